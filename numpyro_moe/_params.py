"""The parameter record of a softmax-gated mixture of experts.

Model (DESIGN section 1), for one input x in R^d::

    P(z = i | x) = softmax(W x + b)_i          W = gates (k, d), last row zero; b = gate_intercepts
    y | z = i, x ~ Normal(g(a_i . x + c_i), s_i^2)    a_i = experts[i]; c = expert_intercepts;
                                                       s = noise (k,); g = link

or, with degrees of freedom ``df`` (nu, (k,)), robust Student-t experts::

    y | z = i, x ~ StudentT(nu_i, g(a_i . x + c_i), s_i)   (s_i the scale, not the sd)

The gate may read its own covariates instead of x (``gate_x``, z in R^q: P(z = i | x, z) =
softmax(W z + b)_i with W of shape (k, q)), as flexmix's concomitant variables do; the record's
gates then have q columns and every method that evaluates the gate takes the gate's input.

The record carries its link, so a saved fit is self-describing and everything downstream (the
likelihood, prediction, metrics, EM) needs nothing from the caller but data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._links import Link, resolve_link

__all__ = ["MoEParams"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEParams:
    """Parameters of a k-expert, d-dimensional mixture of experts (a JAX PyTree, link static).

    Attributes
    ----------
    experts
        (k, d) expert weight vectors a_i.
    gates
        (k, q) gating weights W, q = d when the gate reads x (the default) or the number of gate
        covariates when it reads its own (``gate_x``). The model is identified with the last row
        zero; `normalized` brings any W to that form (softmax is shift-invariant).
    noise
        (k,) noise standard deviation of each expert (a shared noise is k equal entries; a
        scalar is accepted and broadcasts wherever it is used).
    expert_intercepts
        (k,) offsets c_i inside the link, or None for none.
    gate_intercepts
        (k,) gate offsets b_i (last entry zero), or None for none.
    link
        The expert link g (a name such as ``"tanh"``, or a callable, resolved to a `Link`);
        static under ``jit`` and ``vmap``: a leading batch axis on the arrays stacks records.
    df
        (k,) degrees of freedom nu_i of Student-t experts (then ``noise`` holds their scales), or
        None for Gaussian experts (the default). A leaf like the intercepts; keyword-only in
        practice (it follows ``link``).
    """

    experts: jax.Array
    gates: jax.Array
    noise: jax.Array
    expert_intercepts: jax.Array | None = None
    gate_intercepts: jax.Array | None = None
    link: Link = dataclasses.field(default="linear", metadata={"static": True})
    df: jax.Array | None = None

    def __post_init__(self):
        # Only the static link is touched: JAX rebuilds records with placeholder leaves.
        if not isinstance(self.link, Link):
            object.__setattr__(self, "link", resolve_link(self.link))

    @property
    def num_experts(self) -> int:
        return self.experts.shape[-2]

    @property
    def dim(self) -> int:
        return self.experts.shape[-1]

    @property
    def gate_dim(self) -> int:
        """q, the number of the gate's inputs (d unless the gate has covariates of its own)."""
        return self.gates.shape[-1]

    @property
    def has_intercepts(self) -> bool:
        return self.expert_intercepts is not None or self.gate_intercepts is not None

    def replace(self, **changes) -> MoEParams:
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    def normalized(self) -> MoEParams:
        """The same model with the last gate row (and gate intercept) zero."""
        gates = self.gates - self.gates[..., -1:, :]
        gate_intercepts = self.gate_intercepts
        if gate_intercepts is not None:
            gate_intercepts = gate_intercepts - gate_intercepts[..., -1:]
        return self.replace(gates=gates, gate_intercepts=gate_intercepts)

    def permute(self, permutation) -> MoEParams:
        """Relabel the experts: expert ``i`` of the result is expert ``permutation[i]`` of self.

        Experts, gates, noise, intercepts and degrees of freedom move together; the gates are re-normalised so the
        last row stays zero.

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
        noise = self.noise if jnp.ndim(self.noise) == 0 else self.noise[permutation]
        return self.replace(
            experts=self.experts[permutation],
            gates=self.gates[permutation],
            noise=noise,
            expert_intercepts=take(self.expert_intercepts),
            gate_intercepts=take(self.gate_intercepts),
            df=None if self.df is None or jnp.ndim(self.df) == 0 else self.df[permutation],
        ).normalized()

    def gate_logits(self, x) -> jax.Array:
        """(n, k) gate logits ``x W^T + b`` for the gate's inputs x of shape (n, q) (the gate
        covariates when the gate has its own; one expert: all zero, whatever x)."""
        if self.gates.shape[-2] == 1:  # static: one expert, probability 1
            return jnp.zeros((*jnp.shape(x)[:-1], 1), jnp.result_type(self.gates, x))
        logits = x @ self.gates.T
        if self.gate_intercepts is not None:
            logits = logits + self.gate_intercepts
        return logits

    def gate_probabilities(self, x) -> jax.Array:
        """(n, k) probabilities P(z = i | x) for the gate's inputs x of shape (n, q)."""
        return jax.nn.softmax(self.gate_logits(x), axis=-1)

    def expert_means(self, x) -> jax.Array:
        """(n, k) expert means ``g(x a_i + c_i)`` for inputs x of shape (n, d)."""
        pre_activation = x @ self.experts.T
        if self.expert_intercepts is not None:
            pre_activation = pre_activation + self.expert_intercepts
        means = self.link.function(pre_activation)
        if jnp.shape(means) != pre_activation.shape:  # static: costs nothing under jit
            raise ValueError(
                f"link: {self.link.name!r} must map arrays elementwise to arrays of the same shape; "
                f"it mapped shape {pre_activation.shape} to shape {jnp.shape(means)}"
            )
        return means

    def predictive_mean(self, x, gate_x=None) -> jax.Array:
        """(n,) E[y | x] = sum_i P(z = i | x) g(a_i . x + c_i); the gate reads ``gate_x`` (n, q)
        when given (its own covariates), else x.

        For Student-t experts this is the gate-weighted sum of their locations: E[y | x] where
        every nu_i > 1 (with nu_i <= 1 the expert has no mean and this is its centre).
        """
        gate_input = x if gate_x is None else gate_x
        return jnp.sum(self.gate_probabilities(gate_input) * self.expert_means(x), axis=-1)
