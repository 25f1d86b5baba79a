"""The law forms the fit stage knows, as one registry: a new form is one entry of FORMS.

A form is what the rest of the stage needs to fit a law and predict with it: the law (a pure
function in ``workflow.laws``), its parameters' names, what it predicts (a run's loss, or its
downstream error) and from what (a run's size N and D, or a loss), and how it is fitted (a
start grid with Levenberg-Marquardt and the law's Jacobian, or an objective with L-BFGS). The
stage loops over the registry; nothing matches a form by its name. A form of the error is
fitted on each task group's average error and on each task's accuracy, as its error
1 - accuracy.

- ``paper``: L(C, M) = E + (a M^eta + b M^-eta) C^-eta on raw loss, with Levenberg-Marquardt
  (scipy's curve_fit) from the 128-start grid of the paper's code, keeping the lowest residual.
  This is what Gadre et al. did, so the released testbed reproduces their numbers.
- ``chinchilla``: L = E + A N^-alpha + B D^-beta with free exponents, fitted as Besiroglu et al.
  (2024) do: Huber loss (delta 1e-3) on log loss, L-BFGS from a grid of starts
  (``workflow.routines``).
- ``exponential``: the paper's error law Err(L) = epsilon - k exp(-gamma L), from curve_fit's
  default start. It is fitted on the measured loss and predicts from each loss form's predicted
  loss, so it ends every loss form's chain and its rows carry that loss form's name. Nothing
  keeps it in [0, 1]: the prediction stage clips it there and marks the rows it clipped.
- ``sigmoid``: Err(L) = Err_chance sigma(a + b L), the OLMo ladder's second step (Bhagia et
  al. 2024) bounded by the error at chance and 0; it ends every loss form's chain too, as
  "{loss form}+sigmoid".
- ``direct``: Err(C, M) = Err_chance sigma(a + b ln C + m ln M), from the run's size with no
  loss in between.

Both bounded forms are fitted on error / Err_chance, by Levenberg-Marquardt from the straight
line through the logits of the points; Err_chance is the runs' ``chance`` (1 where unknown).

The first form registered for a quantity is its reference: its residuals give the bootstrap's
sd of a fit point that has no interval of its own (``workflow.bootstrap``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from workflow import laws
from workflow.routines import Fitting, HuberOnLogLoss, LeastSquares
from workflow.settings import FitSettings

LOSS, ERROR = "loss", "error"  # what a form predicts: a metric of runs.parquet
ACCURACY = "accuracy"  # a task's metric, fitted by the forms of the error as 1 - accuracy
SIZE = "size"  # a form of a run's N and D (the other source is LOSS: a form of a loss)


@dataclass(frozen=True)
class Form:
    """One law form: what it predicts from what, its parameters and how it is fitted."""

    name: str
    predicts: str  # LOSS or ERROR
    source: str  # SIZE (a run's N and D) or LOSS (a loss: measured to fit, predicted to predict)
    variables: Callable[..., tuple[np.ndarray, ...]]  # the source's arrays -> the law's inputs
    law: Callable  # law(*inputs, *params)
    params: tuple[str, ...]
    fitting: Fitting
    # The 'form' column of the predictions this form ends: "{name}" is its own name, "{loss}"
    # the name of the loss form whose chain it ends (a form of the loss).
    label: str = "{name}"
    # Why a fit (inputs at its points, parameters) is degenerate, its constants meaningless,
    # or None.
    degenerate: Callable[[tuple, np.ndarray], str | None] = lambda inputs, params: None
    # The law gives the error as a fraction of its value at chance: fitted on error / chance
    # error, its predictions multiplied back, so they stay between 0 and chance.
    of_chance: bool = False
    # The fitted law as a person reads it, from its parameters and the factor its values are
    # multiplied by (the error at chance for a form of it).
    formula: Callable[[np.ndarray, float], str] = lambda params, scale: str(params)
    # What makes a fit of a loss form implausible (``workflow.sanity``): its exponents, which
    # must lie in (0, 2), and its irreducible loss, which must not be negative.
    exponents: tuple[str, ...] = ()
    irreducible: str | None = None

    def predict(self, source: tuple, params) -> np.ndarray:
        """The law at ``source`` (the arrays its source names), broadcasting over ``params``."""
        return self.law(*self.variables(*source), *params)

    def chain_label(self, loss_form: Form | None = None) -> str:
        """The 'form' column of the predictions this form makes, at the end of ``loss_form``'s
        chain when its source is a loss."""
        loss = loss_form.chain_label() if loss_form else None
        return self.label.format(name=self.name, loss=loss)


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
ERROR_START = np.array([(1.0, 1.0, 1.0)])
# Besiroglu et al.'s grid (Hoffmann et al.'s) is log A, log B in {0, 5, ..., 25}, log E in
# {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2}: 4,500 starts. We keep every other value of
# each axis (3^5 = 243 starts), in (log A, log B, log E, alpha, beta).
CHINCHILLA_GRID = np.array(
    list(
        itertools.product(
            (0.0, 10.0, 20.0), (0.0, 10.0, 20.0), (-1.0, 0.0, 1.0), (0.0, 1.0, 2.0), (0.0, 1.0, 2.0)
        )
    )
)


def paper_starts(settings: FitSettings, inputs: tuple, values: ArrayLike) -> np.ndarray:
    """``settings.starts`` starting points: the paper's 128, an evenly spaced subset, or 128
    plus random ones (drawn with ``settings.seed``)."""
    count = settings.starts
    if count <= len(PAPER_GRID):
        return PAPER_GRID[np.linspace(0, len(PAPER_GRID) - 1, count).round().astype(int)]
    rng = np.random.default_rng(settings.seed)
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


def compute_and_multiplier(n_params: ArrayLike, tokens: ArrayLike) -> tuple:
    """(C, M) = (6ND, D/N): the paper's axes."""
    n_params, tokens = params_and_tokens(n_params, tokens)
    return laws.compute(n_params, tokens), tokens / n_params


