"""The laws as pure functions: the two ways of writing the loss law agree, M* is the minimum
at fixed compute, the Jacobians are the derivatives, and the chain uses the predicted loss."""

from __future__ import annotations

import numpy as np
import pytest

from workflow import laws

PAPER_C4 = (1.51, 141.0, 190.0, 0.121)  # E, a, b, eta of the paper's C4 fit
ERROR_C4 = (0.850, 2.08, 0.756)  # epsilon, k, gamma


@pytest.fixture
def runs_grid():
    """Parameter counts and token budgets spanning the released testbed."""
    n_params = np.geomspace(1e7, 7e9, 9)
    multiplier = np.array([5, 10, 20, 40, 80, 160, 320, 640, 20.0])
    return n_params, multiplier * n_params


def test_compute_is_six_n_d_in_float():
    assert laws.compute(6_889_410_560, 137_788_211_200) == pytest.approx(5.695e21, rel=1e-3)
    assert laws.compute(6_889_410_560, 137_788_211_200).dtype == np.float64


def test_loss_in_compute_and_multiplier_equals_loss_in_params_and_tokens(runs_grid):
    n_params, tokens = runs_grid
    by_compute = laws.loss(laws.compute(n_params, tokens), tokens / n_params, *PAPER_C4)
    by_size = laws.loss_from_params_tokens(n_params, tokens, *PAPER_C4)
    np.testing.assert_allclose(by_compute, by_size, rtol=1e-12)


def test_paper_form_is_chinchilla_form_with_shared_exponent(runs_grid):
    n_params, tokens = runs_grid
    E, a, b, eta = PAPER_C4
    scale = 6.0**-eta
    chinchilla = laws.chinchilla_loss(n_params, tokens, E, a * scale, b * scale, 2 * eta, 2 * eta)
    np.testing.assert_allclose(
        chinchilla, laws.loss_from_params_tokens(n_params, tokens, *PAPER_C4)
    )


def test_optimal_multiplier_minimises_loss_at_fixed_compute():
    _, a, b, eta = PAPER_C4
    best = laws.optimal_multiplier(a, b, eta)
    multipliers = np.geomspace(best / 50, best * 50, 20001)
    for compute in (1e18, 1e21, 1e24):
        losses = laws.loss(compute, multipliers, *PAPER_C4)
        assert multipliers[np.argmin(losses)] == pytest.approx(best, rel=1e-3)
    assert best == pytest.approx((b / a) ** (1 / (2 * eta)))


@pytest.mark.parametrize(
    ("law", "jacobian", "inputs", "params"),
    [
        (
            laws.loss,
            laws.loss_jacobian,
            (np.array([1e17, 3e19, 5e21]), np.array([20.0, 320, 5])),
            PAPER_C4,
        ),
        (laws.error, laws.error_jacobian, (np.array([2.2, 3.0, 4.5]),), ERROR_C4),
    ],
)
def test_jacobians_are_the_derivatives(law, jacobian, inputs, params):
    analytic = jacobian(*inputs, *params)
    for index, value in enumerate(params):
        step = 1e-6 * abs(value)
        up, down = list(params), list(params)
        up[index], down[index] = value + step, value - step
        numeric = (law(*inputs, *up) - law(*inputs, *down)) / (2 * step)
        np.testing.assert_allclose(analytic[:, index], numeric, rtol=1e-6)


def test_laws_broadcast_over_bootstrap_replicates():
    compute, multiplier = np.array([1e18, 1e20]), np.array([20.0, 320.0])
    replicates = [np.full((3, 1), value) for value in PAPER_C4]
    assert laws.loss(compute, multiplier, *replicates).shape == (3, 2)
    assert laws.loss_jacobian(compute, multiplier, *replicates).shape == (3, 2, 4)


def test_error_rises_with_loss_towards_epsilon():
    error = laws.error(np.linspace(1.5, 15, 200), *ERROR_C4)
    assert np.all(np.diff(error) > 0)
    assert laws.error(60.0, *ERROR_C4) == pytest.approx(ERROR_C4[0])


def test_chain_predicts_error_from_the_predicted_loss():
    n_params, tokens = np.array([1.4e9, 6.9e9]), np.array([9e11, 1.38e11])
    predicted_loss, predicted_error = laws.predict("paper", n_params, tokens, PAPER_C4, ERROR_C4)
    np.testing.assert_allclose(
        predicted_loss, laws.loss(laws.compute(n_params, tokens), tokens / n_params, *PAPER_C4)
    )
    np.testing.assert_allclose(predicted_error, laws.error(predicted_loss, *ERROR_C4))
    _, no_error = laws.predict("chinchilla", n_params, tokens, (1.5, 400.0, 400.0, 0.3, 0.3))
    assert no_error is None


def test_unknown_form_is_named():
    with pytest.raises(ValueError, match=r"'kaplan'.*'paper', 'chinchilla'"):
        laws.predict("kaplan", [1e9], [2e10], PAPER_C4)
