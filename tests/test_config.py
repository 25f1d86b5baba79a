"""Config validation: a wrong key or type fails before any job, naming the key and the fix."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
from conftest import REPO, snakemake

from workflow.config import (
    USUAL_CHECKPOINTS_PER_RUN,
    ConfigError,
    explain_schema_errors,
    load_config_file,
    unusual_cost,
    validate_config,
)
from workflow.runs import count_parameters, ffn_hidden_size, size_parameters, trained_runs


def test_default_and_tiny_configs_are_valid(default_config, tiny_config):
    for config in (default_config, tiny_config):
        validate_config(config)
        assert config["train"]["z_loss"] == 1e-4  # set by neither: the schema's default


def test_misspelt_key_names_the_key_and_the_allowed_keys(default_config):
    default_config["sizes"]["xs"]["learning_rate"] = default_config["sizes"]["xs"].pop("lr")
    message = explain_schema_errors(default_config)
    assert "sizes.xs" in message
    assert "learning_rate" in message
    assert "'lr'" in message and "'warmup'" in message


def test_wrong_type_and_enum_are_named(default_config):
    default_config["sizes"]["s"]["n_layers"] = "four"
    default_config["datasets"]["wiki_en"]["source"]["corpus"] = "wikipedia"
    message = explain_schema_errors(default_config)
    assert "sizes.s.n_layers" in message and "integer" in message
    assert "datasets.wiki_en.source.corpus" in message and "docs_en" in message


@pytest.mark.parametrize(
    ("source", "filled"),
    [
        ({"kind": "files", "paths": ["docs/*.txt"]}, {"text_field": "text"}),
        (
            {"kind": "hub", "path": "allenai/c4", "name": "en"},
            {"split": "train", "text_field": "text", "max_documents": None, "data_files": None},
        ),
    ],
)
def test_each_source_kind_gets_only_its_own_defaults(default_config, source, filled):
    """Defaults of one kind (offline's ``pinned``) must not leak into a source of another."""
    default_config["datasets"]["docs_en"]["source"] = dict(source)
    validate_config(default_config)
    assert default_config["datasets"]["docs_en"]["source"] == {**source, **filled}


def test_a_key_of_another_source_kind_is_named(default_config):
    default_config["datasets"]["docs_en"]["source"] = {"kind": "hub", "path": "x", "corpus": "y"}
    message = explain_schema_errors(default_config)
    assert "datasets.docs_en.source" in message and "corpus" in message and "'path'" in message


def test_snakemake_fails_before_any_job_with_the_key(tmp_path, default_config):
    default_config["train"]["chekpoints"] = 3
    result = snakemake("-n", config=default_config, workdir=tmp_path, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "chekpoints" in output and "checkpoints" in output
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["grid"]["docs_en"].update(huge=[20]), "grid.docs_en.huge: unknown size"),
        (lambda c: c["sizes"]["xs"].update(n_heads=3), "divisible by n_heads"),
        (lambda c: c["fit"]["loss"]["points"].update(xs=[40]), "fit.loss.points.xs"),
        (lambda c: c["validation"]["sets"].append("nope"), "validation.sets"),
        (lambda c: c.update(cluster={"gpus": {"xxl": 8}}), "cluster.gpus.xxl: unknown size"),
        (lambda c: c.update(cluster={"gpus": {"xs": 3}}), "sizes.xs.batch_size: 32 .* = 3"),
        (lambda c: c["fit"]["error"].update(loss_eval="c4"), "fit.error.loss_eval: 'c4'"),
        (
            lambda c: c["fit"]["loss"]["points"].update(xxs=[20]),
            r"fit\.loss\.points\.xxs: unknown size; allowed: \['l', 'm', 's', 'xl', 'xs'\]",
        ),
        (
            lambda c: c["sizes"]["l"].update(context_length=1_000_000),
            r"sizes\.l\.context_length: 1000000 is above validation\.max_tokens \(32768\)",
        ),
        (
            lambda c: c["sizes"]["xs"].update(warmup=100_000),
            r"sizes\.xs\.warmup: 100000 steps, but the longest run of xs, docs_en/xs/M160",
        ),
        (lambda c: c.update(released_dir="x", results_table="y.csv"), "both set"),
    ],
)
def test_semantic_errors_name_the_key(default_config, edit, expected):
    edit(default_config)
    with pytest.raises(ConfigError, match=expected):
        validate_config(default_config)


