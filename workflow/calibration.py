"""Calibrated 95% prediction intervals: the bootstrap's, widened by what makes extrapolations miss.

The bootstrap (``workflow.bootstrap``) covers only the fit points' evaluation noise; on the
paper's released testbed its intervals held few of the in-distribution loss targets (README,
"What the intervals cover"). Here each prediction y^ gets, in log space (a miss is
e = ln(y / y^)), an extra sd x beside the bootstrap's, and the interval is

    [y^ exp(-1.96 sqrt(b_lo^2 + x^2)),  y^ exp(+1.96 sqrt(b_hi^2 + x^2))]

with b_lo = ln(y^ / boot_low) / 1.96 and b_hi = ln(boot_high / y^) / 1.96 (the bootstrap's,
asymmetry kept), and

    x^2 = [nu0 (S s0)^2 + dof r^2] / (nu0 + dof)              run-level scatter
        + S^2 (kC^2 dC^2 + kMo^2 dMo^2 + kMu^2 dMu^2)          form error beyond the fit points
        + D^2                                                 disagreement between forms
        + run_sd^2                                            measured run-to-run variance
        + (g x_loss)^2                                        the loss's x, through a chain

- dC: decades of compute C = 6ND outside the law's fit points' range; dMo (dMu): decades of
  M = D/N above (below) the fit points' largest (smallest) M. Zero for interpolations.
- S: |slope of ln(value) on log10 C| over the fit points, the curve's log change per decade;
  every learned constant is an error in decades of compute, so the constants carry from one
  ladder to another whatever its scale.
- r^2, dof: SSR / dof of the log residuals at the fit points (forms fitted to the same points
  pooled); with nu0 prior degrees of freedom they update the shipped floor s0, so a noisy
  ladder widens its own intervals.
- D: the spread of ln(prediction) across forms of one family at the same run (the loss forms;
  the chains that end in one downstream form): a lower bound on the form's own error.
- run_sd: ``fit.run_sd``, a relative sd measured from replicate seeds.
- g x_loss: for a prediction chained on a predicted loss, that loss's x times the elasticity
  g = |d ln y / d ln L| of the downstream form at the predicted loss.

A prediction <= 0 (a law extrapolated below zero) has no logarithm: there the interval is built
in linear units, with x times the median fit-point value as the sd (x itself where that median
is not positive, a task at zero).

The constants (s0, kC, kMo, kMu) are learned, not tuned: ``python -m workflow.learn_calibration``
refits the released testbed under eight fit-point layouts and minimises the interval score of
the central 80% interval over the loss targets, every (layout, dataset, evaluation) weighted
equally; it also reports their coverage leave-one-dataset-out (README, "What the intervals
cover"). What they assume: misses are normal in log space, grow linearly with the distance
beyond the fit points, scale with the curve's steepness, and are at least the forms'
disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from workflow.intervals import Z_95

# Learned by `python -m workflow.learn_calibration --exp-data ../shared/paper-testbed/exp_data`
# on all three datasets of Gadre et al.'s released testbed (104 runs), each refitted under the
# eight fit-point layouts of workflow/learn_calibration.py (tests/test_calibration.py checks
# that relearning gives these).
CONSTANTS = {"s0": 0.0744, "kC": 0.0723, "kMo": 0.1642, "kMu": 0.9409}
CONSTANT_NAMES = tuple(CONSTANTS)
# The columns a prediction table carries for the calibration, beside predictions.parquet's.
CALIBRATION_COLUMNS = ["n_params", "family", "upstream", "elasticity"]
PRIOR_DOF = 4.0  # nu0: the shipped floor counts as this many residual degrees of freedom


@dataclass(frozen=True)
class LawContext:
    """What a law's fit points say about its predictions' uncertainty."""

    fit_compute: np.ndarray
    fit_multiplier: np.ndarray
    steepness: float
    residual_variance: float
    residual_dof: int
    reference: float  # the median fit-point value: the sd's unit where y^ <= 0


def distances(
    compute: np.ndarray, multiplier: np.ndarray, fit_compute: np.ndarray, fit_multiplier: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dC, dMo, dMu) in decades: compute outside the fit points' range (either side), M above
    their largest M, M below their smallest M; zero inside, and zero everywhere for a law with
    no measured fit point (a task measured only on other runs: it predicts nothing)."""
    log_c, log_m = np.log10(np.asarray(compute, float)), np.log10(np.asarray(multiplier, float))
    if not len(fit_compute):
        return np.zeros_like(log_c), np.zeros_like(log_c), np.zeros_like(log_c)
    fit_c, fit_m = np.log10(fit_compute), np.log10(fit_multiplier)
    outside_c = np.maximum(0.0, log_c - fit_c.max()) + np.maximum(0.0, fit_c.min() - log_c)
    return outside_c, np.maximum(0.0, log_m - fit_m.max()), np.maximum(0.0, fit_m.min() - log_m)


