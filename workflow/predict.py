"""Predictions of one dataset's runs along every chain of laws, with 95% intervals, and the
fitted parameters, as rows of predictions.parquet and fits.parquet.

A chain starts at a form of the run's size (N, D): each loss form, and any form that predicts
error from the size directly. Each loss form's chain goes on through every form of the loss,
which predicts from the *predicted* loss, the chain one runs for a model nobody trained. Every
target is predicted: the trained runs (fit points and targets) and the untrained ones the
config lists. A prediction's interval comes from the same chain through each bootstrap
replicate (``workflow.bootstrap``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow import forms, laws
from workflow.forms import ERROR, LOSS
from workflow.intervals import percentile_interval
from workflow.ladder import LadderFits, fit_ladder
from workflow.settings import FitSettings
from workflow.tables import FITS_SCHEMA


def dataset_tables(
    dataset: str, final: pd.DataFrame, settings: FitSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predictions and the parameters of one dataset (its final rows of runs.parquet)."""
    ladder = fit_ladder(dataset, final, settings)
    table = ladder.measurements.table
    untrained = pd.DataFrame(
        [target for target in settings.extra_targets if target["dataset"] == dataset],
        columns=["size", "N", "M", "D"],
    )
    targets = pd.concat([table, untrained[table.columns]], ignore_index=True)
    padding = np.zeros(len(untrained), dtype=bool)
    roles = {
        quantity: np.concatenate([ladder.points[quantity], padding]) for quantity in (LOSS, ERROR)
    }
    predictions = predict_targets(ladder, targets, roles, settings.loss_eval)
    for (form_name, eval_name), fitted in ladder.fits.items():
        failed = int(np.isnan(fitted.replicates).any(axis=1).sum())
        print(
            f"{dataset} {form_name} {eval_name}: {np.array2string(fitted.params, precision=5)}"
            + (f"; {failed} of {len(fitted.replicates)} refits did not converge" if failed else "")
        )
    return predictions, parameter_rows(ladder)


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

    def frame(label, quantity, eval_name, predicted, replicate_predictions) -> dict:
        low, high = percentile_interval(replicate_predictions)
        actual = np.concatenate([measurements.value(quantity, eval_name), untrained])
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
            "relative_error": np.abs(predicted - actual) / actual,
            "ci_low": low,
            "ci_high": high,
        }

    predicted_loss = {}
    for link in forms.links():
        form = link.form
        for eval_name in measurements.evals(form.predicts):
            fitted = ladder.of(form, eval_name)
            if link.after is None:
                source = replicate_source = sizes
            else:
                loss, replicate_loss = predicted_loss[(link.after.name, loss_eval)]
                source, replicate_source = (loss,), (replicate_loss,)
            predicted = form.predict(source, fitted.params)
            replicate_predictions = form.predict(replicate_source, _as_columns(fitted.replicates))
            if form.predicts == LOSS:
                predicted_loss[(form.name, eval_name)] = predicted, replicate_predictions
            frames.append(
                frame(link.label, form.predicts, eval_name, predicted, replicate_predictions)
            )
    return pd.DataFrame({name: np.concatenate([f[name] for f in frames]) for name in frames[0]})


def parameter_rows(ladder: LadderFits) -> pd.DataFrame:
    """fits.parquet's rows: every form of the size, then every form of the loss under each
    chain it ends."""
    measurements = ladder.measurements
    firsts_first = sorted(forms.links(), key=lambda link: link.after is not None)
    records = [
        (measurements.dataset, link.label, link.form.predicts, eval_name, name, value)
        for link in firsts_first
        for eval_name in measurements.evals(link.form.predicts)
        for name, value in zip(
            link.form.params, ladder.of(link.form, eval_name).params, strict=True
        )
    ]
    return pd.DataFrame.from_records(records, columns=FITS_SCHEMA.names)


def _as_columns(params: np.ndarray) -> list[np.ndarray]:
    """Replicate parameters (replicates x p) as p column vectors, so laws broadcast over runs."""
    return list(params.T[:, :, None])
