"""Learn the calibration constants from the paper's released testbed, and measure them
leave-one-dataset-out.

The intervals' constants (``workflow.calibration.CONSTANTS``) are errors in decades of compute:
how far apart actual and predicted values lie at a given distance beyond the fit points. One
ladder's fit-point layout shows only a few distances, so the released testbed (three datasets,
104 runs) is refitted under several layouts, from the paper's own to a CPU-like ladder with
over-trained fit points, and every loss target of every layout is a training example. The
constants minimise the interval score (Gneiting and Raftery 2007) of the central 80% interval,
with every (layout, dataset, evaluation) weighted equally; the 95% interval then assumes normal
tails, which is less sensitive to the few large misses of the smallest models (README,
"What the intervals cover").

Leave-one-dataset-out: constants learned on two datasets, applied to the third under the
paper's layout, and its coverage per quantity and form printed (README, "What the intervals
cover"), with the range of factors on every interval's width that would meet the goals (85-99%
covered, width at most 8x the median error) on that dataset, and their overlap across the three:
where the ranges do not overlap, no method that widens every ladder's intervals alike can meet
the goals on all three.

``python -m workflow.learn_calibration --exp-data PATH/TO/exp_data [--json OUT]`` (fit settings
from presets/paper-released.yaml)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import minimize
from scipy.stats import norm

from workflow import calibration
from workflow.atomic import write_json
from workflow.config import validate_config
from workflow.paths import Layout, preset_file
from workflow.predict import uncalibrated_predictions
from workflow.released import ingest
from workflow.settings import FitSettings, fit_settings

PRESET = preset_file("paper-released")

ALPHA = 0.2  # the central interval the constants are learned on
# The goals of the 95% intervals, per held-out dataset: the share of actuals inside, and the
# median width over the median absolute error (5.8 for a calibrated normal error).
GOAL_COVERAGE = (0.85, 0.99)
GOAL_RATIO = 8.0
PAPER = "paper layout (4 sizes, M 20 and 320)"
SMALLEST, SMALL, MEDIUM, LARGE = "0.011B", "0.079B", "0.154B", "0.411B"
# Fit points of the loss law per layout; the error law adds 1.4B at M = 20 to the paper's.
LAYOUTS = {
    PAPER: {SMALLEST: [20, 320], SMALL: [20], MEDIUM: [20], LARGE: [20]},
    "CPU-like (4 sizes, M 20 and 80)": {SMALLEST: [20, 80], SMALL: [20], MEDIUM: [20], LARGE: [20]},
    "3 small sizes, M 20 and 80": {SMALLEST: [20, 80], SMALL: [20, 80], MEDIUM: [20]},
    "dense (12 points)": {
        SMALLEST: [10, 20, 40, 80, 160],
        SMALL: [10, 20, 40, 80],
        MEDIUM: [20, 40],
        LARGE: [20],
    },
    "3 sizes x M 20-160": {size: [20, 40, 80, 160] for size in (SMALL, MEDIUM, LARGE)},
    "3 small sizes x M 20 and 40": {size: [20, 40] for size in (SMALLEST, SMALL, MEDIUM)},
    "4 sizes, M 10-40 at the smallest": {
        SMALLEST: [10, 20, 40],
        SMALL: [20],
        MEDIUM: [20],
        LARGE: [20],
    },
    "2 sizes x 3 M": {size: [20, 80, 320] for size in (SMALL, MEDIUM)},
}
PAPER_ERROR_POINTS = {**LAYOUTS[PAPER], "1.4B": [20]}
STARTS = (
    (0.03, 0.03, 0.1, 0.3),
    (0.1, 0.1, 0.3, 1.0),
    (0.01, 0.2, 0.03, 0.1),
    (0.2, 0.01, 1.0, 2.0),
)


def layout_predictions(runs: pd.DataFrame, settings: FitSettings) -> pd.DataFrame:
    """Every dataset's uncalibrated predictions under each layout (column ``layout``): the
    paper's layout predicts everything (leave-one-dataset-out reports it all), the others only
    the losses the constants are learned from, which saves refitting every downstream law."""
    final = runs[runs["final"].astype(bool)]
    losses = final[final["metric"] == "loss"]
    frames = []
    for layout, points in LAYOUTS.items():
        error_points = PAPER_ERROR_POINTS if layout == PAPER else points
        layout_settings = replace(settings, loss_points=points, error_points=error_points)
        measured = final if layout == PAPER else losses
        for dataset, rows in measured.groupby("dataset"):
            with contextlib.redirect_stdout(io.StringIO()):
                predicted = uncalibrated_predictions(dataset, rows, layout_settings)
            frames.append(predicted.assign(layout=layout))
    return pd.concat(frames, ignore_index=True)


def loss_examples(predictions: pd.DataFrame) -> pd.DataFrame:
    """The loss targets with a measured value, each with its ingredients of x."""
    frames = []
    for _, rows in predictions[predictions["quantity"] == "loss"].groupby(
        ["layout", "dataset", "eval"], sort=False
    ):
        measured = (rows["role"] == "target") & rows["actual"].notna()
        ingredients = calibration.law_ingredients(rows)[measured]
        frames.append(pd.concat([rows[measured], ingredients], axis=1))
    return pd.concat(frames, ignore_index=True)


def interval_score(actual: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Width plus 2 / alpha times the miss, in log space: lower is better."""
    actual, low, high = np.log(actual), np.log(low), np.log(high)
    miss = np.maximum(low - actual, 0) + np.maximum(actual - high, 0)
    return (high - low) + (2 / ALPHA) * miss


