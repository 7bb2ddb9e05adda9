"""The whole fit in one call: tensor estimate -> EM over the gate -> joint EM, with restarts.

The moment estimate has no local optima but needs many samples to be accurate, and it is
biased when the design assumptions fail; EM from random starts is accurate at its optimum but
can stop in a wrong one. So the estimate (with its gate learned by EM, experts fixed) is used as
one start among ``num_restarts`` random ones, all refined by joint EM in parallel, and the best
likelihood wins. `MoEFit` records which start that was.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._baselines import fit_em_restarts, random_start
from numpyro_moe._em import EMResult
from numpyro_moe._experts import ExpertEstimate, estimate_experts
from numpyro_moe._fit import _check_xy, fit_gating
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import ReliabilityWarning, check_key, check_num_experts, check_positive_int

__all__ = ["MoEFit", "fit_moe"]


class MoEFit(NamedTuple):
    """Result of `fit_moe`.

    Attributes
    ----------
    params
        `MoEParams` of the best start after joint EM.
    em
        `EMResult` of that start.
    estimate
        The `ExpertEstimate` of the tensor method, or None when k > d.
    start_log_likelihoods
        (1 + num_restarts,) final mean log-likelihood per point of each start; entry 0 is the
        tensor estimate's (``-inf`` when there is none).
    chosen_start
        Index of the winning start (0: the tensor estimate).
    """

    params: MoEParams
    em: EMResult
    estimate: ExpertEstimate | None
    start_log_likelihoods: np.ndarray
    chosen_start: int


def fit_moe(
    x,
    y,
    *,
    num_experts: int,
    key: jax.Array,
    link: str | Link = "linear",
    num_restarts: int = 4,
    intercepts: bool = False,
    max_iterations: int = 500,
    tol: float = 1e-8,
    progress: bool = False,
    **estimate_kwargs,
) -> MoEFit:
    """Fit a mixture of experts: tensor method, EM over the gate, joint EM, best of restarts.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses.
    num_experts
        k. For k > d the tensor method cannot apply and only random starts are used
        (``num_restarts`` must then be >= 1).
    key
        PRNG key (tensor decomposition and random starts).
    link
        Expert link.
    num_restarts
        Random starts run beside the tensor start (0: the tensor start alone).
    intercepts
        Fit expert and gate intercepts.
    max_iterations, tol
        Joint EM limits (see `fit_em`).
    progress
        Show progress bars.
    **estimate_kwargs
        Passed to `estimate_experts` (e.g. ``noise``, ``decomposition``).
    """
    x, y = _check_xy(x, y)
    link = resolve_link(link)
    key = check_key(key)
    num_experts = check_num_experts(num_experts, x.shape[1], require_k_le_d=False)
    num_restarts = check_positive_int(num_restarts, "num_restarts", minimum=0)
    tensor_key, restart_key = jax.random.split(key)
    estimate = None
    starts = []
    if num_experts <= x.shape[1]:
        estimate = estimate_experts(x, y, num_experts=num_experts, link=link, key=tensor_key, **estimate_kwargs)
        gate_start = estimate.to_params(intercepts=intercepts)
        gated = fit_gating(
            x, y, gate_start, link=link, intercepts=intercepts, max_iterations=max_iterations, tol=tol,
            progress=progress,
        )
        starts.append(gated)
    elif num_restarts == 0:
        raise ValueError(
            f"num_restarts: with num_experts={num_experts} > dim={x.shape[1]} the tensor method cannot "
            "apply, so at least one random start is needed"
        )
    for start_key in jax.random.split(restart_key, num_restarts):
        start = random_start(start_key, x, y, num_experts=num_experts)
        if intercepts:
            zeros = jnp.zeros(num_experts, x.dtype)
            start = start._replace(expert_intercepts=zeros, gate_intercepts=zeros)
        starts.append(start)
    dtype = x.dtype
    stacked = jax.tree_util.tree_map(lambda *values: jnp.stack([jnp.asarray(v, dtype) for v in values]), *starts)
    restarts = fit_em_restarts(
        x, y, num_experts=num_experts, key=restart_key, link=link, starts=stacked, intercepts=intercepts,
        max_iterations=max_iterations, tol=tol, progress=progress,
    )
    log_likelihoods = restarts.log_likelihoods
    if estimate is None:
        log_likelihoods = np.concatenate([[-np.inf], log_likelihoods])
    chosen = int(np.argmax(log_likelihoods))
    if not restarts.best.converged:
        warnings.warn(
            f"joint EM of the best start hit max_iterations={max_iterations}; raise max_iterations",
            ReliabilityWarning,
            stacklevel=2,
        )
    return MoEFit(restarts.best.params, restarts.best, estimate, log_likelihoods, chosen)
