"""The scaling-law laboratory: the Python code behind the Snakemake rules.

Stages (each with a ``main()`` that a rule calls as ``python -m workflow.<stage>``, and plain
functions that tests call without Snakemake): ``prepare`` (corpus), ``tokenization``,
``train``, ``evaluate`` (validation loss), ``suite`` and ``downstream`` (lm-eval tasks and
their evaluation), ``aggregate``, ``released`` and ``ingest`` (results from elsewhere in place
of our runs), ``fit``, and the report's ``plots``, ``targets`` and ``curves``; plus ``plan``
and ``resources`` (commands a user runs).

What they share, by job:
- configuration: ``config`` (validation and checks), ``settings`` (typed settings of each
  stage), ``runs`` (the run list), ``paths`` (every file name);
- data and model: ``sources``, ``tasks``, ``shards``, ``model``;
- training: ``step`` (one optimizer step), ``resume``, ``telemetry``, ``device``,
  ``distributed``;
- fitting: ``laws`` (pure functions), ``solvers`` (numerical methods), ``routines`` (how a
  form is fitted), ``forms`` (the registry of law forms), ``bootstrap``, ``ladder`` (one
  dataset's measurements and fits), ``predict``;
- output: ``tables`` (every Parquet schema and writer), ``atomic``, ``intervals``, ``errors``.
"""
