"""The solvers against scipy on the same problems: Levenberg-Marquardt is curve_fit, its
bootstrap refits reach curve_fit's minima, and the batched L-BFGS reaches scipy's L-BFGS-B
minima on every problem at once."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import curve_fit, minimize
from test_fit import GRID, TRUE_ERROR, synthetic_runs

from workflow import laws, solvers
from workflow.forms import PAPER_GRID


def paper_problem(noise: float = 0.01, seed: int = 1):
    """The paper's loss law on the synthetic grid: inputs (C, M) and noisy losses."""
    rows = synthetic_runs(GRID, noise=noise, seed=seed)
    inputs = laws.compute(rows["N"], rows["D"]), rows["M"].to_numpy()
    return inputs, rows["value"].to_numpy()


def curve_fit_lm(law, jacobian, inputs, values, start) -> np.ndarray:
    params, _ = curve_fit(
        lambda x, *p: law(*x, *p), np.array(inputs), values, p0=start,
        jac=lambda x, *p: jacobian(*x, *p), method="lm", maxfev=10_000,
    )  # fmt: skip
    return params


def sum_of_squares(law, inputs, values, params) -> float:
    return float(np.sum((law(*inputs, *params) - values) ** 2))


def test_levenberg_marquardt_is_scipys_curve_fit():
    inputs, values = paper_problem()
    for start in PAPER_GRID[::9]:
        ours = solvers.levenberg_marquardt(laws.loss, laws.loss_jacobian, inputs, values, start)
        scipys = curve_fit_lm(laws.loss, laws.loss_jacobian, inputs, values, start)
        np.testing.assert_allclose(ours, scipys, rtol=1e-12)


def test_best_of_starts_is_the_lowest_of_curve_fit_from_each_start():
    inputs, values = paper_problem(seed=2)
    starts = PAPER_GRID[::8]
    best = solvers.best_of_starts(laws.loss, laws.loss_jacobian, inputs, values, starts)
    lowest = min(
        sum_of_squares(laws.loss, inputs, values, curve_fit_lm(laws.loss, laws.loss_jacobian,
                                                               inputs, values, start))
        for start in starts
    )  # fmt: skip
    assert sum_of_squares(laws.loss, inputs, values, best) == pytest.approx(lowest, rel=1e-12)


def test_best_of_starts_is_none_when_no_start_converges():
    inputs, values = paper_problem()
    values = 1e200 * np.arange(1, len(values) + 1)  # every start overflows
    assert (
        solvers.best_of_starts(laws.loss, laws.loss_jacobian, inputs, values, PAPER_GRID[:4])
        is None
    )


def test_refits_reach_the_minima_curve_fit_reaches_from_the_best_fit():
    inputs, values = paper_problem(noise=3e-3, seed=3)
    best = solvers.best_of_starts(laws.loss, laws.loss_jacobian, inputs, values, PAPER_GRID)
    samples = values + 3e-3 * np.random.default_rng(4).standard_normal((6, len(values)))
    refits = solvers.refit(laws.loss, laws.loss_jacobian, inputs, samples, best)
    for sample, ours in zip(samples, refits, strict=True):
        scipys = curve_fit_lm(laws.loss, laws.loss_jacobian, inputs, sample, best)
        assert sum_of_squares(laws.loss, inputs, sample, ours) <= sum_of_squares(
            laws.loss, inputs, sample, scipys
        ) * (1 + 1e-9)


def test_refits_take_each_replicates_own_inputs():
    """The error law's x is itself resampled: replicate i is fitted at its own losses."""
    rng = np.random.default_rng(5)
    losses = np.linspace(2.3, 6.0, 8) + 0.01 * rng.standard_normal((5, 8))
    errors = laws.error(losses, *TRUE_ERROR) + 1e-3 * rng.standard_normal((5, 8))
    refits = solvers.refit(laws.error, laws.error_jacobian, (losses,), errors, np.array(TRUE_ERROR))
    for loss, error, ours in zip(losses, errors, refits, strict=True):
        scipys = curve_fit_lm(laws.error, laws.error_jacobian, (loss,), error, TRUE_ERROR)
        np.testing.assert_allclose(ours, scipys, rtol=1e-6)


