"""The numerical solvers the law forms fit with: Levenberg-Marquardt and a batched L-BFGS.

Levenberg-Marquardt is scipy's ``curve_fit(method="lm")``: the same MINPACK routine (lmder,
via ``leastsq``) with the same defaults and the same test of success, called without
curve_fit's wrapper, whose per-call overhead adds up over a grid of starts times a bootstrap.
The L-BFGS, and a batched Levenberg-Marquardt for small least-squares problems, solve many
independent problems at once (one per row), so a grid of starts and hundreds of bootstrap
refits of every task run as a few array operations per iteration instead of thousands of
optimizer calls. They know nothing of the laws: they take functions and arrays.
tests/test_solvers.py holds each against scipy on the same problems.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import leastsq

# curve_fit's limit on function evaluations for method="lm".
LM_MAX_EVALUATIONS = 10_000
# MINPACK's statuses for a converged fit (lmder's info 1-4).
LM_CONVERGED = (1, 2, 3, 4)

# The batched Levenberg-Marquardt: MINPACK's default tolerances on the relative decrease of the
# sum of squares and on the relative step, its damping bounds and its iteration limit.
BATCH_TOLERANCE = 1.49012e-8
DAMPING_START, DAMPING_FLOOR, DAMPING_CEILING = 1e-3, 1e-12, 1e12
BATCH_MAX_ITERATIONS = 200
# An L-BFGS iteration that lowers the objective by at most relative x |value| + absolute ends a
# fit. The fit itself: 1e-8 relative, and 1e-15 absolute, far below what any loss is measured
# to. The bootstrap refits: 2.2e-9 x (|value| + 1), within a factor of 2 of scipy's L-BFGS-B
# default, 2.2e-9 x max(|value|, 1), which Besiroglu et al. used; replicates whose points a
# curve can almost pass through would otherwise creep along a flat valley.
FIT_TOLERANCE = (1e-8, 1e-15)
REFIT_TOLERANCE = (2.2e-9, 2.2e-9)
# A gradient whose largest component is below this ends a fit.
GRADIENT_TOLERANCE = 1e-11
# An objective below this means the curve passes through the points (a Huber loss on log loss:
# within about 1.4e-7 of each), and going on would only slide along the valley of curves that do.
EXACT_FIT = 1e-14
# Pairs of (step, gradient change) L-BFGS keeps.
HISTORY_SIZE = 8
# The line search: Armijo's sufficient decrease, and how many trial steps it takes.
ARMIJO = 1e-4
LINE_SEARCH_TRIALS = 30


def levenberg_marquardt(
    law: Callable, jacobian: Callable, inputs: tuple, values: np.ndarray, start: Sequence[float]
) -> np.ndarray | None:
    """One fit of ``law(*inputs, *params)`` to ``values``; None when it does not converge."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            params, _, _, _, status = leastsq(
                lambda params: law(*inputs, *params) - values,
                np.asarray(start, dtype=float),
                Dfun=lambda params: jacobian(*inputs, *params),
                full_output=True,
                maxfev=LM_MAX_EVALUATIONS,
            )
        except (RuntimeError, ValueError, TypeError):
            return None
    with np.errstate(all="ignore"):
        finite = np.all(np.isfinite(params)) and np.all(np.isfinite(law(*inputs, *params)))
    return params if status in LM_CONVERGED and finite else None