def learn(examples: pd.DataFrame) -> dict[str, float]:
    """The constants minimising the mean interval score of the examples, every (layout,
    dataset, evaluation) weighted equally."""
    groups = examples.groupby(["layout", "dataset", "eval"])["predicted"].transform("size")
    weight = 1.0 / groups.to_numpy(float)
    z = norm.ppf(1 - ALPHA / 2)
    predicted, actual = examples["predicted"].to_numpy(float), examples["actual"].to_numpy(float)
    boot_low, boot_high = examples["ci_low"].to_numpy(float), examples["ci_high"].to_numpy(float)
    reference = examples["reference"].to_numpy(float)
    no_chain = np.zeros(len(examples))

    def objective(log_constants: np.ndarray) -> float:
        constants = dict(zip(calibration.CONSTANT_NAMES, np.exp(log_constants), strict=True))
        x = calibration.extra_sd(examples, no_chain, 0.0, constants)
        low, high = calibration.calibrated_interval(predicted, boot_low, boot_high, x, reference, z)
        return float(np.sum(weight * interval_score(actual, low, high)) / np.sum(weight))

    best = min(
        (
            minimize(
                objective,
                np.log(start),
                method="Nelder-Mead",
                options={"xatol": 1e-4, "fatol": 1e-9, "maxiter": 3000},
            )
            for start in STARTS
        ),
        key=lambda result: result.fun,
    )
    return {
        name: float(value)
        for name, value in zip(calibration.CONSTANT_NAMES, np.exp(best.x), strict=True)
    }


