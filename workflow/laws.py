"""The scaling laws, as pure functions of arrays and parameters.

Gadre et al. (2024) write the loss in compute C = 6ND and token multiplier M = D/N,

    L(C, M) = E + (a M^eta + b M^-eta) C^-eta,

which is the Chinchilla form with one shared exponent (alpha = beta = 2 eta) rewritten so that
over-training (M) is an explicit axis. Downstream top-1 error follows the loss,

    Err(L) = epsilon - k exp(-gamma L),

and the prediction chain is (N, M) -> predicted loss -> predicted error: the error law is
applied to the *predicted* loss, never to a measured one, so a prediction needs no run. That
law leaves [0, 1] at low enough loss; two bounded alternatives give the fraction of the error
at chance that a model keeps, a logistic function sigma(z) = 1 / (1 + exp(-z)) of the loss or
(with no loss in between) of log compute and log multiplier:

    Err(L) / Err_chance = sigma(a + b L),    Err(C, M) / Err_chance = sigma(a + b ln C + m ln M).

Every law is a function of its inputs and parameters only, so the fit stage, the plots and the
tests share one definition; which laws are fitted, and how, is ``workflow.forms``. The
Jacobians sit beside the laws because Levenberg-Marquardt evaluates them at every step and the
bootstrap refits every law hundreds of times.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

# Training FLOPs per parameter per token: 2 in the forward pass, 4 in the backward (C = 6ND).
TRAINING_FLOPS_PER_PARAM_TOKEN = 6.0


def compute(n_params: ArrayLike, tokens: ArrayLike) -> np.ndarray:
    """Training FLOPs C = 6ND, in float64 (6ND overflows int64 beyond ~1e18)."""
    return (
        TRAINING_FLOPS_PER_PARAM_TOKEN
        * np.asarray(n_params, dtype=float)
        * np.asarray(tokens, dtype=float)
    )


def tokens_for_compute(n_params: ArrayLike, compute_flops: ArrayLike) -> np.ndarray:
    """The training tokens D that spend ``compute_flops`` on a model of N parameters: C / 6N."""
    return np.asarray(compute_flops, dtype=float) / (
        TRAINING_FLOPS_PER_PARAM_TOKEN * np.asarray(n_params, dtype=float)
    )


def params_for_compute(compute_flops: float, multiplier: float) -> float:
    """The N that spends ``compute_flops`` at token multiplier M = D/N: sqrt(C / 6M)."""
    return math.sqrt(compute_flops / (TRAINING_FLOPS_PER_PARAM_TOKEN * multiplier))


def loss(
    compute_flops: ArrayLike, multiplier: ArrayLike, E: float, a: float, b: float, eta: float
) -> np.ndarray:
    """L(C, M) = E + (a M^eta + b M^-eta) C^-eta, the paper's loss law."""
    multiplier_eta = np.power(multiplier, eta, dtype=float)
    compute_eta = np.power(compute_flops, -eta, dtype=float)
    return E + (a * multiplier_eta + b / multiplier_eta) * compute_eta


def loss_jacobian(
    compute_flops: ArrayLike, multiplier: ArrayLike, E: float, a: float, b: float, eta: float
) -> np.ndarray:
    """d L(C, M) / d (E, a, b, eta): the last axis runs over the parameters."""
    log_over = np.log(np.divide(multiplier, compute_flops, dtype=float))  # log M - log C
    log_under = -np.log(np.multiply(multiplier, compute_flops, dtype=float))  # -log M - log C
    over, under = np.exp(eta * log_over), np.exp(eta * log_under)  # M^eta C^-eta, M^-eta C^-eta
    jacobian = np.empty((*np.broadcast(over, under).shape, 4))
    jacobian[..., 0] = 1.0
    jacobian[..., 1] = over
    jacobian[..., 2] = under
    jacobian[..., 3] = a * over * log_over + b * under * log_under
    return jacobian


