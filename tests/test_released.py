"""Ingest of the paper's released testbed (../shared/paper-testbed, never copied here): the
aggregated schema, the names, the 17-task split derived with the paper's rule, and the preset
run end to end with snakemake."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, snakemake

from workflow.released import ReleasedDataError, eval_name, ingest

EXP_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "paper-testbed" / "exp_data"

# The paper's 17-task split: SUBSET in mlfoundations/scaling, scaling/constants.py (commit
# 741b9ef), the tasks of Section 3.4 of arXiv:2403.08540.
PAPER_17_TASKS = [
    "bigbench_operators",
    "pubmed_qa_labeled",
    "hellaswag_zeroshot",
    "boolq",
    "arc_easy",
    "coqa",
    "bigbench_dyck_languages",
    "lambada_openai",
    "bigbench_novel_concepts",
    "winograd",
    "bigbench_cs_algorithms",
    "commonsense_qa",
    "bigbench_qa_wikidata",
    "hellaswag",
    "copa",
    "squad",
    "piqa",
]
LOSS_EVALS = {
    "c4_val",
    "openlm",
    "paloma_c4_en",
    "paloma_redpajama",
    "paloma_falcon-refinedweb",
    "paloma_dolma_100_programing_languages",
    "paloma_ptb",
    "val_de-en_100",
}


def exp_data() -> Path:
    """The released exp_data: skip without ../shared, but fail on CI, where it must be there."""
    if not EXP_DATA.is_dir():
        reason = (
            f"the paper's released testbed is not at {EXP_DATA} (../shared beside the checkout)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return EXP_DATA


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    out = tmp_path_factory.mktemp("released")
    frame = ingest(exp_data(), out / "runs.parquet", out / "error_groups.json")
    return frame, json.loads((out / "error_groups.json").read_text())


def test_every_released_model_is_the_final_checkpoint_of_one_run(ingested):
    frame, _ = ingested
    runs = frame.drop_duplicates(["dataset", "size", "M"])
    assert len(runs) == 104
    assert runs.groupby("dataset").size().to_dict() == {"c4": 34, "redpajama": 35, "refinedweb": 35}
    assert set(runs["size"]) == {"0.011B", "0.079B", "0.154B", "0.411B", "1.4B", "6.9B"}
    assert frame["N"].dtype == "int64" and frame["D"].dtype == "int64"
    np.testing.assert_array_equal(frame["M"], frame["D"] / frame["N"])
    assert frame["final"].all() and frame["step"].isna().all()
    assert (frame["tokens"] == frame["D"]).all()
    sizes = runs.set_index(["dataset", "size", "M"])["N"]
    assert sizes[("redpajama", "6.9B", 20.0)] == 6_889_410_560
    assert ("refinedweb", "1.4B", 320.0) in sizes.index


def test_each_run_has_its_losses_accuracies_and_errors(ingested):
    frame, _ = ingested
    counts = frame.groupby(["dataset", "size", "M", "metric"]).size().unstack()
    assert (counts["loss"] == 8).all() and (counts["accuracy"] == 46).all()
    assert (counts["error"] == 2).all()
    assert set(frame.loc[frame["metric"] == "loss", "eval"]) == LOSS_EVALS
    assert set(frame.loc[frame["metric"] == "error", "eval"]) == {"avg17", "avg46"}


def test_losses_carry_their_sequence_bootstrap_interval(ingested):
    frame, _ = ingested
    loss = frame[frame["metric"] == "loss"]
    assert ((loss["ci_low"] <= loss["value"]) & (loss["value"] <= loss["ci_high"])).all()
    sequences = loss.groupby("eval")["n_examples"].unique()
    assert list(sequences["c4_val"]) == [84_999] and list(sequences["paloma_ptb"]) == [44]


def test_derived_17_task_split_is_the_papers(ingested):
    _, groups = ingested
    assert groups["groups"]["avg17"] == sorted(PAPER_17_TASKS)
    assert len(groups["groups"]["avg46"]) == 46
    assert "0.154B" in groups["rule"]


def test_errors_are_plain_means_of_one_minus_accuracy(ingested):
    frame, groups = ingested
    run = frame[(frame["dataset"] == "c4") & (frame["size"] == "1.4B") & (frame["M"] == 80)]
    accuracy = run[run["metric"] == "accuracy"].set_index("eval")["value"]
    error = run[run["metric"] == "error"].set_index("eval")["value"]
    for group, tasks in groups["groups"].items():
        assert error[group] == pytest.approx(np.mean(1 - accuracy[tasks]), rel=1e-12)


def test_chance_is_the_random_baseline_and_an_averages_its_tasks_error_at_chance(ingested):
    frame, groups = ingested
    run = frame[(frame["dataset"] == "c4") & (frame["size"] == "1.4B") & (frame["M"] == 80)]
    chance = run[run["metric"] == "accuracy"].set_index("eval")["chance"]
    assert chance["hellaswag"] == 0.25 and chance["copa"] == 0.5
    assert chance["lambada_openai"] == 0.0
    error = run[run["metric"] == "error"].set_index("eval")["chance"]
    for group, tasks in groups["groups"].items():
        assert error[group] == pytest.approx(np.mean(1 - chance[tasks]), rel=1e-12)
    assert run.loc[run["metric"] == "loss", "chance"].isna().all()


def test_validation_set_names_follow_the_papers_parser():
    assert eval_name("training/eval_data/c4_val/shard-{0000000..0000010}.tar") == "c4_val"
    assert eval_name("training/eval_data/val_tok_mult/de-en/val_de-en_100.tar") == "val_de-en_100"


def test_missing_downstream_evaluations_name_the_file(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "evals").mkdir()
    (tmp_path / "eval_metadata.csv").write_text("Eval Task,Random baseline,#datapoints\n")
    model = {
        "dataset_name": "rpj",
        "hyperparameters": {"model": "open_lm_1b", "params": 10, "tokens": 200},
        "results": [],
    }
    (tmp_path / "models" / "rpj-open_lm_1b-1.0.json").write_text(json.dumps(model))
    with pytest.raises(
        ReleasedDataError, match=re.escape("evaluation_rpj-open_lm_1b-1.0_heavy.json")
    ):
        ingest(tmp_path, tmp_path / "runs.parquet", tmp_path / "groups.json")


@pytest.mark.slow
def test_preset_runs_end_to_end(tmp_path):
    """`snakemake --configfile presets/paper-released.yaml --config released_dir=...` writes the
    predictions, the fits and the figure in the documented schema."""
    results = tmp_path / "results"
    preset = REPO / "presets" / "paper-released.yaml"
    assert yaml.safe_load(preset.read_text())["results_dir"] == "results/paper-released"
    snakemake(
        "--cores",
        "2",
        "--configfile",
        str(preset),
        "--config",
        f"released_dir={exp_data()}",
        f"results_dir={results}",
        workdir=tmp_path,
    )
    predictions = pd.read_parquet(results / "predictions.parquet")
    assert list(predictions.columns[:14]) == [
        "dataset", "form", "N", "M", "D", "C", "quantity", "eval", "role", "predicted",
        "actual", "relative_error", "ci_low", "ci_high",
    ]  # fmt: skip
    assert set(predictions["form"]) == {
        "paper", "paper+sigmoid", "chinchilla", "chinchilla+sigmoid", "direct"
    }  # fmt: skip
    assert set(predictions.loc[predictions["quantity"] == "error", "eval"]) == {"avg17", "avg46"}
    assert predictions.loc[predictions["quantity"] == "accuracy", "eval"].nunique() == 46
    assert set(predictions.loc[predictions["quantity"] == "loss", "eval"]) == LOSS_EVALS
    fits = pd.read_parquet(results / "fits.parquet")
    paper = fits[(fits["form"] == "paper") & (fits["eval"] == "c4_val")]
    assert set(paper["param"]) == {"E", "a", "b", "eta"}
    assert (results / "plots" / "scaling.png").stat().st_size > 50_000
    assert json.loads((results / "error_groups.json").read_text())["groups"]["avg17"] == sorted(
        PAPER_17_TASKS
    )