def rosenbrock(theta: np.ndarray, rows: np.ndarray, scale: np.ndarray):
    """A batch of Rosenbrock valleys, problem i with its own minimum (scale_i, scale_i^2)."""
    x, y, a = theta[:, 0], theta[:, 1], scale[rows]
    value = (a - x) ** 2 + 100 * (y - x**2) ** 2
    gradient = np.column_stack([-2 * (a - x) - 400 * x * (y - x**2), 200 * (y - x**2)])
    return value, gradient


def test_lbfgs_reaches_scipys_minima_on_every_problem_at_once():
    scale = np.array([1.0, 0.5, 2.0, -1.0])
    starts = np.array([[-1.2, 1.0], [0.0, 0.0], [3.0, -2.0], [2.0, 2.0]])
    theta, value, converged = solvers.minimize_lbfgs(
        lambda theta, rows: rosenbrock(theta, rows, scale), starts, 2000
    )
    assert converged.all()
    for row, start in enumerate(starts):

        def one(t, row=row):
            value, gradient = rosenbrock(t[None], np.array([row]), scale)
            return value[0], gradient[0]

        scipys = minimize(
            one, start, jac=True, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12}
        )
        np.testing.assert_allclose(theta[row], scipys.x, atol=1e-6)
        np.testing.assert_allclose(theta[row], [scale[row], scale[row] ** 2], atol=1e-6)
        assert value[row] <= scipys.fun + 1e-12


def test_lbfgs_history_direction_satisfies_the_secant_equation():
    """The L-BFGS inverse Hessian maps the newest gradient change onto the newest step."""
    rng = np.random.default_rng(6)
    history = solvers.LbfgsHistory.empty(3, 4)
    rows = np.arange(3)
    for _ in range(5):
        step = rng.standard_normal((3, 4))
        change = step @ np.diag([1.0, 2.0, 3.0, 4.0]) + 0.1 * rng.standard_normal((3, 4))
        history.remember(rows, step, change)
    np.testing.assert_allclose(history.direction(rows, change), -step, rtol=1e-10, atol=1e-12)


def test_lbfgs_history_skips_a_pair_of_negative_curvature():
    history = solvers.LbfgsHistory.empty(1, 2)
    history.remember(np.array([0]), np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]]))
    assert not history.inverse.any()
    gradient = np.array([[0.3, -0.2]])
    np.testing.assert_array_equal(history.direction(np.array([0]), gradient), -gradient)


def test_backtrack_takes_the_quadratics_minimum_within_a_tenth_and_a_half():
    value, slope = np.zeros(3), np.full(3, -1.0)
    curvature = np.array([1.25, 0.1, 100.0])  # minima at 0.4, 5 and 0.005 of a unit step
    trial_value = value + slope + curvature
    lengths = solvers._backtrack(np.ones(3), value, slope, trial_value)
    np.testing.assert_allclose(lengths, [0.4, 0.5, 0.1])


def test_batched_levenberg_marquardt_reaches_curve_fits_minimum_on_every_row():
    loss = np.linspace(2.5, 5.0, 6)
    rng = np.random.default_rng(4)
    values = laws.sigmoid_of_loss(loss, -3.0, 1.2) + 0.01 * rng.standard_normal((40, 6))
    values[0, 2] = np.nan  # a point this row lacks: left out
    starts = np.tile([-2.0, 1.0], (40, 1))
    law, jacobian = laws.sigmoid_of_loss, laws.sigmoid_of_loss_jacobian
    params, cost, converged = solvers.batched_levenberg_marquardt(
        law, jacobian, (np.broadcast_to(loss, values.shape),), values, starts
    )
    assert converged.all()
    for row in range(len(values)):
        kept = np.isfinite(values[row])
        scipys = curve_fit_lm(law, jacobian, (loss[kept],), values[row, kept], starts[row])
        np.testing.assert_allclose(params[row], scipys, rtol=1e-5)
        assert cost[row] == pytest.approx(
            sum_of_squares(law, (loss[kept],), values[row, kept], scipys), rel=1e-8
        )
