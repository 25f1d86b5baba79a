"""The scaling-law laboratory: the Python code behind the Snakemake rules.

Stages (each with a ``main()`` that a rule calls as ``python -m workflow.<stage>``, and plain
functions that tests call without Snakemake): ``prepare`` (corpus), ``tokenization``,
``train`` (and ``trunk``, a size's shared trunk under the warmup-stable-decay schedule),
``evaluate`` (validation loss), ``suite`` and ``downstream`` (lm-eval tasks and
their evaluation), ``aggregate``, ``released`` and ``ingest`` (results from elsewhere in place
of our runs), ``fit``, and the report's ``plots``, ``targets`` and ``curves``; plus ``plan``,
``resources`` and ``learn_calibration`` (commands a user runs); and ``calibration_view``, a
report figure.

What they share, by job:
- configuration: ``config`` (validation and checks), ``settings`` (typed settings of each
  stage), ``runs`` (the run list), ``paths`` (every file name);
- data and model: ``sources``, ``tasks``, ``shards``, ``model``;
- training: ``step`` (one optimizer step), ``loop`` (the step loop runs and trunks share),
  ``resume``, ``telemetry``, ``device``, ``distributed``, ``integrity``;
- fitting: ``laws`` (pure functions), ``solvers`` (numerical methods), ``routines`` (how a
  form is fitted), ``forms`` (the registry of law forms), ``bootstrap``, ``ladder`` (one
  dataset's measurements and fits), ``sanity``, ``predict``, ``calibration`` (the intervals);
- output: ``tables`` (every Parquet schema and writer), ``atomic``, ``intervals``, ``errors``.
"""
