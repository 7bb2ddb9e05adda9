"""How close an estimate is to the truth (DESIGN section 6)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._model import as_params, predictive_params
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import check_design, check_gate_x, check_params, check_response

__all__ = [
    "ExpertMatch",
    "expert_error",
    "gating_error",
    "heldout_log_likelihood",
    "match_experts",
    "mean_squared_error",
]


class ExpertMatch(NamedTuple):
    """Result of `match_experts`.

    Attributes
    ----------
    error
        min over permutations of ||A_hat[perm] - A||_F / ||A||_F.
    permutation
        (k,) int array: ``estimate[permutation]`` is aligned with ``truth``.
    """

    error: float
    permutation: np.ndarray


def _experts_of(value, name: str) -> np.ndarray:
    if isinstance(getattr(value, "params", None), MoEParams):  # a fit result
        value = value.params
    experts = value.experts if hasattr(value, "experts") else value
    try:
        experts = np.asarray(experts, dtype=float)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name}: expected a (k, d) experts array or an object with .experts, got {type(value).__name__}"
        ) from error
    if experts.ndim != 2:
        raise ValueError(f"{name}: expected experts of shape (k, d), got shape {experts.shape}")
    if not np.isfinite(experts).all():
        raise ValueError(f"{name}: expected finite experts, found NaN or inf")
    return experts


def match_experts(estimate, truth) -> ExpertMatch:
    """Match estimated experts to true ones, minimising the Frobenius error.

    The squared error separates over experts, so the best of the k! permutations is a linear
    assignment problem, solved exactly in O(k^3).

    Parameters
    ----------
    estimate, truth
        (k, d) arrays, objects with an ``experts`` attribute of that shape, or fit results.

    Raises
    ------
    TypeError
        For values that are not numeric arrays.
    ValueError
        For shapes other than one (k, d), non-finite values, or an all-zero ``truth``.
    """
    estimate = _experts_of(estimate, "estimate")
    truth = _experts_of(truth, "truth")
    if estimate.shape != truth.shape:
        raise ValueError(
            f"estimate: expected experts of shape {truth.shape} like truth, got {estimate.shape}"
        )
    cost = ((truth[:, None, :] - estimate[None, :, :]) ** 2).sum(-1)  # cost[i, j]: truth i, est j
    truth_norm = np.linalg.norm(truth)
    if truth_norm == 0:
        raise ValueError("truth: expected experts with a non-zero norm (the error is relative to it), got all zeros")
    rows, cols = linear_sum_assignment(cost)
    permutation = cols[np.argsort(rows)]
    error = np.linalg.norm(estimate[permutation] - truth) / truth_norm
    return ExpertMatch(float(error), permutation)


def expert_error(estimate, truth) -> float:
    """min over permutations of ||A_hat - A||_F / ||A||_F; below 0.1 counts as recovered."""
    return match_experts(estimate, truth).error


def gating_error(params: MoEParams, truth: MoEParams, x, *, gate_x=None) -> float:
    """Mean over x of the total variation between true and estimated gate probabilities.

    The estimate's experts are first matched to the truth's (`match_experts`), and its gates
    permuted the same way.

    Parameters
    ----------
    params, truth
        `MoEParams` (or fit results) with gates of shape (k, d), or (k, q) with ``gate_x``.
    x
        (n, d) held-out inputs.
    gate_x
        (n, q) the gate's own covariates at those points, when the gate has them.
    """
    x = check_design(x)
    gate_x = check_gate_x(gate_x, x.shape[0])
    gate_dim = None if gate_x is None else gate_x.shape[1]
    params = check_params(as_params(params, "params"), "params", gate_dim=gate_dim)  # shapes, finite values
    truth = check_params(as_params(truth, "truth"), "truth", gate_dim=gate_dim)
    if params.experts.shape != truth.experts.shape:
        raise ValueError(
            f"params: expected experts of shape {truth.experts.shape} like truth, got "
            f"{params.experts.shape}"
        )
    if x.shape[1] != truth.dim:
        raise ValueError(f"x: expected {truth.dim} columns like truth's experts, got {x.shape[1]}")
    permutation = match_experts(params, truth).permutation
    aligned = params.permute(permutation)
    gate_input = x if gate_x is None else gate_x
    difference = aligned.gate_probabilities(gate_input) - truth.gate_probabilities(gate_input)
    return float(0.5 * jnp.abs(difference).sum(-1).mean())


def _check_eval_inputs(params, x, y, gate_x):
    x = check_design(x)
    gate_x = check_gate_x(gate_x, x.shape[0])
    params = check_params(
        as_params(params, "params"), "params", require_noise=True,
        gate_dim=None if gate_x is None else gate_x.shape[1],
    )
    y = check_response(y, x.shape[0])
    if x.shape[1] != params.dim:
        raise ValueError(f"x: expected {params.dim} columns like params.experts, got {x.shape[1]}")
    return params, x, y, gate_x


def heldout_log_likelihood(params: MoEParams, x, y, *, gate_x=None) -> float:
    """Mean log p(y | x) per point on held-out data (x (n, d), y (n,)), under ``params.link``.

    ``params``: `MoEParams` (used as they are) or a fit result (an EM fit's experts with their
    unbiased noise sds, ``Fit.predictive_noise``, as `numpyro_moe.predict` uses); ``gate_x``
    (n, q): the gate's own covariates, when it has them.
    """
    params, x, y, gate_x = _check_eval_inputs(predictive_params(params, "params"), x, y, gate_x)
    return float(jnp.mean(MixtureOfExperts.from_params(params, x, gate_x=gate_x).log_prob(y)))


def mean_squared_error(params: MoEParams, x, y, *, gate_x=None) -> float:
    """Mean of (y - E[y | x])^2 on held-out data (x (n, d), y (n,)), under ``params.link``.

    ``params``: `MoEParams` or a fit result; ``gate_x`` (n, q): the gate's own covariates, when
    it has them.
    """
    params, x, y, gate_x = _check_eval_inputs(params, x, y, gate_x)
    residual = y - params.predictive_mean(x, gate_x)
    return float(jnp.mean(residual**2))

