"""Whether a law's fit points can be fitted at all, and whether a fitted law makes sense.

A solver that converges is not a law that means something: a diverged run among the fit points
(one learning rate too high) pulls the paper's form to a hugely negative E, and a flat ladder
gives an error law with narrow intervals around nothing. Inputs that cannot be fitted (a loss
that is not a number, a non-positive N or D, losses all equal within their noise) stop the
stage naming the run (``input_problems``); a fit that converged to something implausible is kept
but flagged (``implausibility``), its reasons written beside its parameters and in the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from workflow.errors import FitError
from workflow.forms import ACCURACY, ERROR, LOSS, Form, predicting
from workflow.intervals import Z_95

if TYPE_CHECKING:
    from workflow.ladder import LadderMeasurements

# A loss form's exponents must lie in this open interval (the paper's eta, Chinchilla's alpha
# and beta: every published fit has them between 0.1 and 0.8).
EXPONENT_RANGE = (0.0, 2.0)
# A loss form whose prediction of a target is below the fit points' smallest loss / this, or
# above their largest x this, extrapolates nonsense.
TARGET_FACTOR = 3.0
# A fit point is off the trend when its |log residual| exceeds the larger of this factor x the
# median |log residual| of the other points and OUTLIER_FLOOR (5% of its value): a diverged run.
OUTLIER_FACTOR = 5.0
OUTLIER_FLOOR = 0.05


def input_problems(
    quantity: str, labels: list[str], values: np.ndarray, rows: list[str]
) -> list[str]:
    """Why fit points whose ``quantity`` (a loss, an error, N or D) is ``values`` cannot be
    fitted: each non-finite or (for N and D) non-positive value, naming its point and its row
    of runs.parquet."""
    problems = []
    for label, value, row in zip(labels, values, rows, strict=True):
        if np.isnan(value):
            why = "nan (not a number, or no row)"
        elif not np.isfinite(value):
            why = f"{value} (not finite)"
        elif quantity in ("N", "D") and value <= 0:
            why = f"{value:g} (not positive)"
        else:
            continue
        problems.append(f"fit point {label} has {quantity} {why}; runs.parquet row {row}")
    return problems


def constant(values: np.ndarray, sd: np.ndarray) -> bool:
    """Whether ``values`` are all equal within their noise: their range within twice the
    largest sd (where no sd is known, within 1e-9 of their size)."""
    known = sd[np.isfinite(sd)]
    tolerance = max(2 * known.max() if known.size else 0.0, 1e-9 * np.abs(values).max())
    return bool(np.ptp(values) <= tolerance)


def implausibility(
    params: np.ndarray,
    names: tuple[str, ...],
    exponents: tuple[str, ...] = (),
    irreducible: str | None = None,
) -> list[str]:
    """What is wrong with a law's parameters themselves: a non-finite one, a negative
    irreducible loss, an exponent outside EXPONENT_RANGE."""
    value = dict(zip(names, params, strict=True))
    found = [
        f"{name} = {value[name]} is not finite" for name in names if not np.isfinite(value[name])
    ]
    if irreducible and value[irreducible] < 0:
        found.append(f"{irreducible} = {value[irreducible]:.4g} < 0 (a negative irreducible loss)")
    low, high = EXPONENT_RANGE
    found += [
        f"{name} = {value[name]:.4g} outside ({low:g}, {high:g})"
        for name in exponents
        if np.isfinite(value[name]) and not low < value[name] < high
    ]
    return found


def off_trend(labels: list[str], fitted: np.ndarray, values: np.ndarray) -> list[str]:
    """Fit points whose log residual is far off the others' (see OUTLIER_FACTOR), by name."""
    if len(values) < 3:
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        residuals = np.abs(np.log(fitted / values))
    found = []
    for index, residual in enumerate(residuals):
        others = np.delete(residuals, index)
        bound = max(OUTLIER_FACTOR * float(np.median(others)), OUTLIER_FLOOR)
        if residual > bound:
            found.append(
                f"fit point {labels[index]} is off the trend of the others: measured "
                f"{values[index]:.4g}, fitted {fitted[index]:.4g} (|log residual| "
                f"{residual:.3f} > {bound:.3f}; a diverged run?)"
            )
    return found


def wild_targets(labels: list[str], predicted: np.ndarray, values: np.ndarray) -> list[str]:
    """Targets whose predicted loss is more than TARGET_FACTOR outside the fit points' range."""
    low, high = values.min() / TARGET_FACTOR, values.max() * TARGET_FACTOR
    wild = ~((predicted >= low) & (predicted <= high))
    if not wild.any():
        return []
    shown = ", ".join(
        f"{label} ({value:.4g})"
        for label, value in zip(np.array(labels)[wild], predicted[wild], strict=True)
    )
    return [
        f"predicted loss of {wild.sum()} target(s) outside [{low:.4g}, {high:.4g}] (the fit "
        f"points' range, {TARGET_FACTOR:g}x each way): {shown}"
    ]


