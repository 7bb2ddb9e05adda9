"""The baselines the papers beat, on the package's API, for users' comparisons and the benchmarks.

- `fit_em_restarts`: joint EM from several random starts (vmapped), keeping the best likelihood.
- `fit_squared_loss_gd`: gradient descent (Adam) on the squared loss of E[y | x].
- `fit_likelihood_gd`: gradient descent (Adam) on the joint negative log-likelihood.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._em import EMResult, em_iterations, split_augmented, to_augmented
from numpyro_moe._fit import (
    _check_link_output,
    _check_xy,
    _likelihood_gd,
    as_params,
    minimize_adam,
    resolvable_tol,
)
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._params import MoEParams, predictive_mean
from numpyro_moe._validation import (
    check_design,
    check_key,
    check_num_experts,
    check_positive,
    check_positive_int,
    check_response,
)

__all__ = [
    "RestartsResult",
    "fit_em_restarts",
    "fit_likelihood_gd",
    "fit_squared_loss_gd",
    "random_start",
]


class RestartsResult(NamedTuple):
    """Result of `fit_em_restarts`.

    Attributes
    ----------
    best
        `EMResult` of the restart with the highest final log-likelihood.
    log_likelihoods
        (num_restarts,) final mean log-likelihood per point of every restart.
    params
        `MoEParams` of every restart, stacked on a leading axis.
    """

    best: EMResult
    log_likelihoods: np.ndarray
    params: MoEParams


def random_start(key: jax.Array, x, y, *, num_experts: int) -> MoEParams:
    """A random start: unit-norm Gaussian expert directions, a uniform gate, noise = sd(y)."""
    key = check_key(key)
    x = check_design(x)
    y = check_response(y, x.shape[0])
    num_experts = check_positive_int(num_experts, "num_experts")
    dim = x.shape[1]
    experts = jax.random.normal(key, (num_experts, dim), x.dtype)
    experts = experts / jnp.linalg.norm(experts, axis=1, keepdims=True)
    return MoEParams(experts, jnp.zeros((num_experts, dim), x.dtype), jnp.std(y))


def fit_em_restarts(
    x,
    y,
    *,
    num_experts: int,
    key: jax.Array,
    num_restarts: int = 10,
    link: str | Link = "linear",
    starts: MoEParams | None = None,
    intercepts: bool = False,
    max_iterations: int = 500,
    tol: float = 1e-8,
    progress: bool = False,
) -> RestartsResult:
    """Joint EM from ``num_restarts`` random starts (`random_start`), run in parallel (vmap).

    ``starts`` (stacked `MoEParams`, leading axis = restart) replaces the random starts, e.g. to
    include a moment estimate among random ones. The best final likelihood wins. With
    ``intercepts`` the expert and gate intercepts are fitted too (random starts begin at zero).
    """
    x, y = _check_xy(x, y)
    link = resolve_link(link)
    key = check_key(key)
    num_experts = check_num_experts(num_experts, x.shape[1], require_k_le_d=False)
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    max_iterations = check_positive_int(max_iterations, "max_iterations")
    tol = resolvable_tol(check_positive(tol, "tol"), x.dtype)
    if starts is None:
        keys = jax.random.split(key, num_restarts)
        starts = jax.vmap(lambda k: random_start(k, x, y, num_experts=num_experts))(keys)
    elif not isinstance(starts, MoEParams) or starts.experts.ndim != 3:
        raise TypeError("starts: expected MoEParams stacked on a leading restart axis")
    elif starts.experts.shape[1:] != (num_experts, x.shape[1]):
        raise ValueError(
            f"starts: expected experts of shape (restarts, {num_experts}, {x.shape[1]}), got {starts.experts.shape}"
        )
    _check_link_output(link, x, jax.tree_util.tree_map(lambda value: value[0], starts))
    experts, gates = jax.vmap(lambda start: to_augmented(start, intercepts))(starts)
    design = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1) if intercepts else x
    experts, gates, noise, log_likelihoods, history, iterations = em_iterations(
        experts, gates, jnp.asarray(starts.noise), design, y, link=link,
        update_experts=True, max_iterations=max_iterations, tol=tol,
        progress="EM restarts" if progress else None,
    )
    log_likelihoods = np.where(np.isfinite(log_likelihoods), log_likelihoods, -np.inf)
    best = int(np.argmax(log_likelihoods))
    count = int(iterations[best])
    params = jax.vmap(lambda e, g, s: split_augmented(e, g, s, intercepts))(experts, gates, noise)
    best_result = EMResult(
        params=jax.tree_util.tree_map(lambda value: value[best], params),
        log_likelihood=float(log_likelihoods[best]),
        history=np.asarray(history[best, :count]),
        iterations=count,
        converged=count < max_iterations,
    )
    return RestartsResult(best_result, log_likelihoods, params)


def _descent_start(x, y, key, link, num_experts, init):
    """Checked inputs of the descent baselines and their start (``init``, or `random_start`)."""
    x, y = _check_xy(x, y)
    link = resolve_link(link)
    key = check_key(key)
    num_experts = check_num_experts(num_experts, x.shape[1], require_k_le_d=False)
    if init is None:
        start = random_start(key, x, y, num_experts=num_experts)
    else:
        start = as_params(init, "init", x.shape[1], num_experts=num_experts)
    return x, y, link, start


def fit_likelihood_gd(
    x,
    y,
    *,
    num_experts: int,
    key: jax.Array,
    link: str | Link = "linear",
    init=None,
    num_steps: int = 3000,
    learning_rate: float = 0.01,
) -> MoEParams:
    """Adam on the joint negative log-likelihood (experts, gates, noise), from ``init`` or random."""
    x, y, link, params = _descent_start(x, y, key, link, num_experts, init)
    params = params._replace(noise=jnp.std(y) if not np.isfinite(float(params.noise)) else params.noise)
    fitted, _ = _likelihood_gd(
        params, x, y, link, num_steps=check_positive_int(num_steps, "num_steps"),
        learning_rate=check_positive(learning_rate, "learning_rate"), fix_experts=False,
    )
    return fitted


def fit_squared_loss_gd(
    x,
    y,
    *,
    num_experts: int,
    key: jax.Array,
    link: str | Link = "linear",
    init=None,
    num_steps: int = 3000,
    learning_rate: float = 0.01,
) -> MoEParams:
    """Adam on the squared loss mean (y - sum_i softmax(W x)_i g(a_i . x))^2, from ``init`` or random.

    The noise of the result is the root of the final mean squared error.
    """
    x, y, link, start = _descent_start(x, y, key, link, num_experts, init)
    variables = {"experts": jnp.asarray(start.experts, x.dtype), "gates": jnp.asarray(start.gates[:-1], x.dtype)}
    variables, _ = minimize_adam(
        _squared_loss, variables, (x, y), num_steps=check_positive_int(num_steps, "num_steps"),
        learning_rate=check_positive(learning_rate, "learning_rate"), static=link,
    )
    return _squared_loss_params(variables, x, jnp.sqrt(_squared_loss(variables, (x, y), link)))


def _squared_loss_params(variables, x, noise=1.0) -> MoEParams:
    gates = jnp.concatenate([variables["gates"], jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
    return MoEParams(variables["experts"], gates, jnp.asarray(noise, x.dtype))


def _squared_loss(variables, args, link):
    x, y = args
    return jnp.mean((y - predictive_mean(_squared_loss_params(variables, x), x, link)) ** 2)
