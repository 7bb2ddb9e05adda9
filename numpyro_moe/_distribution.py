"""The mixture-of-experts likelihood as a NumPyro distribution (DESIGN section 1).

``y_n ~ sum_i softmax(logits_n)_i Normal(loc_ni, scale_i)``, or with robust experts
``sum_i softmax(logits_n)_i StudentT(df_i, loc_ni, scale_i)``: a ``MixtureSameFamily`` whose mixing
weights are the gate's and whose components are the experts' densities, so it goes wherever a
NumPyro distribution goes (``numpyro.sample``, ``log_density``, ``Predictive``, ``jit``, ``vmap``,
``grad``) and adds what a mixture of experts needs: the posterior expert probabilities of observed
responses (the E-step of EM) and a constructor from a parameter record.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax import lax
from numpyro.distributions import constraints

from numpyro_moe._params import MoEParams

__all__ = ["MixtureOfExperts"]


class MixtureOfExperts(dist.MixtureSameFamily):
    """Softmax-gated mixture of Gaussian (or Student-t) experts, one observation per batch element.

    Parameters
    ----------
    gate_logits
        (..., k) gate logits (softmax gives P(z = i | x)); shift-invariant over the last axis.
    expert_locs
        (..., k) expert means ``g(a_i . x + c_i)``.
    expert_scales
        (k,) or (..., k) expert noise standard deviations, > 0 (a scalar is a shared noise); the
        scales s_i of Student-t experts.
    expert_df
        (k,) or (..., k) degrees of freedom nu_i > 0 of Student-t experts,
        ``y | z = i ~ StudentT(nu_i, loc_i, s_i)`` (robust to outliers: Peel and McLachlan 2000,
        "Robust mixture modelling using the t distribution"); None (the default) for Gaussian
        experts.
    validate_args
        Check the arguments' constraints (NumPyro's ``validate_args``).

    Notes
    -----
    The batch shape is the broadcast of the arguments without their last axis; the event shape
    is (). ``mean`` and ``variance`` are the mixture's; ``log_prob`` is the marginal log-density
    with the expert summed out by logsumexp. With Student-t experts an expert's mean exists only
    where nu_i > 1 and its variance s_i^2 nu_i / (nu_i - 2) only where nu_i > 2: the mixture's
    ``mean`` is inf (undefined) where some nu_i <= 1, and its ``variance`` is inf where some
    1 < nu_i <= 2 and NaN where some nu_i <= 1 (NumPyro's ``StudentT`` conventions).

    Examples
    --------
    Inside a model, with the package's priors::

        params = moe_priors(num_experts=3, dim=x.shape[1])
        with numpyro.plate("obs", x.shape[0]):
            numpyro.sample("y", MixtureOfExperts.from_params(params, x), obs=y)
    """

    arg_constraints = {
        "gate_logits": constraints.real_vector,
        "expert_locs": constraints.real_vector,
        "expert_scales": constraints.positive,
        "expert_df": constraints.positive,
    }
    pytree_data_fields = ("gate_logits", "expert_locs", "expert_scales", "expert_df")

    def __init__(self, gate_logits, expert_locs, expert_scales, *, expert_df=None, validate_args=None):
        shapes = {
            "gate_logits": jnp.shape(gate_logits),
            "expert_locs": jnp.shape(expert_locs),
            "expert_scales": jnp.shape(expert_scales),
        }
        if expert_df is not None:
            shapes["expert_df"] = jnp.shape(expert_df)
        for name in ("gate_logits", "expert_locs"):
            if len(shapes[name]) == 0:
                raise ValueError(
                    f"{name}: expected an array whose last axis indexes the k experts, got a scalar"
                )
        num_experts = shapes["gate_logits"][-1]
        for name, shape in shapes.items():
            if shape and shape[-1] not in (1, num_experts):
                raise ValueError(
                    f"{name}: expected a last axis of {num_experts} experts like gate_logits, got shape {shape}"
                )
        try:
            lax.broadcast_shapes(*shapes.values())
        except ValueError:
            raise ValueError(
                f"{', '.join(shapes)}: shapes {list(shapes.values())} do not broadcast"
            ) from None
        self.gate_logits = gate_logits
        self.expert_locs = expert_locs
        self.expert_scales = expert_scales
        self.expert_df = expert_df
        locs = jnp.broadcast_to(expert_locs, lax.broadcast_shapes(shapes["expert_locs"], (num_experts,)))
        # Component arguments are checked once below, as this distribution's own arguments.
        if expert_df is None:
            components = dist.Normal(locs, expert_scales, validate_args=False)
        else:
            # StudentT builds a Chi2 that validates under the global setting whatever it is told.
            with numpyro.validation_enabled(False):
                components = dist.StudentT(expert_df, locs, expert_scales, validate_args=False)
        mixing = dist.Categorical(logits=gate_logits, validate_args=False)
        super().__init__(mixing, components, validate_args=validate_args)

    @classmethod
    def from_params(cls, params: MoEParams, x, *, gate_x=None, validate_args=None) -> MixtureOfExperts:
        """The likelihood of responses at inputs x (n, d) under a parameter record (batch shape (n,));
        the gate reads ``gate_x`` (n, q) when given (covariates of its own), else x; Student-t
        experts when the record carries degrees of freedom (``params.df``)."""
        return cls(
            params.gate_logits(x if gate_x is None else gate_x),
            params.expert_means(x),
            params.noise,
            expert_df=params.df,
            validate_args=validate_args,
        )

    def get_args(self) -> dict:
        args = super().get_args()
        if args.get("expert_df", 0) is None:  # Gaussian experts: no degrees of freedom to check
            del args["expert_df"]
        return args

    @property
    def gate_probabilities(self) -> jax.Array:
        """(..., k) gate probabilities P(z = i | x), over the batch shape."""
        return jnp.broadcast_to(self.mixing_distribution.probs, self.batch_shape + (self.mixture_size,))

    def expert_probabilities(self, value) -> jax.Array:
        """(..., k) posterior probabilities P(z = i | x, y = value) (EM's responsibilities)."""
        return jax.nn.softmax(self.component_log_probs(value), axis=-1)
