"""The scaling-law laboratory: the Python code behind the Snakemake rules.

One module per pipeline stage: ``prepare`` (corpus), ``tokenization``, ``train``, ``evaluate``
(validation loss), ``suite`` and ``downstream`` (lm-eval tasks and their evaluation),
``aggregate``, ``released`` (the paper's testbed in place of our runs), ``fit``, and the
report's ``plots``, ``targets`` and ``curves``; plus ``plan`` and ``resources`` (commands a
user runs). The pieces they share: ``model``, ``distributed``, ``shards``, ``sources``,
``tasks``, ``runs``, ``config``, ``tables``, ``atomic`` and ``laws``. Every stage has a
``main()`` that a rule calls with ``python -m workflow.<stage>`` and plain functions that the
tests call without Snakemake.
"""