def steepness(fit_compute: np.ndarray, fit_values: np.ndarray) -> float:
    """|slope| of ln(value) on log10(compute) over the fit points (log change per decade)."""
    x, y = np.log10(np.asarray(fit_compute, float)), np.asarray(fit_values, float)
    with np.errstate(all="ignore"):
        y = np.log(y)
    usable = np.isfinite(x) & np.isfinite(y)
    if usable.sum() < 2 or np.ptp(x[usable]) == 0:
        return 0.0
    return float(abs(np.polyfit(x[usable], y[usable], 1)[0]))


def residual_variance(log_residuals: np.ndarray, n_params: int) -> tuple[float, int]:
    """(SSR / dof, dof) of one fit's log residuals at its fit points; (0, 0) without dof."""
    residuals = np.asarray(log_residuals, float)
    residuals = residuals[np.isfinite(residuals)]
    dof = len(residuals) - n_params
    return (float(np.sum(residuals**2) / dof), dof) if dof > 0 else (0.0, 0)


def elasticity(predict, loss: np.ndarray, step: float = 1e-4) -> np.ndarray:
    """g = |d ln f / d ln L| of a downstream law ``predict(loss)``, by a central difference."""
    loss = np.asarray(loss, float)
    with np.errstate(all="ignore"):
        ratio = predict(loss * (1 + step)) / predict(loss * (1 - step))
        slope = np.abs(np.log(ratio) / (np.log1p(step) - np.log1p(-step)))
    return np.where(np.isfinite(slope), slope, 0.0)


def extra_sd(
    ingredients: pd.DataFrame,
    chained: np.ndarray,
    run_sd: float,
    constants: dict[str, float] = CONSTANTS,
) -> np.ndarray:
    """x, the log-space sd each row's interval adds to the bootstrap's (module docstring);
    ``ingredients`` as ``law_ingredients`` gives them, ``chained`` is g x_loss."""
    slope, dof = ingredients["steepness"], ingredients["residual_dof"]
    floor = (
        PRIOR_DOF * (slope * constants["s0"]) ** 2 + dof * ingredients["residual_variance"]
    ) / (PRIOR_DOF + dof)
    form_error = slope**2 * (
        constants["kC"] ** 2 * ingredients["d_compute"] ** 2
        + constants["kMo"] ** 2 * ingredients["d_over"] ** 2
        + constants["kMu"] ** 2 * ingredients["d_under"] ** 2
    )
    variance = floor + form_error + ingredients["spread"] ** 2 + run_sd**2 + chained**2
    return np.sqrt(variance.to_numpy(float))


def calibrated_interval(
    predicted: np.ndarray,
    boot_low: np.ndarray,
    boot_high: np.ndarray,
    x: np.ndarray,
    reference: np.ndarray,
    z: float = Z_95,
) -> tuple[np.ndarray, np.ndarray]:
    """The interval (95% at the default ``z``) from the bootstrap's 95% interval and the extra
    log sd ``x``; a missing bootstrap bound counts as zero width."""
    predicted = np.asarray(predicted, float)
    positive = predicted > 0
    with np.errstate(all="ignore"):
        below = np.where(positive, np.log(predicted / boot_low), predicted - boot_low) / Z_95
        above = np.where(positive, np.log(boot_high / predicted), boot_high - predicted) / Z_95
        below = np.where(np.isfinite(below), np.maximum(below, 0.0), 0.0)
        above = np.where(np.isfinite(above), np.maximum(above, 0.0), 0.0)
        # the unit of a linear sd: the fit points' median value, or 1 where that is not positive
        unit = np.where(np.isfinite(reference) & (reference > 0), reference, 1.0)
        sd = np.where(positive, x, x * unit)
        half_below = z * np.sqrt(below**2 + sd**2)
        half_above = z * np.sqrt(above**2 + sd**2)
        low = np.where(positive, predicted * np.exp(-half_below), predicted - half_below)
        high = np.where(positive, predicted * np.exp(half_above), predicted + half_above)
    return low, high