def params_and_tokens(n_params: ArrayLike, tokens: ArrayLike) -> tuple:
    """(N, D) as float arrays."""
    return np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float)


def loss_itself(loss: np.ndarray) -> tuple:
    """(L,): a law of the loss alone."""
    return (loss,)


# Fractions of the chance error nearer 0 or 1 than this are moved to it before their logit is
# taken for a start.
LOGIT_MARGIN = 0.02


def logit_starts(design: Callable[..., list[np.ndarray]]) -> Callable:
    """Starts for sigma(a + sum_j c_j x_j) at the points: the least-squares plane through their
    logits (``design`` gives the x_j from the law's inputs; an x_j that does not vary over the
    points gets c_j = 0), and the flat curve at their mean."""

    def starts(settings: FitSettings, inputs: tuple, values: np.ndarray) -> np.ndarray:
        columns = np.column_stack(design(*inputs))
        if not len(values):  # no measured point: the problem fails, but keeps the batch's shape
            return np.zeros((2, columns.shape[1] + 1))
        logits = _logit(np.clip(values, LOGIT_MARGIN, 1 - LOGIT_MARGIN))
        centre = columns.mean(axis=0)
        slopes = np.linalg.lstsq(columns - centre, logits - logits.mean(), rcond=None)[0]
        flat = np.zeros(len(slopes) + 1)
        flat[0] = _logit(np.clip(np.mean(values), LOGIT_MARGIN, 1 - LOGIT_MARGIN))
        return np.array([[logits.mean() - slopes @ centre, *slopes], flat])

    return starts


def _logit(fraction: ArrayLike) -> np.ndarray:
    return np.log(fraction) - np.log1p(-np.asarray(fraction))


def loss_design(loss: np.ndarray) -> list[np.ndarray]:
    """The x of a + b L."""
    return [loss]


def size_design(compute_flops: np.ndarray, multiplier: np.ndarray) -> list[np.ndarray]:
    """The x of a + b ln C + m ln M."""
    return [np.log(compute_flops), np.log(multiplier)]


# Below this, exp(-gamma L) is linear to 1% across the fit points' loss range.
LINEAR_ERROR_LAW = 0.01


def straight_error_law(inputs: tuple, params: np.ndarray) -> str | None:
    """Err(L) whose exponential is a straight line over the fit points: its curvature is not
    identified, and epsilon and k are meaningless apart."""
    (loss,) = inputs
    gamma = params[2]
    if not abs(gamma) * np.ptp(loss) < LINEAR_ERROR_LAW:
        return None
    return (
        f"a straight line over the fit points, {describe_line(params)} (as gamma goes to 0, "
        "epsilon and k grow together, meaningless apart)"
    )


def one_multiplier(inputs: tuple, params: np.ndarray) -> str | None:
    """A form of (C, M) whose fit points share one M: its M term is not identified."""
    _, multiplier = inputs
    if np.ptp(np.log(multiplier)) > 0:
        return None
    return (
        f"every fit point has M = {multiplier[0]:g}, so the M term is not identified: its "
        "predictions at any other M mean nothing"
    )


def describe_line(params: ArrayLike) -> str:
    """The line epsilon - k + k gamma L that Err(L) = epsilon - k exp(-gamma L) is at small
    gamma L, as 'Err = intercept + slope L'."""
    epsilon, k, gamma = params
    intercept, slope = epsilon - k, k * gamma
    return f"Err = {intercept:.4g} {'-' if slope < 0 else '+'} {abs(slope):.4g} L"


