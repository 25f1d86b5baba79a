"""Predictions of one dataset's runs along every chain of laws, with 95% intervals, and the
fitted parameters, as rows of predictions.parquet and fits.parquet.

A chain starts at a form of the run's size (N, D): each loss form, and any form that predicts
error from the size directly. Each loss form's chain goes on through every form of the loss,
which predicts from the *predicted* loss, the chain one runs for a model nobody trained. Every
target is predicted: the trained runs (fit points and targets) and the untrained ones the
config lists; a task's accuracy is 1 - its predicted error. A prediction's interval comes from
the same chain through each bootstrap replicate (``workflow.bootstrap``), widened by what
makes extrapolations miss (``workflow.calibration``). An error or accuracy
outside [0, 1] (a form that is not bounded, at a loss far from its fit points) is clipped to
it and the row says so (``clipped``); a law that could not be fitted predicts nothing (null).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow import forms, laws
from workflow.calibration import CALIBRATION_COLUMNS, calibrate_table, elasticity
from workflow.forms import ACCURACY, FITTED_ON, LOSS
from workflow.intervals import percentile_interval
from workflow.ladder import DOWNSTREAM, OK, Fitted, LadderFits, fit_ladder
from workflow.settings import FitSettings
from workflow.tables import FITS_SCHEMA


def uncalibrated_tables(
    dataset: str, final: pd.DataFrame, settings: FitSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predictions (bootstrap intervals, unclipped) and the parameters of one dataset."""
    ladder = fit_ladder(dataset, final, settings)
    untrained = [target for target in settings.extra_targets if target["dataset"] == dataset]
    predictions = ladder_predictions(ladder, untrained, settings.loss_eval)
    report_fits(ladder)
    return predictions, parameter_rows(ladder)


def ladder_predictions(ladder: LadderFits, untrained: list[dict], loss_eval: str) -> pd.DataFrame:
    """A fitted ladder's predictions (bootstrap intervals, unclipped) of its trained runs and
    of the ``untrained`` ones (dicts with size, N, M and D)."""
    table = ladder.measurements.table
    columns = ["size", "N", "M", "D"]
    extra = pd.DataFrame(untrained, columns=columns)
    targets = pd.concat([table[columns], extra], ignore_index=True)
    padding = np.zeros(len(extra), dtype=bool)
    roles = {
        quantity: np.concatenate([points, padding]) for quantity, points in ladder.points.items()
    }
    return predict_targets(ladder, targets, roles, loss_eval)


def dataset_tables(
    dataset: str, final: pd.DataFrame, settings: FitSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predictions, with calibrated intervals, and the parameters of one dataset (its
    final rows of runs.parquet)."""
    predictions, parameters = uncalibrated_tables(dataset, final, settings)
    return finished(predictions, settings.loss_eval, settings.run_sd), parameters


def uncalibrated_predictions(
    dataset: str, final: pd.DataFrame, settings: FitSettings
) -> pd.DataFrame:
    """One dataset's predictions with the bootstrap's intervals, unclipped, and what the
    calibration needs beside them (``workflow.calibration.calibrate_table``)."""
    return uncalibrated_tables(dataset, final, settings)[0]


def finished(predictions: pd.DataFrame, loss_eval: str, run_sd: float) -> pd.DataFrame:
    """predictions.parquet's rows from uncalibrated ones: calibrated intervals
    (``workflow.calibration``), errors and accuracies within [0, 1], each row's relative error
    and whether its interval holds its actual value."""
    calibrated = calibrate_table(predictions, loss_eval, run_sd)
    table = calibrated.drop(columns=CALIBRATION_COLUMNS)
    predicted, low, high = (
        table[name].to_numpy(float) for name in ("predicted", "ci_low", "ci_high")
    )
    bounded = (table["quantity"] != LOSS).to_numpy()
    predicted, low, high, clipped = within_bounds(bounded, predicted, low, high)
    actual = table["actual"].to_numpy(float)
    return table.assign(
        predicted=predicted,
        ci_low=low,
        ci_high=high,
        relative_error=relative_error(predicted, actual),
        inside=inside_interval(actual, low, high),
        clipped=clipped,
    )


def report_fits(ladder: LadderFits) -> None:
    """Log each loss and error-average fit's parameters (one that is not ok by its status and
    warnings), and per form how the tasks' fits went."""
    dataset = ladder.measurements.dataset
    tasks: dict[str, list] = {}
    for (form_name, metric, eval_name), fitted in ladder.fits.items():
        failed = int(np.isnan(fitted.replicates).any(axis=1).sum())
        if metric == ACCURACY:
            tasks.setdefault(form_name, []).append((fitted.status, failed))
            continue
        shown = np.array2string(fitted.params, precision=5)
        if fitted.status != OK:
            shown = f"{fitted.status} ({fitted.warnings})"
        print(
            f"{dataset} {form_name} {eval_name}: {shown}"
            + (f"; {failed} of {len(fitted.replicates)} refits did not converge" if failed else "")
        )
    for form_name, outcomes in tasks.items():
        statuses = pd.Series([status for status, _ in outcomes]).value_counts()
        print(
            f"{dataset} {form_name} on {len(outcomes)} tasks: "
            + ", ".join(f"{count} {status}" for status, count in statuses.items())
            + f"; {sum(failed for _, failed in outcomes)} refits did not converge"
        )


