"""Validate a config against the JSON Schema, fill its defaults, and explain what is wrong.

snakemake.utils.validate checks the schema and fills defaults, but its message for a
misspelt key ("Additional properties are not allowed") does not say which keys are; a user
fixing a config wants both, before any job starts. So on failure we re-run the validator
ourselves and describe each violation by its key path and what is allowed.
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from workflow.runs import ConfigError, check_config

SCHEMA_PATH = Path(__file__).with_name("schemas") / "config.schema.yaml"


def _location(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


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
        return f"{where}: {error.instance!r} has the wrong type; expected {error.validator_value}"
    if error.validator == "required":
        hint = ""
        if "then" in error.schema_path:  # required only when released_dir is not set
            hint = " (or set released_dir, e.g. --config released_dir=PATH/TO/exp_data)"
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
    if not config["released_dir"]:
        check_config(config)
    return config
