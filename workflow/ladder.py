"""One dataset's ladder of trained runs: its measurements, and every registered law form fitted
on them with its bootstrap replicates.

Each loss form is fitted on each loss evaluation (validation set) on its own, so a reader sees
how much the choice of form moves a prediction. The error forms are fitted per task group on
the *measured* loss of ``loss_eval`` (as the paper does); predictions then feed them the
*predicted* loss (``workflow.predict``). The fit stage and the planner both fit here, so a
plan's intervals are the fit stage's.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from workflow import forms
from workflow.bootstrap import measurement_sd, resample
from workflow.errors import FitError
from workflow.forms import ERROR, LOSS, SIZE, Form
from workflow.settings import FitSettings


@dataclass(frozen=True)
class Fitted:
    """A law fitted on one evaluation: its parameters and its bootstrap replicates, one row
    each (NaN where a refit did not converge)."""

    params: np.ndarray
    replicates: np.ndarray


@dataclass(frozen=True)
class LadderMeasurements:
    """One dataset's final checkpoints: one row per run, and its measurements by (metric, eval)."""

    dataset: str
    table: pd.DataFrame
    measured: dict[tuple[str, str], pd.DataFrame]

    @classmethod
    def from_rows(cls, dataset: str, final: pd.DataFrame) -> LadderMeasurements:
        duplicated = final.duplicated(["size", "M", "metric", "eval"])
        if duplicated.any():
            row = final[duplicated].iloc[0]
            raise FitError(
                f"{dataset}: two final rows for {row['size']} M={row['M']:g} "
                f"{row['metric']} {row['eval']}"
            )
        table = (
            final[["size", "N", "M", "D"]]
            .drop_duplicates(["size", "M"])
            .sort_values(["N", "M"])
            .reset_index(drop=True)
        )
        fitted = final[final["metric"].isin([LOSS, ERROR])]  # accuracies are not fitted
        measured = {
            key: table.merge(rows[["size", "M", "value", "ci_low", "ci_high"]], how="left")
            for key, rows in fitted.groupby(["metric", "eval"])
        }
        return cls(dataset, table, measured)

    def evals(self, metric: str) -> list[str]:
        return sorted(eval_name for kind, eval_name in self.measured if kind == metric)

    def value(self, metric: str, eval_name: str, column: str = "value") -> np.ndarray:
        return self.measured[(metric, eval_name)][column].to_numpy(float, na_value=np.nan)

    def interval_width(self, metric: str, eval_name: str) -> np.ndarray:
        """ci_high - ci_low of each run (NaN where a measurement has no interval)."""
        return self.value(metric, eval_name, "ci_high") - self.value(metric, eval_name, "ci_low")

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Each run's N and D, as floats."""
        return self.table["N"].to_numpy(float), self.table["D"].to_numpy(float)

    def select(self, points: dict[str, list[float]], law: str) -> np.ndarray:
        """Which runs are the law's fit points; every configured point must exist."""
        selected = np.zeros(len(self.table), dtype=bool)
        for size, multipliers in points.items():
            for multiplier in multipliers:
                match = (self.table["size"] == size).to_numpy() & np.isclose(
                    self.table["M"].to_numpy(float), float(multiplier), rtol=1e-9
                )
                if not match.any():
                    raise FitError(
                        f"{self.dataset}: the {law} law's fit point {size} M={multiplier:g} has "
                        f"no final checkpoint; runs: {self.describe(np.ones_like(selected))}"
                    )
                selected |= match
        return selected

    def describe(self, selected: np.ndarray, values: np.ndarray | None = None) -> str:
        rows = self.table[selected]
        labels = [
            f"{size} M={multiplier:g}"
            for size, multiplier in zip(rows["size"], rows["M"], strict=True)
        ]
        if values is not None:
            labels = [
                f"{label} ({value:.4g})"
                for label, value in zip(labels, values[selected], strict=True)
            ]
        return ", ".join(labels)

    def failure(self, where: str, reason: str, used: np.ndarray, values: np.ndarray) -> FitError:
        """One message naming the dataset, the law and its points."""
        return FitError(f"{self.dataset}: {where}: {reason}; points: {self.describe(used, values)}")


@dataclass(frozen=True)
class LadderFits:
    """Every registered form fitted on one dataset's final runs, and which runs were each
    quantity's fit points."""

    measurements: LadderMeasurements
    points: dict[str, np.ndarray]  # LOSS, ERROR -> which runs are that law's fit points
    fits: dict[tuple[str, str], Fitted]  # (form name, evaluation) -> the fit

    def of(self, form: Form, eval_name: str) -> Fitted:
        return self.fits[(form.name, eval_name)]


