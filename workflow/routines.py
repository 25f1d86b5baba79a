"""The fit routines a law form can use: each fits all problems of one form at once, then
their bootstrap refits.

A problem is one evaluation's measurements; the problems of a form share their points (the
runs) and differ in the values. Two routines:

- ``LeastSquares``: Levenberg-Marquardt (``workflow.solvers``) from every start of a grid (or
  starts read off the points) with the law's Jacobian, the lowest sum of squares winning;
  refits warm-start from the best fit, one MINPACK call each or all of them batched.
- ``HuberOnLogLoss``: the Chinchilla form as Besiroglu et al. (2024) fit it. L = E + A N^-alpha
  + B D^-beta is fitted in theta = (log A, log B, log E, alpha, beta), where log L =
  LSE(log A - alpha log N, log B - beta log D, log E), scored with a Huber loss against the
  measured log loss. Every problem starts from each point of a grid for a few iterations, its
  best starts go on to convergence and the lowest wins, all of it one batched L-BFGS. log N
  and log D are centred on their means while fitting, which leaves the minimum where it is and
  conditions the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workflow import solvers
from workflow.settings import FitSettings
from workflow.solvers import FIT_TOLERANCE, REFIT_TOLERANCE, minimize_lbfgs


@dataclass(frozen=True)
class Solution:
    """One form fitted to several problems (evaluations) that share their points."""

    params: np.ndarray  # problems x parameters; NaN rows where the fit did not converge
    converged: np.ndarray  # per problem
    warm_starts: np.ndarray  # where each problem's refits start, in the routine's coordinates
    used: np.ndarray  # problems x points: the points each fit used
    failure: str  # why a problem that did not converge did not


class Fitting(Protocol):
    """How a form is fitted: all problems of one form at once, then their bootstrap refits."""

    def fit(
        self, law: Callable, inputs: tuple, values: np.ndarray, settings: FitSettings
    ) -> Solution:
        """``values``: problems x points, NaN where a run was not measured; ``inputs``: the
        law's inputs at the points."""

    def refit(
        self, law: Callable, inputs: tuple, samples: np.ndarray, solution: Solution
    ) -> np.ndarray:
        """Replicates' parameters (problems x replicates x parameters; NaN where a refit did
        not converge) for ``samples`` (problems x replicates x points); an input may differ
        per replicate (replicates x points)."""


@dataclass(frozen=True)
class LeastSquares:
    """Levenberg-Marquardt from every start of a problem, with the law's Jacobian; the lowest
    sum of squares wins. A point whose value or input is not finite is left out of that fit.

    ``starts(settings, inputs, values)`` gives one problem's starts (starts x parameters), from
    the settings or read off its points. Fits and refits run MINPACK once each, as the paper's
    code does, unless batched: a form fitted on every task refits thousands of times, so its
    replicates (``batched_refits``), and its fits too (``batched_fits``), run as one batched
    Levenberg-Marquardt over every problem.
    """

    jacobian: Callable
    starts: Callable[[FitSettings, tuple, np.ndarray], np.ndarray]
    batched_fits: bool = False
    batched_refits: bool = False

    def fit(
        self, law: Callable, inputs: tuple, values: np.ndarray, settings: FitSettings
    ) -> Solution:
        used = np.isfinite(values) & np.all([np.isfinite(x) for x in inputs], axis=0)
        starts = [
            self.starts(settings, tuple(x[points] for x in inputs), row[points])
            for row, points in zip(values, used, strict=True)
        ]
        if self.batched_fits:
            params = self._batched_fit(law, inputs, np.where(used, values, np.nan), starts)
        else:
            params = np.stack(
                [
                    _or_nan(
                        solvers.best_of_starts(
                            law, self.jacobian, tuple(x[points] for x in inputs), row[points], own
                        ),
                        own.shape[1],
                    )
                    for row, points, own in zip(values, used, starts, strict=True)
                ]
            )
        count = len(starts[0])
        failure = (
            f"Levenberg-Marquardt did not converge from its start {tuple(starts[0][0].tolist())}"
            if count == 1
            else f"Levenberg-Marquardt converged from none of the {count} starts"
        )
        return Solution(params, np.isfinite(params).all(axis=1), params, used, failure)

    def _batched_fit(
        self, law: Callable, inputs: tuple, values: np.ndarray, starts: list[np.ndarray]
    ) -> np.ndarray:
        """Every problem from each of its starts at once; its lowest converged sum of squares
        wins (NaN where none converged)."""
        starts = np.stack(starts)
        n_problems, n_starts, n_params = starts.shape
        rows = tuple(np.repeat(np.broadcast_to(x, values.shape), n_starts, axis=0) for x in inputs)
        params, cost, converged = solvers.batched_levenberg_marquardt(
            law,
            self.jacobian,
            rows,
            np.repeat(values, n_starts, axis=0),
            starts.reshape(-1, n_params),
        )
        cost = np.where(converged, cost, np.inf).reshape(n_problems, n_starts)
        best = params.reshape(n_problems, n_starts, n_params)[
            np.arange(n_problems), cost.argmin(axis=1)
        ]
        best[~np.isfinite(cost.min(axis=1))] = np.nan
        return best

    def refit(
        self, law: Callable, inputs: tuple, samples: np.ndarray, solution: Solution
    ) -> np.ndarray:
        if self.batched_refits:
            return batched_refit(law, self.jacobian, inputs, samples, solution)
        return np.stack(
            [
                solvers.refit(
                    law,
                    self.jacobian,
                    tuple(x[..., points] for x in inputs),
                    problem_samples[:, points],
                    start,
                )
                for problem_samples, points, start in zip(
                    samples, solution.used, solution.warm_starts, strict=True
                )
            ]
        )


