"""One dataset's ladder of trained runs: its measurements, and every registered law form fitted
on them with its bootstrap replicates.

Each loss form is fitted on each loss evaluation (validation set) on its own, so a reader sees
how much the choice of form moves a prediction. The error forms are fitted per task group, and
per task on its error 1 - accuracy, on the *measured* loss of ``loss_eval`` (as the paper
does); predictions then feed them the *predicted* loss (``workflow.predict``). A loss law that
cannot be fitted stops the stage; a downstream one is reported and left out (status
``failed``). The fit stage and the planner both fit here, so a plan's intervals are the fit
stage's.

Whether a task can be predicted at all is read off its fit points before any law
(``Predictability``): the error at chance less the error where the ladder ends, against the
binomial noise of that measurement.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from workflow import forms, sanity
from workflow.bootstrap import measurement_sd, resample
from workflow.errors import FitError
from workflow.forms import ACCURACY, ERROR, LOSS, SIZE, Form
from workflow.intervals import Z_95
from workflow.settings import FitSettings
from workflow.tables import runs_at

DOWNSTREAM = (ERROR, ACCURACY)  # fitted in this order, so the error averages' draws come first
# A fit's status; an implausible one converged to parameters that make no sense
# (``workflow.sanity``): it is kept, and its warnings say why.
OK, DEGENERATE, FAILED, IMPLAUSIBLE = "ok", "degenerate", "failed", "implausible"
# A task is predictable when, at the fit point with the most compute, its error is below its
# error at chance (where unknown, at the fit point with the least compute) by more than this
# many sds of that measurement's noise.
SIGNAL_SDS = 3.0


@dataclass(frozen=True)
class Fitted:
    """A law fitted on one evaluation: its parameters and its bootstrap replicates, one row
    each (NaN where a refit did not converge), its status (OK, DEGENERATE, FAILED or
    IMPLAUSIBLE), the factor its law's values are multiplied by (the error at chance for a
    form of it), and why its status is not OK, in words (None where it is)."""

    params: np.ndarray
    replicates: np.ndarray
    status: str = OK
    scale: float = 1.0
    warnings: str | None = None


@dataclass(frozen=True)
class Predictability:
    """A downstream evaluation's signal at the fit points: its error at chance less its error
    at the fit point with the most compute, and that measurement's sd (an accuracy's binomial
    sd from its items, else from its interval; NaN where neither is known)."""

    signal: float
    noise: float

    @property
    def predictable(self) -> bool | None:
        """Signal above SIGNAL_SDS sds of noise; None where the noise is unknown."""
        if not np.isfinite(self.noise):
            return None
        return bool(self.signal > SIGNAL_SDS * self.noise)


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
        if "chance" not in final:
            final = final.assign(chance=np.nan)
        if "diverged" not in final:
            final = final.assign(diverged=pd.NA)
        diverged = final["diverged"].astype("boolean").fillna(False)
        table = table.merge(
            diverged.groupby([final["size"], final["M"]]).any().rename("diverged").reset_index(),
            on=["size", "M"],
            how="left",
        )
        columns = ["size", "M", "value", "ci_low", "ci_high", "n_examples", "chance"]
        measured = {
            key: table.merge(rows[columns], how="left")
            for key, rows in final[final["metric"].isin([LOSS, *DOWNSTREAM])].groupby(
                ["metric", "eval"]
            )
        }
        return cls(dataset, table, measured)

    def evals(self, metric: str) -> list[str]:
        return sorted(eval_name for kind, eval_name in self.measured if kind == metric)

    def value(self, metric: str, eval_name: str, column: str = "value") -> np.ndarray:
        return self.measured[(metric, eval_name)][column].to_numpy(float, na_value=np.nan)

    def fitted_value(self, metric: str, eval_name: str) -> np.ndarray:
        """What the forms are fitted on: the value, or an accuracy's error 1 - accuracy."""
        value = self.value(metric, eval_name)
        return 1.0 - value if metric == ACCURACY else value

    def chance(self, metric: str, eval_name: str) -> float:
        """The evaluation's value at chance (runs.parquet's ``chance``); NaN where unknown."""
        chance = self.value(metric, eval_name, "chance")
        return (
            float(np.median(chance[np.isfinite(chance)])) if np.isfinite(chance).any() else np.nan
        )

    def chance_error(self, metric: str, eval_name: str) -> float:
        """The error at chance (``workflow.forms.chance_error``)."""
        return forms.chance_error(metric, self.chance(metric, eval_name))

    def predictability(self, metric: str, eval_name: str, selected: np.ndarray) -> Predictability:
        """The signal and noise of a downstream evaluation at the fit points ``selected``: the
        error at chance (where unknown, at the fit point with the least compute) less the
        error at the fit point with the most compute."""
        error = self.fitted_value(metric, eval_name)
        measured = selected & np.isfinite(error)
        if not measured.any():
            return Predictability(np.nan, np.nan)
        compute = self.table["N"].to_numpy(float) * self.table["D"].to_numpy(float)
        first = int(np.argmin(np.where(measured, compute, np.inf)))
        last = int(np.argmax(np.where(measured, compute, -np.inf)))
        chance = self.chance(metric, eval_name)
        reference = error[first] if np.isnan(chance) else self.chance_error(metric, eval_name)
        items = self.value(metric, eval_name, "n_examples")[last]
        noise = self.interval_width(metric, eval_name)[last] / (2 * Z_95)
        if metric == ACCURACY and items > 0:
            shrunk = (error[last] * items + 1) / (items + 2)  # a task at 0 or 1 has noise too
            noise = np.sqrt(shrunk * (1 - shrunk) / items)
        return Predictability(float(reference - error[last]), float(noise))

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
                match = runs_at(self.table["size"], self.table["M"], size, multiplier)
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

    def label(self, index: int) -> str:
        """A run as messages name it: 'xs M=20'."""
        return f"{self.table['size'][index]} M={self.table['M'][index]:g}"

    def failure(self, where: str, reason: str, used: np.ndarray, values: np.ndarray) -> FitError:
        """One message naming the dataset, the law and its points."""
        return FitError(f"{self.dataset}: {where}: {reason}; points: {self.describe(used, values)}")


