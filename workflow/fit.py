"""Fit stage: the scaling laws on the final checkpoints, every run predicted, 95% intervals.

For each dataset, the loss law is fitted on each loss evaluation (validation set) on its own,
in two forms, so a reader sees how much the choice of form moves a prediction:

- ``paper``: L(C, M) = E + (a M^eta + b M^-eta) C^-eta on raw loss, with scipy's curve_fit
  (Levenberg-Marquardt) from the 128-start grid of the paper's code, keeping the lowest
  residual. This is what Gadre et al. did, so the released testbed reproduces their numbers.
- ``chinchilla``: L = E + A N^-alpha + B D^-beta with free exponents, fitted as Besiroglu et al.
  (2024) do: Huber loss (delta 1e-3) on log loss, L-BFGS from a grid of starts.

The error law Err(L) = epsilon - k exp(-gamma L) is fitted per task group on the *measured*
loss of ``loss_eval`` (as the paper does); every run's error is then predicted from its
*predicted* loss, the chain one runs for a model nobody trained.

Intervals: a parametric bootstrap over the fit points' measurement uncertainty. Each replicate
adds to every fit point a normal draw whose sd is the one its 95% interval implies,
(ci_high - ci_low) / (2 x 1.96); a point without an interval (the released error averages have
none) gets the sd of its law's residuals, sqrt(SSR / (n - p)). The loss of ``loss_eval`` is
drawn once per replicate and used both for its loss fit and as the error law's x, so error
intervals carry the loss uncertainty too. Every refit is warm-started from the best fit. The
interval is the 2.5-97.5 percentile of the replicates' predictions (a refit that does not
converge is left out and counted in the log): it covers evaluation noise of the fit points, not
seed-to-seed training variance, nor a wrong functional form (compare the two forms for that).

``python -m workflow.fit --runs RUNS --settings JSON --predictions OUT --fits OUT [--workers N]``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.optimize import leastsq

from workflow import laws
from workflow.atomic import atomic_path
from workflow.runs import untrained_targets
from workflow.tables import read_runs_table

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("N", pa.int64(), nullable=False),
        pa.field("M", pa.float64(), nullable=False),
        pa.field("D", pa.int64(), nullable=False),
        pa.field("C", pa.float64(), nullable=False),
        pa.field("quantity", pa.string(), nullable=False),
        pa.field("eval", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("predicted", pa.float64()),
        pa.field("actual", pa.float64()),
        pa.field("relative_error", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("size", pa.string(), nullable=False),
    ]
)
FITS_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("law", pa.string(), nullable=False),
        pa.field("eval", pa.string(), nullable=False),
        pa.field("param", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)
FORM_PARAMS = {"paper": laws.LOSS_PARAMS, "chinchilla": laws.CHINCHILLA_PARAMS}
Z_95 = 1.959963984540054

# The paper's multi-start grid (mlfoundations/scaling, scaling/laws.py): four values for each of
# the two coefficients, two exponents, four irreducible losses. Its parameters are
# L = A N^x + B' D^x + E with B' = B 6^(x/2); in L(C, M) they are eta = -x/2, a = A 6^eta, b = B.
PAPER_GRID = np.array(
    [
        (irreducible, coefficient_n * 6.0 ** (-exponent / 2), coefficient_d, -exponent / 2)
        for coefficient_n, coefficient_d, exponent, irreducible in itertools.product(
            (1e2, 3e2, 1e3, 3e3), (1e2, 3e2, 1e3, 3e3), (-0.1, -0.3), (0.0, 1.0, 2.0, 10.0)
        )
    ]
)
# curve_fit's default start, which the paper's code uses for the error law.
ERROR_START = (1.0, 1.0, 1.0)

# Besiroglu et al.'s grid (Hoffmann et al.'s) is log A, log B in {0, 5, ..., 25}, log E in
# {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2}: 4,500 starts. We keep every other value of
# each axis (3^5 = 243 starts). On every evaluation of the released testbed they reach the full
# grid's lowest objective to 1e-8 (6.9B predictions agree to 3e-7) in a tenth of the time, except
# where a curve passes through all five points exactly and every such curve is a minimum.
CHINCHILLA_GRID = np.array(
    list(
        itertools.product(
            (0.0, 10.0, 20.0), (0.0, 10.0, 20.0), (-1.0, 0.0, 1.0), (0.0, 1.0, 2.0), (0.0, 1.0, 2.0)
        )
    )
)
HUBER_DELTA = 1e-3
SCREEN_ITERATIONS = 50  # L-BFGS iterations from every grid start before keeping the best
POLISHED_STARTS = 8  # best screened starts per problem that run on to convergence
# An L-BFGS iteration that lowers the objective by at most relative x |value| + absolute ends a
# fit. The fit itself: 1e-8 relative moves a 6.9B prediction by < 1e-6 on the released testbed,
# and 1e-15 is a residual change of ~3e-8 in log loss, far below what any loss is measured to.
# The bootstrap refits: scipy's L-BFGS-B default, 2.2e-9 x max(|value|, 1), which Besiroglu et
# al. used; replicates whose points a curve can almost pass through would otherwise creep along
# a flat valley for thousands of iterations.
FIT_TOLERANCE = (1e-8, 1e-15)
REFIT_TOLERANCE = (2.2e-9, 2.2e-9)
# An objective below this passes within 1.4e-7 of every log loss: the curve goes through the
# points, and going on would only slide along the valley of curves that do.
EXACT_FIT = 1e-14


# Below this, exp(-gamma L) is linear to 1% across the fit points' loss range.
LINEAR_ERROR_LAW = 0.01


class FitError(ValueError):
    """A law that cannot be fitted; the message names the dataset, the law and the points."""


@dataclass(frozen=True)
class Settings:
    """What the rule passes as --settings (see rules/fit.smk)."""

    loss_points: dict[str, list[float]]
    error_points: dict[str, list[float]]
    loss_eval: str | None = None
    # The schema's defaults, for settings given by hand (tests, the CLI).
    starts: int = 128
    bootstrap: int = 200
    seed: int = 0
    extra_targets: list[dict] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise FitError(f"--settings is not JSON: {error}") from None
        return cls.from_payload(payload)

    @classmethod
    def from_payload(cls, payload: dict) -> Settings:
        """From the dict ``settings_payload`` builds (the rule passes it as JSON)."""
        try:
            given = {
                "loss_points": payload["loss"]["points"],
                "error_points": payload["error"]["points"],
                "starts": payload["loss"].get("starts"),
                "loss_eval": payload["error"].get("loss_eval"),
                "bootstrap": payload.get("bootstrap"),
                "seed": payload.get("seed"),
                "extra_targets": payload.get("extra_targets"),
            }
        except KeyError as missing:
            raise FitError(
                f"settings lack {missing}; expected loss.points and error.points"
            ) from None
        return cls(**{name: value for name, value in given.items() if value is not None})


def error_loss_eval(config: dict) -> str:
    """The validation set whose loss the error law is fitted on (and the plot shows)."""
    chosen = config["fit"]["error"].get("loss_eval")
    if chosen:
        return chosen
    # The released testbed's loss is C4's validation set's, the one the paper fits on.
    return "c4_val" if config.get("released_dir") else config["validation"]["sets"][0]


def settings_payload(config: dict) -> dict:
    """Everything the fit stage needs from a validated config, as the rule passes it (JSON).

    One builder for the fit rule and the planner (workflow/plan.py), so both fit the same way.
    """
    fit = config["fit"]
    extra_targets = (
        []  # the released testbed has no runs to predict beyond its own
        if config.get("released_dir")
        else [
            {
                "dataset": run.dataset,
                "size": run.size,
                "N": run.n_params,
                "M": run.multiplier,
                "D": run.tokens,
            }
            for run in untrained_targets(config)
        ]
    )
    return {
        "loss": {"points": fit["loss"]["points"], "starts": fit["loss"]["starts"]},
        "error": {"points": fit["error"]["points"], "loss_eval": error_loss_eval(config)},
        "bootstrap": fit["bootstrap"],
        "seed": fit["seed"],
        "extra_targets": extra_targets,
    }


# ---------------------------------------------------------------------------------------------
# The paper's form and the error law: Levenberg-Marquardt (scipy's curve_fit)


def levenberg_marquardt(
    law: Callable, jacobian: Callable, inputs: tuple, values: np.ndarray, start: Sequence[float]
) -> np.ndarray | None:
    """One fit of ``law(*inputs, *params)`` to ``values``; None when it does not converge.

    This is scipy's ``curve_fit(method="lm")``: the same MINPACK routine (lmder, via leastsq)
    with the same defaults and the same test of success, called without curve_fit's wrapper,
    whose overhead would be a third of the fit stage's time. tests/test_fit.py checks that
    both give the same parameters.
    """
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            params, _, _, _, status = leastsq(
                lambda params: law(*inputs, *params) - values,
                np.asarray(start, dtype=float),
                Dfun=lambda params: jacobian(*inputs, *params),
                full_output=True,
                maxfev=10_000,
            )
        except (RuntimeError, ValueError, TypeError):
            return None
    with np.errstate(all="ignore"):
        finite = np.all(np.isfinite(params)) and np.all(np.isfinite(law(*inputs, *params)))
    return params if status in (1, 2, 3, 4) and finite else None


def refit(
    law: Callable,
    jacobian: Callable,
    inputs: tuple[np.ndarray, ...],
    samples: np.ndarray,
    start: np.ndarray,
) -> np.ndarray:
    """Bootstrap refits of ``law`` to each row of ``samples``, warm-started from the best fit.

    ``inputs`` are arrays of shape (points,) or (replicates, points). Each refit starts at the
    best fit moved by its sample's Gauss-Newton step (the linearised refit) and MINPACK takes
    it from there, falling back to the best fit itself if that fails. On the released testbed
    this reaches the same minima as starting at the best fit (all 4,800 loss refits agree to
    1e-6 in the sum of squares) in half the evaluations. Rows that do not converge are NaN.
    """
    with np.errstate(all="ignore"):
        step = np.einsum(
            "...pn,...n->...p",
            np.linalg.pinv(jacobian(*inputs, *start)),
            samples - law(*inputs, *start),
        )
    refits = np.full((len(samples), len(start)), np.nan)
    for row, sample in enumerate(samples):
        arguments = tuple(x if x.ndim == 1 else x[row] for x in inputs)
        for first in (start + step[row], start):
            params = levenberg_marquardt(law, jacobian, arguments, sample, first)
            if params is not None:
                refits[row] = params
                break
    return refits


def paper_starts(count: int, seed: int = 0) -> np.ndarray:
    """``count`` starting points: the paper's 128, an evenly spaced subset, or 128 plus random."""
    if count <= len(PAPER_GRID):
        return PAPER_GRID[np.linspace(0, len(PAPER_GRID) - 1, count).round().astype(int)]
    rng = np.random.default_rng(seed)
    extra = count - len(PAPER_GRID)
    low, high = PAPER_GRID.min(axis=0), PAPER_GRID.max(axis=0)
    log_a, log_b = (rng.uniform(np.log(low[i]), np.log(high[i]), extra) for i in (1, 2))
    random = np.column_stack(
        [
            rng.uniform(low[0], high[0], extra),
            np.exp(log_a),
            np.exp(log_b),
            rng.uniform(low[3], high[3], extra),
        ]
    )
    return np.vstack([PAPER_GRID, random])