PAPER = Form(
    name="paper",
    predicts=LOSS,
    source=SIZE,
    variables=compute_and_multiplier,
    law=laws.loss,
    params=("E", "a", "b", "eta"),
    fitting=LeastSquares(laws.loss_jacobian, paper_starts),
    exponents=("eta",),
    irreducible="E",
)
CHINCHILLA = Form(
    name="chinchilla",
    predicts=LOSS,
    source=SIZE,
    variables=params_and_tokens,
    law=laws.chinchilla_loss,
    params=("E", "A", "B", "alpha", "beta"),
    fitting=HuberOnLogLoss(grid=CHINCHILLA_GRID, delta=1e-3),
    exponents=("alpha", "beta"),
    irreducible="E",
)
EXPONENTIAL = Form(
    name="exponential",
    predicts=ERROR,
    source=LOSS,
    variables=loss_itself,
    law=laws.error,
    params=("epsilon", "k", "gamma"),
    fitting=LeastSquares(laws.error_jacobian, lambda *problem: ERROR_START, batched_refits=True),
    label="{loss}",
    degenerate=straight_error_law,
    formula=lambda params, scale: "Err = {:.3f} - {:.2f} exp(-{:.3f} L)".format(*params),
)
SIGMOID = Form(
    name="sigmoid",
    predicts=ERROR,
    source=LOSS,
    variables=loss_itself,
    law=laws.sigmoid_of_loss,
    params=("a", "b"),
    fitting=LeastSquares(
        laws.sigmoid_of_loss_jacobian,
        logit_starts(loss_design),
        batched_fits=True,
        batched_refits=True,
    ),
    label="{loss}+sigmoid",
    of_chance=True,
    formula=lambda params, scale: "Err = {:.3f} sigma({:.3f} + {:.3f} L)".format(scale, *params),
)
DIRECT = Form(
    name="direct",
    predicts=ERROR,
    source=SIZE,
    variables=compute_and_multiplier,
    law=laws.sigmoid_of_compute,
    params=("a", "b", "m"),
    fitting=LeastSquares(
        laws.sigmoid_of_compute_jacobian,
        logit_starts(size_design),
        batched_fits=True,
        batched_refits=True,
    ),
    degenerate=one_multiplier,
    of_chance=True,
    formula=lambda params, scale: "Err = {:.3f} sigma({:.3f} + {:.4f} ln C + {:.4f} ln M)".format(
        scale, *params
    ),
)

FORMS: tuple[Form, ...] = (PAPER, CHINCHILLA, EXPONENTIAL, SIGMOID, DIRECT)


# The metrics of runs.parquet the forms predicting a quantity are fitted on, each on its own.
FITTED_ON = {LOSS: (LOSS,), ERROR: (ERROR, ACCURACY)}


def chance_error(metric: str, chance: float) -> float:
    """The error at chance of a downstream metric whose ``chance`` (runs.parquet's) is given:
    an error's chance, 1 - an accuracy's; 1 where unknown (NaN) or out of (0, 1]."""
    error = 1.0 - chance if metric == ACCURACY else chance
    return float(error) if 0.0 < error <= 1.0 else 1.0


def fitted_as(metric: str) -> str:
    """What the forms fitted on ``metric`` predict: an accuracy is fitted as its error."""
    return ERROR if metric == ACCURACY else metric


def predicting(quantity: str) -> list[Form]:
    """The registered forms that predict ``quantity`` (LOSS, ERROR or ACCURACY), reference
    first."""
    return [form for form in FORMS if form.predicts == fitted_as(quantity)]


@dataclass(frozen=True)
class Link:
    """A form where it sits in a chain: first (``after`` None), or after the loss form whose
    predicted loss it is fed (a form of the loss)."""

    form: Form
    after: Form | None = None

    @property
    def label(self) -> str:
        """The 'form' column of this link's predictions and parameters."""
        return self.form.chain_label(self.after)


def links() -> list[Link]:
    """Every form in every chain, in the order the chains are predicted: each form of the
    size, followed, when it predicts loss, by each form of the loss."""
    of_loss = [form for form in FORMS if form.source == LOSS]
    return [
        link
        for form in FORMS
        if form.source == SIZE
        for link in [Link(form)] + [Link(then, form) for then in of_loss if form.predicts == LOSS]
    ]


def chain_labels(quantity: str) -> list[str]:
    """The 'form' column of every chain that predicts ``quantity``, in registry order."""
    return [link.label for link in links() if link.form.predicts == fitted_as(quantity)]
