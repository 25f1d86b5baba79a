"""The planner: on runs drawn from a known law it recommends that law's optimum, serving tokens
moves it to smaller over-trained models, and its CLI reports plainly."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO
from test_fit import (
    GRID,
    STRAIGHT_POINTS,
    TRUE_ERROR,
    TRUE_LOSS,
    settings,
    straight_ladder,
    synthetic_runs,
)

from workflow import laws, plan
from workflow.errors import FitError
from workflow.forms import PAPER
from workflow.tables import write_runs_table

BUDGET = 1e22


@pytest.fixture(scope="module")
def runs():
    return synthetic_runs(GRID, noise=1e-3, seed=3, errors=True)


def test_without_inference_the_plan_is_the_laws_compute_optimum(runs):
    recommended = plan.plan(runs, settings(), "toy", "val", BUDGET)
    optimal_m = laws.optimal_multiplier(*TRUE_LOSS[1:])
    assert pytest.approx(optimal_m, rel=0.05) == recommended.M
    assert recommended.M_ci[0] <= recommended.M <= recommended.M_ci[1]
    assert pytest.approx(BUDGET) == 6 * recommended.N * recommended.D
    true_loss = laws.loss(BUDGET, optimal_m, *TRUE_LOSS)
    assert recommended.loss == pytest.approx(true_loss, rel=0.01)
    assert recommended.loss_ci[0] <= recommended.loss <= recommended.loss_ci[1]
    assert recommended.error == pytest.approx(laws.error(true_loss, *TRUE_ERROR), rel=0.02)


def test_the_search_agrees_with_the_closed_form_when_serving_nothing():
    closed = plan.best_size(np.array(TRUE_LOSS), BUDGET, 0.0)
    searched = plan.best_size(np.array(TRUE_LOSS), BUDGET, 1e-6)
    assert searched == pytest.approx(closed, rel=1e-3)


def test_serving_tokens_recommends_a_smaller_more_over_trained_model(runs):
    alone = plan.plan(runs, settings(), "toy", "val", BUDGET)
    serving = plan.plan(runs, settings(), "toy", "val", BUDGET, inference_tokens=1e13)
    assert serving.N < alone.N and serving.M > alone.M
    assert pytest.approx(BUDGET) == 6 * serving.N * serving.D + 2 * serving.N * 1e13
    # It is the minimum: a 10% larger or smaller model predicts a higher loss on the same budget.
    for factor in (0.9, 1.1):
        n_params = serving.N * factor
        tokens = plan.tokens_for(np.array(n_params), BUDGET, 1e13)
        neighbour = PAPER.predict((n_params, tokens), serving.loss_params)
        assert neighbour > serving.loss


@pytest.mark.parametrize("inference_tokens", [1e22, 1e21 / 2 * (1 - 1e-12)])
def test_a_budget_that_serving_alone_spends_is_named(runs, inference_tokens):
    with pytest.raises(FitError, match=r"tokens alone costs more than 1e\+21 FLOPs"):
        plan.plan(runs, settings(), "toy", "val", 1e21, inference_tokens=inference_tokens)


@pytest.mark.parametrize(("budget", "inference_tokens"), [(0.0, 0.0), (BUDGET, -1.0)])
def test_a_budget_or_served_tokens_that_make_no_sense_are_named(runs, budget, inference_tokens):
    with pytest.raises(FitError, match=r"a plan needs a positive budget"):
        plan.plan(runs, settings(), "toy", "val", budget, inference_tokens=inference_tokens)


def test_an_unknown_dataset_is_named(runs):
    with pytest.raises(FitError, match=r"'nope'.*toy"):
        plan.plan(runs, settings(), "nope", "val", BUDGET)


def test_a_paper_form_that_could_not_be_fitted_is_named_instead_of_planned():
    chosen = settings(loss_points=STRAIGHT_POINTS, error_points=STRAIGHT_POINTS, bootstrap=5)
    with pytest.raises(FitError, match=r"paper form's loss law on val could not be fitted"):
        plan.plan(straight_ladder(), chosen, "default", "val", BUDGET)


def test_cli_reports_the_plan(tmp_path, runs):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["results_dir"] = str(tmp_path)
    config["grid"] = {"docs_en": {size: [10, 20, 80, 320] for size in ("xs", "s", "m", "l")}}
    config["fit"]["loss"]["points"] = {"xs": [20, 320], "s": [20], "m": [20], "l": [20]}
    config["fit"]["error"] = {"points": config["fit"]["loss"]["points"]}  # loss of docs_en
    config["fit"]["bootstrap"] = 20
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    measured = runs.replace({"eval": {"val": "docs_en"}})  # the config's validation set
    write_runs_table(measured.to_dict("records"), tmp_path / "runs.parquet")
    result = subprocess.run(
        [sys.executable, "-m", "workflow.plan", "--configfile", str(config_file),
         "--budget", "1e20", "--json", str(tmp_path / "plan.json")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "recommended N =" in result.stdout and "predicted avg error" in result.stdout
    # the ladder's own cost under both schedules: wsd shares a trunk among each size's 4 runs
    pattern = r"the ladder itself \(16 runs\): (\S+) training tokens.*; (\S+) tokens"
    cost = re.search(pattern, result.stdout)
    assert cost and float(cost.group(2)) < float(cost.group(1))
    written = yaml.safe_load((tmp_path / "plan.json").read_text())
    assert math.isclose(6 * written["N"] * written["D"], 1e20, rel_tol=1e-9)
