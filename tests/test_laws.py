"""The laws as pure functions: C = 6ND and its inverses, the two ways of writing the loss law
agree, M* is the minimum at fixed compute, and the laws broadcast over replicates (each
registered form's Jacobian and chain are tested in test_forms.py)."""

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


def test_tokens_and_params_for_compute_invert_six_n_d():
    n_params, tokens = 411_616_256.0, 8_232_325_120.0
    compute = laws.compute(n_params, tokens)
    assert laws.tokens_for_compute(n_params, compute) == pytest.approx(tokens, rel=1e-15)
    assert laws.params_for_compute(compute, tokens / n_params) == pytest.approx(n_params, rel=1e-15)


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


def test_laws_broadcast_over_bootstrap_replicates():
    compute, multiplier = np.array([1e18, 1e20]), np.array([20.0, 320.0])
    replicates = [np.full((3, 1), value) for value in PAPER_C4]
    assert laws.loss(compute, multiplier, *replicates).shape == (3, 2)
    assert laws.loss_jacobian(compute, multiplier, *replicates).shape == (3, 2, 4)


def test_error_rises_with_loss_towards_epsilon():
    error = laws.error(np.linspace(1.5, 15, 200), *ERROR_C4)
    assert np.all(np.diff(error) > 0)
    assert laws.error(60.0, *ERROR_C4) == pytest.approx(ERROR_C4[0])