def loss_from_params_tokens(
    n_params: ArrayLike, tokens: ArrayLike, E: float, a: float, b: float, eta: float
) -> np.ndarray:
    """The same law in N and D: E + A N^-2eta + B D^-2eta with A = a 6^-eta, B = b 6^-eta.

    Substituting N = sqrt(C / 6M) and D = sqrt(CM / 6) into L(C, M) gives this form; it is
    written out separately so a test can check the algebra rather than trust it.
    """
    n_params = np.asarray(n_params, dtype=float)
    tokens = np.asarray(tokens, dtype=float)
    scale = TRAINING_FLOPS_PER_PARAM_TOKEN**-eta
    return E + a * scale * n_params ** (-2 * eta) + b * scale * tokens ** (-2 * eta)


def optimal_multiplier(a: float, b: float, eta: float) -> float:
    """M* = (b/a)^(1/(2 eta)): the multiplier that minimises L(C, M) at fixed compute."""
    return (b / a) ** (1.0 / (2.0 * eta))


def error(loss_value: ArrayLike, epsilon: float, k: float, gamma: float) -> np.ndarray:
    """Err(L) = epsilon - k exp(-gamma L): average top-1 error as a function of loss."""
    return epsilon - k * np.exp(-gamma * np.asarray(loss_value, dtype=float))


def error_jacobian(loss_value: ArrayLike, epsilon: float, k: float, gamma: float) -> np.ndarray:
    """d Err(L) / d (epsilon, k, gamma): the last axis runs over the parameters."""
    loss_value = np.asarray(loss_value, dtype=float)
    decay = np.exp(-gamma * loss_value)
    return np.stack([np.ones_like(decay), -decay, k * loss_value * decay], axis=-1)


def chinchilla_loss(
    n_params: ArrayLike,
    tokens: ArrayLike,
    E: float,
    A: float,
    B: float,
    alpha: float,
    beta: float,
) -> np.ndarray:
    """L(N, D) = E + A N^-alpha + B D^-beta (Hoffmann et al. 2022), exponents free."""
    n_params = np.asarray(n_params, dtype=float)
    tokens = np.asarray(tokens, dtype=float)
    return E + A * n_params**-alpha + B * tokens**-beta


def logistic(z: ArrayLike) -> np.ndarray:
    """sigma(z) = 1 / (1 + exp(-z)), written with tanh so that no z overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))


def sigmoid_of_loss(loss_value: ArrayLike, a: float, b: float) -> np.ndarray:
    """sigma(a + b L): the fraction of its chance value that a downstream error keeps at loss L
    (the form multiplies it by the error at chance)."""
    return logistic(a + b * np.asarray(loss_value, dtype=float))


def sigmoid_of_loss_jacobian(loss_value: ArrayLike, a: float, b: float) -> np.ndarray:
    """d sigma(a + b L) / d (a, b): the last axis runs over the parameters."""
    loss_value = np.asarray(loss_value, dtype=float)
    value = sigmoid_of_loss(loss_value, a, b)
    slope = value * (1.0 - value)
    return np.stack(np.broadcast_arrays(slope, slope * loss_value), axis=-1)


def sigmoid_of_compute(
    compute_flops: ArrayLike, multiplier: ArrayLike, a: float, b: float, m: float
) -> np.ndarray:
    """sigma(a + b ln C + m ln M): the fraction of its chance value that a downstream error
    keeps at compute C and multiplier M, with no loss in between."""
    log_c, log_m = np.log(np.asarray(compute_flops, dtype=float)), np.log(multiplier, dtype=float)
    return logistic(a + b * log_c + m * log_m)


def sigmoid_of_compute_jacobian(
    compute_flops: ArrayLike, multiplier: ArrayLike, a: float, b: float, m: float
) -> np.ndarray:
    """d sigma(a + b ln C + m ln M) / d (a, b, m): the last axis runs over the parameters."""
    log_c, log_m = np.log(np.asarray(compute_flops, dtype=float)), np.log(multiplier, dtype=float)
    value = logistic(a + b * log_c + m * log_m)
    slope = value * (1.0 - value)
    return np.stack(np.broadcast_arrays(slope, slope * log_c, slope * log_m), axis=-1)
