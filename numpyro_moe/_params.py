"""Parameters of a softmax-gated mixture of experts, and the densities they define.

Model (DESIGN section 1), for one input x in R^d::

    P(z = i | x) = softmax(W x + b)_i          W = gates (k, d), last row zero; b = gate_intercepts
    y | z = i, x ~ Normal(g(a_i . x + c_i), noise^2)    a_i = experts[i]; c = expert_intercepts
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from numpyro_moe._links import Link, resolve_link

__all__ = [
    "MoEParams",
    "expert_means",
    "gate_logits",
    "gate_probabilities",
    "joint_log_probs",
    "normalize_gates",
    "pointwise_log_likelihood",
    "predictive_mean",
    "responsibilities",
]


class MoEParams(NamedTuple):
    """Parameters of a k-expert, d-dimensional mixture of experts (a JAX PyTree).

    Attributes
    ----------
    experts
        (k, d) expert weight vectors a_i.
    gates
        (k, d) gating weights W. The model is identified with the last row zero; use
        `normalize_gates` to bring any W to that form (softmax is shift-invariant).
    noise
        () standard deviation of the Gaussian noise on y.
    expert_intercepts
        (k,) offsets c_i inside the link, or None for none.
    gate_intercepts
        (k,) gate offsets b_i (last entry zero), or None for none.
    """

    experts: jax.Array
    gates: jax.Array
    noise: jax.Array
    expert_intercepts: jax.Array | None = None
    gate_intercepts: jax.Array | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.shape[0]

    @property
    def dim(self) -> int:
        return self.experts.shape[1]

    def permute(self, permutation) -> MoEParams:
        """Relabel the experts: expert ``i`` of the result is expert ``permutation[i]`` of self.

        The gates are re-normalised so the last row stays zero.

        Raises
        ------
        ValueError
            If ``permutation`` (when concrete) is not a permutation of ``0 .. k-1``.
        """
        if not isinstance(permutation, jax.core.Tracer):
            given = np.asarray(permutation)
            if (
                given.shape != (self.num_experts,)
                or not np.issubdtype(given.dtype, np.integer)
                or not np.array_equal(np.sort(given), np.arange(self.num_experts))
            ):
                raise ValueError(
                    f"permutation: expected a permutation of 0..{self.num_experts - 1} (each index "
                    f"once), got {given.tolist()}"
                )
        permutation = jnp.asarray(permutation)
        take = lambda value: None if value is None else value[permutation]  # noqa: E731
        permuted = self._replace(
            experts=self.experts[permutation],
            gates=self.gates[permutation],
            expert_intercepts=take(self.expert_intercepts),
            gate_intercepts=take(self.gate_intercepts),
        )
        return normalize_gates(permuted)


def normalize_gates(params: MoEParams) -> MoEParams:
    """Subtract the last gate row (and intercept) from all rows: same model, last row zero."""
    gates = params.gates - params.gates[-1]
    gate_intercepts = params.gate_intercepts
    if gate_intercepts is not None:
        gate_intercepts = gate_intercepts - gate_intercepts[-1]
    return params._replace(gates=gates, gate_intercepts=gate_intercepts)


def gate_logits(params: MoEParams, x: jax.Array) -> jax.Array:
    """(n, k) gate logits ``x W^T + b`` for inputs x of shape (n, d)."""
    logits = x @ params.gates.T
    if params.gate_intercepts is not None:
        logits = logits + params.gate_intercepts
    return logits


def gate_probabilities(params: MoEParams, x: jax.Array) -> jax.Array:
    """(n, k) probabilities P(z = i | x) for inputs x of shape (n, d)."""
    return jax.nn.softmax(gate_logits(params, x), axis=-1)


def expert_means(params: MoEParams, x: jax.Array, link: str | Link = "linear") -> jax.Array:
    """(n, k) expert means ``g(x a_i + c_i)`` for inputs x of shape (n, d)."""
    link = resolve_link(link)
    pre_activation = x @ params.experts.T
    if params.expert_intercepts is not None:
        pre_activation = pre_activation + params.expert_intercepts
    means = link.function(pre_activation)
    if jnp.shape(means) != pre_activation.shape:  # static: costs nothing under jit
        raise ValueError(
            f"link: {link.name!r} must map arrays elementwise to arrays of the same shape; it "
            f"mapped shape {pre_activation.shape} to shape {jnp.shape(means)}"
        )
    return means


def joint_log_probs(params: MoEParams, x: jax.Array, y: jax.Array, link: str | Link = "linear") -> jax.Array:
    """(n, k) log [P(z = i | x_n) Normal(y_n; g(a_i . x_n + c_i), noise^2)]."""
    means = expert_means(params, x, link)
    log_gate = jax.nn.log_softmax(gate_logits(params, x), axis=-1)
    residual = (y[:, None] - means) / params.noise
    return log_gate - 0.5 * residual**2 - jnp.log(params.noise) - 0.5 * jnp.log(2 * jnp.pi)


def pointwise_log_likelihood(
    params: MoEParams, x: jax.Array, y: jax.Array, link: str | Link = "linear"
) -> jax.Array:
    """(n,) log p(y_n | x_n), the expert marginalised by logsumexp."""
    return logsumexp(joint_log_probs(params, x, y, link), axis=-1)


def responsibilities(params: MoEParams, x: jax.Array, y: jax.Array, link: str | Link = "linear") -> jax.Array:
    """(n, k) posterior expert probabilities P(z = i | x_n, y_n) (the E-step of EM)."""
    return jax.nn.softmax(joint_log_probs(params, x, y, link), axis=-1)


def predictive_mean(params: MoEParams, x: jax.Array, link: str | Link = "linear") -> jax.Array:
    """(n,) E[y | x] = sum_i P(z = i | x) g(a_i . x + c_i)."""
    return jnp.sum(gate_probabilities(params, x) * expert_means(params, x, link), axis=-1)
