"""NumPyro model definitions of the softmax-gated mixture of experts (DESIGN sections 1 and 5).

Sample sites and their named dims (read by ``arviz.from_numpyro``):

=====================  ===========  =====================  =====================================
site                   shape        dims                   meaning
=====================  ===========  =====================  =====================================
``experts``            (k, d)       (expert, feature)      expert weights a_i
``gates``              (k - 1, d)   (gate, feature)        free gate rows; row k is fixed at 0
``noise``              ()                                  noise standard deviation
``expert_intercepts``  (k,)         (expert,)              only with ``intercepts=True``
``gate_intercepts``    (k - 1,)     (gate,)                only with ``intercepts=True``
``y``                  (n,)         (obs,)                 observed response
=====================  ===========  =====================  =====================================

Fix the experts with ``numpyro.handlers.condition(model, {"experts": A})``; start inference at
given values with ``init_to_value(values=params_to_sites(params))``. Nothing in the model
changes for either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.ops.indexing import Vindex

from numpyro_moe._links import Link, resolve_link
from numpyro_moe._params import MoEParams, expert_means, gate_logits, normalize_gates
from numpyro_moe._validation import check_design, check_num_experts, check_response

__all__ = [
    "moe_regression",
    "moe_regression_enumerated",
    "params_to_sites",
    "sites_to_params",
]


def _sample_params(
    dim: int,
    num_experts: int,
    intercepts: bool,
    expert_prior_scale: float,
    gate_prior_scale: float,
    noise_prior_scale: float,
) -> MoEParams:
    experts = numpyro.sample(
        "experts",
        dist.Normal(0.0, expert_prior_scale).expand([num_experts, dim]).to_event(2),
        infer={"event_dims": ["expert", "feature"]},
    )
    free = num_experts - 1
    if free > 0:
        free_gates = numpyro.sample(
            "gates",
            dist.Normal(0.0, gate_prior_scale).expand([free, dim]).to_event(2),
            infer={"event_dims": ["gate", "feature"]},
        )
    else:
        free_gates = jnp.zeros((0, dim))
    gates = jnp.concatenate([free_gates, jnp.zeros((1, dim), free_gates.dtype)], axis=0)
    noise = numpyro.sample("noise", dist.HalfNormal(noise_prior_scale))
    expert_intercepts = gate_intercepts = None
    if intercepts:
        expert_intercepts = numpyro.sample(
            "expert_intercepts",
            dist.Normal(0.0, expert_prior_scale).expand([num_experts]).to_event(1),
            infer={"event_dims": ["expert"]},
        )
        if free > 0:
            free_bias = numpyro.sample(
                "gate_intercepts",
                dist.Normal(0.0, gate_prior_scale).expand([free]).to_event(1),
                infer={"event_dims": ["gate"]},
            )
        else:
            free_bias = jnp.zeros((0,))
        gate_intercepts = jnp.concatenate([free_bias, jnp.zeros((1,), free_bias.dtype)])
    return MoEParams(experts, gates, noise, expert_intercepts, gate_intercepts)


def _check_model_inputs(x, y, num_experts):
    x = check_design(x)
    if y is not None:
        y = check_response(y, x.shape[0])
    num_experts = check_num_experts(num_experts, x.shape[1], require_k_le_d=False)
    return x, y, num_experts


def moe_regression(
    x,
    y=None,
    *,
    num_experts: int,
    link: str | Link = "linear",
    intercepts: bool = False,
    expert_prior_scale: float = 1.0,
    gate_prior_scale: float = 2.5,
    noise_prior_scale: float = 1.0,
):
    """Softmax-gated mixture-of-experts regression, the expert marginalised out.

    ``y_n ~ sum_i softmax(W x_n + b)_i Normal(g(a_i . x_n + c_i), noise^2)``, written as a
    ``MixtureSameFamily`` inside the ``obs`` plate, so ``log_likelihood`` is per point.

    Parameters
    ----------
    x
        (n, d) inputs (standardise real data first).
    y
        (n,) responses, or None to sample them (prior / posterior predictive).
    num_experts
        k >= 1.
    link
        Expert link name or callable (see `resolve_link`).
    intercepts
        Add the ``expert_intercepts`` and ``gate_intercepts`` sites.
    expert_prior_scale, gate_prior_scale, noise_prior_scale
        Normal(0, s) priors on experts and gates (and their intercepts), HalfNormal(s) on noise.
    """
    x, y, num_experts = _check_model_inputs(x, y, num_experts)
    link = resolve_link(link)
    params = _sample_params(
        x.shape[1], num_experts, intercepts, expert_prior_scale, gate_prior_scale,
        noise_prior_scale,
    )
    mixing = dist.Categorical(logits=gate_logits(params, x))
    components = dist.Normal(expert_means(params, x, link), params.noise)
    with numpyro.plate("obs", x.shape[0]):
        numpyro.sample("y", dist.MixtureSameFamily(mixing, components), obs=y)


def moe_regression_enumerated(
    x,
    y=None,
    *,
    num_experts: int,
    link: str | Link = "linear",
    intercepts: bool = False,
    expert_prior_scale: float = 1.0,
    gate_prior_scale: float = 2.5,
    noise_prior_scale: float = 1.0,
):
    """The same model with the expert of each point as a latent site ``expert_assignment``.

    The site is marked for parallel enumeration, so NUTS marginalises it exactly (needs
    ``funsor``); ``numpyro.contrib.funsor.infer_discrete`` then draws per-point assignments.
    Arguments as in `moe_regression`.
    """
    x, y, num_experts = _check_model_inputs(x, y, num_experts)
    link = resolve_link(link)
    params = _sample_params(
        x.shape[1], num_experts, intercepts, expert_prior_scale, gate_prior_scale,
        noise_prior_scale,
    )
    logits = gate_logits(params, x)
    means = expert_means(params, x, link)
    with numpyro.plate("obs", x.shape[0]):
        assignment = numpyro.sample(
            "expert_assignment",
            dist.Categorical(logits=logits),
            infer={"enumerate": "parallel"},
        )
        numpyro.sample("y", dist.Normal(Vindex(means)[..., assignment], params.noise), obs=y)


def params_to_sites(params: MoEParams) -> dict[str, jax.Array]:
    """Model site values for `MoEParams` (gates normalised so the fixed last row is zero).

    For ``init_to_value(values=...)`` and ``handlers.condition``; take a subset of the dict
    (e.g. ``{"experts": ...}``) to fix or start only some sites.
    """
    if not isinstance(params, MoEParams):
        raise TypeError(f"params: expected MoEParams, got {type(params).__name__}")
    params = normalize_gates(params)
    sites = {"experts": params.experts, "noise": jnp.asarray(params.noise)}
    if params.num_experts > 1:
        sites["gates"] = params.gates[:-1]
    if params.expert_intercepts is not None:
        sites["expert_intercepts"] = params.expert_intercepts
    if params.gate_intercepts is not None and params.num_experts > 1:
        sites["gate_intercepts"] = params.gate_intercepts[:-1]
    return sites


def sites_to_params(sites: dict) -> MoEParams:
    """`MoEParams` from one draw of the model's sites (the inverse of `params_to_sites`)."""
    experts = jnp.asarray(sites["experts"])
    dim = experts.shape[-1]
    free_gates = jnp.asarray(sites.get("gates", jnp.zeros((0, dim))))
    gates = jnp.concatenate([free_gates, jnp.zeros((1, dim), free_gates.dtype)], axis=0)
    expert_intercepts = sites.get("expert_intercepts")
    gate_intercepts = None
    if "expert_intercepts" in sites:
        free_bias = jnp.asarray(sites.get("gate_intercepts", jnp.zeros((0,))))
        gate_intercepts = jnp.concatenate([free_bias, jnp.zeros((1,), free_bias.dtype)])
    return MoEParams(experts, gates, jnp.asarray(sites["noise"]), expert_intercepts, gate_intercepts)
