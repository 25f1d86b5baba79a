"""The downstream suite's files, its summary and its rows in runs.parquet, and the paper
suite's task names in lm-eval's registry (offline: the registry is lm-eval's own YAML files)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from conftest import snakemake
from test_tasks import make_documents

from workflow.aggregate import aggregate, summary_rows
from workflow.downstream import Z_95, summarize
from workflow.runs import format_multiplier
from workflow.suite import MANIFEST, PAPER17, SuiteError, build_suite, paper_suite, read_manifest

RUN = {
    "dataset": "docs_en",
    "size": "xs",
    "N": 39504,
    "M": 20.0,
    "D": 790080,
    "step": 193,
    "tokens": 790080,
    "final": True,
}


@pytest.fixture
def offline_suite(tmp_path):
    """A two-task offline suite built from synthetic held-out documents."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": text}) + "\n" for text in make_documents()))
    settings = {
        "suite": "offline",
        "tasks": {
            "order": {"builder": "word_order", "source": "docs"},
            "last": {"builder": "last_word", "source": "docs"},
        },
        "sources": {"docs": str(val)},
        "examples": 30,
        "seed": 0,
    }
    return build_suite(settings, tmp_path / "suite"), tmp_path / "suite", settings


def test_offline_suite_writes_lm_eval_task_files(offline_suite):
    manifest, suite_dir, _ = offline_suite
    assert manifest["include_path"] == str(suite_dir.resolve())
    assert [task["name"] for task in manifest["tasks"]] == ["order", "last"]
    for task in manifest["tasks"]:
        config = yaml.safe_load((suite_dir / f"{task['name']}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert config["dataset_path"] == "json" and data_file == task["data_file"]
        assert data_file.startswith("/")  # lm-eval resolves a relative path against the cwd
        assert config["output_type"] == "multiple_choice"
        assert task["metric"] in [metric["metric"] for metric in config["metric_list"]]
        assert len((suite_dir / f"{task['name']}.jsonl").read_text().splitlines()) == 30
        assert task["n_examples"] == 30 and task["chance"] == 0.25
    assert [p.name for p in suite_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_the_same_settings_build_the_same_suite(offline_suite, tmp_path):
    _, suite_dir, settings = offline_suite
    build_suite(settings, tmp_path / "again")
    for task in ("order", "last"):
        assert (suite_dir / f"{task}.jsonl").read_bytes() == (
            tmp_path / "again" / f"{task}.jsonl"
        ).read_bytes()


def test_too_few_items_name_the_task_and_the_fix(offline_suite, tmp_path):
    _, _, settings = offline_suite
    with pytest.raises(SuiteError, match=r"task order: .*fewer than downstream.examples"):
        build_suite({**settings, "examples": 100_000}, tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_a_missing_task_file_names_the_file_and_its_rule(offline_suite):
    _, suite_dir, _ = offline_suite
    (suite_dir / "last.jsonl").unlink()
    with pytest.raises(SuiteError, match=r"last\.jsonl of task last .*made by rule build_suite"):
        read_manifest(suite_dir)
    (suite_dir / "order.yaml").unlink()
    with pytest.raises(SuiteError, match=r"order\.yaml of task order .*made by rule build_suite"):
        read_manifest(suite_dir)
    (suite_dir / MANIFEST).unlink()
    with pytest.raises(SuiteError, match=r"suite\.json is missing; it is made by rule build_suite"):
        read_manifest(suite_dir)


def lm_eval_results(accuracies: dict[str, tuple[str, float, float]], shots: int) -> dict:
    """The parts of lm-eval's results that the summary reads, shaped as simple_evaluate's."""
    return {
        "results": {
            task: {f"{metric},none": value, f"{metric}_stderr,none": stderr}
            for task, (metric, value, stderr) in accuracies.items()
        },
        "n-shot": {task: shots for task in accuracies},
        "n-samples": {task: {"original": 300, "effective": 300} for task in accuracies},
    }


def test_summary_reads_each_tasks_metric_and_averages_the_error(offline_suite):
    _, suite_dir, _ = offline_suite
    _, task_specs = read_manifest(suite_dir)
    results = lm_eval_results(
        {"order": ("acc", 0.9, 0.02), "last": ("acc_mutual_info", 0.4, 0.03)}, shots=0
    )
    results["results"]["last"]["acc,none"] = 0.1  # not the metric the task is read by
    summary = summarize("offline", task_specs, {0: results})
    assert summary["tasks"]["order"]["accuracy"] == 0.9
    assert summary["tasks"]["last"]["accuracy"] == 0.4
    assert summary["tasks"]["last"]["metric"] == "acc_mutual_info"
    assert summary["tasks"]["order"]["n_shot"] == 0
    assert summary["tasks"]["order"]["n_examples"] == 300
    assert summary["average_error"] == pytest.approx((0.1 + 0.6) / 2)
    assert summary["average_error_stderr"] == pytest.approx((0.02**2 + 0.03**2) ** 0.5 / 2)
    low, high = summary["tasks"]["order"]["interval"]
    assert (low, high) == pytest.approx((0.9 - Z_95 * 0.02, 0.9 + Z_95 * 0.02))


def test_paper_tasks_are_read_at_their_own_shot_counts():
    task_specs = [task for task in paper_suite() if task.lm_eval_task == "hellaswag"]
    assert sorted(task.shots for task in task_specs) == [0, 10]
    results = {
        0: lm_eval_results({"hellaswag": ("acc_norm", 0.3, 0.01)}, shots=0),
        10: lm_eval_results({"hellaswag": ("acc_norm", 0.5, 0.01)}, shots=10),
    }
    summary = summarize("paper17", task_specs, results)
    assert summary["tasks"]["hellaswag_0shot"]["accuracy"] == 0.3
    assert summary["tasks"]["hellaswag_10shot"]["accuracy"] == 0.5
    assert summary["tasks"]["hellaswag_10shot"]["n_shot"] == 10


def test_aggregate_adds_task_accuracies_and_the_suites_error(offline_suite, tmp_path):
    _, suite_dir, _ = offline_suite
    _, task_specs = read_manifest(suite_dir)
    results = lm_eval_results(
        {"order": ("acc", 0.9, 0.02), "last": ("acc_mutual_info", 0.4, 0.03)}, 0
    )
    summary = {**summarize("offline", task_specs, {0: results}), "run": RUN}
    summary_file = tmp_path / "downstream-offline.json"
    summary_file.write_text(json.dumps(summary))
    loss_file = tmp_path / "loss-docs_en.json"
    loss = {**RUN, "metric": "loss", "eval": "docs_en", "value": 5.1}
    loss_file.write_text(json.dumps({**loss, "ci_low": 5.0, "ci_high": 5.2, "n_examples": 64}))

    training_file = tmp_path / "train.json"
    run_key = f"{RUN['dataset']}/{RUN['size']}/M{format_multiplier(RUN['M'])}"
    training_file.write_text(json.dumps({"run": run_key, "diverged": True, "steps": 9}))

    frame = aggregate([loss_file], tmp_path / "runs.parquet", [summary_file], [training_file])
    table = pd.read_parquet(tmp_path / "runs.parquet")
    assert len(frame) == len(table) == 4
    assert table["diverged"].tolist() == [True] * 4  # every row of the run says so
    unknown = aggregate([loss_file], tmp_path / "unknown.parquet", [summary_file])
    assert unknown["diverged"].isna().all()
    accuracy = table[table["metric"] == "accuracy"].set_index("eval")
    assert accuracy.loc["order", "value"] == 0.9 and accuracy.loc["last", "value"] == 0.4
    error = table[table["metric"] == "error"].iloc[0]
    assert error["eval"] == "offline" and error["value"] == pytest.approx(0.35)
    assert error["ci_low"] < 0.35 < error["ci_high"]
    assert error["n_examples"] == 600 and error["N"] == RUN["N"] and error["final"]
    assert summary_rows(summary)[-1]["value"] == error["value"]


def test_every_paper_task_resolves_in_lm_evals_registry():
    """Names only: the registry indexes lm-eval's task YAMLs; no dataset is downloaded."""
    from lm_eval.tasks import TaskManager

    registry = set(TaskManager().all_tasks)
    assert len(PAPER17) == 17
    missing = sorted({task.lm_eval_task for task in PAPER17} - registry)
    assert not missing, f"not in lm-eval's registry: {missing}"
    assert {task.lm_eval_task for task in paper_suite()} <= registry
    assert len(paper_suite()) == 13  # the README's count: CoQA, SQuAD and two BIG-bench left out


def test_the_evaluate_stage_stops_on_a_missing_task_file_before_loading_the_model(
    offline_suite, tmp_path
):
    from workflow.downstream import main

    _, suite_dir, _ = offline_suite
    (suite_dir / "order.jsonl").unlink()
    arguments = ["--checkpoint", str(tmp_path / "no-such-checkpoint"), "--suite", str(suite_dir)]
    arguments += ["--run", json.dumps(RUN), "--summary", str(tmp_path / "summary.json")]
    arguments += ["--batch-size", "8", "--device", "cpu", "--threads", "1"]
    with pytest.raises(SystemExit, match=r"order\.jsonl of task order .*rule build_suite"):
        main([*arguments, "--results", str(tmp_path / "lm-eval.json")])
    assert not (tmp_path / "summary.json").exists()


def test_a_task_on_an_unknown_dataset_or_builder_is_named(default_config):
    from workflow.config import ConfigError, validate_config

    default_config["downstream"]["tasks"]["window_order"]["source"] = "nope"
    with pytest.raises(ConfigError, match=r"downstream\.tasks\.window_order\.source: .*'nope'"):
        validate_config(default_config)
    tasks = default_config["downstream"]["tasks"]
    tasks["window_order"] = {"builder": "cloze", "source": "docs_en"}
    with pytest.raises(ConfigError, match=r"downstream\.tasks\.window_order\.builder: 'cloze'"):
        validate_config(default_config)


def test_without_a_downstream_section_no_suite_runs(default_config, tmp_path):
    from workflow.config import validate_config

    del default_config["downstream"]
    assert validate_config(default_config)["downstream"]["suite"] == "none"
    planned = snakemake("-n", config=default_config, workdir=tmp_path).stdout
    assert "rule train:" in planned and "rule fit:" in planned
    assert "build_suite" not in planned and "evaluate_downstream" not in planned