def predict_targets(
    ladder: LadderFits, targets: pd.DataFrame, roles: dict[str, np.ndarray], loss_eval: str
) -> pd.DataFrame:
    """Every target (trained runs first, then untrained ones) predicted by every chain.

    ``roles`` holds, per quantity, which targets are that law's fit points.
    """
    measurements = ladder.measurements
    sizes = targets["N"].to_numpy(float), targets["D"].to_numpy(float)
    untrained = np.full(len(targets) - len(measurements.table), np.nan)
    frames = []

    def frame(link, quantity, eval_name, predicted, replicate_predictions, elasticity) -> dict:
        low, high = percentile_interval(replicate_predictions)
        actual = np.concatenate([measurements.value(quantity, eval_name), untrained])
        label = link.label
        return {
            **{name: targets[name].to_numpy() for name in ("size", "N", "M", "D")},
            "dataset": np.full(len(targets), measurements.dataset),
            "form": np.full(len(targets), label),
            "C": laws.compute(*sizes),
            "quantity": np.full(len(targets), quantity),
            "eval": np.full(len(targets), eval_name),
            "role": np.where(roles[quantity], "fit", "target"),
            "predicted": predicted,
            "actual": actual,
            "relative_error": np.full(len(targets), np.nan),
            "ci_low": low,
            "ci_high": high,
            "inside": np.full(len(targets), None),
            "clipped": np.full(len(targets), None),
            # what the calibration needs beside them
            "n_params": np.full(len(targets), len(link.form.params)),
            "family": np.full(len(targets), LOSS if quantity == LOSS else link.form.name),
            "upstream": np.full(len(targets), link.after.chain_label() if link.after else ""),
            "elasticity": elasticity,
        }

    predicted_loss = {}
    for link in forms.links():
        form = link.form
        if link.after is None:
            source = replicate_source = sizes
        else:
            loss, replicate_loss = predicted_loss[(link.after.name, loss_eval)]
            source, replicate_source = (loss,), (replicate_loss,)
        for metric in FITTED_ON[form.predicts]:
            for eval_name in measurements.evals(metric):
                fitted = ladder.of(form, eval_name, metric)
                predicted = fitted.scale * form.predict(source, fitted.params)
                replicate_predictions = fitted.scale * form.predict(
                    replicate_source, _as_columns(fitted.replicates)
                )
                if metric == LOSS:
                    predicted_loss[(form.name, eval_name)] = predicted, replicate_predictions
                if metric == ACCURACY:  # fitted as its error
                    predicted, replicate_predictions = 1 - predicted, 1 - replicate_predictions
                gain = np.zeros(len(targets))
                if link.after is not None:
                    gain = chain_elasticity(form, fitted, metric, source[0])
                frames.append(
                    frame(link, metric, eval_name, predicted, replicate_predictions, gain)
                )
    return pd.DataFrame({name: np.concatenate([f[name] for f in frames]) for name in frames[0]})


def chain_elasticity(form: forms.Form, fitted: Fitted, metric: str, loss: np.ndarray) -> np.ndarray:
    """g = |d ln y / d ln L| of a downstream prediction y at its predicted loss L: how much of
    the loss's uncertainty reaches it."""

    def predict(at: np.ndarray) -> np.ndarray:
        error = fitted.scale * form.predict((at,), fitted.params)
        return 1 - error if metric == ACCURACY else error

    return elasticity(predict, loss)


def within_bounds(
    bounded: np.ndarray, predicted: np.ndarray, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Errors and accuracies (``bounded`` rows), and their intervals' ends, clipped to [0, 1],
    and which rows were clipped: 'prediction' where the prediction left [0, 1], 'interval'
    where only an end of its interval did, None elsewhere (and for a loss, which has no
    bound)."""
    clipped = np.full(len(predicted), None, dtype=object)
    outside = [bounded & ((values < 0) | (values > 1)) for values in (predicted, low, high)]
    clipped[outside[1] | outside[2]] = "interval"
    clipped[outside[0]] = "prediction"
    predicted, low, high = (
        np.where(bounded, np.clip(values, 0.0, 1.0), values) for values in (predicted, low, high)
    )
    return predicted, low, high, clipped


def parameter_rows(ladder: LadderFits) -> pd.DataFrame:
    """fits.parquet's rows: every form of the size, then every form of the loss under each
    chain it ends; each with its fit's status and warnings, and a downstream evaluation's
    chance and predictability."""
    measurements = ladder.measurements
    firsts_first = sorted(forms.links(), key=lambda link: link.after is not None)
    records = []
    for link in firsts_first:
        for metric in FITTED_ON[link.form.predicts]:
            for eval_name in measurements.evals(metric):
                fitted = ladder.of(link.form, eval_name, metric)
                chance, predictable = None, None
                if metric in DOWNSTREAM:
                    chance = measurements.chance(metric, eval_name)
                    predictable = ladder.predictability[(metric, eval_name)].predictable
                key = (measurements.dataset, link.label, metric, eval_name)
                records += [
                    (*key, name, value, fitted.status, chance, predictable, fitted.warnings)
                    for name, value in zip(link.form.params, fitted.params, strict=True)
                ]
    return pd.DataFrame.from_records(records, columns=FITS_SCHEMA.names)


def relative_error(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|predicted - actual| / actual; NaN where the actual value is 0 (a task nobody solves)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(actual == 0, np.nan, np.abs(predicted - actual) / actual)


def inside_interval(actual: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Whether each actual value lies in its interval; None where there is no actual, or no
    interval (a form that could not be fitted predicts nothing, so it cannot miss)."""
    inside = (actual >= low) & (actual <= high)
    unknown = np.isnan(actual) | np.isnan(low) | np.isnan(high)
    return np.where(unknown, None, inside).astype(object)


def _as_columns(params: np.ndarray) -> list[np.ndarray]:
    """Replicate parameters (replicates x p) as p column vectors, so laws broadcast over runs."""
    return list(params.T[:, :, None])