def fit_paper_loss(
    compute: np.ndarray, multiplier: np.ndarray, loss: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """(E, a, b, eta) of L(C, M): curve_fit from every start, the lowest residual wins."""
    best, best_residual = None, np.inf
    for start in starts:
        params = levenberg_marquardt(
            laws.loss, laws.loss_jacobian, (compute, multiplier), loss, start
        )
        if params is None:
            continue
        with np.errstate(all="ignore"):
            residual = np.sum((laws.loss(compute, multiplier, *params) - loss) ** 2)
        if residual < best_residual:
            best, best_residual = params, residual
    if best is None:
        raise FitError(f"Levenberg-Marquardt converged from none of the {len(starts)} starts")
    return best


def fit_error_law(loss: np.ndarray, error: np.ndarray) -> np.ndarray:
    """(epsilon, k, gamma) of Err(L), from curve_fit's default start as the paper does."""
    params = levenberg_marquardt(laws.error, laws.error_jacobian, (loss,), error, ERROR_START)
    if params is None:
        raise FitError(f"Levenberg-Marquardt did not converge from the default start {ERROR_START}")
    return params


# ---------------------------------------------------------------------------------------------
# The Chinchilla form: Huber loss on log loss, L-BFGS, many problems at once


@dataclass(frozen=True)
class _Memory:
    """L-BFGS's memory, one problem per row: recent steps, gradient changes and 1 / (s . y);
    empty slots have ``inverse`` 0."""

    steps: np.ndarray
    changes: np.ndarray
    inverse: np.ndarray

    @classmethod
    def empty(cls, n_rows: int, n_params: int, size: int = 8) -> _Memory:
        steps = np.zeros((n_rows, size, n_params))
        return cls(steps, steps.copy(), np.zeros((n_rows, size)))

    def remember(self, rows: np.ndarray, step: np.ndarray, change: np.ndarray) -> None:
        """Push (step, change) as the newest pair of ``rows`` where the curvature is positive."""
        curvature = np.einsum("kp,kp->k", step, change)
        keep = curvature > 0
        rows = rows[keep]
        for memory, newest in ((self.steps, step[keep]), (self.changes, change[keep])):
            memory[rows] = np.roll(memory[rows], -1, axis=1)
            memory[rows, -1] = newest
        self.inverse[rows] = np.roll(self.inverse[rows], -1, axis=1)
        self.inverse[rows, -1] = 1.0 / curvature[keep]

    def direction(self, rows: np.ndarray, gradient: np.ndarray) -> np.ndarray:
        """-H g for ``rows`` by the two-loop recursion."""
        steps, changes, inverse = self.steps[rows], self.changes[rows], self.inverse[rows]
        q = gradient.copy()
        alphas = np.zeros(inverse.shape)
        for j in reversed(range(inverse.shape[1])):
            alphas[:, j] = inverse[:, j] * np.einsum("kp,kp->k", steps[:, j], q)
            q -= alphas[:, j, None] * changes[:, j]
        has_pair = inverse[:, -1] > 0
        newest = changes[has_pair, -1]
        scale = np.ones(len(q))
        scale[has_pair] = 1.0 / (inverse[has_pair, -1] * np.einsum("kp,kp->k", newest, newest))
        r = scale[:, None] * q
        for j in range(inverse.shape[1]):
            beta = inverse[:, j] * np.einsum("kp,kp->k", changes[:, j], r)
            r += steps[:, j] * (alphas[:, j] - beta)[:, None]
        return -r


def minimize_lbfgs(
    objective: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    starts: np.ndarray,
    max_iterations: int,
    tolerance: tuple[float, float] = FIT_TOLERANCE,
    gradient_tolerance: float = 1e-11,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-BFGS on many independent problems at once, one per row of ``starts``.

    ``objective(theta, rows)`` returns the values and gradients of problems ``rows`` at
    ``theta``. Thousands of 5-parameter problems then cost about what one costs through scipy,
    whose per-call overhead would dominate a grid of starts times a bootstrap. The line search
    backtracks from the full step by quadratic interpolation (Armijo's condition). A problem
    has converged when an iteration lowers its value by at most relative x |value| + absolute
    (``tolerance``), its value is below EXACT_FIT, its gradient is below tolerance, or no lower
    value is left to find in float64.
    Returns the parameters, the values and which problems converged.
    """
    theta = np.array(starts, dtype=float)
    value, gradient = objective(theta, np.arange(len(theta)))
    memory = _Memory.empty(*theta.shape)
    active = np.isfinite(value)
    converged = np.zeros(len(theta), dtype=bool)
    for _ in range(max_iterations):
        converged |= active & (np.abs(gradient).max(axis=1) <= gradient_tolerance)
        converged |= active & (value <= EXACT_FIT)
        active &= ~converged
        if not active.any():
            break
        rows = np.flatnonzero(active)
        direction = memory.direction(rows, gradient[rows])
        slope = np.einsum("kp,kp->k", gradient[rows], direction)
        uphill = ~(slope < 0)  # a stale memory: fall back to steepest descent
        direction[uphill] = -gradient[rows][uphill]
        slope[uphill] = -np.einsum("kp,kp->k", gradient[rows][uphill], gradient[rows][uphill])
        new_theta, new_value, new_gradient = theta[rows], value[rows], gradient[rows]
        step_length = np.ones(len(rows))
        pending = np.ones(len(rows), dtype=bool)
        for _ in range(30):
            trial = np.flatnonzero(pending)
            if trial.size == 0:
                break
            candidate = theta[rows[trial]] + step_length[trial, None] * direction[trial]
            trial_value, trial_gradient = objective(candidate, rows[trial])
            accepted = np.isfinite(trial_value) & (
                trial_value <= value[rows[trial]] + 1e-4 * step_length[trial] * slope[trial]
            )
            done = trial[accepted]
            new_theta[done], new_value[done] = candidate[accepted], trial_value[accepted]
            new_gradient[done] = trial_gradient[accepted]
            pending[done] = False
            rejected = trial[~accepted]
            step_length[rejected] = _backtrack(
                step_length[rejected],
                value[rows[rejected]],
                slope[rejected],
                trial_value[~accepted],
            )
        converged[rows[pending]] = True  # no lower value along the direction: a minimum
        active[rows[pending]] = False
        moved, accepted = rows[~pending], ~pending
        memory.remember(
            moved, new_theta[accepted] - theta[moved], new_gradient[accepted] - gradient[moved]
        )
        decrease = value[moved] - new_value[accepted]
        relative, absolute = tolerance
        converged[moved] |= decrease <= relative * np.abs(value[moved]) + absolute
        theta[moved], value[moved] = new_theta[accepted], new_value[accepted]
        gradient[moved] = new_gradient[accepted]
    return theta, value, converged


def _backtrack(
    step_length: np.ndarray, value: np.ndarray, slope: np.ndarray, trial_value: np.ndarray
) -> np.ndarray:
    """The next step length after a rejected one: the minimum of the quadratic through the
    value, the slope and the rejected trial, kept within [0.1, 0.5] of the rejected length."""
    curvature = trial_value - value - slope * step_length
    with np.errstate(all="ignore"):
        minimum = -slope * step_length**2 / (2 * curvature)
    minimum = np.where(np.isfinite(minimum), minimum, 0.1 * step_length)
    return np.clip(minimum, 0.1 * step_length, 0.5 * step_length)


def _huber_log_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Besiroglu et al.'s objective and its gradient, one problem per row of ``theta``.

    theta = (log A, log B, log E, alpha, beta); log L is predicted as LSE(log A - alpha log N,
    log B - beta log D, log E) and scored with a Huber loss. NaN losses are left out.
    """
    from_n = theta[:, [0]] - theta[:, [3]] * log_n
    from_d = theta[:, [1]] - theta[:, [4]] * log_d
    floor = np.broadcast_to(theta[:, [2]], from_n.shape)
    top = np.maximum(np.maximum(from_n, from_d), floor)
    weight_n, weight_d, weight_e = np.exp(from_n - top), np.exp(from_d - top), np.exp(floor - top)
    total = weight_n + weight_d + weight_e
    residual = top + np.log(total) - log_loss
    residual[np.isnan(residual)] = 0.0  # a missing loss: no residual, no gradient
    size = np.abs(residual)
    value = np.where(
        size <= HUBER_DELTA, 0.5 * residual**2, HUBER_DELTA * (size - 0.5 * HUBER_DELTA)
    ).sum(axis=1)
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) / total
    on_n, on_d = slope * weight_n, slope * weight_d
    gradient = np.column_stack(
        [
            on_n.sum(axis=1),
            on_d.sum(axis=1),
            (slope * weight_e).sum(axis=1),
            -(on_n * log_n).sum(axis=1),
            -(on_d * log_d).sum(axis=1),
        ]
    )
    return value, gradient


def fit_chinchilla(
    n_params: np.ndarray,
    tokens: np.ndarray,
    losses: np.ndarray,
    samples: np.ndarray | None = None,
    max_iterations: int = 2000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, A, B, alpha, beta) for each row of ``losses``: problems that share the points N, D.

    Every problem starts from each point of CHINCHILLA_GRID for SCREEN_ITERATIONS; its
    POLISHED_STARTS best go on to convergence and the lowest wins. ``samples`` (problems x
    replicates x points) are bootstrap samples, each refitted from its problem's winner.
    log N and log D are centred on their means while fitting, which leaves the minimum where
    it is and conditions the problem. Returns the parameters (NaN where no start converged),
    whether each problem converged, and the replicates' parameters (problems x replicates x 5;
    NaN where a refit did not converge).
    """
    losses = np.atleast_2d(np.asarray(losses, dtype=float))
    n_problems = len(losses)
    log_n = np.log(np.asarray(n_params, dtype=float))
    log_d = np.log(np.asarray(tokens, dtype=float))
    centre = np.array([log_n.mean(), log_d.mean()])

    def solve(log_loss, starts, iterations, tolerance=FIT_TOLERANCE) -> tuple:
        def objective(theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _huber_log_objective(theta, log_n - centre[0], log_d - centre[1], log_loss[rows])

        return minimize_lbfgs(objective, starts, iterations, tolerance)

    # log A - alpha log N = (log A - alpha c) - alpha (log N - c), likewise for B and D
    grid = np.tile(CHINCHILLA_GRID, (n_problems, 1))
    grid[:, :2] -= grid[:, 3:] * centre
    per_start = np.repeat(np.log(losses), len(CHINCHILLA_GRID), axis=0)
    theta, value, _ = solve(per_start, grid, SCREEN_ITERATIONS)
    value = np.where(np.isfinite(value), value, np.inf).reshape(n_problems, -1)
    offsets = np.arange(n_problems)[:, None] * len(CHINCHILLA_GRID)
    chosen = (np.argsort(value, axis=1)[:, :POLISHED_STARTS] + offsets).ravel()
    theta, value, converged = solve(per_start[chosen], theta[chosen], max_iterations)
    value = np.where(converged, value, np.inf).reshape(n_problems, -1)
    winner = value.argmin(axis=1) + np.arange(n_problems) * value.shape[1]
    ok = np.isfinite(value.min(axis=1))
    params = _chinchilla_params(theta[winner], centre)
    params[~ok] = np.nan
    n_replicates = 0 if samples is None else samples.shape[1]
    if not n_replicates:
        return params, ok, np.empty((n_problems, 0, 5))
    from_winner = np.repeat(winner, n_replicates)
    replicate_theta, _, replicate_ok = solve(
        np.log(samples.reshape(n_problems * n_replicates, -1)),
        theta[from_winner],
        max_iterations,
        REFIT_TOLERANCE,
    )
    replicates = _chinchilla_params(replicate_theta, centre)
    replicates[~(replicate_ok & np.repeat(ok, n_replicates))] = np.nan
    return params, ok, replicates.reshape(n_problems, n_replicates, 5)


def _chinchilla_params(theta: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Centred (log A, log B, log E, alpha, beta) back to (E, A, B, alpha, beta)."""
    log_a, log_b = (theta[:, :2] + theta[:, 3:] * centre).T
    return np.column_stack([np.exp(theta[:, 2]), np.exp(log_a), np.exp(log_b), theta[:, 3:]])


# ---------------------------------------------------------------------------------------------
# One dataset: its runs, the fits, their bootstrap replicates and the predictions


@dataclass(frozen=True)
class Fitted:
    """A law fitted on one evaluation: its parameters and its bootstrap replicates, one row
    each (NaN where a refit did not converge)."""

    params: np.ndarray
    replicates: np.ndarray


@dataclass(frozen=True)
class Runs:
    """One dataset's final checkpoints: one row per run, and its measurements by (metric, eval)."""

    dataset: str
    table: pd.DataFrame
    measured: dict[tuple[str, str], pd.DataFrame]

    @classmethod
    def from_rows(cls, dataset: str, final: pd.DataFrame) -> Runs:
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
        fitted = final[final["metric"].isin(["loss", "error"])]  # accuracies are not fitted
        measured = {
            key: table.merge(rows[["size", "M", "value", "ci_low", "ci_high"]], how="left")
            for key, rows in fitted.groupby(["metric", "eval"])
        }
        return cls(dataset, table, measured)

    def evals(self, metric: str) -> list[str]:
        return sorted(eval_name for kind, eval_name in self.measured if kind == metric)

    def value(self, metric: str, eval_name: str, column: str = "value") -> np.ndarray:
        return self.measured[(metric, eval_name)][column].to_numpy(float, na_value=np.nan)

    def sd(self, metric: str, eval_name: str, residuals: np.ndarray, n_params: int) -> np.ndarray:
        """Each run's sd: from its 95% interval, else sqrt(SSR / (n - p)) of the law's residuals.

        The residual sd is zero when there are no more points than parameters.
        """
        width = self.value(metric, eval_name, "ci_high") - self.value(metric, eval_name, "ci_low")
        dof = len(residuals) - n_params
        residual_sd = np.sqrt(np.sum(residuals**2) / dof) if dof > 0 else 0.0
        return np.where(np.isfinite(width), width / (2 * Z_95), residual_sd)

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

    def require(self, where: str, n_params: int, used: np.ndarray, values: np.ndarray) -> None:
        """A law needs at least as many points as parameters."""
        if used.sum() < n_params:
            reason = f"{used.sum()} points for {n_params} parameters"
            raise self.failure(where, reason, used, values)

    @contextlib.contextmanager
    def explaining(
        self, where: str, n_params: int, used: np.ndarray, values: np.ndarray
    ) -> Iterator[None]:
        """Too few points, or a FitError in the block, become one FitError naming the dataset,
        the law and its points."""
        self.require(where, n_params, used, values)
        try:
            yield
        except FitError as error:
            raise self.failure(where, str(error), used, values) from None


def fit_loss_laws(
    runs: Runs, selected: np.ndarray, settings: Settings, rng: np.random.Generator
) -> tuple[dict[tuple[str, str], Fitted], dict[str, np.ndarray]]:
    """Both forms on every loss evaluation, with bootstrap replicates.

    Also returns, per evaluation, the bootstrap samples of every run's loss (replicates x runs),
    which the error law reuses as its x.
    """
    n_params, tokens = runs.table["N"].to_numpy(float), runs.table["D"].to_numpy(float)
    compute, multiplier = laws.compute(n_params, tokens), tokens / n_params
    starts = paper_starts(settings.starts, settings.seed)
    fits, samples = {}, {}
    for eval_name in runs.evals("loss"):
        value = runs.value("loss", eval_name)
        used = selected & np.isfinite(value)
        inputs = (compute[used], multiplier[used])
        with runs.explaining(f"loss law on {eval_name} (paper form)", 4, used, value):
            params = fit_paper_loss(*inputs, value[used], starts)
        residuals = laws.loss(*inputs, *params) - value[used]
        sd = runs.sd("loss", eval_name, residuals, 4)
        samples[eval_name] = value + rng.standard_normal((settings.bootstrap, len(value))) * sd
        replicates = refit(
            laws.loss, laws.loss_jacobian, inputs, samples[eval_name][:, used], params
        )
        fits[("paper", eval_name)] = Fitted(params, replicates)
    fits.update(_fit_chinchilla_laws(runs, selected, samples))
    return fits, samples


def _fit_chinchilla_laws(
    runs: Runs, selected: np.ndarray, samples: dict[str, np.ndarray]
) -> dict[tuple[str, str], Fitted]:
    """The Chinchilla form on every loss evaluation at once (one batched L-BFGS)."""
    evals = runs.evals("loss")
    n_params = runs.table["N"].to_numpy(float)[selected]
    tokens = runs.table["D"].to_numpy(float)[selected]
    measured = np.array([runs.value("loss", eval_name) for eval_name in evals])

    where = [f"loss law on {eval_name} (chinchilla form)" for eval_name in evals]
    used = selected & np.isfinite(measured)
    for index in range(len(evals)):
        runs.require(where[index], 5, used[index], measured[index])
    samples_at_points = np.stack([samples[eval_name][:, selected] for eval_name in evals])
    params, converged, replicates = fit_chinchilla(
        n_params, tokens, measured[:, selected], samples_at_points
    )
    for index in np.flatnonzero(~converged):
        reason = f"L-BFGS converged from none of the {len(CHINCHILLA_GRID)} starts"
        raise runs.failure(where[index], reason, used[index], measured[index])
    return {
        ("chinchilla", eval_name): Fitted(params[i], replicates[i])
        for i, eval_name in enumerate(evals)
    }


def fit_error_laws(
    runs: Runs,
    selected: np.ndarray,
    loss_eval: str,
    loss_samples: np.ndarray,
    settings: Settings,
    rng: np.random.Generator,
) -> dict[str, Fitted]:
    """Err(L) per task group on the measured loss of ``loss_eval``, with bootstrap replicates.

    Each replicate's x is the bootstrap sample of the loss (``loss_samples``, replicates x runs)
    that the loss law's replicate of the same index was fitted on.
    """
    loss = runs.value("loss", loss_eval)
    fits = {}
    for group in runs.evals("error"):
        error = runs.value("error", group)
        used = selected & np.isfinite(loss) & np.isfinite(error)
        with runs.explaining(f"error law on {group} (x: {loss_eval} loss)", 3, used, error):
            params = fit_error_law(loss[used], error[used])
        epsilon, k, gamma = params
        if gamma * np.ptp(loss[used]) < LINEAR_ERROR_LAW:
            print(
                f"{runs.dataset}: error law on {group} is a straight line over the fit points "
                f"(gamma {gamma:.2g}; epsilon {epsilon:.3g} and k {k:.3g} grow together): its "
                f"curvature is not identified, only the line epsilon - k + k gamma L; the "
                f"predictions are that line's",
                flush=True,
            )
        sd = runs.sd("error", group, laws.error(loss[used], *params) - error[used], 3)
        error_samples = error + rng.standard_normal((settings.bootstrap, len(error))) * sd
        replicates = refit(
            laws.error,
            laws.error_jacobian,
            (loss_samples[:, used],),
            error_samples[:, used],
            params,
        )
        fits[group] = Fitted(params, replicates)
    return fits


def _interval(replicate_predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles over the replicates that converged (NaN without replicates)."""
    if not len(replicate_predictions):
        nothing = np.full(replicate_predictions.shape[1], np.nan)
        return nothing, nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(replicate_predictions, [2.5, 97.5], axis=0)
    return low, high


def _as_columns(params: np.ndarray) -> list[np.ndarray]:
    """Replicate parameters (replicates x p) as p column vectors, so laws broadcast over runs."""
    return list(params.T[:, :, None])


def predict_dataset(
    runs: Runs,
    targets: pd.DataFrame,
    roles: dict[str, np.ndarray],
    loss_fits: dict[tuple[str, str], Fitted],
    error_fits: dict[str, Fitted],
    loss_eval: str | None,
) -> pd.DataFrame:
    """Every target (trained runs first, then untrained ones) predicted by both forms.

    ``roles`` holds, for 'loss' and 'error', which targets are that law's fit points.
    """
    n_params, tokens = targets["N"].to_numpy(float), targets["D"].to_numpy(float)
    untrained = np.full(len(targets) - len(runs.table), np.nan)
    frames = []

    def frame(form, quantity, eval_name, predicted, replicate_predictions, actual) -> dict:
        low, high = _interval(replicate_predictions)
        actual = np.concatenate([actual, untrained])
        return {
            **{name: targets[name].to_numpy() for name in ("size", "N", "M", "D")},
            "dataset": np.full(len(targets), runs.dataset),
            "form": np.full(len(targets), form),
            "C": laws.compute(n_params, tokens),
            "quantity": np.full(len(targets), quantity),
            "eval": np.full(len(targets), eval_name),
            "role": np.where(roles[quantity], "fit", "target"),
            "predicted": predicted,
            "actual": actual,
            "relative_error": np.abs(predicted - actual) / actual,
            "ci_low": low,
            "ci_high": high,
        }

    for form in FORM_PARAMS:
        predicted_loss = {}
        for eval_name in runs.evals("loss"):
            fitted = loss_fits[(form, eval_name)]
            predicted, _ = laws.predict(form, n_params, tokens, fitted.params)
            replicate_predictions, _ = laws.predict(
                form, n_params, tokens, _as_columns(fitted.replicates)
            )
            predicted_loss[eval_name] = predicted, replicate_predictions
            frames.append(
                frame(
                    form,
                    "loss",
                    eval_name,
                    predicted,
                    replicate_predictions,
                    runs.value("loss", eval_name),
                )
            )
        for group, fitted in error_fits.items():
            loss, replicate_loss = predicted_loss[loss_eval]
            frames.append(
                frame(
                    form,
                    "error",
                    group,
                    laws.error(loss, *fitted.params),
                    laws.error(replicate_loss, *_as_columns(fitted.replicates)),
                    runs.value("error", group),
                )
            )
    return pd.DataFrame({name: np.concatenate([f[name] for f in frames]) for name in frames[0]})


@dataclass(frozen=True)
class DatasetFits:
    """Both laws fitted on one dataset's final runs, and which runs they were fitted on."""

    runs: Runs
    loss_points: np.ndarray
    loss_fits: dict[tuple[str, str], Fitted]
    error_points: np.ndarray
    error_fits: dict[str, Fitted]


def fit_laws(dataset: str, final: pd.DataFrame, settings: Settings) -> DatasetFits:
    """The loss law of every form and validation set, and the error law of every task group
    on the loss of ``settings.loss_eval``, each with its bootstrap replicates.

    The fit stage and the planner both fit here, so a plan's intervals are the fit stage's.
    """
    runs = Runs.from_rows(dataset, final)
    loss_eval = settings.loss_eval
    needed = loss_eval is not None or runs.evals("error")
    if needed and loss_eval not in runs.evals("loss"):
        raise FitError(
            f"{dataset}: no loss evaluation {loss_eval!r} (error.loss_eval, the loss the "
            f"error law is fitted on); available: {runs.evals('loss')}"
        )
    rng = np.random.default_rng([settings.seed, zlib.crc32(dataset.encode())])
    loss_points = runs.select(settings.loss_points, "loss")
    loss_fits, loss_samples = fit_loss_laws(runs, loss_points, settings, rng)
    error_fits, error_points = {}, np.zeros_like(loss_points)
    if runs.evals("error"):
        error_points = runs.select(settings.error_points, "error")
        error_fits = fit_error_laws(
            runs, error_points, loss_eval, loss_samples[loss_eval], settings, rng
        )
    return DatasetFits(runs, loss_points, loss_fits, error_points, error_fits)


def fit_dataset(
    dataset: str, final: pd.DataFrame, settings: Settings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fits and predictions of one dataset (its final rows of runs.parquet)."""
    fits = fit_laws(dataset, final, settings)
    runs, loss_fits, error_fits = fits.runs, fits.loss_fits, fits.error_fits
    untrained = pd.DataFrame(
        [target for target in settings.extra_targets if target["dataset"] == dataset],
        columns=["size", "N", "M", "D"],
    )
    untrained_count = len(untrained)
    targets = pd.concat([runs.table, untrained[runs.table.columns]], ignore_index=True)
    padding = np.zeros(untrained_count, dtype=bool)
    roles = {
        "loss": np.concatenate([fits.loss_points, padding]),
        "error": np.concatenate([fits.error_points, padding]),
    }
    predictions = predict_dataset(runs, targets, roles, loss_fits, error_fits, settings.loss_eval)
    fitted = {**{f"{form} {name}": fit for (form, name), fit in loss_fits.items()}, **error_fits}
    for name, fit in fitted.items():
        failed = int(np.isnan(fit.replicates).any(axis=1).sum())
        print(
            f"{dataset} {name}: {np.array2string(fit.params, precision=5)}"
            + (f"; {failed} of {len(fit.replicates)} refits did not converge" if failed else "")
        )
    return predictions, _parameter_table(dataset, loss_fits, error_fits)


def _parameter_table(
    dataset: str, loss_fits: dict[tuple[str, str], Fitted], error_fits: dict[str, Fitted]
) -> pd.DataFrame:
    """fits.parquet's rows; the error law is listed under both forms, whose chains it ends."""
    records = [
        (dataset, form, "loss", eval_name, name, value)
        for (form, eval_name), fitted in loss_fits.items()
        for name, value in zip(FORM_PARAMS[form], fitted.params, strict=True)
    ] + [
        (dataset, form, "error", group, name, value)
        for form in FORM_PARAMS
        for group, fitted in error_fits.items()
        for name, value in zip(laws.ERROR_PARAMS, fitted.params, strict=True)
    ]
    return pd.DataFrame.from_records(records, columns=FITS_SCHEMA.names)


def fit_runs(
    runs: pd.DataFrame, settings: Settings, workers: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fits and predictions of every dataset in runs.parquet (final checkpoints only).

    Datasets are independent, so ``workers`` processes fit them in parallel.
    """
    final = runs[runs["final"].astype(bool)]
    if final.empty:
        raise FitError("runs.parquet has no final checkpoints (final == True) to fit")
    names = sorted(final["dataset"].unique())
    unknown = {target["dataset"] for target in settings.extra_targets} - set(names)
    if unknown:
        raise FitError(
            f"extra_targets name datasets without runs: {sorted(unknown)}; datasets: {names}"
        )
    frames = [final[final["dataset"] == name] for name in names]
    if workers > 1 and len(names) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(names))) as pool:
            results = list(pool.map(fit_dataset, names, frames, [settings] * len(names)))
    else:
        results = [fit_dataset(*job, settings) for job in zip(names, frames, strict=True)]
    predictions = pd.concat([result[0] for result in results], ignore_index=True)
    predictions = predictions.sort_values(
        ["dataset", "form", "quantity", "eval", "N", "M"], kind="stable"
    ).reset_index(drop=True)
    return predictions, pd.concat([result[1] for result in results], ignore_index=True)


def write_table(frame: pd.DataFrame, schema: pa.Schema, path: str) -> None:
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="runs.parquet (aggregated evaluations)")
    parser.add_argument(
        "--settings", required=True, help="JSON: loss, error, bootstrap, seed, extra_targets"
    )
    parser.add_argument("--predictions", required=True, help="predictions.parquet to write")
    parser.add_argument("--fits", required=True, help="fits.parquet to write")
    parser.add_argument("--workers", type=int, default=1, help="datasets fitted in parallel")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        predictions, fits = fit_runs(
            read_runs_table(args.runs), Settings.from_json(args.settings), args.workers
        )
    except FitError as error:
        sys.exit(f"fit: {error}")
    write_table(predictions, PREDICTIONS_SCHEMA, args.predictions)
    write_table(fits, FITS_SCHEMA, args.fits)
    seconds = time.perf_counter() - started
    print(f"wrote {len(predictions)} predictions and {len(fits)} parameters in {seconds:.1f} s")


if __name__ == "__main__":
    main()
