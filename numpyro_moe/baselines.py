"""Gradient-descent fits (Adam) that the papers compare with, returning the package's `Fit`.

- `fit_likelihood_gd`: the negative log-likelihood. With the experts fixed
  (``fix=("experts",)``) it is the gating loss of Makkuva, Oh, Kannan, Viswanath (AISTATS 2020),
  the negative log-likelihood in W; over everything, the joint likelihood that gets stuck.
- `fit_squared_loss_gd`: the squared loss of E[y | x], the common alternative that gets stuck.

Random starts come from `random_starts`; EM from several random starts is `fit_em` on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._fit import Fit, as_starts, check_data
from numpyro_moe._model import check_fix
from numpyro_moe._optim import minimize_adam
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import check_positive, check_positive_int

__all__ = ["fit_likelihood_gd", "fit_squared_loss_gd"]


def _single_start(init, x) -> MoEParams:
    starts = as_starts(init, x.shape[1])
    if starts.experts.shape[0] != 1:
        raise ValueError(f"init: expected one start, got {starts.experts.shape[0]}")
    return jax.tree_util.tree_map(lambda leaf: leaf[0], starts)


def _unpack(variables, start: MoEParams) -> MoEParams:
    """`MoEParams` from Adam's variables: free gate rows (last row zero), log noise, and the
    start's values for what is held fixed."""
    dim = start.experts.shape[1]
    gates = start.gates
    if "gates" in variables:
        gates = jnp.concatenate([variables["gates"], jnp.zeros((1, dim), variables["gates"].dtype)], axis=0)
    noise = jnp.exp(variables["log_noise"]) if "log_noise" in variables else start.noise
    return start.replace(experts=variables.get("experts", start.experts), gates=gates, noise=noise)


def _negative_log_likelihood(variables, args, static):
    start, x, y = args  # the start's link is static in its PyTree structure
    params = _unpack(variables, start)
    return -jnp.mean(MixtureOfExperts.from_params(params, x).log_prob(y))


def _result(params, losses, x, y, method) -> Fit:
    history = -np.asarray(losses)
    log_likelihood = float(jnp.mean(MixtureOfExperts.from_params(params, x).log_prob(y)))
    return Fit(
        params=params,
        log_likelihood=log_likelihood,
        history=history,
        iterations=len(history),
        converged=True,
        method=method,
        start_log_likelihoods=np.asarray([log_likelihood]),
    )


def fit_likelihood_gd(
    x,
    y,
    init,
    *,
    fix: tuple[str, ...] = (),
    num_steps: int = 3000,
    learning_rate: float = 0.01,
) -> Fit:
    """Adam on the negative mean log-likelihood, from ``init``.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses.
    init
        One start: `MoEParams` (its link is the fit's), an expert estimate, a `Fit`, or one of
        `random_starts`. A start without a finite noise starts at sd(y).
    fix
        Parameter groups held at ``init``'s values (``"experts"``, ``"gates"``, ``"noise"``);
        ``("experts",)`` is the AISTATS 2020 gating loss. Intercepts are held at their start.
    num_steps, learning_rate
        Adam steps and step size. ``Fit.converged`` is always True: a fixed number of steps.
    """
    x, y = check_data(x, y)
    fix = check_fix(fix)
    start = _single_start(init, x)
    noise = jnp.asarray(start.noise, x.dtype)
    start = start.replace(noise=jnp.where(jnp.isfinite(noise) & (noise > 0), noise, jnp.std(y)))
    variables = {}
    if "experts" not in fix:
        variables["experts"] = start.experts
    if "gates" not in fix:
        variables["gates"] = (start.gates[:-1] - start.gates[-1]).astype(x.dtype)
    if "noise" not in fix:
        variables["log_noise"] = jnp.log(start.noise)
    if not variables:
        raise ValueError("fix: every parameter group is fixed; nothing is left to fit")
    variables, losses = minimize_adam(
        _negative_log_likelihood,
        variables,
        (start, x, y),
        num_steps=check_positive_int(num_steps, "num_steps"),
        learning_rate=check_positive(learning_rate, "learning_rate"),
    )
    return _result(_unpack(variables, start), losses, x, y, "likelihood_gd")


def _squared_loss(variables, args, static):
    start, x, y = args
    params = _unpack(variables, start)
    return jnp.mean((y - params.predictive_mean(x)) ** 2)


def fit_squared_loss_gd(
    x,
    y,
    init,
    *,
    num_steps: int = 3000,
    learning_rate: float = 0.01,
) -> Fit:
    """Adam on the squared loss mean (y - sum_i softmax(W x)_i g(a_i . x))^2, from ``init``.

    The experts and gates are fitted; the noise of the result (every expert's) is the root of
    the final mean squared error. ``history`` is minus the squared loss along the way.
    """
    x, y = check_data(x, y)
    start = _single_start(init, x)
    variables = {"experts": start.experts, "gates": (start.gates[:-1] - start.gates[-1]).astype(x.dtype)}
    variables, losses = minimize_adam(
        _squared_loss,
        variables,
        (start, x, y),
        num_steps=check_positive_int(num_steps, "num_steps"),
        learning_rate=check_positive(learning_rate, "learning_rate"),
    )
    params = _unpack(variables, start)
    mse = jnp.mean((y - params.predictive_mean(x)) ** 2)
    params = params.replace(noise=jnp.full((params.num_experts,), jnp.sqrt(mse)))
    return _result(params, losses, x, y, "squared_loss_gd")