def best_of_starts(
    law: Callable, jacobian: Callable, inputs: tuple, values: np.ndarray, starts: np.ndarray
) -> np.ndarray | None:
    """Levenberg-Marquardt from every start; the lowest sum of squares wins (None: no start
    converged)."""
    best, best_residual = None, np.inf
    for start in starts:
        params = levenberg_marquardt(law, jacobian, inputs, values, start)
        if params is None:
            continue
        with np.errstate(all="ignore"):
            residual = np.sum((law(*inputs, *params) - values) ** 2)
        if residual < best_residual:
            best, best_residual = params, residual
    return best


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
    it from there, falling back to the best fit itself if that fails. Rows that do not converge
    are NaN, and so is every row where there is no best fit (a start that is not finite).
    """
    refits = np.full((len(samples), len(start)), np.nan)
    if not np.isfinite(start).all():
        return refits
    with np.errstate(all="ignore"):
        step = np.einsum(
            "...pn,...n->...p",
            np.linalg.pinv(jacobian(*inputs, *start)),
            samples - law(*inputs, *start),
        )
    for row, sample in enumerate(samples):
        arguments = tuple(x if x.ndim == 1 else x[row] for x in inputs)
        for first in (start + step[row], start):
            params = levenberg_marquardt(law, jacobian, arguments, sample, first)
            if params is not None:
                refits[row] = params
                break
    return refits


def batched_levenberg_marquardt(
    law: Callable, jacobian: Callable, inputs: tuple, values: np.ndarray, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt on many small problems at once: fit ``law(*inputs, *params)`` to each
    row of ``values`` (rows x points; NaN points are left out), from that row of ``starts``.

    ``inputs`` are arrays of shape (rows, points). Each step solves (J'J + lambda diag J'J)
    step = J'r (Marquardt's scaling, so the parameters' units do not matter); an accepted
    step divides lambda by 3, a rejected one multiplies it by 4. A row has converged when an
    accepted step lowers its sum of squares by at most BATCH_TOLERANCE of it or below
    EXACT_FIT (a curve through the points, or as near as its bounds allow: a task at chance
    at every point), moves its parameters by at most BATCH_TOLERANCE of their size, or no step
    lowers it any more (lambda at its ceiling). Returns the parameters, the sums of squares
    and which rows converged.
    """
    theta = np.array(starts, dtype=float)
    measured = np.isfinite(values) & np.all([np.isfinite(x) for x in inputs], axis=0)
    values = np.where(measured, values, 0.0)
    inputs = tuple(np.where(measured, x, 1.0) for x in inputs)  # a point left out: any x

    def evaluate(rows: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arguments = tuple(x[rows] for x in inputs)
        with np.errstate(all="ignore"):
            residual = np.where(
                measured[rows], values[rows] - law(*arguments, *params.T[..., None]), 0
            )
            return residual, np.sum(residual**2, axis=1)

    residual, cost = evaluate(np.arange(len(theta)), theta)
    damping = np.full(len(theta), DAMPING_START)
    active = np.isfinite(cost)
    converged = np.zeros(len(theta), dtype=bool)
    for _ in range(BATCH_MAX_ITERATIONS):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        with np.errstate(all="ignore"):
            slopes = jacobian(*(x[rows] for x in inputs), *theta[rows].T[..., None])
        slopes = np.where(measured[rows, :, None], slopes, 0.0)
        normal = np.einsum("rnp,rnq->rpq", slopes, slopes)
        scale = np.maximum(np.einsum("rpp->rp", normal), np.finfo(float).tiny)
        gradient = np.einsum("rnp,rn->rp", slopes, residual[rows])
        damped = normal + (damping[rows, None] * scale)[..., None] * np.eye(theta.shape[1])
        finite = np.isfinite(damped).all(axis=(1, 2)) & np.isfinite(gradient).all(axis=1)
        active[rows[~finite]] = False  # overflowed: not converged
        rows, damped, gradient = rows[finite], damped[finite], gradient[finite]
        step = _solve(damped, gradient)
        trial = theta[rows] + step
        trial_residual, trial_cost = evaluate(rows, trial)
        trial_cost[~np.isfinite(step).all(axis=1)] = np.inf
        better = np.isfinite(trial_cost) & (trial_cost < cost[rows])
        moved = rows[better]
        decrease = cost[moved] - trial_cost[better]
        small_step = np.linalg.norm(step[better], axis=1) <= BATCH_TOLERANCE * (
            np.linalg.norm(theta[moved], axis=1) + BATCH_TOLERANCE
        )
        converged[moved] = (
            (decrease <= BATCH_TOLERANCE * cost[moved])
            | small_step
            | (trial_cost[better] <= EXACT_FIT)
        )
        theta[moved], cost[moved], residual[moved] = (
            trial[better],
            trial_cost[better],
            trial_residual[better],
        )
        damping[moved] = np.maximum(damping[moved] / 3.0, DAMPING_FLOOR)
        stuck = rows[~better]
        damping[stuck] *= 4.0
        converged[stuck] |= damping[stuck] > DAMPING_CEILING
        active &= ~converged
    return theta, cost, converged


def _solve(matrices: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """x with A x = b for each row; the pseudo-inverse's x where some A is singular."""
    with np.errstate(all="ignore"):
        try:
            return np.linalg.solve(matrices, vectors[..., None])[..., 0]
        except np.linalg.LinAlgError:
            return (np.linalg.pinv(matrices) @ vectors[..., None])[..., 0]


@dataclass(frozen=True)
class LbfgsHistory:
    """L-BFGS's history of recent steps, one problem per row: the steps, the gradient changes
    and 1 / (step . change); empty slots have ``inverse`` 0."""

    steps: np.ndarray
    changes: np.ndarray
    inverse: np.ndarray

    @classmethod
    def empty(cls, n_rows: int, n_params: int) -> LbfgsHistory:
        steps = np.zeros((n_rows, HISTORY_SIZE, n_params))
        return cls(steps, steps.copy(), np.zeros((n_rows, HISTORY_SIZE)))

    def remember(self, rows: np.ndarray, step: np.ndarray, change: np.ndarray) -> None:
        """Push (step, change) as the newest pair of ``rows`` where the curvature is positive."""
        curvature = np.einsum("kp,kp->k", step, change)
        keep = curvature > 0
        rows = rows[keep]
        for history, newest in ((self.steps, step[keep]), (self.changes, change[keep])):
            history[rows] = np.roll(history[rows], -1, axis=1)
            history[rows, -1] = newest
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-BFGS on many independent problems at once, one per row of ``starts``.

    ``objective(theta, rows)`` returns the values and gradients of problems ``rows`` at
    ``theta``. The line search backtracks from the full step by quadratic interpolation
    (Armijo's condition). A problem has converged when an iteration lowers its value by at
    most relative x |value| + absolute (``tolerance``), its value is below EXACT_FIT, its
    gradient is below GRADIENT_TOLERANCE, or no lower value is left to find in float64.
    Returns the parameters, the values and which problems converged.
    """
    theta = np.array(starts, dtype=float)
    value, gradient = objective(theta, np.arange(len(theta)))
    history = LbfgsHistory.empty(*theta.shape)
    active = np.isfinite(value)
    converged = np.zeros(len(theta), dtype=bool)
    for _ in range(max_iterations):
        converged |= active & (np.abs(gradient).max(axis=1) <= GRADIENT_TOLERANCE)
        converged |= active & (value <= EXACT_FIT)
        active &= ~converged
        if not active.any():
            break
        rows = np.flatnonzero(active)
        direction = history.direction(rows, gradient[rows])
        slope = np.einsum("kp,kp->k", gradient[rows], direction)
        uphill = ~(slope < 0)  # a stale history: fall back to steepest descent
        direction[uphill] = -gradient[rows][uphill]
        slope[uphill] = -np.einsum("kp,kp->k", gradient[rows][uphill], gradient[rows][uphill])
        new_theta, new_value, new_gradient = theta[rows], value[rows], gradient[rows]
        step_length = np.ones(len(rows))
        pending = np.ones(len(rows), dtype=bool)
        for _ in range(LINE_SEARCH_TRIALS):
            trial = np.flatnonzero(pending)
            if trial.size == 0:
                break
            candidate = theta[rows[trial]] + step_length[trial, None] * direction[trial]
            trial_value, trial_gradient = objective(candidate, rows[trial])
            accepted = np.isfinite(trial_value) & (
                trial_value <= value[rows[trial]] + ARMIJO * step_length[trial] * slope[trial]
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
        history.remember(
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
