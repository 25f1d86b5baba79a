"""The whole DAG for real on the tiny config: prepare -> tokenize -> train -> evaluate (loss,
and downstream through lm-eval) -> aggregate -> fit, then the two re-run guarantees (nothing
to do; one size changed)."""

from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest
from conftest import snakemake

from workflow.forms import chain_labels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete `snakemake --cores 2` of the tiny config, shared by the tests below."""
    from conftest import load_config

    workdir = tmp_path_factory.mktemp("pipeline")
    config = copy.deepcopy(load_config("tests/configs/tiny.yaml"))
    config["results_dir"] = "results"
    snakemake("--cores", "2", config=config, workdir=workdir)
    return workdir, config


def planned_jobs(result) -> dict[str, int]:
    """Job counts per rule from a dry run's summary table."""
    table = re.search(r"Job stats:\n(.*?)\n\n", result.stdout, re.S)
    if table is None:
        return {}
    counts = {}
    for line in table.group(1).splitlines()[2:]:
        name, count = line.split()
        if name != "total":
            counts[name] = int(count)
    return counts


def test_outputs_have_the_documented_schema(finished_run):
    workdir, config = finished_run
    results = workdir / "results"
    runs = pd.read_parquet(results / "runs.parquet")
    assert set(runs["metric"]) == {"loss", "accuracy", "error"}
    evals = runs.groupby("metric")["eval"].agg(set)
    assert evals["loss"] == set(config["validation"]["sets"])
    assert evals["accuracy"] == set(config["downstream"]["tasks"])
    assert evals["error"] == {"offline"}
    assert runs["N"].dtype == "int64" and runs["D"].dtype == "int64"
    assert (runs["ci_low"] <= runs["value"]).all() and (runs["value"] <= runs["ci_high"]).all()
    assert runs["diverged"].notna().all()  # every row carries its run's train.json
    diverged = {
        json.loads(summary.read_text())["run"]: json.loads(summary.read_text())["diverged"]
        for summary in (results / "runs").glob("*/*/*/train.json")
    }
    for (dataset, size, multiplier), rows in runs.groupby(["dataset", "size", "M"]):
        assert set(rows["diverged"]) == {diverged[f"{dataset}/{size}/M{multiplier:g}"]}
    n_runs = sum(len(ms) for sizes in config["grid"].values() for ms in sizes.values())
    assert runs.loc[runs["final"], ["size", "M"]].drop_duplicates().shape[0] == n_runs
    downstream = runs[runs["metric"] != "loss"]
    assert downstream["final"].all() and len(downstream) == n_runs * 4  # 3 tasks + average
    assert downstream["value"].between(0, 1).all()
    assert (downstream[downstream["metric"] == "accuracy"]["n_examples"] == 100).all()

    predictions = pd.read_parquet(results / "predictions.parquet")
    assert {
        "dataset",
        "N",
        "M",
        "D",
        "C",
        "quantity",
        "eval",
        "role",
        "predicted",
        "actual",
        "relative_error",
        "ci_low",
        "ci_high",
        "form",
    } <= set(predictions.columns)
    assert predictions["C"].dtype == "float64"
    untrained = predictions[predictions["size"] == "xl"]
    assert len(untrained) and untrained["actual"].isna().all()
    targets = predictions[(predictions["role"] == "target") & predictions["actual"].notna()]
    assert len(targets)
    assert (predictions["ci_low"] <= predictions["ci_high"]).all()
    # The error law on our own runs: every target's error predicted from its predicted loss.
    errors = targets[targets["quantity"] == "error"]
    assert set(errors["eval"]) == {"offline"} and set(errors["form"]) == set(chain_labels("error"))
    assert errors["relative_error"].notna().all() and errors["ci_low"].notna().all()
    step = runs.loc[runs["final"] & (runs["size"] == "xs") & (runs["M"] == 20), "step"].iloc[0]
    checkpoint = results / "eval" / "wiki_en" / "xs" / "M20" / f"step{step:06d}"
    lm_eval_results = json.loads((checkpoint / "lm-eval-offline.json").read_text())
    assert set(lm_eval_results["0"]["results"]) == set(config["downstream"]["tasks"])
    summary = json.loads((checkpoint / "downstream-offline.json").read_text())
    assert summary["tasks"]["last_word"]["metric"] == "acc_mutual_info"

    fits = pd.read_parquet(results / "fits.parquet")
    paper = fits[(fits["form"] == "paper") & (fits["law"] == "loss")]
    assert set(paper["param"]) == {"E", "a", "b", "eta"}
    assert (results / "plots" / "scaling.png").stat().st_size > 10_000