def check_points(
    measurements: LadderMeasurements, law: str, selected: np.ndarray, measured: dict[str, tuple]
) -> None:
    """Stop on fit points that cannot be fitted: a non-positive or non-finite N or D, or a
    non-finite value of ``measured`` (what a message calls it -> (metric, eval)), naming
    each run and its row of runs.parquet."""
    index = np.flatnonzero(selected)
    labels = [measurements.label(i) for i in index]
    row = f"dataset={measurements.dataset}, size={{}}, M={{:g}}"
    rows = [row.format(measurements.table["size"][i], measurements.table["M"][i]) for i in index]
    problems = [
        problem
        for column in ("N", "D")
        for problem in input_problems(
            column, labels, measurements.table[column].to_numpy(float)[index], rows
        )
    ]
    for name, (metric, eval_name) in measured.items():
        problems += input_problems(
            name,
            labels,
            measurements.value(metric, eval_name)[index],
            [f"{text}, metric={metric}, eval={eval_name}" for text in rows],
        )
    if problems:
        raise FitError(f"{measurements.dataset}: {law}: " + "; ".join(problems))


def check_loss_points(measurements: LadderMeasurements, eval_name: str, points: np.ndarray):
    """Stop on loss fit points that cannot be fitted (``check_points``), fewer than two, or
    whose losses are all equal within their noise: a flat ladder has no law to fit."""
    law = f"loss law on {eval_name}"
    check_points(measurements, law, points, {"loss": (LOSS, eval_name)})
    if points.sum() < 2:  # too few to be flat or not, or to fit any form
        fewest = min(len(form.params) for form in predicting(LOSS))
        raise measurements.failure(
            law,
            f"{points.sum()} fit point(s) (fit.loss.points); every form of the loss has "
            f"{fewest} or more parameters",
            points,
            measurements.value(LOSS, eval_name),
        )
    values = measurements.value(LOSS, eval_name)[points]
    sd = measurements.interval_width(LOSS, eval_name)[points] / (2 * Z_95)
    if constant(values, sd):
        raise measurements.failure(
            law,
            f"every fit point's loss is within its noise of {np.mean(values):.4g}: a flat "
            "ladder has no scaling law to fit (do the runs differ at all?)",
            points,
            measurements.value(LOSS, eval_name),
        )


def target_sizes(
    measurements: LadderMeasurements, extra_targets: list[dict]
) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    """Every run a loss form predicts (trained, then the untrained ones the settings list):
    their N and D, and their labels."""
    untrained = [t for t in extra_targets if t["dataset"] == measurements.dataset]
    n_params, tokens = measurements.sizes()
    labels = [measurements.label(index) for index in range(len(n_params))]
    return (
        (
            np.concatenate([n_params, [float(t["N"]) for t in untrained]]),
            np.concatenate([tokens, [float(t["D"]) for t in untrained]]),
        ),
        labels + [f"{t['size']} M={float(t['M']):g} (untrained)" for t in untrained],
    )


def judge(
    measurements: LadderMeasurements,
    form: Form,
    metric: str,
    eval_name: str,
    inputs: tuple,
    points: np.ndarray,
    params: np.ndarray,
    scale: float,
    targets: tuple[tuple[np.ndarray, np.ndarray], list[str]] | None,
) -> list[str]:
    """Why a converged fit makes no sense (this module's checks), in words; empty when it does.
    Every fit's parameters and its points' training (a diverged run) are judged; a loss or
    error-average fit's points too (one far off the others' trend), a loss form's targets, and
    an error average's points' spread. A task's accuracy is noisier than any of these thresholds
    assume: only its parameters and its points' training."""
    found = implausibility(params, form.params, form.exponents, form.irreducible)
    found += [
        f"fit point {measurements.label(index)} diverged in training (its train.json)"
        for index in np.flatnonzero(points & measurements.table["diverged"].to_numpy(bool))
    ]
    if metric == ACCURACY or not np.all(np.isfinite(params)):
        return found
    values = measurements.fitted_value(metric, eval_name)[points]
    labels = [measurements.label(index) for index in np.flatnonzero(points)]
    fitted = scale * form.law(*(x[points] for x in inputs), *params)
    found += off_trend(labels, fitted, values)
    if metric == ERROR:
        sd = measurements.interval_width(metric, eval_name)[points] / (2 * Z_95)
        if constant(values, sd):
            found.append(
                f"every fit point's error is within its noise of {np.mean(values):.4g}: the "
                "law's constants are not identified"
            )
    if metric == LOSS and targets is not None:
        sizes, target_labels = targets
        found += wild_targets(target_labels, form.predict(sizes, params), values)
    return found
