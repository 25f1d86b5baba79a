"""Calibrated intervals: each term widens them where it should, and on the paper's released
testbed the shipped constants relearn and cover the held-out datasets' targets."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from test_released import exp_data

from workflow.calibration import CONSTANTS, calibrate_table, calibrated_interval
from workflow.calibration_view import draw, panels
from workflow.learn_calibration import coverage_and_ratio, goal_scales, shared_goal_scales
from workflow.learn_calibration import main as learn_main


def ladder(predicted_far: float = 2.0) -> pd.DataFrame:
    """One loss law's rows: four fit points on a curve, an interpolation and two targets
    beyond them (10x and 100x the largest fit point's compute), two forms."""
    rows = []
    points = [(1e17, 20.0, 4.0), (1e18, 20.0, 3.5), (1e19, 20.0, 3.1), (1e19, 80.0, 3.2)]
    targets = [(3e18, 20.0, 3.3), (1e20, 20.0, 2.8), (1e21, 20.0, predicted_far)]
    for form, shift in (("paper", 0.0), ("chinchilla", 0.01)):
        for index, (compute, multiplier, value) in enumerate(points + targets):
            rows.append(
                {
                    "dataset": "d",
                    "form": form,
                    "size": f"s{index}",
                    "N": 1,
                    "M": multiplier,
                    "D": 1,
                    "C": compute,
                    "quantity": "loss",
                    "eval": "val",
                    "role": "fit" if index < len(points) else "target",
                    "predicted": value * (1 + shift),
                    "actual": value * (1.002 if index % 2 else 0.998),
                    "ci_low": value * (1 + shift) * 0.999,
                    "ci_high": value * (1 + shift) * 1.001,
                    "n_params": 4 if form == "paper" else 5,
                    "family": "loss",
                    "upstream": "",
                    "elasticity": 0.0,
                }
            )
    return pd.DataFrame(rows)


def widths(table: pd.DataFrame) -> pd.Series:
    paper = table[table["form"] == "paper"]
    return np.log(paper["ci_high"] / paper["ci_low"]).set_axis(paper["C"])


def test_intervals_widen_with_the_distance_beyond_the_fit_points():
    width = widths(calibrate_table(ladder(), "val", 0.0))
    assert width[1e21] > width[1e20] > width[3e18]
    assert width[3e18] == pytest.approx(width[1e17], rel=0.2)  # an interpolation is not far


def test_the_calibrated_interval_contains_the_bootstraps():
    raw = ladder()
    calibrated = calibrate_table(raw, "val", 0.0)
    assert (calibrated["ci_low"] <= raw["ci_low"]).all()
    assert (calibrated["ci_high"] >= raw["ci_high"]).all()


def test_measured_run_to_run_variance_widens_every_interval():
    quiet = widths(calibrate_table(ladder(), "val", 0.0))
    noisy = widths(calibrate_table(ladder(), "val", 0.05))
    assert (noisy > quiet).all()
    # at a fit point the run-to-run sd dominates: the 95% interval is about +-1.96 x 5%
    assert noisy[1e17] == pytest.approx(2 * 1.96 * 0.05, rel=0.15)


def test_forms_that_disagree_widen_each_others_intervals():
    agree = widths(calibrate_table(ladder(), "val", 0.0))
    far_apart = ladder()
    far_apart.loc[(far_apart["form"] == "chinchilla") & (far_apart["C"] == 1e21), "predicted"] = 3.0
    disagree = widths(calibrate_table(far_apart, "val", 0.0))
    assert disagree[1e21] > 2 * agree[1e21]
    assert disagree[1e20] == pytest.approx(agree[1e20])


def test_a_form_that_predicted_nothing_leaves_the_others_spread_in_log_units():
    """A failed form's NaN is not a prediction <= 0: the spread stays ln(3.3 / 3.0)."""
    rows = ladder()
    rows = pd.concat([rows, rows[rows["form"] == "paper"].assign(form="failed", predicted=np.nan)])
    far = ladder()
    far.loc[(far["form"] == "chinchilla") & (far["C"] == 1e21), "predicted"] = 3.3
    rows.loc[(rows["form"] == "chinchilla") & (rows["C"] == 1e21), "predicted"] = 3.3
    with_failed = widths(calibrate_table(rows, "val", 0.0))
    without = widths(calibrate_table(far, "val", 0.0))
    assert with_failed[1e21] == pytest.approx(without[1e21])


def test_a_chained_prediction_carries_its_losses_uncertainty():
    loss = ladder()
    error = loss.assign(
        quantity="error",
        eval="avg",
        family="exponential",
        upstream=loss["form"],
        predicted=0.5,
        actual=0.5,
        ci_low=0.499,
        ci_high=0.501,
        n_params=3,
    )
    chained = calibrate_table(pd.concat([loss, error.assign(elasticity=2.0)]), "val", 0.0)
    alone = calibrate_table(pd.concat([loss, error]), "val", 0.0)
    far = (chained["quantity"] == "error") & (chained["C"] == 1e21) & (chained["form"] == "paper")
    assert (chained[far]["ci_high"] - chained[far]["ci_low"]).item() > 1.5 * (
        alone[far]["ci_high"] - alone[far]["ci_low"]
    ).item()


def test_a_prediction_below_zero_gets_a_linear_interval():
    low, high = calibrated_interval(
        np.array([-0.1, 0.2]), np.array([-0.2, 0.1]), np.array([0.0, 0.3]), np.full(2, 0.1), 0.5
    )
    assert low[0] < -0.1 < high[0] and np.isfinite([low[0], high[0]]).all()
    assert 0 < low[1] < 0.2 < high[1]


def test_the_calibration_view_draws_a_panel_per_quantity(tmp_path):
    table = calibrate_table(ladder(), "val", 0.0).assign(inside=True)
    errors = table.assign(quantity="error", eval="avg", predicted=0.5, actual=0.52)
    errors[["ci_low", "ci_high"]] = [0.45, 0.55]
    both = pd.concat([table, errors], ignore_index=True)
    assert list(panels(both, "val")) == ["loss on val", "error"]
    draw(both, "val", str(tmp_path / "calibration.png"))
    height, width, _ = matplotlib.image.imread(tmp_path / "calibration.png").shape
    assert width > 1.5 * height


def calibrated_normal_targets(sd: float = 0.01, count: int = 10_000) -> pd.DataFrame:
    """Targets whose log misses are exactly normal quantiles of ``sd``, each with the 95%
    interval of that sd: a perfectly calibrated set."""
    misses = norm.ppf((np.arange(count) + 0.5) / count) * sd
    predicted = np.full(count, 3.0)
    return pd.DataFrame(
        {
            "predicted": predicted,
            "actual": predicted * np.exp(misses),
            "ci_low": predicted * np.exp(-1.96 * sd),
            "ci_high": predicted * np.exp(1.96 * sd),
        }
    )


def test_a_calibrated_normal_error_covers_95_percent_at_about_5_8_times_its_median_error():
    covered, ratio = coverage_and_ratio(calibrated_normal_targets())
    assert covered == pytest.approx(0.95, abs=0.002)
    assert ratio == pytest.approx(5.81, abs=0.05)
    # half as wide: the intervals of sd / 2
    covered, ratio = coverage_and_ratio(calibrated_normal_targets(), scale=0.5)
    assert covered == pytest.approx(0.673, abs=0.003)
    assert ratio == pytest.approx(2.91, abs=0.03)


def test_goal_scales_span_85_percent_coverage_to_99_percent_or_8x_the_error():
    """For a calibrated normal error, 85% coverage needs z = 1.44 (scale 1.44 / 1.96) and 99%
    is reached at z = 2.58 (1.31), before the width reaches 8x the median error (1.38)."""
    low, high = goal_scales(calibrated_normal_targets())
    assert low == pytest.approx(norm.ppf(0.925) / 1.96, abs=0.011)
    assert high == pytest.approx(norm.ppf(0.995) / 1.96, abs=0.011)
    # where half the misses are twice as small, the median error is what limits the width
    targets = calibrated_normal_targets()
    small = targets.index % 2 == 0
    targets.loc[small, "actual"] = (
        targets["predicted"] * (targets["actual"] / targets["predicted"]) ** 0.5
    )
    low, high = goal_scales(targets)
    assert high < norm.ppf(0.995) / 1.96 - 0.05
    assert coverage_and_ratio(targets, high)[1] <= 8 < coverage_and_ratio(targets, high + 0.01)[1]


def test_datasets_whose_goal_scales_do_not_overlap_cannot_share_one_scale():
    table = pd.DataFrame(
        {
            "form": ["paper"] * 4,
            "targets": ["every loss", "every loss", "error averages", "error averages"],
            "goal scale low": [0.7, 0.8, 0.8, 0.5],
            "goal scale high": [1.2, 1.0, 1.0, 0.7],
        }
    )
    shared = shared_goal_scales(table).set_index("targets")
    assert shared.loc["every loss", ["low", "high"]].tolist() == [0.8, 1.0]
    assert bool(shared.loc["every loss", "met by one scale"])
    assert not bool(shared.loc["error averages", "met by one scale"])


def test_the_shipped_constants_relearn_and_cover_each_held_out_dataset(tmp_path):
    """Relearning on the released testbed gives the shipped constants, and with constants
    learned on the other two datasets each dataset's targets are covered (README, "What the
    intervals cover", has the full table)."""
    out = tmp_path / "learned.json"
    learn_main(["--exp-data", str(exp_data()), "--json", str(out)])
    learned = json.loads(out.read_text())
    for name, value in CONSTANTS.items():
        assert learned["constants"][name] == pytest.approx(value, rel=2e-3), name
    table = pd.DataFrame(learned["leave_one_dataset_out"])
    loss_forms = table[table["form"].isin(["paper", "chinchilla"])]
    assert (loss_forms["coverage"] >= 0.85).all(), loss_forms
    paper_errors = table[(table["form"] == "paper") & (table["targets"] == "error averages")]
    assert (paper_errors["coverage"] >= 0.85).all(), paper_errors
    # honest widths: never far above a calibrated normal error's 5.8
    assert (loss_forms["width / |error|"] <= 12).all(), loss_forms
    assert set(table["held_out"]) == {"c4", "redpajama", "refinedweb"}
    # each held-out dataset's losses alone could be brought to the goals by one scale
    assert loss_forms["goal scale low"].notna().all(), loss_forms
    assert {"low", "high", "met by one scale"} <= set(learned["shared_goal_scales"][0])
