"""The scaling-law laboratory: the Python code behind the Snakemake rules.

One module per pipeline stage (``prepare``, ``tokenization``, ``train``, ``evaluate``,
``aggregate``, ``fit``), plus the pieces they share (``model``, ``shards``, ``runs``,
``laws``). Every stage has a ``main()`` that a rule calls with ``python -m workflow.<stage>``
and plain functions that the tests call without Snakemake.
"""
