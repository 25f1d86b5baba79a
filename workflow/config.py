"""Validate a config against the JSON Schema, fill its defaults, and explain what is wrong.

``python -m workflow.config FILE`` checks a config file as the pipeline would, before any job:
Snakemake reads a ``--configfile`` itself, and its message for a YAML syntax error names no line,
so this names the file, line and column as well as every schema or cross-reference problem.

snakemake.utils.validate checks the schema and fills defaults, but its message for a
misspelt key ("Additional properties are not allowed") does not say which keys are; a user
fixing a config wants both, before any job starts. So on failure we re-run the validator
ourselves and describe each violation by its key path and what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jsonschema
import yaml

from workflow.runs import trained_runs


class ConfigError(ValueError):
    """A config the pipeline cannot run; the message names the key, the value and what is
    allowed."""


SCHEMA_PATH = Path(__file__).with_name("schemas") / "config.schema.yaml"


def _location(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def _reads_as_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _describe(error: jsonschema.ValidationError) -> str:
    where = _location(error.absolute_path)
    schema = error.schema
    if error.validator == "additionalProperties" and isinstance(schema, dict):
        allowed = sorted(schema.get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        return f"{where}: unknown key(s) {unexpected}; allowed keys: {allowed}"
    if error.validator == "enum":
        return (
            f"{where}: {error.instance!r} is not allowed; allowed values: {error.validator_value}"
        )
    if error.validator == "type":
        expected = error.validator_value
        message = f"{where}: {error.instance!r} has the wrong type; expected {expected}"
        if "number" in str(expected) and _reads_as_number(error.instance):
            message += (
                f" (YAML reads {error.instance} as a string: write the mantissa with a decimal "
                "point and the exponent with a sign, e.g. 1.0e-3)"
            )
        return message
    if error.validator == "required":
        hint = ""
        if "then" in error.schema_path:  # required only when the runs are trained here
            hint = (
                " (or give results instead: results_table: PATH to a CSV or Parquet table, or "
                "released_dir: PATH/TO/exp_data)"
            )
        return f"{where}: {error.message}{hint}"
    if error.validator == "oneOf" and error.context:
        deepest = max(error.context, key=lambda sub: len(sub.absolute_path))
        return (
            _describe(deepest)
            if deepest.absolute_path != error.absolute_path
            else (f"{where}: matches none of the allowed forms: {error.message}")
        )
    return f"{where}: {error.message}"


def explain_schema_errors(config: dict, schema_path: str | Path = SCHEMA_PATH) -> str:
    """One line per violation of the schema, each naming the key and what is allowed."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda error: list(error.absolute_path))
    lines = [_describe(error) for error in errors]
    return "invalid config:\n  " + "\n  ".join(lines) if lines else "invalid config"