def _or_nan(params: np.ndarray | None, n_params: int) -> np.ndarray:
    return np.full(n_params, np.nan) if params is None else params


def batched_refit(
    law: Callable, jacobian: Callable, inputs: tuple, samples: np.ndarray, solution: Solution
) -> np.ndarray:
    """Every problem's replicates (problems x replicates x points) refitted at once by the
    batched Levenberg-Marquardt, each from its problem's fit; an input is the same for every
    problem, one value per point or per (replicate, point)."""
    n_problems, n_replicates, n_points = samples.shape
    n_params = solution.warm_starts.shape[1]
    if not n_replicates:
        return np.empty((n_problems, 0, n_params))
    shape = (n_problems, n_replicates, n_points)
    values = np.where(solution.used[:, None, :], samples, np.nan).reshape(-1, n_points)
    rows = tuple(np.broadcast_to(x, shape).reshape(-1, n_points) for x in inputs)
    starts = np.repeat(np.nan_to_num(solution.warm_starts), n_replicates, axis=0)
    params, _, converged = solvers.batched_levenberg_marquardt(law, jacobian, rows, values, starts)
    params[~(converged & np.repeat(solution.converged, n_replicates))] = np.nan
    return params.reshape(n_problems, n_replicates, n_params)


SCREEN_ITERATIONS = 50  # L-BFGS iterations from every grid start before keeping the best
POLISHED_STARTS = 8  # best screened starts per problem that run on to convergence
MAX_ITERATIONS = 2000


def huber_log_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Besiroglu et al.'s objective and its gradient, one problem per row of ``theta``.

    NaN losses are left out.
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
    value = np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta)).sum(axis=1)
    slope = np.clip(residual, -delta, delta) / total
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


@dataclass(frozen=True)
class HuberOnLogLoss:
    """The Chinchilla form's fitting (see workflow.forms.Fitting): ``grid`` holds the starts
    in (log A, log B, log E, alpha, beta); ``delta`` is the Huber loss's."""

    grid: np.ndarray
    delta: float

    def fit(
        self, law: Callable, inputs: tuple, values: np.ndarray, settings: FitSettings
    ) -> Solution:
        """(E, A, B, alpha, beta) for each row of ``values`` at the points ``inputs`` = (N, D)."""
        losses = np.atleast_2d(np.asarray(values, dtype=float))
        n_problems = len(losses)
        solve, centre = self._solver(inputs)
        # log A - alpha log N = (log A - alpha c) - alpha (log N - c), likewise for B and D
        grid = np.tile(self.grid, (n_problems, 1))
        grid[:, :2] -= grid[:, 3:] * centre
        per_start = np.repeat(np.log(losses), len(self.grid), axis=0)
        theta, value, _ = solve(per_start, grid, SCREEN_ITERATIONS)
        value = np.where(np.isfinite(value), value, np.inf).reshape(n_problems, -1)
        offsets = np.arange(n_problems)[:, None] * len(self.grid)
        chosen = (np.argsort(value, axis=1)[:, :POLISHED_STARTS] + offsets).ravel()
        theta, value, converged = solve(per_start[chosen], theta[chosen], MAX_ITERATIONS)
        value = np.where(converged, value, np.inf).reshape(n_problems, -1)
        winner = value.argmin(axis=1) + np.arange(n_problems) * value.shape[1]
        ok = np.isfinite(value.min(axis=1))
        params = _params(theta[winner], centre)
        params[~ok] = np.nan
        failure = (
            f"L-BFGS converged from none of the {POLISHED_STARTS} best of {len(self.grid)} starts"
        )
        return Solution(params, ok, theta[winner], np.isfinite(losses), failure)

    def refit(
        self, law: Callable, inputs: tuple, samples: np.ndarray, solution: Solution
    ) -> np.ndarray:
        """Each problem's replicates, warm-started from its winner."""
        n_problems, n_replicates = samples.shape[:2]
        if not n_replicates:
            return np.empty((n_problems, 0, len(self.grid[0])))
        solve, centre = self._solver(inputs)
        from_winner = np.repeat(np.arange(n_problems), n_replicates)
        theta, _, ok = solve(
            np.log(samples.reshape(n_problems * n_replicates, -1)),
            solution.warm_starts[from_winner],
            MAX_ITERATIONS,
            REFIT_TOLERANCE,
        )
        replicates = _params(theta, centre)
        replicates[~(ok & np.repeat(solution.converged, n_replicates))] = np.nan
        return replicates.reshape(n_problems, n_replicates, -1)

    def _solver(self, inputs: tuple) -> tuple[Callable, np.ndarray]:
        """L-BFGS on the centred problem at the points (N, D), and the centre."""
        n_params, tokens = inputs
        log_n = np.log(np.asarray(n_params, dtype=float))
        log_d = np.log(np.asarray(tokens, dtype=float))
        centre = np.array([log_n.mean(), log_d.mean()])

        def solve(log_loss, starts, iterations, tolerance=FIT_TOLERANCE) -> tuple:
            def objective(theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return huber_log_objective(
                    theta, log_n - centre[0], log_d - centre[1], log_loss[rows], self.delta
                )

            return minimize_lbfgs(objective, starts, iterations, tolerance)

        return solve, centre


def _params(theta: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Centred (log A, log B, log E, alpha, beta) back to (E, A, B, alpha, beta)."""
    log_a, log_b = (theta[:, :2] + theta[:, 3:] * centre).T
    return np.column_stack([np.exp(theta[:, 2]), np.exp(log_a), np.exp(log_b), theta[:, 3:]])