@dataclass(frozen=True)
class LadderFits:
    """Every registered form fitted on one dataset's final runs, which runs were each
    quantity's fit points, and each downstream evaluation's predictability."""

    measurements: LadderMeasurements
    points: dict[str, np.ndarray]  # LOSS, ERROR, ACCURACY -> which runs are its fit points
    fits: dict[tuple[str, str, str], Fitted]  # (form name, metric, evaluation) -> the fit
    predictability: dict[tuple[str, str], Predictability]  # (metric, evaluation) -> it

    def of(self, form: Form, eval_name: str, metric: str | None = None) -> Fitted:
        """``form``'s fit on ``eval_name`` of ``metric`` (default: what the form predicts)."""
        return self.fits[(form.name, metric or form.predicts, eval_name)]


def fit_ladder(dataset: str, final: pd.DataFrame, settings: FitSettings) -> LadderFits:
    """Every loss form on every validation set, and every error form on every task group and
    task on the loss of ``settings.loss_eval``, each with its bootstrap replicates."""
    measurements = LadderMeasurements.from_rows(dataset, final)
    loss_eval = settings.loss_eval
    if loss_eval not in measurements.evals(LOSS):
        raise FitError(
            f"{dataset}: no loss evaluation {loss_eval!r} (fit.error.loss_eval, or plan's "
            f"--eval: the loss the error law is fitted on); available: {measurements.evals(LOSS)}"
        )
    rng = np.random.default_rng([settings.seed, zlib.crc32(dataset.encode())])
    sizes = measurements.sizes()
    points = {LOSS: measurements.select(settings.loss_points, LOSS)}
    for eval_name in measurements.evals(LOSS):
        sanity.check_loss_points(measurements, eval_name, points[LOSS])
    fits, loss_samples = _fit_quantity(
        measurements,
        LOSS,
        points[LOSS],
        {SIZE: sizes},
        {SIZE: sizes},
        settings,
        rng,
        sanity.target_sizes(measurements, settings.extra_targets),
    )
    downstream = np.zeros_like(points[LOSS])
    if any(measurements.evals(metric) for metric in DOWNSTREAM):
        downstream = measurements.select(settings.error_points, ERROR)
        sanity.check_points(
            measurements,
            f"error law (x: {loss_eval} loss)",
            downstream,
            {f"{loss_eval} loss": (LOSS, loss_eval)},
        )
        for eval_name in measurements.evals(ERROR):
            sanity.check_points(
                measurements, f"error law on {eval_name}", downstream, {"error": (ERROR, eval_name)}
            )
    predictability = {}
    for metric in DOWNSTREAM:
        points[metric] = downstream
        if not measurements.evals(metric):
            continue
        metric_fits, _ = _fit_quantity(
            measurements,
            metric,
            downstream,
            {SIZE: sizes, LOSS: (measurements.value(LOSS, loss_eval),)},
            {SIZE: sizes, LOSS: (loss_samples[loss_eval],)},
            settings,
            rng,
        )
        fits.update(metric_fits)
        for eval_name in measurements.evals(metric):
            predictability[(metric, eval_name)] = measurements.predictability(
                metric, eval_name, downstream
            )
    return LadderFits(measurements, points, fits, predictability)