def target_groups(
    predictions: pd.DataFrame, loss_eval: str
) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(form, name, targets) of the measured targets the goals are stated for: the
    in-distribution loss, every loss and every error average, per form."""
    measured = predictions[(predictions["role"] == "target") & predictions["actual"].notna()]
    selections = {
        f"{loss_eval} loss": (measured["quantity"] == "loss") & (measured["eval"] == loss_eval),
        "every loss": measured["quantity"] == "loss",
        "error averages": measured["quantity"] == "error",
    }
    for form, of_form in measured.groupby("form", sort=False):
        for name, selected in selections.items():
            targets = of_form[selected[of_form.index]]
            if not targets.empty:
                yield form, name, targets


def coverage_and_ratio(targets: pd.DataFrame, scale: float = 1.0) -> tuple[float, float]:
    """The share of actuals inside their intervals, and the median interval width over the
    median absolute error, with every interval's half-widths multiplied by ``scale`` (in log
    units where the prediction and its bounds are positive, as they were built)."""
    predicted, actual = targets["predicted"].to_numpy(float), targets["actual"].to_numpy(float)
    low, high = targets["ci_low"].to_numpy(float), targets["ci_high"].to_numpy(float)
    positive = (predicted > 0) & (low > 0)
    with np.errstate(all="ignore"):
        low = np.where(
            positive, predicted * (low / predicted) ** scale, predicted - scale * (predicted - low)
        )
        high = np.where(
            positive,
            predicted * (high / predicted) ** scale,
            predicted + scale * (high - predicted),
        )
    inside = (actual >= low) & (actual <= high)
    return float(inside.mean()), float(
        np.median(high - low) / np.median(np.abs(predicted - actual))
    )


def coverage(predictions: pd.DataFrame, loss_eval: str) -> pd.DataFrame:
    """Per form: coverage and median width / median |error| of the in-distribution loss, every
    loss and every error average's measured targets, and the range of scales of every
    interval that would meet the goals (``goal_scales``)."""
    rows = []
    for form, name, targets in target_groups(predictions, loss_eval):
        covered, ratio = coverage_and_ratio(targets)
        low, high = goal_scales(targets)
        rows.append(
            {
                "form": form,
                "targets": name,
                "n": len(targets),
                "coverage": covered,
                "width / |error|": ratio,
                "goal scale low": low,
                "goal scale high": high,
            }
        )
    return pd.DataFrame(rows)


def goal_scales(targets: pd.DataFrame) -> tuple[float, float]:
    """The smallest and largest factor on every interval's half-widths (0.30 to 3.00, in steps
    of 0.01) under which the targets meet the goals: between 85% and 99% covered, and a median
    width at most 8x the median absolute error; (nan, nan) where none does. Across held-out
    datasets, ranges that do not overlap mean that no method scaling every interval alike
    (learned constants included) meets the goals on all of them."""
    meeting = [
        scale
        for scale in np.round(np.arange(0.30, 3.005, 0.01), 2)
        if _meets_goals(*coverage_and_ratio(targets, scale))
    ]
    return (min(meeting), max(meeting)) if meeting else (np.nan, np.nan)


def _meets_goals(covered: float, ratio: float) -> bool:
    return GOAL_COVERAGE[0] <= covered <= GOAL_COVERAGE[1] and ratio <= GOAL_RATIO


def leave_one_dataset_out(
    predictions: pd.DataFrame, examples: pd.DataFrame, settings: FitSettings
) -> pd.DataFrame:
    """Each dataset's coverage under the paper's layout, with constants learned on the others."""
    frames = []
    paper = predictions[predictions["layout"] == PAPER]
    for held_out in sorted(predictions["dataset"].unique()):
        constants = learn(examples[examples["dataset"] != held_out])
        held = paper[paper["dataset"] == held_out].drop(columns="layout")
        calibrated = calibration.calibrate_table(held, settings.loss_eval, 0.0, constants)
        frames.append(coverage(calibrated, settings.loss_eval).assign(held_out=held_out))
    return pd.concat(frames, ignore_index=True)


def shared_goal_scales(table: pd.DataFrame) -> pd.DataFrame:
    """Per (form, targets) of a leave-one-dataset-out table: the interval scales that meet the
    goals on every held-out dataset at once (the overlap of their ranges), empty where the
    ranges do not overlap."""
    grouped = table.groupby(["form", "targets"], sort=False)
    shared = grouped.agg(low=("goal scale low", "max"), high=("goal scale high", "min"))
    shared["met by one scale"] = shared["low"] <= shared["high"]
    return shared.reset_index()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp-data", required=True, help="the released testbed's exp_data")
    parser.add_argument("--json", help="write the constants and the coverage table here")
    args = parser.parse_args(argv)
    preset = yaml.safe_load(PRESET.read_text())
    settings = fit_settings(validate_config({**preset, "released_dir": args.exp_data}))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch_layout = Layout(scratch)
        runs = ingest(args.exp_data, scratch_layout.runs_table(), scratch_layout.error_groups())
    predictions = layout_predictions(runs, settings)
    examples = loss_examples(predictions)
    fitted = time.perf_counter()
    constants = learn(examples)
    table = leave_one_dataset_out(predictions, examples, settings)
    pd.set_option("display.width", 160)
    print(f"{len(examples)} loss targets under {len(LAYOUTS)} layouts ({fitted - started:.0f} s)")
    print("constants (all datasets):", {name: round(v, 4) for name, v in constants.items()})
    print(table.round(3).to_string(index=False))
    shared = shared_goal_scales(table)
    print("interval scales meeting the goals on every held-out dataset:")
    print(shared.to_string(index=False))
    if args.json:
        report = {
            "constants": constants,
            "leave_one_dataset_out": table.to_dict("records"),
            "shared_goal_scales": shared.to_dict("records"),
        }
        write_json(args.json, report)


if __name__ == "__main__":
    main()
