"""The paper-scale preset plans exactly the paper's 104 runs, with the paper's token budgets.

Only planning is tested here (validation and a dry run): the runs need a GPU cluster and
the hub. The released models' own files (../shared/paper-testbed) are the reference where
present; the budgets below are theirs.
"""

from __future__ import annotations

import collections
import re

import pytest
from conftest import REPO, load_config, snakemake

from workflow.config import validate_config
from workflow.resources import cost_table
from workflow.runs import trained_runs, trunks


@pytest.fixture(scope="module")
def paper_config() -> dict:
    config = load_config("presets/paper.yaml")
    validate_config(config)
    return config


def test_paper_preset_has_the_papers_104_runs(paper_config):
    runs = trained_runs(paper_config)
    assert len(runs) == 104
    per_dataset = collections.Counter(run.dataset for run in runs)
    assert per_dataset == {"c4": 34, "redpajama": 35, "refinedweb": 35}
    assert not any(
        run.size == "0.411B" and run.multiplier == 640 for run in runs if run.dataset == "c4"
    )


@pytest.mark.parametrize(
    ("dataset", "size", "multiplier", "n_params", "tokens"),
    [
        # exp_data/models/*.json: hyperparameters.params and .tokens of the released models.
        ("c4", "0.011B", 20, 10_569_312, 211_386_240),
        ("refinedweb", "0.411B", 5, 411_616_256, 2_058_081_280),
        ("c4", "1.4B", 80, 1_439_795_200, 115_183_616_000),
        ("redpajama", "6.9B", 20, 6_889_410_560, 137_788_211_200),
    ],
)
def test_paper_preset_budgets(paper_config, dataset, size, multiplier, n_params, tokens):
    (run,) = [
        run
        for run in trained_runs(paper_config)
        if (run.dataset, run.size, run.multiplier) == (dataset, size, multiplier)
    ]
    assert (run.n_params, run.tokens) == (n_params, tokens)


def test_paper_preset_dry_run_lists_104_training_jobs(tmp_path):
    result = snakemake(
        "-n",
        "--configfile",
        str(REPO / "presets" / "paper.yaml"),
        workdir=tmp_path,
    )
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.M))
    assert counts["train"] == "104", result.stdout[-3000:]


def test_ladder_preset_fits_small_runs_and_extrapolates_to_larger_and_over_trained_ones():
    config = load_config("presets/ladder-small.yaml")
    validate_config(config)
    runs = trained_runs(config)
    fit_points = {
        (size, float(multiplier))
        for size, multipliers in config["fit"]["loss"]["points"].items()
        for multiplier in multipliers
    }
    fits = [run for run in runs if (run.size, run.multiplier) in fit_points]
    targets = [run for run in runs if (run.size, run.multiplier) not in fit_points]
    assert {run.size for run in runs} == {"0.011B", "0.079B", "0.154B", "0.411B"}
    assert len(fits) >= 7  # more points than the loss law's four parameters
    largest_fit = max(run.compute for run in fits)
    assert sum(run.compute >= 3.5 * largest_fit for run in targets) == 2
    assert max(run.multiplier for run in targets) >= 80  # an over-trained target too
    # One GPU, a few hours: the cost estimate the README quotes.
    assert sum(run.compute for run in runs) == pytest.approx(1.03e19, rel=0.01)


def test_the_paper_presets_keep_the_papers_cosine_schedule():
    for name in ("presets/paper.yaml", "presets/ladder-small.yaml"):
        assert load_config(name)["train"]["schedule"] == "cosine"


def test_the_ladder_preset_under_wsd_trains_one_trunk_per_size_and_fewer_tokens():
    """The smallest size's five multipliers share a trunk: 0.8 x 640 + 0.2 x (5 + 20 + 80 +
    320 + 640) = 725 units of N tokens instead of 1,065; the largest size, with one
    multiplier, costs the same under either schedule."""
    config = load_config("presets/ladder-small.yaml")
    config["train"]["schedule"] = "wsd"
    validate_config(config)
    assert [trunk.size for trunk in trunks(config)] == ["0.011B", "0.079B", "0.154B", "0.411B"]
    assert len(trained_runs(config)) == 10
    table = cost_table(config).set_index("size")
    smallest = table.loc["0.011B"]
    assert smallest["tokens_wsd"] / smallest["N"] == pytest.approx(725, abs=0.5)
    assert smallest["tokens_cosine"] / smallest["N"] == pytest.approx(1065, abs=0.5)
    largest = table.loc["0.411B"]
    assert largest["tokens_wsd"] == largest["tokens_cosine"]
    total = table.loc["total"]
    assert total["tokens_wsd"] / total["tokens_cosine"] == pytest.approx(0.76, abs=0.005)


def test_paper_preset_under_wsd_plans_a_trunk_per_dataset_and_size(tmp_path):
    config = load_config("presets/paper.yaml")
    config["train"]["schedule"] = "wsd"
    result = snakemake("-n", config=config, workdir=tmp_path)
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.M))
    assert (counts["trunk"], counts["train"]) == ("18", "104"), result.stdout[-3000:]