def fit_ladder(dataset: str, final: pd.DataFrame, settings: FitSettings) -> LadderFits:
    """Every loss form on every validation set, and every error form on every task group on
    the loss of ``settings.loss_eval``, each with its bootstrap replicates."""
    measurements = LadderMeasurements.from_rows(dataset, final)
    loss_eval = settings.loss_eval
    if loss_eval not in measurements.evals(LOSS):
        raise FitError(
            f"{dataset}: no loss evaluation {loss_eval!r} (error.loss_eval, the loss the "
            f"error law is fitted on); available: {measurements.evals(LOSS)}"
        )
    rng = np.random.default_rng([settings.seed, zlib.crc32(dataset.encode())])
    sizes = measurements.sizes()
    points = {LOSS: measurements.select(settings.loss_points, LOSS)}
    fits, loss_samples = _fit_quantity(
        measurements, LOSS, points[LOSS], {SIZE: sizes}, {SIZE: sizes}, settings, rng
    )
    points[ERROR] = np.zeros_like(points[LOSS])
    if measurements.evals(ERROR):
        points[ERROR] = measurements.select(settings.error_points, ERROR)
        error_fits, _ = _fit_quantity(
            measurements,
            ERROR,
            points[ERROR],
            {SIZE: sizes, LOSS: (measurements.value(LOSS, loss_eval),)},
            {SIZE: sizes, LOSS: (loss_samples[loss_eval],)},
            settings,
            rng,
        )
        fits.update(error_fits)
    return LadderFits(measurements, points, fits)


def _fit_quantity(
    measurements: LadderMeasurements,
    quantity: str,
    selected: np.ndarray,
    sources: dict[str, tuple[np.ndarray, ...]],
    replicate_sources: dict[str, tuple[np.ndarray, ...]],
    settings: FitSettings,
    rng: np.random.Generator,
) -> tuple[dict[tuple[str, str], Fitted], dict[str, np.ndarray]]:
    """Every form predicting ``quantity`` on each of its evaluations, with bootstrap
    replicates; also returns each evaluation's bootstrap samples (replicates x runs).

    ``sources`` holds the arrays (one value per run) each source of a form stands for while
    fitting, ``replicate_sources`` those of each replicate's refit (replicates x runs where
    they are resampled themselves). The samples are drawn once, after the quantity's
    reference form (its first) is fitted, and every form is refitted on them.
    """
    evals = measurements.evals(quantity)
    values = np.array([measurements.value(quantity, eval_name) for eval_name in evals])
    fits, samples = {}, {}
    for position, form in enumerate(forms.predicting(quantity)):
        inputs = form.variables(*sources[form.source])
        used = selected & np.isfinite(values) & np.all([np.isfinite(x) for x in inputs], axis=0)
        where = [_where(form, quantity, eval_name, settings.loss_eval) for eval_name in evals]
        for index in range(len(evals)):
            if used[index].sum() < len(form.params):
                reason = f"{used[index].sum()} points for {len(form.params)} parameters"
                raise measurements.failure(where[index], reason, used[index], values[index])
        solution = form.fitting.fit(
            form.law, tuple(x[selected] for x in inputs), values[:, selected], settings
        )
        for index in np.flatnonzero(~solution.converged):
            raise measurements.failure(where[index], solution.failure, used[index], values[index])
        for index, eval_name in enumerate(evals):
            caveat = form.caveat(tuple(x[used[index]] for x in inputs), solution.params[index])
            if caveat:
                print(f"{measurements.dataset}: {quantity} law on {eval_name} {caveat}", flush=True)
        if position == 0:
            for index, eval_name in enumerate(evals):
                points = used[index]
                residuals = (
                    form.law(*(x[points] for x in inputs), *solution.params[index])
                    - values[index][points]
                )
                width = measurements.interval_width(quantity, eval_name)
                sd = measurement_sd(width, residuals, len(form.params))
                samples[eval_name] = resample(values[index], sd, settings.bootstrap, rng)
        replicates = form.fitting.refit(
            form.law,
            tuple(x[..., selected] for x in form.variables(*replicate_sources[form.source])),
            np.stack([samples[eval_name][:, selected] for eval_name in evals]),
            solution,
        )
        for index, eval_name in enumerate(evals):
            fits[(form.name, eval_name)] = Fitted(solution.params[index], replicates[index])
    return fits, samples


def _where(form: Form, quantity: str, eval_name: str, loss_eval: str) -> str:
    """The law a message is about: its quantity, evaluation and form (and x, for a form of
    the loss)."""
    x = f", x: {loss_eval} loss" if form.source == LOSS else ""
    return f"{quantity} law on {eval_name} ({form.name} form{x})"