def test_the_report_is_one_self_contained_page_with_every_figure(finished_run):
    workdir, config = finished_run
    for figure in ("scaling.png", "curves.png", "targets.html", "calibration.png"):
        assert (workdir / "results" / "plots" / figure).stat().st_size > 1000
    snakemake("--report", "report.html", config=config, workdir=workdir)
    page = (workdir / "report.html").read_text()
    # The figures and the table are embedded as data URIs, not linked to files beside the page.
    for embedded in (
        "image/png;charset=utf8;filename=scaling.png",
        "image/png;charset=utf8;filename=curves.png",
        "text/html;charset=utf8;filename=targets.html",
        "image/png;charset=utf8;filename=calibration.png",
    ):
        assert f"data:{embedded};base64," in page
    assert "Training curves of every trained run" in page  # a caption, rendered


def test_second_run_finds_nothing_to_do(finished_run):
    workdir, config = finished_run
    result = snakemake("-n", config=config, workdir=workdir)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_engine_settings_rerun_nothing(finished_run):
    """Speed, memory and resume-state settings leave every result alone, so changing them must
    not retrain finished runs."""
    workdir, config = finished_run
    changed = copy.deepcopy(config)
    changed["train"].update(compile=True, peak_tflops=1.0, resume_every=7)
    changed["sizes"]["m"]["activation_checkpointing"] = True
    result = snakemake("-n", config=changed, workdir=workdir)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_one_size_reruns_only_its_runs(finished_run):
    workdir, config = finished_run
    changed = {**config, "sizes": {**config["sizes"]}}
    changed["sizes"]["m"] = {**config["sizes"]["m"], "lr": config["sizes"]["m"]["lr"] * 0.5}
    result = snakemake("-n", config=changed, workdir=workdir)
    jobs = planned_jobs(result)
    n_m_runs = len(config["grid"]["wiki_en"]["m"])
    assert jobs.get("train") == n_m_runs
    assert jobs.get("evaluate_loss") == n_m_runs * config["train"]["checkpoints"]
    assert jobs.get("evaluate_downstream") == n_m_runs  # downstream.checkpoints: final
    assert "build_suite" not in jobs
    assert jobs.get("aggregate") == 1 and jobs.get("fit") == 1
    assert re.findall(r"wiki_en/(\w+)/M", result.stdout) and all(
        size == "m"
        for size in re.findall(r"output: \S*runs/wiki_en/(\w+)/M[\d.]+/checkpoints", result.stdout)
    )


def test_a_deleted_checkpoint_folder_is_retrained(finished_run):
    """The checkpoints are a run's most valuable output: the next `snakemake` retrains a run
    whose folder is gone instead of finding nothing to do."""
    workdir, config = finished_run
    checkpoints = workdir / "results" / "runs" / "wiki_en" / "s" / "M20" / "checkpoints"
    aside = checkpoints.with_name("checkpoints-aside")
    checkpoints.rename(aside)
    try:
        result = snakemake("-n", config=config, workdir=workdir)
    finally:
        aside.rename(checkpoints)
    assert planned_jobs(result).get("train") == 1
    assert "runs/wiki_en/s/M20/checkpoints" in result.stdout