def test_parameter_count_matches_the_paper():
    """0.011B: d 96, 8 layers, vocab 50432 has 10,569,312 parameters; M = 20 gives 211,386,240."""
    n_params = count_parameters(96, 8, 50432, ffn_hidden_size(96, 256))
    assert n_params == 10_569_312
    assert 20 * n_params == 211_386_240


def test_every_run_trains_exactly_m_times_n_tokens(default_config):
    for run in trained_runs(validate_config(default_config)):
        assert run.tokens == round(run.multiplier * run.n_params)
        assert (run.steps - 1) * run.tokens_per_step < run.tokens <= run.steps * run.tokens_per_step


def test_released_preset_without_its_directory_names_released_dir(tmp_path):
    from conftest import load_config

    preset = load_config("presets/paper-released.yaml")
    preset["released_dir"] = None
    with pytest.raises(ConfigError, match="released_dir"):
        validate_config(preset)


def test_a_number_yaml_reads_as_a_string_says_how_to_write_it(default_config):
    default_config["sizes"]["xs"]["lr"] = "1e-3"  # what YAML 1.1 makes of `lr: 1e-3`
    with pytest.raises(ConfigError, match=r"sizes\.xs\.lr: '1e-3' .* write .* e\.g\. 1\.0e-3"):
        validate_config(default_config)


def test_an_unusual_cost_is_said_before_anything_runs(tmp_path, default_config):
    assert unusual_cost(validate_config(copy.deepcopy(default_config))) is None
    many = copy.deepcopy(default_config)
    many["train"]["checkpoints"] = 100_000
    # every step of every run is a checkpoint (10,653 of them); downstream evaluates the 8 final
    assert "10,661 evaluation jobs of 10,653 checkpoints" in unusual_cost(validate_config(many))
    default_config["train"]["checkpoints"] = USUAL_CHECKPOINTS_PER_RUN + 1
    default_config["downstream"] = {"suite": "none"}
    result = snakemake("-n", config=default_config, workdir=tmp_path)
    assert re.search(
        r"note: this config plans 8 training runs .* [0-9,]+ evaluation jobs", result.stderr
    )


def test_parsing_the_workflow_imports_no_heavy_library():
    """Snakemake imports the modules rules/common.smk names while it plans; none of them may
    pull in scipy, pyarrow, pandas or torch."""
    common = (REPO / "rules" / "common.smk").read_text()
    modules = sorted(set(re.findall(r"^from (workflow[.\w]*) import", common, re.MULTILINE)))
    assert "workflow.config" in modules and "workflow.settings" in modules
    code = (
        f"import sys, {', '.join(modules)}; "
        "print(sorted({'scipy', 'pyarrow', 'pandas', 'torch'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_yaml_syntax_error_names_the_line_and_column(tmp_path):
    """Snakemake's own message for a broken --configfile names no line; ours does."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("results_dir: results\ngrid:\n  docs_en:\n    xs: [20, 80\n  s: [20]\n")
    with pytest.raises(ConfigError, match=r"line 4, column 9.*line 5, column 4"):
        load_config_file(broken)
    result = subprocess.run(
        [sys.executable, "-m", "workflow.config", str(broken)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert f"{broken}: YAML syntax error" in result.stderr
    tabbed = tmp_path / "tabbed.yaml"
    tabbed.write_text("results_dir: results\n\tgrid: {}\n")
    with pytest.raises(ConfigError, match=r"'\\t'.*line 2, column 1"):
        load_config_file(tabbed)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match="a config is a mapping"):
        load_config_file(listed)


def test_config_check_command_reports_what_a_valid_config_trains():
    result = subprocess.run(
        [sys.executable, "-m", "workflow.config", "config.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    runs = trained_runs(validate_config(load_config_file(REPO / "config.yaml")))
    assert result.stdout.startswith(f"config.yaml: valid; {len(runs)} runs to train")


def test_the_defaults_warmup_lasts_about_twice_as_many_tokens_as_the_model_has_parameters(
    default_config,
):
    """config.yaml's rule (after Porian et al. 2024): warmup = ceil(2N / tokens per step)
    steps, so a size added or reshaped without its warmup is caught."""
    config = validate_config(default_config)
    for size, settings in config["sizes"].items():
        tokens_per_step = settings["batch_size"] * settings["context_length"]
        expected = -(-2 * size_parameters(config, size) // tokens_per_step)
        assert settings["warmup"] == expected, (size, settings["warmup"], expected)
