"""The numerical solvers the law forms fit with: Levenberg-Marquardt and a batched L-BFGS.

Levenberg-Marquardt is scipy's ``curve_fit(method="lm")``: the same MINPACK routine (lmder,
via ``leastsq``) with the same defaults and the same test of success, called without
curve_fit's wrapper, whose per-call overhead adds up over a grid of starts times a bootstrap.
The L-BFGS solves many independent problems at once (one per row), so a grid of starts and
hundreds of bootstrap refits run as a few array operations per iteration instead of thousands
of optimizer calls. Both know nothing of the laws: they take functions and arrays.
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

# An L-BFGS iteration that lowers the objective by at most relative x |value| + absolute ends a
# fit. The fit itself: 1e-8 relative, and 1e-15 absolute, far below what any loss is measured
# to. The bootstrap refits: scipy's L-BFGS-B default, 2.2e-9 x max(|value|, 1), which
# Besiroglu et al. used; replicates whose points a curve can almost pass through would
# otherwise creep along a flat valley.
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
    are NaN.
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


@dataclass(frozen=True)
class LbfgsHistory:
    """L-BFGS's history of recent steps, one problem per row: the steps, the gradient changes
    and 1 / (step . change); empty slots have ``inverse`` 0."""

    steps: np.ndarray
    changes: np.ndarray
    inverse: np.ndarray

    @classmethod
    def empty(cls, n_rows: int, n_params: int, size: int = HISTORY_SIZE) -> LbfgsHistory:
        steps = np.zeros((n_rows, size, n_params))
        return cls(steps, steps.copy(), np.zeros((n_rows, size)))

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
    gradient_tolerance: float = GRADIENT_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-BFGS on many independent problems at once, one per row of ``starts``.

    ``objective(theta, rows)`` returns the values and gradients of problems ``rows`` at
    ``theta``. The line search backtracks from the full step by quadratic interpolation
    (Armijo's condition). A problem has converged when an iteration lowers its value by at
    most relative x |value| + absolute (``tolerance``), its value is below EXACT_FIT, its
    gradient is below ``gradient_tolerance``, or no lower value is left to find in float64.
    Returns the parameters, the values and which problems converged.
    """
    theta = np.array(starts, dtype=float)
    value, gradient = objective(theta, np.arange(len(theta)))
    history = LbfgsHistory.empty(*theta.shape)
    active = np.isfinite(value)
    converged = np.zeros(len(theta), dtype=bool)
    for _ in range(max_iterations):
        converged |= active & (np.abs(gradient).max(axis=1) <= gradient_tolerance)
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