def validate_config(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Check ``config`` in place (schema, then cross-references), filling schema defaults.

    Raises ConfigError with one line per problem, each naming the key.
    """
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(schema_path))
    except WorkflowError as error:
        raise ConfigError(explain_schema_errors(config, schema_path)) from error
    if config["released_dir"] and config["results_table"]:
        raise ConfigError(
            f"released_dir ({config['released_dir']!r}) and results_table "
            f"({config['results_table']!r}) are both set; give one source of results"
        )
    if config["results_table"]:
        check_results_table(config)
    elif not config["released_dir"]:
        check_config(config)
    return config


def check_results_table(config: dict) -> None:
    """A results table exists, and the error law's x is named; its contents are checked by
    the ingest stage (workflow.ingest), the first job."""
    table = Path(config["results_table"])
    if not table.is_file():
        raise ConfigError(f"results_table: {str(table)!r} is not a file")
    if table.suffix.lower() not in (".csv", ".tsv", ".parquet"):
        raise ConfigError(
            f"results_table: {str(table)!r} has suffix {table.suffix!r}; allowed: .csv, .tsv, "
            ".parquet"
        )
    if config["columns"] is None and not config["fit"]["error"]["loss_eval"]:
        raise ConfigError(
            "fit.error.loss_eval: required with a long-layout results_table: the loss the "
            "error law is fitted on and the figures show (one of the table's loss evals)"
        )
    if config["fit"]["predict"]:
        raise ConfigError(
            "fit.predict: names sizes of the config's `sizes`, which a results table has not; "
            "every run of the table that is not a fit point is a target"
        )


def check_config(config: dict) -> None:
    """Checks the JSON Schema cannot express; raises ConfigError naming the key."""
    sizes = config["sizes"]
    datasets = config["datasets"]
    for name, spec in sizes.items():
        if spec["d_model"] % spec["n_heads"]:
            raise ConfigError(
                f"sizes.{name}: d_model ({spec['d_model']}) must be divisible by "
                f"n_heads ({spec['n_heads']})"
            )
        if (spec["d_model"] // spec["n_heads"]) % 2:
            raise ConfigError(f"sizes.{name}: the head width d_model/n_heads must be even (RoPE)")
    for dataset, grid in config["grid"].items():
        if dataset not in datasets:
            raise ConfigError(
                f"grid.{dataset}: unknown dataset; allowed: {sorted(datasets)} (keys of 'datasets')"
            )
        for size in grid:
            if size not in sizes:
                raise ConfigError(
                    f"grid.{dataset}.{size}: unknown size; "
                    f"allowed: {sorted(sizes)} (keys of 'sizes')"
                )
    for name in config["validation"]["sets"]:
        if name not in datasets:
            raise ConfigError(
                f"validation.sets: unknown dataset {name!r}; allowed: {sorted(datasets)}"
            )
    runs = trained_runs(config)
    _check_steps(config, runs)
    trained = {(run.size, run.multiplier) for run in runs}
    for law in ("loss", "error"):
        for size, multipliers in config["fit"][law]["points"].items():
            if size not in sizes:
                raise ConfigError(
                    f"fit.{law}.points.{size}: unknown size; allowed: {sorted(sizes)} "
                    "(keys of 'sizes')"
                )
            for multiplier in multipliers:
                if (size, float(multiplier)) not in trained:
                    raise ConfigError(
                        f"fit.{law}.points.{size}: M={multiplier} is not trained in 'grid'; "
                        f"trained runs: {sorted(trained)}"
                    )
    loss_eval = config["fit"]["error"]["loss_eval"]
    validation_sets = config["validation"]["sets"]
    if loss_eval and loss_eval not in validation_sets:
        raise ConfigError(
            f"fit.error.loss_eval: {loss_eval!r} is not a validation set; "
            f"allowed: {validation_sets} (validation.sets)"
        )
    by_size = {
        "fit.predict": config["fit"]["predict"],
        "cluster.tokens_per_second": config["cluster"]["tokens_per_second"],
        "cluster.gpus": config["cluster"]["gpus"],
    }
    for key, mapping in by_size.items():
        for size in mapping:
            if size not in sizes:
                raise ConfigError(f"{key}.{size}: unknown size; allowed: {sorted(sizes)}")
    for size, gpus in config["cluster"]["gpus"].items():
        batch_size = sizes[size]["batch_size"]
        if config["train"]["device"] != "cpu" and batch_size % gpus:
            raise ConfigError(
                f"sizes.{size}.batch_size: {batch_size} sequences do not split evenly over "
                f"cluster.gpus.{size} = {gpus} processes; use a multiple of {gpus}"
            )
    downstream = config["downstream"]
    if downstream["suite"] == "offline" and not downstream["tasks"]:
        raise ConfigError(
            "downstream.tasks: the offline suite needs at least one task, "
            "e.g. {word_order: {builder: word_order, source: <dataset>}}"
        )
    for name, task in downstream["tasks"].items():
        if task["source"] not in datasets:
            raise ConfigError(
                f"downstream.tasks.{name}.source: unknown dataset {task['source']!r}; "
                f"allowed: {sorted(datasets)}"
            )
    trainer = config["tokenizer"].get("train_on")
    if trainer is not None and trainer not in datasets:
        raise ConfigError(
            f"tokenizer.train_on: unknown dataset {trainer!r}; allowed: {sorted(datasets)}"
        )


def _check_steps(config: dict, runs: list) -> None:
    """Every sequence fits the validation budget, and some run of every size gets past half
    its warmup."""
    max_tokens = config["validation"]["max_tokens"]
    for name, spec in config["sizes"].items():
        if spec["context_length"] > max_tokens:
            raise ConfigError(
                f"sizes.{name}.context_length: {spec['context_length']} is above "
                f"validation.max_tokens ({max_tokens}): a checkpoint's loss is measured on at "
                "most max_tokens tokens of each validation set, which must hold one sequence; "
                "raise validation.max_tokens or lower context_length"
            )
    longest: dict[str, object] = {}
    for run in runs:
        if run.size not in longest or run.steps > longest[run.size].steps:
            longest[run.size] = run
    for size, run in longest.items():
        spec = config["sizes"][size]
        if 2 * run.steps <= spec["warmup"]:
            raise ConfigError(
                f"sizes.{size}.warmup: {spec['warmup']} steps, but the longest run of {size}, "
                f"{run.key}, trains {run.steps} steps ({run.tokens:,} tokens at "
                f"{spec['batch_size']} x {spec['context_length']} tokens per step): no run of "
                "this size would get past half its peak learning rate (the paper's shortest "
                "runs end inside their warmup, but near its end); lower warmup, batch_size or "
                "context_length, or raise M"
            )


# Above these, `snakemake -n` says what the config asks for before anyone runs it.
USUAL_EVALUATIONS = 1000
USUAL_CHECKPOINTS_PER_RUN = 50


def unusual_cost(config: dict) -> str | None:
    """A note on what a training config costs, when it asks for far more jobs than usual."""
    if config["released_dir"] or config["results_table"]:
        return None
    runs = trained_runs(config)
    checkpoints = sum(len(run.checkpoint_steps) for run in runs)
    downstream = config["downstream"]
    downstream_jobs = 0
    if downstream["suite"] != "none":
        downstream_jobs = checkpoints if downstream["checkpoints"] == "all" else len(runs)
    evaluations = checkpoints + downstream_jobs
    most = max(len(run.checkpoint_steps) for run in runs)
    if evaluations <= USUAL_EVALUATIONS and most <= USUAL_CHECKPOINTS_PER_RUN:
        return None
    return (
        f"note: this config plans {len(runs)} training runs ({sum(run.tokens for run in runs):,} "
        f"tokens in all) and {evaluations:,} evaluation jobs of {checkpoints:,} checkpoints (up "
        f"to {most} per run from train.checkpoints = {config['train']['checkpoints']})"
    )


def load_config_file(path: str | Path) -> dict:
    """A config file's keys; a YAML syntax error names the file, the line and the column."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read: {error.strerror}") from error
    except yaml.MarkedYAMLError as error:
        parts = [
            f"{text} (line {mark.line + 1}, column {mark.column + 1})"
            for text, mark in (
                (error.context, error.context_mark),
                (error.problem, error.problem_mark),
            )
            if text and mark
        ]
        raise ConfigError(f"{path}: YAML syntax error: {'; '.join(parts)}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML syntax error: {error}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: holds a {type(loaded).__name__}; a config is a mapping of keys "
            "(results_dir, datasets, sizes, grid, ...)"
        )
    return loaded


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Check a config file (given to snakemake with --configfile, which replaces "
        "config.yaml) as the pipeline would before any job: YAML syntax with its line, the "
        "schema and the cross-checks."
    )
    parser.add_argument("configfile", help="the YAML or JSON config file")
    args = parser.parse_args(argv)
    try:
        config = validate_config(load_config_file(args.configfile))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(1)
    if config["released_dir"] or config["results_table"]:
        print(f"{args.configfile}: valid; fits results measured elsewhere, trains nothing")
        return
    runs = trained_runs(config)
    print(
        f"{args.configfile}: valid; {len(runs)} runs to train, "
        f"{sum(run.tokens for run in runs):,} tokens in all"
    )
    if note := unusual_cost(config):
        print(note)


if __name__ == "__main__":
    main()