def law_context(fit_rows: pd.DataFrame, n_params: dict[str, int]) -> LawContext:
    """The context of one (quantity, evaluation) from its fit points' rows of every form."""
    points = fit_rows.drop_duplicates(["size", "M"])
    actual = points["actual"].to_numpy(float)
    per_form = []
    for form, rows in fit_rows.groupby("form", sort=False):
        with np.errstate(all="ignore"):
            residuals = np.log(rows["actual"].to_numpy(float) / rows["predicted"].to_numpy(float))
        per_form.append(residual_variance(residuals, n_params[form]))
    with_dof = [(variance, dof) for variance, dof in per_form if dof > 0]
    variance = float(np.mean([v for v, _ in with_dof])) if with_dof else 0.0
    return LawContext(
        fit_compute=points["C"].to_numpy(float),
        fit_multiplier=points["M"].to_numpy(float),
        steepness=steepness(points["C"].to_numpy(float), actual),
        residual_variance=variance,
        residual_dof=max((dof for _, dof in with_dof), default=0),
        reference=float(np.nanmedian(actual)) if len(actual) else np.nan,
    )


def form_spread(rows: pd.DataFrame, reference: float) -> np.ndarray:
    """D of each row: the spread of ln(prediction) over the forms of its family at its run
    (linear, over ``reference``, where a prediction is <= 0)."""
    run = [rows[key] for key in ("family", "size", "M")]
    predicted = rows["predicted"]
    with np.errstate(all="ignore"):
        logs = np.log(predicted.where(predicted > 0))
    by_log, by_value = logs.groupby(run), predicted.groupby(run)
    log_spread = by_log.transform("max") - by_log.transform("min")
    unit = abs(reference) if np.isfinite(reference) and reference != 0 else 1.0
    linear_spread = (by_value.transform("max") - by_value.transform("min")) / unit
    # a form that predicted nothing (failed) leaves the others' spread in log units
    all_positive = (predicted.isna() | (predicted > 0)).groupby(run).transform("all")
    spread = np.asarray(np.where(all_positive, log_spread, linear_spread), float)
    return np.where(np.isfinite(spread), spread, 0.0)


def calibrate_table(
    predictions: pd.DataFrame,
    loss_eval: str,
    run_sd: float,
    constants: dict[str, float] = CONSTANTS,
) -> pd.DataFrame:
    """One dataset's predictions with calibrated ``ci_low``/``ci_high``.

    Besides predictions.parquet's columns, the rows carry ``n_params`` (their form's parameter
    count), ``family`` (the forms whose spread is D), ``upstream`` (the loss form a chained
    prediction feeds on; empty for the loss and for forms of the size) and ``elasticity`` (g).
    Losses go first, so that a chain can use its loss's x.
    """
    table = predictions.reset_index(drop=True)
    table["x"] = np.nan
    losses = table["quantity"] == "loss"
    for mask in (losses, ~losses):
        for _, rows in table[mask].groupby(["quantity", "eval"], sort=False):
            table.loc[rows.index, ["ci_low", "ci_high", "x"]] = _calibrate_law(
                rows, table, loss_eval, run_sd, constants
            )
    return table.drop(columns="x").set_axis(predictions.index)


def law_ingredients(rows: pd.DataFrame) -> pd.DataFrame:
    """Per row of one (quantity, evaluation): its distances beyond the fit points, the forms'
    spread and its law's context, everything of x but the constants and the chain."""
    fit_rows = rows[(rows["role"] == "fit") & rows["actual"].notna()]
    context = law_context(fit_rows, fit_rows.groupby("form")["n_params"].first().to_dict())
    d_compute, d_over, d_under = distances(
        rows["C"].to_numpy(float),
        rows["M"].to_numpy(float),
        context.fit_compute,
        context.fit_multiplier,
    )
    return pd.DataFrame(
        {
            "d_compute": d_compute,
            "d_over": d_over,
            "d_under": d_under,
            "spread": form_spread(rows, context.reference),
            "steepness": context.steepness,
            "residual_variance": context.residual_variance,
            "residual_dof": float(context.residual_dof),
            "reference": context.reference,
        },
        index=rows.index,
    )


def _calibrate_law(
    rows: pd.DataFrame,
    table: pd.DataFrame,
    loss_eval: str,
    run_sd: float,
    constants: dict[str, float],
) -> np.ndarray:
    """(ci_low, ci_high, x) of every row of one (quantity, evaluation)."""
    ingredients = law_ingredients(rows)
    loss_x = table[(table["quantity"] == "loss") & (table["eval"] == loss_eval)]
    upstream = rows[["upstream", "size", "M"]].merge(
        loss_x[["form", "size", "M", "x"]].rename(columns={"form": "upstream"}),
        how="left",
        on=["upstream", "size", "M"],
    )
    chained = rows["elasticity"].to_numpy(float) * upstream["x"].fillna(0.0).to_numpy(float)
    x = extra_sd(ingredients, chained, run_sd, constants)
    low, high = calibrated_interval(
        rows["predicted"].to_numpy(float),
        rows["ci_low"].to_numpy(float),
        rows["ci_high"].to_numpy(float),
        x,
        ingredients["reference"].to_numpy(float),
    )
    return np.column_stack([low, high, x])
