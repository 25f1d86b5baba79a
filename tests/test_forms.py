"""The registry of law forms: every form's derivatives are right and its fit recovers known
parameters, chains feed the predicted loss on, and a new form is one entry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_fit import GRID, PAPER_POINTS, SIZES, TRUE_ERROR, TRUE_LOSS, settings, synthetic_runs

from workflow import fit, forms, laws
from workflow.forms import ACCURACY, ERROR, EXPONENTIAL, LOSS, PAPER, SIZE, Form
from workflow.routines import HuberOnLogLoss, LeastSquares, huber_log_objective

LADDER_N = np.repeat(list(SIZES.values())[:4], 4).astype(float)
LADDER_D = LADDER_N * np.tile([10.0, 20.0, 80.0, 320.0], 4)
FAR = (np.array([6.9e9]), np.array([1.38e11]))  # a 6.9B model at M = 20


@dataclasses.dataclass(frozen=True)
class Known:
    """A law a form should recover: its parameters, where it is measured (the form's source),
    the measurement noise (relative), which parameters the points pin down and how well."""

    truth: tuple[float, ...]
    source: tuple[np.ndarray, ...]
    noise: float
    identified: list[int]
    rtol: float
    far: tuple[np.ndarray, ...] | None = None  # an extrapolation that must come out right
    far_rtol: float = 0.0


KNOWN = {
    "paper": Known(TRUE_LOSS, (LADDER_N, LADDER_D), 3e-4, [0, 3], 0.02, FAR, 0.005),
    "chinchilla": Known(
        (1.7, 400.0, 1500.0, 0.30, 0.33), (LADDER_N, LADDER_D), 1e-3, [0, 3, 4], 0.1, FAR, 0.01
    ),
    "exponential": Known(TRUE_ERROR, (np.linspace(2.3, 6.0, 8),), 2e-4, [0, 1, 2], 0.02),
    "sigmoid": Known((-3.0, 1.2), (np.linspace(2.3, 6.0, 8),), 2e-4, [0, 1], 0.01),
    "direct": Known((8.5, -0.2, 0.1), (LADDER_N, LADDER_D), 2e-4, [0, 1, 2], 0.02, FAR, 0.005),
}
FIT_SETTINGS = settings(bootstrap=0)


def test_every_registered_form_has_a_known_law_to_recover():
    assert sorted(KNOWN) == sorted(form.name for form in forms.FORMS)


def test_forms_predict_loss_or_error_from_size_or_loss_under_unique_names():
    assert len({form.name for form in forms.FORMS}) == len(forms.FORMS)
    for form in forms.FORMS:
        assert form.predicts in (LOSS, ERROR) and form.source in (SIZE, LOSS)
        assert not (form.predicts == LOSS and form.source == LOSS)
    for quantity in (LOSS, ERROR):
        labels = forms.chain_labels(quantity)
        assert len(set(labels)) == len(labels)


def test_each_form_of_the_loss_ends_each_loss_forms_chain_under_its_name():
    loss_forms = forms.predicting(LOSS)
    assert forms.chain_labels(ERROR) == [
        "paper", "paper+sigmoid", "chinchilla", "chinchilla+sigmoid", "direct"
    ]  # fmt: skip
    assert [EXPONENTIAL.chain_label(form) for form in loss_forms] == [f.name for f in loss_forms]
    assert EXPONENTIAL.chain_label(PAPER) == PAPER.chain_label() == "paper"
    assert forms.chain_labels(ACCURACY) == forms.chain_labels(ERROR)


@pytest.mark.parametrize(
    "form",
    [form for form in forms.FORMS if isinstance(form.fitting, LeastSquares)],
    ids=lambda form: form.name,
)
def test_jacobians_are_the_laws_derivatives(form: Form):
    known = KNOWN[form.name]
    inputs = form.variables(*known.source)
    analytic = form.fitting.jacobian(*inputs, *known.truth)
    for index, value in enumerate(known.truth):
        step = 1e-6 * abs(value)
        up, down = list(known.truth), list(known.truth)
        up[index], down[index] = value + step, value - step
        numeric = (form.law(*inputs, *up) - form.law(*inputs, *down)) / (2 * step)
        np.testing.assert_allclose(analytic[:, index], numeric, rtol=1e-6)


def test_huber_objectives_gradient_is_its_derivative():
    log_n, log_d = np.log(LADDER_N) - 19.0, np.log(LADDER_D) - 22.0
    log_loss = np.log(laws.chinchilla_loss(LADDER_N, LADDER_D, 1.7, 400.0, 1500.0, 0.3, 0.33))
    log_loss[3] = np.nan  # a run without this measurement
    theta = np.array([[1.0, 2.0, 0.5, 0.3, 0.35], [0.2, 0.1, 0.6, 0.5, 0.2]])
    for delta in (1e-3, 10.0):  # residuals beyond the Huber loss's kink, and within it
        _, gradient = huber_log_objective(theta, log_n, log_d, log_loss, delta)
        for index in range(5):
            step = np.zeros(5)
            step[index] = 1e-6
            up, _ = huber_log_objective(theta + step, log_n, log_d, log_loss, delta)
            down, _ = huber_log_objective(theta - step, log_n, log_d, log_loss, delta)
            np.testing.assert_allclose(gradient[:, index], (up - down) / 2e-6, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("form", forms.FORMS, ids=lambda form: form.name)
def test_each_forms_fit_recovers_known_parameters_from_noisy_points(form: Form):
    known = KNOWN[form.name]
    clean = form.predict(known.source, known.truth)
    noise = np.random.default_rng(8).standard_normal(clean.shape)
    values = clean * np.exp(known.noise * noise)
    inputs = form.variables(*known.source)
    solution = form.fitting.fit(form.law, inputs, values[None], FIT_SETTINGS)
    assert solution.converged.all()
    params = solution.params[0]
    np.testing.assert_allclose(
        params[known.identified], np.array(known.truth)[known.identified], rtol=known.rtol
    )
    if known.far is not None:
        expected = form.predict(known.far, known.truth)
        np.testing.assert_allclose(form.predict(known.far, params), expected, rtol=known.far_rtol)


@pytest.mark.parametrize("form", forms.FORMS, ids=lambda form: form.name)
def test_each_forms_refits_of_its_own_points_return_its_fit(form: Form):
    """A replicate that resamples nothing is the fitted points themselves: its refit is the
    fit, up to the solver's tolerance."""
    known = KNOWN[form.name]
    values = form.predict(known.source, known.truth)
    values = values * np.exp(known.noise * np.random.default_rng(9).standard_normal(values.shape))
    inputs = form.variables(*known.source)
    solution = form.fitting.fit(form.law, inputs, values[None], FIT_SETTINGS)
    replicates = form.fitting.refit(form.law, inputs, np.tile(values, (1, 3, 1)), solution)
    assert replicates.shape == (1, 3, len(form.params))
    np.testing.assert_allclose(
        form.predict(known.source, replicates[0, 0]),
        form.predict(known.source, solution.params[0]),
        rtol=1e-6,
    )


def test_a_chain_predicts_error_from_the_predicted_loss():
    n_params, tokens = np.array([1.4e9, 6.9e9]), np.array([9e11, 1.38e11])
    predicted_loss = PAPER.predict((n_params, tokens), TRUE_LOSS)
    np.testing.assert_allclose(
        predicted_loss, laws.loss(laws.compute(n_params, tokens), tokens / n_params, *TRUE_LOSS)
    )
    np.testing.assert_allclose(
        EXPONENTIAL.predict((predicted_loss,), TRUE_ERROR), laws.error(predicted_loss, *TRUE_ERROR)
    )


def test_a_form_predicts_for_every_bootstrap_replicate_at_once():
    replicates = np.array([TRUE_LOSS, TRUE_LOSS]) * [[1.0, 1, 1, 1], [1.01, 1, 1, 1]]
    columns = list(replicates.T[:, :, None])
    predicted = PAPER.predict(FAR, columns)
    assert predicted.shape == (2, 1) and predicted[1, 0] > predicted[0, 0]


def test_a_new_form_is_one_entry(monkeypatch):
    """A second loss form and a form of error straight from (C, M) join the tables as they
    are registered, the first with the error law chained on."""
    few_starts = LeastSquares(laws.loss_jacobian, lambda *problem: forms.PAPER_GRID[::8])
    fewer_starts = dataclasses.replace(PAPER, name="paper-16", label="paper-16", fitting=few_starts)
    direct = dataclasses.replace(
        PAPER, name="paper-direct", predicts=ERROR, label="paper-direct", fitting=few_starts
    )
    monkeypatch.setattr(forms, "FORMS", (*forms.FORMS, fewer_starts, direct))
    rows = synthetic_runs([*GRID, ("xl", 20)], noise=2e-3, seed=5, errors=True)
    chosen = settings(error_points={**PAPER_POINTS, "xl": [20]}, starts=16, bootstrap=8)
    predictions, fits = fit.fit_table(rows, chosen)
    by_chain = predictions.groupby(["form", "quantity"]).size().to_dict()
    assert by_chain[("paper-16", LOSS)] == by_chain[("paper-16", ERROR)] == len(GRID) + 1
    assert by_chain[("paper-direct", ERROR)] == len(GRID) + 1
    assert ("paper-direct", LOSS) not in by_chain
    laws_of = fits.groupby("form")["law"].unique().map(sorted).to_dict()
    assert laws_of["paper-16"] == [ERROR, LOSS] and laws_of["paper-direct"] == [ERROR]
    assert predictions["predicted"].notna().all()


def test_huber_fitting_leaves_a_missing_loss_out():
    form = forms.CHINCHILLA
    assert isinstance(form.fitting, HuberOnLogLoss)
    known = KNOWN[form.name]
    values = form.predict(known.source, known.truth)
    gappy = values.copy()
    gappy[5] = np.nan
    solution = form.fitting.fit(form.law, known.source, np.stack([values, gappy]), FIT_SETTINGS)
    assert solution.converged.all() and not solution.used[1, 5] and solution.used[0].all()
    np.testing.assert_allclose(solution.params[1], solution.params[0], rtol=1e-3)


def test_only_an_exponential_straight_over_the_fit_points_is_degenerate():
    """gamma near 0 either way is a line; a steep curve is a law, rising (gamma < 0) or not."""
    loss = (np.linspace(2.3, 6.0, 8),)
    assert EXPONENTIAL.degenerate(loss, np.array(TRUE_ERROR)) is None
    assert EXPONENTIAL.degenerate(loss, np.array([0.5, -0.001, -1.5])) is None
    for gamma in (1e-4, -1e-4):
        assert "a straight line" in EXPONENTIAL.degenerate(loss, np.array([5.0, 4.5, gamma]))
