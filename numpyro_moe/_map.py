"""MAP estimation of the model by NumPyro SVI with an AutoDelta guide (DESIGN section 4)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO, init_to_median, init_to_value
from numpyro.infer.autoguide import AutoDelta

from numpyro_moe._links import Link, resolve_link
from numpyro_moe._model import moe_regression, params_to_sites, sites_to_params
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import (
    check_design,
    check_key,
    check_num_experts,
    check_params,
    check_positive,
    check_positive_int,
    check_response,
)

__all__ = ["MapResult", "fit_map"]

PRIOR_SCALES = ("expert_prior_scale", "gate_prior_scale", "noise_prior_scale")


class MapResult(NamedTuple):
    """Result of `fit_map`.

    Attributes
    ----------
    params
        `MoEParams` at the MAP (fixed sites included at their fixed values).
    losses
        (num_steps,) negative log joint density along the optimisation.
    """

    params: MoEParams
    losses: jax.Array


def fit_map(
    x,
    y,
    *,
    num_experts: int,
    link: str | Link = "linear",
    key: jax.Array,
    init: MoEParams | None = None,
    fix: tuple[str, ...] = (),
    num_steps: int = 2000,
    learning_rate: float = 0.01,
    progress_bar: bool = False,
    **model_kwargs,
) -> MapResult:
    """Maximise the posterior density of `moe_regression` with SVI and AutoDelta (Adam).

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses.
    num_experts
        k.
    link
        Expert link.
    key
        JAX PRNG key (the guide's random start when ``init`` is None).
    init
        Start here (via ``init_to_value``); None starts at the prior median plus jitter.
    fix
        A tuple of site names held at their ``init`` values by ``handlers.condition``, e.g.
        ``("experts",)`` to learn only the gate and noise.
    num_steps, learning_rate
        Adam steps and step size.
    progress_bar
        Show NumPyro's progress bar.
    **model_kwargs
        Passed to `moe_regression` (priors, ``intercepts``); prior scales must be > 0.
    """
    x = check_design(x)
    y = check_response(y, x.shape[0])
    num_experts = check_num_experts(num_experts, x.shape[1], require_k_le_d=False)
    link = resolve_link(link)
    key = check_key(key)
    num_steps = check_positive_int(num_steps, "num_steps")
    learning_rate = check_positive(learning_rate, "learning_rate")
    if init is not None and not isinstance(init, MoEParams):
        raise TypeError(f"init: expected MoEParams or None, got {type(init).__name__}")
    if isinstance(fix, str):
        raise TypeError(f"fix: expected a tuple of site names, e.g. ('experts',), got the string {fix!r}")
    for name in PRIOR_SCALES:
        if name in model_kwargs:
            check_positive(model_kwargs[name], name)
    if fix and init is None:
        raise ValueError(f"fix: fixing sites {tuple(fix)} needs their values in init; got init=None")

    model = moe_regression
    init_strategy = init_to_median
    if init is not None:
        check_params(init, "init", require_noise=True)
        if init.dim != x.shape[1] or init.num_experts != num_experts:
            raise ValueError(
                f"init: expected {num_experts} experts of dim {x.shape[1]}, got "
                f"{init.num_experts} of dim {init.dim}"
            )
        sites = params_to_sites(init)
        unknown = set(fix) - set(sites)
        if unknown:
            raise ValueError(f"fix: unknown sites {sorted(unknown)}; expected some of {sorted(sites)}")
        model = handlers.condition(moe_regression, {name: sites[name] for name in fix})
        init_strategy = init_to_value(values={k: v for k, v in sites.items() if k not in fix})

    guide = AutoDelta(model, init_loc_fn=init_strategy)
    svi = SVI(model, guide, optax.adam(learning_rate), Trace_ELBO())
    kwargs = dict(num_experts=num_experts, link=link, **model_kwargs)
    result = svi.run(key, num_steps, x, y, progress_bar=progress_bar, **kwargs)
    estimates = guide.median(result.params)
    if init is not None:
        estimates = {**params_to_sites(init), **estimates}
    return MapResult(params=sites_to_params(estimates), losses=result.losses)

