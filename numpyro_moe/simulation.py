"""Simulated mixture-of-experts data with known truth (the papers' setting and a harder one)."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._links import Link
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import (
    check_design,
    check_gate_x,
    check_key,
    check_num_experts,
    check_params,
    check_positive,
    check_positive_int,
)

__all__ = ["GATINGS", "SimulatedData", "sample_data", "sample_response", "simulate", "true_params"]

GATINGS = ("orthogonal", "correlated")


class SimulatedData(NamedTuple):
    """Output of `simulate`: unpacks as ``x, y, truth``.

    Attributes
    ----------
    x
        (n, d) standard Gaussian inputs.
    y
        (n,) responses.
    truth
        `MoEParams` that generated the data (experts (k, d), gates (k, d) with last row zero,
        noise (k,), the link).
    """

    x: jax.Array
    y: jax.Array
    truth: MoEParams


def _check_noise(noise, num_experts: int) -> jax.Array:
    """A positive noise sd, shared (a number) or one per expert ((k,) array), as shape (k,)."""
    if np.ndim(noise) == 0:
        return jnp.full((num_experts,), check_positive(noise, "noise"))
    noise = jnp.asarray(np.asarray(noise, dtype=float))
    if noise.shape != (num_experts,) or not bool(jnp.all(jnp.isfinite(noise) & (noise > 0))):
        raise ValueError(
            f"noise: expected a positive number or {num_experts} positive sds (one per expert), got {noise}"
        )
    return noise


def true_params(
    *,
    key: jax.Array,
    dim: int,
    num_experts: int,
    link: str | Link = "linear",
    noise=0.1,
    gating: str = "orthogonal",
    gate_scale: float = 2.0,
    orthonormal_experts: bool = False,
) -> MoEParams:
    """Draw ground-truth parameters.

    Experts are unit-norm random directions (orthonormal if ``orthonormal_experts``).
    ``gating="orthogonal"`` (the papers' setting) draws every gate row in the orthogonal
    complement of the experts' span, so w_j . a_i = 0; ``gating="correlated"`` draws gate rows
    freely. The first k - 1 gate rows have norm ``gate_scale``; the last is zero. ``noise`` is a
    shared sd or one sd per expert.

    Raises
    ------
    ValueError
        For k > d, an unknown ``gating``, or a non-positive ``noise`` / ``gate_scale``.
    """
    key = check_key(key)
    dim = check_positive_int(dim, "dim")
    num_experts = check_num_experts(num_experts, dim, require_k_le_d=True)
    noise = _check_noise(noise, num_experts)
    gate_scale = check_positive(gate_scale, "gate_scale")
    if gating not in GATINGS:
        raise ValueError(f"gating: expected one of {GATINGS}, got {gating!r}")
    if gating == "orthogonal" and num_experts > 1 and num_experts == dim:
        raise ValueError(
            f"num_experts: gating='orthogonal' needs num_experts < dim so the gates have room "
            f"orthogonal to the experts; got num_experts={num_experts}, dim={dim}"
        )

    expert_key, gate_key = jax.random.split(key)
    raw = jax.random.normal(expert_key, (num_experts, dim))
    if orthonormal_experts:
        q, r = jnp.linalg.qr(raw.T)
        experts = (q * jnp.sign(jnp.diag(r))).T
    else:
        experts = raw / jnp.linalg.norm(raw, axis=1, keepdims=True)

    gates = jax.random.normal(gate_key, (num_experts - 1, dim))
    if gating == "orthogonal":
        basis, _ = jnp.linalg.qr(experts.T)  # (d, k) orthonormal basis of span(A)
        gates = gates - (gates @ basis) @ basis.T
    gates = gate_scale * gates / jnp.linalg.norm(gates, axis=1, keepdims=True)
    gates = jnp.concatenate([gates, jnp.zeros((1, dim))], axis=0)
    return MoEParams(experts=experts, gates=gates, noise=noise, link=link)


def sample_data(params: MoEParams, *, key: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
    """Draw ``(x, y)`` from the model: x ~ N(0, I_d), expert by the gate, y by the expert.

    Use it with the ``truth`` of `simulate` and a fresh key for a held-out set.

    Returns
    -------
    x : (num_samples, d) array
    y : (num_samples,) array
    """
    key = check_key(key)
    num_samples = check_positive_int(num_samples, "num_samples")
    params = check_params(params, "params", require_noise=True)
    x_key, y_key = jax.random.split(key)
    x = jax.random.normal(x_key, (num_samples, params.dim))
    return x, sample_response(params, x, key=y_key)


def sample_response(
    params: MoEParams, x, *, key: jax.Array, gate_x=None, num_draws: int | None = None
) -> jax.Array:
    """Draw y (n,) given inputs x (n, d) from the `MixtureOfExperts` of ``params``; the gate
    reads ``gate_x`` (n, q) when given (``params.gates`` then has q columns), else x.
    ``num_draws``: that many independent replicates at once, (num_draws, n) (one call, one
    compiled program, where a loop over keys would dispatch each draw).

    Raises
    ------
    TypeError, ValueError
        For a bad key, ``params`` that are not well-formed `MoEParams` with noise > 0, ``x``
        that is not a finite (n, d) array with d = ``params.dim``, or ``num_draws`` not a
        positive integer.
    """
    key = check_key(key)
    x = check_design(x)
    gate_x = check_gate_x(gate_x, x.shape[0])
    params = check_params(
        params, "params", require_noise=True, gate_dim=None if gate_x is None else gate_x.shape[1]
    )
    if x.shape[1] != params.dim:
        raise ValueError(f"x: expected {params.dim} columns like params.experts, got {x.shape[1]}")
    shape = () if num_draws is None else (check_positive_int(num_draws, "num_draws"),)
    return _draw(params, x, gate_x, key, shape)


@partial(jax.jit, static_argnames="shape")
def _draw(params: MoEParams, x, gate_x, key, shape: tuple[int, ...]) -> jax.Array:
    """`sample_response`'s draws as one compiled program (the mixture's sampling, op by op,
    would compile a dozen small ones)."""
    return MixtureOfExperts.from_params(params, x, gate_x=gate_x).sample(key, shape)


def simulate(
    *,
    key: jax.Array,
    num_samples: int,
    dim: int,
    num_experts: int,
    link: str | Link = "linear",
    noise=0.1,
    gating: str = "orthogonal",
    gate_scale: float = 2.0,
    orthonormal_experts: bool = False,
) -> SimulatedData:
    """Simulate a mixture-of-experts regression data set with known truth.

    Parameters
    ----------
    key
        JAX PRNG key.
    num_samples, dim, num_experts
        n, d and k. ``num_experts <= dim`` (``<`` for orthogonal gating with k > 1).
    link
        Expert link: a registered name or a callable (see `resolve_link`); recorded in ``truth``.
    noise
        Noise standard deviation > 0, shared, or a (k,) array of one per expert.
    gating
        ``"orthogonal"`` (the papers' setting: every gate row orthogonal to every expert) or
        ``"correlated"`` (no such constraint; the moment method is then biased).
    gate_scale
        Norm of each non-zero gate row; larger is a sharper gate.
    orthonormal_experts
        Draw orthonormal rather than merely unit-norm experts.

    Returns
    -------
    SimulatedData
        ``x`` (n, d), ``y`` (n,), ``truth`` (`MoEParams`). For a held-out set from the same
        truth: ``sample_data(truth, key=other_key, num_samples=m)``.
    """
    key = check_key(key)
    params_key, data_key = jax.random.split(key)
    truth = true_params(
        key=params_key,
        dim=dim,
        num_experts=num_experts,
        link=link,
        noise=noise,
        gating=gating,
        gate_scale=gate_scale,
        orthonormal_experts=orthonormal_experts,
    )
    x, y = sample_data(truth, key=data_key, num_samples=num_samples)
    return SimulatedData(x=x, y=y, truth=truth)