def _fit_quantity(
    measurements: LadderMeasurements,
    metric: str,
    selected: np.ndarray,
    sources: dict[str, tuple[np.ndarray, ...]],
    replicate_sources: dict[str, tuple[np.ndarray, ...]],
    settings: FitSettings,
    rng: np.random.Generator,
    targets: tuple[tuple[np.ndarray, np.ndarray], list[str]] | None = None,
) -> tuple[dict[tuple[str, str, str], Fitted], dict[str, np.ndarray]]:
    """Every form fitted on each evaluation of ``metric``, with bootstrap replicates; also
    returns each evaluation's bootstrap samples (replicates x runs).

    ``sources`` holds the arrays (one value per run) each source of a form stands for while
    fitting, ``replicate_sources`` those of each replicate's refit (replicates x runs where
    they are resampled themselves). The samples are drawn once, from the residuals of the
    first form (in registry order) that fitted the evaluation, and every form is refitted on
    them. A form of the chance fraction is fitted on value / error at chance. Each fit is
    judged (``workflow.sanity.judge``; a form of the loss also at ``targets``' sizes). A form
    that cannot be fitted is ``failed`` and predicts nothing (a ladder whose loss is straight
    in log N leaves the paper form's E unfitted while Chinchilla's fits); a validation set on
    which no form of the loss can be fitted stops the stage, naming the first form's reason.
    """
    evals = measurements.evals(metric)
    values = np.array([measurements.fitted_value(metric, eval_name) for eval_name in evals])
    chance = np.array([measurements.chance_error(metric, eval_name) for eval_name in evals])
    fits, samples, solved, failures = {}, {}, [], {}
    for form in forms.predicting(metric):
        inputs = form.variables(*sources[form.source])
        scale = chance if form.of_chance else np.ones(len(evals))
        used = selected & np.isfinite(values) & np.all([np.isfinite(x) for x in inputs], axis=0)
        solution = form.fitting.fit(
            form.law,
            tuple(x[selected] for x in inputs),
            values[:, selected] / scale[:, None],
            settings,
        )
        status = np.where(solution.converged, OK, FAILED).astype(object)
        warnings = np.full(len(evals), None, dtype=object)
        for index, eval_name in enumerate(evals):
            where = _where(form, metric, eval_name, settings.loss_eval)
            reason = solution.failure
            if used[index].sum() < len(form.params):
                reason = f"{used[index].sum()} points for {len(form.params)} parameters"
                status[index] = FAILED
            elif status[index] == OK:
                reason = form.degenerate(
                    tuple(x[used[index]] for x in inputs), solution.params[index]
                )
                status[index] = DEGENERATE if reason else OK
            if status[index] == FAILED:
                failure = measurements.failure(where, reason, used[index], values[index])
                failures.setdefault(index, failure)
            else:
                found = sanity.judge(
                    measurements, form, metric, eval_name, inputs, used[index],
                    solution.params[index], scale[index], targets,
                )  # fmt: skip
                reason = "; ".join(([reason] if reason else []) + found)
                status[index] = IMPLAUSIBLE if found and status[index] == OK else status[index]
            if status[index] != OK:
                warnings[index] = reason
                print(f"{measurements.dataset}: {where} is {status[index]}: {reason}", flush=True)
        solved.append((form, inputs, used, scale, solution, status, warnings))
    if metric == LOSS:
        for index, failure in failures.items():
            if all(statuses[index] == FAILED for *_, statuses, _ in solved):
                raise failure
    for index, eval_name in enumerate(evals):
        residuals, n_params = np.array([]), 0
        for form, inputs, used, scale, solution, status, _ in solved:
            if status[index] != FAILED:
                points = used[index]
                fitted = form.law(*(x[points] for x in inputs), *solution.params[index])
                residuals = scale[index] * fitted - values[index][points]
                n_params = len(form.params)
                break
        width = measurements.interval_width(metric, eval_name)
        sd = measurement_sd(width, residuals, n_params)
        samples[eval_name] = resample(values[index], sd, settings.bootstrap, rng)
    for form, _, _, scale, solution, status, warnings in solved:
        replicates = form.fitting.refit(
            form.law,
            tuple(x[..., selected] for x in form.variables(*replicate_sources[form.source])),
            np.stack([samples[eval_name][:, selected] for eval_name in evals])
            / scale[:, None, None],
            solution,
        )
        replicates[status == FAILED] = np.nan
        params = np.where((status == FAILED)[:, None], np.nan, solution.params)
        for index, eval_name in enumerate(evals):
            fits[(form.name, metric, eval_name)] = Fitted(
                params[index], replicates[index], status[index], scale[index], warnings[index]
            )
    return fits, samples


def _where(form: Form, metric: str, eval_name: str, loss_eval: str) -> str:
    """The law a message is about: its metric, evaluation and form (and x, for a form of
    the loss)."""
    x = f", x: {loss_eval} loss" if form.source == LOSS else ""
    return f"{metric} law on {eval_name} ({form.name} form{x})"
