"""The Bayesian layer (DESIGN section 5) in NumPyro's shape: pieces for the user's own
``MCMC(NUTS(model, ...))`` and a thin convenience over them.

From the default init, NUTS chains of a mixture of experts land in different label permutations
(label switching), which wrecks r_hat and ESS. Starting every chain near an estimate
(`chain_init_params`: per-chain points in unconstrained space with a small jitter), with a metric
from the fit (`laplace_inverse_mass_matrix`), and aligning each draw's labels to the estimate's
(`relabel`) removes that. `to_datatree` converts with ``arviz.from_numpyro``, whose named dims come
from the sites' ``event_dims``; every piece finds the mixture-of-experts sites by their names under
the model's ``handlers.scope`` prefix, so they work inside any model that uses `moe_priors`.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, Predictive, init_to_value
from numpyro.infer.util import constrain_fn, potential_energy, unconstrain_fn
from numpyro.primitives import CondIndepStackFrame, Messenger
from scipy.optimize import linear_sum_assignment

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._fit import Fit, check_data, finish_em, fit_moe, starting_df
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._model import (
    PARAMETER_SITES,
    as_params,
    check_family,
    check_fix,
    fixed_sites,
    init_to_params,
    is_record,
    moe_regression,
    predictive_params,
    site_name,
    sites_to_params,
)
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_gate_x,
    check_key,
    check_params,
    check_positive,
    check_positive_int,
    check_probability,
    check_response,
)

__all__ = [
    "ComparisonResult",
    "NutsResult",
    "Prediction",
    "chain_init_params",
    "compare_num_experts",
    "laplace_inverse_mass_matrix",
    "loo",
    "posterior_params",
    "predict",
    "relabel",
    "run_nuts",
    "to_datatree",
]

# xarray forbids "/" in variable names, so a DataTree names the sites of a scoped model with this
# divider instead of NumPyro's: ``a/experts`` in the model is ``a.experts`` in the tree.
TREE_DIVIDER = "."
RHAT_LIMIT = 1.01
PARETO_K_LIMIT = 0.7
MASS_MATRICES = ("laplace", "laplace-fixed", "dense", "diagonal")
# Fewer effective draws than this (the smallest bulk ESS over all entries, all chains together)
# in chains that disagree: the fixed Laplace metric does not suit the posterior (see `run_nuts`).
STUCK_ESS = 100
# More divergent transitions than this share of the draws: warmup runs again with the target
# acceptance rate raised to RETRY_ACCEPT_PROB (see `run_nuts`).
DIVERGENT_LIMIT = 0.01
RETRY_ACCEPT_PROB = 0.95
# What each transition records besides the draw; ``arviz.from_numpyro`` names them ``diverging``,
# ``lp`` (the log density NUTS samples, on the unconstrained space), ``n_steps``, ``tree_depth`` and
# ``reached_max_tree_depth``, and ``acceptance_rate``: Stan's sampler diagnostics.
SAMPLE_STATS = ("diverging", "potential_energy", "num_steps", "accept_prob")
# Rescaling range of the Laplace metric's eigen-directions (see `_desynchronised`).
METRIC_SPREAD = 2.0


def _start_values(model, init, *, prefix: str, values: dict | None, key, model_args, model_kwargs) -> dict:
    """Constrained values of every latent site of ``model`` at ``init``: the mixture-of-experts
    sites from a parameter record (or all sites from a dict), the user's sites from ``values``,
    any other site by NumPyro's ``init_to_uniform``; conditioned sites drop out."""
    if isinstance(init, dict) and init and all(is_record(value) for value in init.values()):
        strategy = init_to_params(params=init, values=values)
    elif isinstance(init, dict):
        given = {**init, **(values or {})}
        strategy = init_to_value(values={name: jnp.asarray(value) for name, value in given.items()})
    else:
        strategy = init_to_params(params=as_params(init, "init"), prefix=prefix, values=values)
    seeded = handlers.substitute(handlers.seed(model, key), substitute_fn=strategy)
    trace = handlers.trace(seeded).get_trace(*model_args, **model_kwargs)
    return {
        name: site["value"]
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def chain_init_params(
    model,
    init,
    *,
    num_chains: int,
    key: jax.Array,
    jitter: float = 0.01,
    prefix: str = "",
    values: dict | None = None,
    model_args=(),
    model_kwargs=None,
) -> dict:
    """Per-chain starting points for ``MCMC.run(init_params=...)``, in unconstrained space.

    Every chain starts at ``init`` plus independent Normal(0, ``jitter``) noise on each
    unconstrained coordinate, so all chains begin near one mode yet not at one point.

    Parameters
    ----------
    model
        Any NumPyro model that samples the sites of `moe_priors` (under ``prefix``).
    init
        `MoEParams`, an expert estimate or a fit result (for the sites under ``prefix``); a dict
        mapping scope prefixes to such records (several blocks, as in `init_to_params`); or a dict
        of values for the model's sites.
    values
        Starting values of the model's other latent sites, by name; sites in neither start by
        ``init_to_uniform``.
    num_chains, key, jitter
        Chains, PRNG key and the perturbation's standard deviation.
    prefix
        The ``handlers.scope`` prefix of the mixture-of-experts sites.
    model_args, model_kwargs
        The model's arguments, as given to ``MCMC.run``.

    Returns
    -------
    dict
        Unconstrained values with a leading chain axis (conditioned sites dropped).
    """
    key = check_key(key)
    num_chains = check_positive_int(num_chains, "num_chains")
    jitter = check_positive(jitter, "jitter")
    model_kwargs = model_kwargs or {}
    start_key, jitter_key = jax.random.split(key)
    start = _start_values(
        model,
        init,
        prefix=prefix,
        values=values,
        key=start_key,
        model_args=model_args,
        model_kwargs=model_kwargs,
    )
    unconstrained = unconstrain_fn(model, model_args, model_kwargs, start)
    leaves, tree = jax.tree_util.tree_flatten(unconstrained)
    keys = jax.random.split(jitter_key, len(leaves))
    noisy = [
        leaf[None]
        + jitter * jax.random.normal(leaf_key, (num_chains, *jnp.shape(leaf)), jnp.result_type(leaf))
        for leaf, leaf_key in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noisy)


def laplace_inverse_mass_matrix(
    model, init, *, prefix: str = "", values: dict | None = None, model_args=(), model_kwargs=None
):
    """Inverse Hessian of ``model``'s potential energy at ``init``, in unconstrained space.

    A (D, D) array over the model's latent sites flattened in sorted-name order (NumPyro's
    order for a dense mass matrix), for ``NUTS(inverse_mass_matrix=...)``; None when the
    Hessian is not positive definite (``init`` is not a mode). ``init`` and ``values`` as in
    `chain_init_params` (a record for the sites of `moe_priors` under ``prefix``, or a dict; the
    model's other sites at ``values``, which a mode needs).
    """
    model_kwargs = model_kwargs or {}
    start = _start_values(
        model,
        init,
        prefix=prefix,
        values=values,
        key=jax.random.key(0),
        model_args=model_args,
        model_kwargs=model_kwargs,
    )
    flat, unravel = ravel_pytree(unconstrain_fn(model, model_args, model_kwargs, start))
    # One XLA program (about 10x faster than op-by-op Hessians for a new model).
    hessian = jax.jit(
        jax.hessian(lambda point: potential_energy(model, model_args, model_kwargs, unravel(point)))
    )(flat)
    hessian = np.asarray((hessian + hessian.T) / 2, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    if not np.all(np.isfinite(eigenvalues)) or eigenvalues[0] <= 1e-10 * max(eigenvalues[-1], 1e-300):
        return None
    return jnp.asarray((eigenvectors / eigenvalues) @ eigenvectors.T, flat.dtype)


MODE_STEPS = 100  # Newton steps of `posterior_mode` at most (it stops once converged)


def posterior_mode(
    model, init, *, prefix: str = "", values: dict | None = None, model_args=(), model_kwargs=None,
    max_steps: int = MODE_STEPS, near_a_mode: bool = False,
) -> tuple[dict, jax.Array | None]:
    """The posterior mode of ``model`` nearest ``init``, by Newton's method on the potential energy
    (the negative log joint density) in unconstrained space.

    Each step solves with the Hessian's eigenvalues replaced by their absolute values (floored;
    a saddle or a flat direction is left downhill, Nocedal and Wright 2006, section 3.4) and
    halves the step until the potential decreases (Armijo's condition). It stops when the Newton
    decrement ``g' H^-1 g / 2`` (the predicted decrease left) is below 1e-9 at a positive definite
    Hessian. From a penalised EM fit it moves the start to the mode of the density in the
    coordinates NUTS samples (the log noise sd adds its Jacobian), where `run_nuts` takes the
    Laplace metric; from an EM fit stopped by its iteration cap it finishes the climb (though
    the mode it reaches may be another than the one EM was heading for).

    ``init``, ``prefix``, ``values``, ``model_args`` and ``model_kwargs`` as in
    `laplace_inverse_mass_matrix`. Returns the constrained values of the model's latent sites at
    the point reached (a dict for `chain_init_params`) and, when it converged, the inverse Hessian
    there (`laplace_inverse_mass_matrix`'s metric at the mode), else None. With ``near_a_mode``,
    a start whose Hessian is not positive definite is returned as it is, with None.
    """
    model_kwargs = model_kwargs or {}
    max_steps = check_positive_int(max_steps, "max_steps")
    start = _start_values(
        model, init, prefix=prefix, values=values, key=jax.random.key(0), model_args=model_args,
        model_kwargs=model_kwargs,
    )
    flat, unravel = ravel_pytree(unconstrain_fn(model, model_args, model_kwargs, start))

    def potential(point):
        return potential_energy(model, model_args, model_kwargs, unravel(point))

    value_and_grad = jax.jit(jax.value_and_grad(potential))
    hessian_of = jax.jit(jax.hessian(potential))
    value, grad = value_and_grad(flat)
    inverse = None
    for _ in range(max_steps):
        hessian = np.asarray(hessian_of(flat), dtype=np.float64)
        eigenvalues, eigenvectors = np.linalg.eigh((hessian + hessian.T) / 2)
        positive = eigenvalues[0] > 1e-10 * max(eigenvalues[-1], 1e-300)
        if not np.all(np.isfinite(eigenvalues)) or not np.isfinite(value) or (near_a_mode and not positive):
            break
        near_a_mode = False  # checked at the start only
        floor = 1e-8 * max(np.max(np.abs(eigenvalues)), 1e-300)
        gradient = np.asarray(grad, dtype=np.float64)
        step = -(eigenvectors @ ((eigenvectors.T @ gradient) / np.maximum(np.abs(eigenvalues), floor)))
        decrease = float(-gradient @ step)  # g' |H|^-1 g >= 0
        if positive and decrease / 2 < 1e-9:
            inverse = jnp.asarray((eigenvectors / eigenvalues) @ eigenvectors.T, flat.dtype)
            break
        length = 1.0
        while length > 1e-10:
            trial = flat + jnp.asarray(length * step, flat.dtype)
            trial_value, trial_grad = value_and_grad(trial)
            if np.isfinite(trial_value) and trial_value <= value - 1e-4 * length * decrease:
                break
            length /= 2
        else:
            break  # no decrease along the step: as close as Newton gets
        flat, value, grad = trial, trial_value, trial_grad
    return constrain_fn(model, model_args, model_kwargs, unravel(flat)), inverse


def _desynchronised(inverse_mass):
    """The Laplace covariance with each eigen-direction rescaled by a fixed factor in
    [1/METRIC_SPREAD, METRIC_SPREAD] (log-uniformly spread by the golden-ratio sequence).

    With the exact covariance as metric, a near-Gaussian posterior makes every direction
    oscillate with one period: NUTS trajectories stop at the antipode, draws are antithetic, and
    while the bulk ESS exceeds the number of draws, |x - median| mixes slowly, which the folded
    r_hat flags. Unequal periods break that resonance; the metric stays within a factor 2 of
    the covariance. Measured (benchmarks/nuts_workflow.py, part D, 20 seeds): with the exact
    covariance r_hat <= 1.01 on 15/20 seeds (median min bulk ESS 3876 of 2000 draws); with this
    metric on 19/20 (bulk ESS 2086, folded ESS 810).
    """
    values, vectors = np.linalg.eigh(np.asarray(inverse_mass, dtype=np.float64))
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    fractions = np.mod(golden * np.arange(1, values.size + 1), 1.0)
    factors = METRIC_SPREAD ** (2.0 * fractions - 1.0)
    return jnp.asarray((vectors * (values * factors)) @ vectors.T, jnp.result_type(inverse_mass))


def _tree_name(name: str) -> str:
    """A model site's (or scope prefix's) name in a DataTree."""
    return name.replace("/", TREE_DIVIDER)


def _under(name: str, prefix: str) -> bool:
    """Whether the tree variable ``name`` lies under the scope ``prefix`` (given as in the model)."""
    return not prefix or name.startswith(_tree_name(prefix) + TREE_DIVIDER)


def _expert_blocks(dataset, prefix: str) -> list[str]:
    """Tree variables of ``dataset`` holding a block's experts: named ``experts`` (under ``prefix``
    and any further scopes) with dims ending in (expert, feature)."""
    return [
        str(name)
        for name, value in dataset.data_vars.items()
        if str(name).split(TREE_DIVIDER)[-1] == "experts"
        and _under(str(name), prefix)
        and tuple(value.dims[-2:]) == ("expert", "feature")
    ]


def _permute_along(values: np.ndarray, axis: int, permutations: np.ndarray, *, gate: bool) -> np.ndarray:
    """Apply per-draw permutations (chain, draw, k) along ``axis`` of (chain, draw, ...) values.

    A ``gate`` axis holds k - 1 free rows of k, the last fixed at zero: the zero row is appended,
    the rows permuted, and all shifted so the last is zero again.
    """
    values = np.moveaxis(values, axis, -1)
    if gate:
        values = np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    index = permutations.reshape(permutations.shape[:2] + (1,) * (values.ndim - 3) + permutations.shape[2:])
    values = np.take_along_axis(values, np.broadcast_to(index, values.shape[:-1] + index.shape[-1:]), axis=-1)
    if gate:
        values = (values - values[..., -1:])[..., :-1]
    return np.moveaxis(values, -1, axis)


def _line_and_noise_cost(posterior, block: str, params: MoEParams) -> np.ndarray | float:
    """The (chain, draw, k, k) cost of the block's intercepts and log noise sds against the
    reference's (0 where either side lacks them): experts with equal slopes, told apart by their
    level or their noise, keep their labels."""
    scope = block[: -len("experts")]
    k = params.num_experts
    cost = 0.0
    pairs = (
        ("expert_intercepts", params.expert_intercepts, lambda value: value),
        ("noise", params.noise, np.log),
    )
    for name, reference, transform in pairs:
        values = posterior.data_vars.get(scope + name)
        if reference is None or values is None or values.dims[2:] != ("expert",):
            continue
        reference = np.broadcast_to(np.asarray(reference, dtype=float), (k,))
        if values.shape[-1] != k or not np.all(np.isfinite(transform(reference))):
            continue
        values = transform(values.transpose("chain", "draw", "expert").values)
        cost = cost + (transform(reference)[None, None, :, None] - values[:, :, None, :]) ** 2
    return cost


def relabel(datatree, reference, *, prefix: str = ""):
    """Align each draw's expert labels with ``reference``: a new DataTree and the permutations.

    The blocks of experts are the posterior variables named ``experts`` under ``prefix`` (found
    by name and their (expert, feature) dims; several blocks, e.g. two groups under their own
    scopes, are aligned jointly, as labels tied by a shared prior must be). For each draw the
    permutation minimising the summed squared distance to the reference (a linear assignment) is
    applied to every posterior variable under ``prefix`` with an ``expert`` dim (experts, noise,
    intercepts, and the user's own such sites) or a ``gate`` dim (the free gate rows, re-shifted
    so the last row stays zero). The distance is ||experts[perm] - reference||_F^2 plus, when the
    reference is a parameter record and the block's scope holds them, the squared differences of
    the expert intercepts and of the log noise sds: experts of near-equal slopes differ in level
    or noise (on the High School and Beyond set of benchmarks/real_data.py, k = 4, the slopes are
    all within 0.1 sd of zero while the intercepts span -1.0 to 1.4 and the noise sds 0.17 to
    0.56), and slopes alone then switch labels from draw to draw.

    Parameters
    ----------
    datatree
        An ArviZ DataTree with a posterior group (e.g. from `to_datatree`).
    reference
        `MoEParams`, an expert estimate, a fit result or a (k, d) array (slopes only: the
        distance is then the experts' alone); or a dict mapping block names (as in the tree, e.g.
        ``"g1.experts"``) to such references.
    prefix
        Restrict to the variables under this ``handlers.scope`` prefix (as in the model, e.g.
        ``"a"`` or ``"a/g1"``; the tree spells ``a/g1/experts`` as ``a.g1.experts``).

    Returns
    -------
    (DataTree, numpy.ndarray)
        The relabelled tree (posterior replaced; the permutations also in ``sample_stats`` as
        ``expert_permutation``) and the (chain, draw, k) permutations. With no experts in the
        posterior (fixed experts) the tree comes back unchanged, with None for the permutations.
    """
    posterior = datatree["posterior"].to_dataset()
    blocks = _expert_blocks(posterior, prefix)
    if not blocks:
        return datatree, None
    references = reference if isinstance(reference, dict) else dict.fromkeys(blocks, reference)
    missing = sorted(set(blocks) - set(references))
    if missing:
        raise ValueError(f"reference: no reference for the expert blocks {missing}")
    cost = 0.0
    for block in blocks:
        target = references[block]
        params = None if isinstance(target, np.ndarray | jax.Array) else as_params(target, "reference")
        target = np.asarray(target if params is None else params.experts)
        draws = posterior[block].transpose("chain", "draw", "expert", "feature").values
        if target.shape != draws.shape[2:]:
            raise ValueError(
                f"reference: expected experts of shape {draws.shape[2:]} like {block!r}, got {target.shape}"
            )
        cost = cost + ((target[None, None, :, None, :] - draws[:, :, None, :, :]) ** 2).sum(-1)
        if params is not None:
            cost = cost + _line_and_noise_cost(posterior, block, params)
    chains, draws_count, k, _ = cost.shape
    permutations = np.empty((chains, draws_count, k), dtype=np.int64)
    for chain in range(chains):
        for draw in range(draws_count):
            rows, cols = linear_sum_assignment(cost[chain, draw])
            permutations[chain, draw] = cols[np.argsort(rows)]
    relabelled = posterior.copy()
    for name, value in posterior.data_vars.items():
        if not _under(str(name), prefix) or not {"expert", "gate"} & set(value.dims):
            continue
        value = value.transpose("chain", "draw", ...)
        array = value.values
        for dim in ("expert", "gate"):
            if dim in value.dims:
                array = _permute_along(array, value.dims.index(dim), permutations, gate=dim == "gate")
        relabelled[name] = value.copy(data=array)
    tree = datatree.copy()
    tree["posterior"] = relabelled
    import xarray as xr  # with ArviZ, only when a tree is at hand: importing the package stays light

    stats = tree["sample_stats"].to_dataset() if "sample_stats" in tree.children else None
    name = _tree_name(site_name(prefix, "expert_permutation"))
    record = xr.DataArray(permutations, dims=("chain", "draw", "expert"))
    tree["sample_stats"] = stats.assign({name: record}) if stats is not None else xr.Dataset({name: record})
    return tree, permutations


def _link_attribute(prefix: str) -> str:
    return _tree_name(site_name(prefix, "moe_link"))


def _df_attribute(prefix: str) -> str:
    """The attribute holding fixed Student-t degrees of freedom (a model without a ``df`` site)."""
    return _tree_name(site_name(prefix, "moe_df"))


def _block_prefix(block: str) -> str:
    """The model's scope prefix of an expert block's tree variable (``a.g1.experts`` -> ``a/g1``)."""
    return block.rpartition(TREE_DIVIDER)[0].replace(TREE_DIVIDER, "/")


class _tree_names(Messenger):
    """Renames a model's sites and plates as a DataTree can hold them (see `TREE_DIVIDER`)."""

    def process_message(self, msg):
        if msg.get("name"):
            msg["name"] = _tree_name(msg["name"])
        if msg.get("cond_indep_stack"):
            msg["cond_indep_stack"] = [
                CondIndepStackFrame(_tree_name(frame.name), frame.dim, frame.size)
                for frame in msg["cond_indep_stack"]
            ]


def _converter_input(mcmc):
    """``mcmc`` for ``arviz.from_numpyro``, its site names in the tree's spelling."""
    from arviz_base.io_numpyro import MCMCAdapter

    class _Renamed(MCMCAdapter):
        def __init__(self, mcmc):
            super().__init__(mcmc)
            self.model = _tree_names(self.model)

        def get_samples(self, seed=None, **kwargs):
            return {_tree_name(name): value for name, value in super().get_samples(seed, **kwargs).items()}

    return _Renamed(mcmc)


def to_datatree(
    mcmc,
    *,
    reference=None,
    prefix: str = "",
    relabel_draws: bool = True,
    log_likelihood: bool = True,
    **from_numpyro_kwargs,
):
    """``arviz.from_numpyro`` for a model with mixture-of-experts sites, relabelled.

    Named dims come from the sites' ``event_dims`` and the model's plates (no table). Sites and
    plates under ``handlers.scope`` are named with ``.`` for NumPyro's ``/`` (``a/experts`` is
    ``a.experts``: xarray forbids ``/`` in names). Sites of
    `moe_priors` that the model conditions on (fixed experts, say) are moved from the observed
    data and log-likelihood groups, where ``from_numpyro`` puts every observed site, to
    ``constant_data``. With a ``reference`` (`MoEParams`, an expert estimate or a fit result;
    or a dict of them by block, as in `relabel`), the link of every block of experts under
    ``prefix`` is recorded in the tree's attributes (for `posterior_params` and `predict`), as
    are the reference's Student-t degrees of freedom where the model fixes them (no ``df``
    site), and, with ``relabel_draws``, the draws are aligned with its labels (`relabel`).

    Parameters
    ----------
    mcmc
        A run ``numpyro.infer.MCMC``.
    reference, prefix, relabel_draws
        See above and `relabel`.
    log_likelihood, **from_numpyro_kwargs
        Passed to ``arviz.from_numpyro`` (e.g. ``posterior_predictive``, ``coords``).
    """
    import arviz as az

    tree = az.from_numpyro(_converter_input(mcmc), log_likelihood=log_likelihood, **from_numpyro_kwargs)
    constant = None
    if "observed_data" in tree.children:
        observed = tree["observed_data"].to_dataset()
        fixed = [name for name in observed.data_vars if _is_parameter(str(name), prefix)]
        if fixed:
            constant = tree["constant_data"].to_dataset() if "constant_data" in tree.children else None
            constant = observed[fixed] if constant is None else constant.merge(observed[fixed])
            tree["constant_data"] = constant
            tree["observed_data"] = observed.drop_vars(fixed)
            if "log_likelihood" in tree.children:
                pointwise = tree["log_likelihood"].to_dataset()
                tree["log_likelihood"] = pointwise.drop_vars([name for name in fixed if name in pointwise])
    if reference is not None:
        blocks = _expert_blocks(tree["posterior"].to_dataset(), prefix)
        if constant is not None:
            blocks += _expert_blocks(constant, prefix)
        references = reference if isinstance(reference, dict) else dict.fromkeys(blocks, reference)
        posterior = tree["posterior"].to_dataset()
        for block in blocks:
            if block in references:
                record = as_params(references[block], "reference")
                tree.attrs[_link_attribute(_block_prefix(block))] = record.link.name
                df_name = _tree_name(site_name(_block_prefix(block), "df"))
                fixed_df = df_name not in posterior and (constant is None or df_name not in constant)
                if record.df is not None and fixed_df:
                    degrees = np.broadcast_to(np.asarray(record.df, dtype=float), (record.num_experts,))
                    tree.attrs[_df_attribute(_block_prefix(block))] = [float(value) for value in degrees]
        if relabel_draws:
            tree, _ = relabel(tree, reference, prefix=prefix)
    return tree


def _is_parameter(name: str, prefix: str) -> bool:
    return _under(name, prefix) and name.split(TREE_DIVIDER)[-1] in PARAMETER_SITES


def posterior_params(datatree, *, prefix: str = "", link: str | Link | None = None) -> MoEParams:
    """`MoEParams` stacked over all (chain, draw) pairs of a DataTree's mixture-of-experts sites.

    Fixed sites are read from ``constant_data``. ``link`` defaults to the one `to_datatree`
    recorded; ``prefix`` is the sites' ``handlers.scope`` prefix (as in the model). Student-t
    degrees of freedom come from the ``df`` site, or where the model fixed them from the value
    `to_datatree` recorded; with neither the experts are Gaussian.
    """
    if not hasattr(datatree, "children") or "posterior" not in datatree.children:
        raise TypeError(
            f"datatree: expected an ArviZ DataTree with a posterior group, got {type(datatree).__name__}"
        )
    posterior = datatree["posterior"].to_dataset()
    constant = datatree["constant_data"].to_dataset() if "constant_data" in datatree.children else {}
    shape = (posterior.sizes["chain"] * posterior.sizes["draw"],)
    sites = {}
    for name in PARAMETER_SITES:
        full = _tree_name(site_name(prefix, name))
        if full in posterior:
            value = posterior[full].transpose("chain", "draw", ...).values
            sites[name] = value.reshape(shape + value.shape[2:])
        elif full in constant:
            value = np.asarray(constant[full])
            sites[name] = np.broadcast_to(value, shape + value.shape)
    if "experts" not in sites:
        found = _expert_blocks(posterior, "") + (_expert_blocks(constant, "") if len(constant) else [])
        raise ValueError(
            f"prefix: no {_tree_name(site_name(prefix, 'experts'))!r} in the DataTree's posterior or constant "
            f"data; expert blocks found: {found}"
        )
    if link is None:
        if _link_attribute(prefix) not in datatree.attrs:
            raise ValueError(
                f"link: the DataTree does not record the experts' link under prefix {prefix!r} (it was not "
                "made by to_datatree with a reference); pass link="
            )
        link = datatree.attrs[_link_attribute(prefix)]
    fixed_df = datatree.attrs.get(_df_attribute(prefix)) if "df" not in sites else None
    return sites_to_params(
        {name: jnp.asarray(value) for name, value in sites.items()},
        link=resolve_link(link),
        df=None if fixed_df is None else np.asarray(fixed_df, dtype=float),
    )


class Prediction(NamedTuple):
    """Predictions at new inputs (n_new points).

    ``mean`` (n,) E[y | x] (its posterior mean for a posterior); ``lower``/``upper`` (n,) the central
    interval of predictive draws of y; ``gate_probabilities`` (n, k) P(z | x) (posterior mean);
    ``log_density`` (n,) the predictive log density of the observed y when given (for a posterior,
    the log of the density averaged over draws), else None.
    """

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gate_probabilities: np.ndarray
    log_density: np.ndarray | None = None


def predict(
    source,
    x_new,
    *,
    key: jax.Array,
    y=None,
    gate_x=None,
    interval: float = 0.9,
    num_draws: int = 1000,
    prefix: str = "",
) -> Prediction:
    """Predictive mean and interval of y, and gate probabilities, at new inputs.

    Parameters
    ----------
    source
        A point fit (`MoEParams`, a fit result): its predictive distribution, the
        `MixtureOfExperts` at x_new (for an EM fit, with each expert's unbiased noise sd,
        `Fit.predictive_noise`; `MoEParams` are used as they are); or a DataTree of posterior draws (from `to_datatree` or
        `run_nuts`): the posterior predictive, averaged over the draws.
    x_new
        (n_new, d) inputs, in the units the model was fitted in.
    key
        PRNG key for the predictive draws of y.
    y
        (n_new,) observed responses at x_new, to score: their predictive log density per point
        (held-out log-likelihood; the mean of it is what `metrics.heldout_log_likelihood` gives
        for a point fit).
    gate_x
        (n_new, q) the gate's own covariates at the new points, when the model's gate has them
        (its gates have q columns); None when the gate reads x.
    interval
        Probability of the central predictive interval.
    num_draws
        Draws of y per point for the interval (at least one per posterior draw).
    prefix
        The sites' ``handlers.scope`` prefix (DataTree only).
    """
    key = check_key(key)
    x_new = check_design(x_new, "x_new")
    gate_x = check_gate_x(gate_x, x_new.shape[0])
    num_draws = check_positive_int(num_draws, "num_draws")
    if not 0 < interval < 1:
        raise ValueError(f"interval: expected a probability in (0, 1), got {interval}")
    if hasattr(source, "children"):
        draws = posterior_params(source, prefix=prefix)
    else:
        # A fit that recorded n and the experts' shares predicts with the experts' unbiased noise
        # sds (Fit.predictive_noise), not the fitted ones, which understate new points' spread.
        single = check_params(
            predictive_params(source, "source"), "source", require_noise=True, gate_dim=None if gate_x is None else gate_x.shape[1],
        )
        draws = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf)[None], single)
    if x_new.shape[1] != draws.experts.shape[-1]:
        raise ValueError(f"x_new: expected {draws.experts.shape[-1]} columns, got {x_new.shape[1]}")
    gate_input = x_new if gate_x is None else gate_x
    if draws.num_experts > 1 and gate_input.shape[1] != draws.gates.shape[-1]:
        if gate_x is None:
            raise ValueError(
                f"gate_x: the model's gate reads {draws.gates.shape[-1]} covariates of its own; pass them as "
                "gate_x (n_new rows)"
            )
        raise ValueError(f"gate_x: expected {draws.gates.shape[-1]} columns like the gates, got {gate_x.shape[1]}")
    if y is not None:
        y = check_response(y, x_new.shape[0]).astype(jnp.result_type(draws.experts))
    count = draws.experts.shape[0]
    total = max(count, num_draws)
    x_new = x_new.astype(jnp.result_type(draws.experts))
    gate_input = gate_input.astype(x_new.dtype)

    probabilities, means, lower, upper = _predictive(draws, x_new, gate_input, key, total, jnp.asarray(interval))
    log_density = None if y is None else np.asarray(_log_predictive_density(draws, x_new, gate_input, y))
    return Prediction(
        mean=np.asarray(means),
        lower=np.asarray(lower),
        upper=np.asarray(upper),
        gate_probabilities=np.asarray(probabilities),
        log_density=log_density,
    )


@partial(jax.jit, static_argnames=("total",))
def _predictive(draws: MoEParams, x_new, gate_x, key, total: int, interval):
    """Posterior-mean gate probabilities and E[y | x], and the central ``interval`` of ``total``
    predictive draws of y (draw j uses posterior draw j mod count); one compiled program."""
    count = draws.experts.shape[0]

    def moments(params):
        return params.gate_probabilities(gate_x), params.predictive_mean(x_new, gate_x)

    def sample(params, draw_key):
        return MixtureOfExperts.from_params(params, x_new, gate_x=gate_x, validate_args=False).sample(draw_key)

    probabilities, means = jax.vmap(moments)(draws)
    picks = jnp.arange(total) % count
    y_draws = jax.vmap(sample)(jax.tree_util.tree_map(lambda leaf: leaf[picks], draws), jax.random.split(key, total))
    tail = (1 - interval) / 2
    bounds = jnp.quantile(y_draws, jnp.stack([tail, 1 - tail]), axis=0)
    return probabilities.mean(0), means.mean(0), bounds[0], bounds[1]


@jax.jit
def _log_predictive_density(draws: MoEParams, x_new, gate_x, y):
    """log of the predictive density of y averaged over the draws, per point."""

    def score(params):
        return MixtureOfExperts.from_params(params, x_new, gate_x=gate_x, validate_args=False).log_prob(y)

    per_draw = jax.lax.map(score, draws)  # (draws, n): one draw's densities at a time
    return logsumexp(per_draw, axis=0) - jnp.log(per_draw.shape[0])


class NutsResult(NamedTuple):
    """Result of `run_nuts`.

    Attributes
    ----------
    mcmc
        The ``numpyro.infer.MCMC`` object (raw, un-relabelled draws).
    datatree
        ``xarray.DataTree`` (`to_datatree`) with groups posterior (relabelled), posterior_predictive,
        log_likelihood, sample_stats (``diverging``, ``lp``, ``n_steps``, ``tree_depth``,
        ``reached_max_tree_depth``, ``acceptance_rate``), observed_data (and constant_data with fixed sites); dims expert,
        gate, feature, obs.
    diagnostics
        ``max_r_hat`` (NaN for one chain), ``min_ess_bulk``, ``divergences``, ``draws`` (per
        chain, over the kept rounds: see ``max_samples``), ``burn_in`` (draws per chain dropped
        after warmup because only the later ones agreed; 0 when none were),
        ``target_accept_prob`` (the rate the draws were tuned to: see ``target_accept_prob``),
        ``accept_raised`` (whether it was raised because too many transitions diverged),
        ``chain_log_density`` (each chain's mean ``lp``: a chain far below the others wandered
        into a region of lower density, which the warning on disagreeing chains names) and
        ``metric``, the metric the draws used:
        ``"laplace"`` (fixed), ``"laplace, adapted"`` (the second warmup), ``"dense"`` or
        ``"diagonal"`` (adapted; see ``mass_matrix``).
    """

    mcmc: MCMC
    datatree: object
    diagnostics: dict


def _chain_method(num_chains: int) -> str:
    # Parallel chains need one device each (numpyro.set_host_device_count before JAX starts);
    # otherwise the chains run vectorised in one program.
    return "parallel" if jax.local_device_count() >= num_chains else "vectorized"


class _Draws:
    """The draws of one or more rounds of an MCMC run (each round resumed from the last one's state),
    concatenated along the draw axis, behind the parts of ``MCMC`` that `to_datatree` and
    ``Predictive`` read."""

    def __init__(self, mcmc: MCMC, samples=None, extra=None):
        self.sampler, self._args, self._kwargs = mcmc.sampler, mcmc._args, mcmc._kwargs
        self.num_chains, self.thinning = mcmc.num_chains, mcmc.thinning
        self._samples = mcmc.get_samples(group_by_chain=True) if samples is None else samples
        self._extra = mcmc.get_extra_fields(group_by_chain=True) if extra is None else extra
        self.draws = int(next(iter(self._samples.values())).shape[1])
        self.num_samples = self.draws * self.thinning

    def extended(self, mcmc: MCMC) -> _Draws:
        """These draws followed by ``mcmc``'s (its latest round)."""

        def join(old, new):
            return {name: np.concatenate([np.asarray(old[name]), np.asarray(new[name])], axis=1) for name in old}

        return _Draws(
            mcmc,
            join(self._samples, mcmc.get_samples(group_by_chain=True)),
            join(self._extra, mcmc.get_extra_fields(group_by_chain=True)),
        )

    def since(self, start: int) -> _Draws:
        """These draws without each chain's first ``start`` (dropped as warmup)."""

        def tail(values):
            return {name: np.asarray(value)[:, start:] for name, value in values.items()}

        kept = _Draws.__new__(_Draws)
        kept.__dict__.update(self.__dict__)
        kept._samples, kept._extra = tail(self._samples), tail(self._extra)
        kept.draws = self.draws - start
        kept.num_samples = kept.draws * self.thinning
        return kept

    @staticmethod
    def _grouped(values: dict, group_by_chain: bool) -> dict:
        if group_by_chain:
            return values
        return {name: np.reshape(value, (-1, *np.shape(value)[2:])) for name, value in values.items()}

    def get_samples(self, group_by_chain: bool = False) -> dict:
        return self._grouped(self._samples, group_by_chain)

    def get_extra_fields(self, group_by_chain: bool = False) -> dict:
        return self._grouped(self._extra, group_by_chain)


def _max_r_hat(datatree) -> float:
    import arviz as az

    return _diagnostic_extreme(az.rhat(datatree), max)


def _diagnostic_extreme(result, reduce=max) -> float:
    """Max (or min) over all variables of an ArviZ diagnostic's DataTree; NaN if any is NaN."""
    dataset = result.to_dataset() if hasattr(result, "to_dataset") else result
    values = np.concatenate(
        [np.ravel(np.asarray(value, dtype=float)) for value in dataset.data_vars.values()]
    )
    if np.isnan(values).any():
        return float("nan")
    return float(reduce(values))


def run_nuts(
    x,
    y,
    init,
    *,
    key: jax.Array,
    fix: tuple[str, ...] = (),
    priors: dict | None = None,
    shared_noise: bool = False,
    family: str = "normal",
    df=None,
    gate_x=None,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    max_samples: int | None = None,
    jitter: float = 0.01,
    relabel_draws: bool = True,
    chain_method: str | None = None,
    mass_matrix: str = "laplace",
    target_accept_prob: float = 0.8,
    progress_bar: bool = False,
) -> NutsResult:
    """NUTS on `moe_regression` from ``init``, a thin convenience over this module's pieces.

    Every chain starts near ``init`` (`chain_init_params`), NUTS's metric is the Laplace
    approximation at it (`laplace_inverse_mass_matrix`), and the draws are relabelled to its
    labels and converted with their posterior predictive (`to_datatree`).

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses.
    init
        Start: `MoEParams`, an expert estimate, or a fit result; its link, number of experts and
        intercepts define the model, and its experts are the reference labelling.
    key
        PRNG key (chain jitter, NUTS, posterior predictive).
    fix
        Parameter groups conditioned on ``init``'s values (``handlers.condition``):
        ``"experts"``, ``"gates"``, ``"noise"`` (each with its intercepts; the noise with the
        Student-t degrees of freedom).
    priors, shared_noise
        The model's priors and noise structure (`moe_priors`).
    family, df
        The experts' noise (`moe_priors`): ``"student_t"`` with ``df=None`` samples the degrees
        of freedom (site ``df``, started at ``init``'s or 4); a number fixes them (recorded in
        the DataTree, so `predict` and `posterior_params` use them).
    gate_x
        (n, q) covariates of the gate's own (``init``'s gates have q columns), or None: the gate
        reads x. The DataTree names the gates' columns ``gate_feature``.
    num_chains, num_warmup, num_samples
        Chains and draws per chain. Chains run in parallel when there is a device per chain,
        else vectorised (``chain_method`` overrides).
    max_samples
        Run longer until the chains agree: while the max r_hat (of the relabelled draws) exceeds
        1.01 and another round fits, draw ``num_samples`` more per chain from where the chains
        stopped (NumPyro's ``post_warmup_state``: no new warmup, the same tuned kernel), up to
        ``max_samples`` draws per chain in all. None (default): one round of ``num_samples``.
        After each further round, when all the draws disagree but the second half of each chain's
        agree (a chain that reached the others late, from a minor mode it left), the first half is
        counted as warmup and dropped, as Gelman and Rubin (1992) do (``diagnostics["burn_in"]``
        draws per chain; on the benchmark's Boston set this turned a max r_hat of 1.287 over
        4 x 2000 draws into 1.007 over their last 1000). The DataTree holds the kept rounds' draws,
        ``diagnostics["draws"]`` their number per chain; ``mcmc`` holds the last round's (its
        ``last_state`` continues the chains).
    jitter
        Standard deviation of the per-chain perturbation in unconstrained space.
    relabel_draws
        Align draws with ``init``'s expert labels (`relabel`).
    mass_matrix
        ``"laplace"`` (default): when the potential's (negative log joint density's) Hessian at
        ``init`` is positive definite, the chains start near the posterior mode that Newton's
        steps reach from it (`posterior_mode`: the mode of the density NUTS samples, in
        unconstrained space), and NUTS's dense inverse mass matrix is fixed at the Laplace
        approximation's covariance there, the inverse Hessian of the potential, with the
        correlations between experts and gates; its
        eigen-directions are rescaled by fixed factors within [1/2, 2] so that NUTS draws are not
        antithetic (see `_desynchronised`). Warmup then only tunes the step size. When the first
        round's chains disagree (max r_hat above 1.01) and barely move (smallest bulk ESS below
        `STUCK_ESS`, 100: 4 x 500 draws of chains that mix give hundreds), the posterior is far
        from that Gaussian (as on real data, where an expert's posterior can be wide and skewed)
        and more draws would not help: the chains warm up again from the same starts, NumPyro
        adapting a dense metric that begins at the Laplace one, and the first round's draws are
        dropped (``diagnostics["metric"]``). An EM fit that stopped at its iteration cap (where
        experts overlap EM crawls) is no mode: EM continues it to convergence first (`finish_em`,
        SQUAREM-accelerated, under this model's priors), and Newton's steps start from there. On
        the benchmark's High School and Beyond set (k = 4, 5,389 rows, a fit stopped at 500
        iterations whose Hessian was not positive definite), the dense metric adapted from the
        identity gave max r_hat 1.331, a bulk ESS of 15 and 227 divergent transitions in 4 x 2,000
        draws; from the finished fit (306 more iterations, 2-4 s), 1.019, 215 and 44 (and 1.010,
        820 and none with another key). Where the Hessian at the start is still not positive
        definite, the posterior there is no Gaussian to take a metric from, and ``"dense"`` is used
        with a warning.
        ``"laplace-fixed"``: the fixed metric alone. ``"dense"`` and ``"diagonal"``: NumPyro's
        dense or diagonal metric adapted from the identity. Measured in
        benchmarks/nuts_workflow.py (part D; d=5, k=3, n=2000, 4 x (500 + 500)) and
        benchmarks/real_data.py (see the README's results).
    target_accept_prob
        The acceptance rate NUTS's step size is tuned to during warmup (NumPyro's default, 0.8).
        Higher (0.9, 0.95) takes smaller steps, at more gradient evaluations per draw, and is
        the usual remedy for divergent transitions (Stan's ``adapt_delta``): on the benchmark's
        High School and Beyond set (k = 4, the dense metric adapted from the identity), 0.8 gave
        3 divergent transitions, 0.9 none (max r_hat 1.005 and 1.009). Applied once by itself:
        when more than `DIVERGENT_LIMIT` (1%) of the first round's transitions diverge (a few
        are common; that many mean the step size suits not the region a chain sits in), warmup
        runs again from the same starts with ``RETRY_ACCEPT_PROB`` (0.95), when the rate asked
        for was lower (``diagnostics["target_accept_prob"]`` is the rate the draws used).

    Warns
    -----
    ReliabilityWarning
        When the maximum r_hat exceeds 1.01 or there were divergences.
    """
    import arviz as az

    x, y = check_data(x, y)
    gate_x = check_gate_x(gate_x, x.shape[0])
    key = check_key(key)
    fix = check_fix(fix)
    num_chains = check_positive_int(num_chains, "num_chains")
    num_warmup = check_positive_int(num_warmup, "num_warmup")
    num_samples = check_positive_int(num_samples, "num_samples")
    if max_samples is not None:
        max_samples = check_positive_int(max_samples, "max_samples")
        if max_samples < num_samples:
            raise ValueError(
                f"max_samples: expected at least num_samples ({num_samples}) draws per chain, got {max_samples}"
            )
    jitter = check_positive(jitter, "jitter")
    target_accept_prob = check_probability(target_accept_prob, "target_accept_prob")
    if mass_matrix not in MASS_MATRICES:
        raise ValueError(f"mass_matrix: expected one of {MASS_MATRICES}, got {mass_matrix!r}")
    if chain_method not in (None, "parallel", "sequential", "vectorized"):
        raise ValueError(
            f"chain_method: expected None, 'parallel', 'sequential' or 'vectorized', got {chain_method!r}"
        )
    capped = isinstance(init, Fit) and init.method == "em" and not init.converged
    if capped and mass_matrix in ("laplace", "laplace-fixed"):
        # EM stopped at its iteration cap, still climbing (where experts overlap): not a mode, and
        # its Hessian often not positive definite. EM continues to the mode of this model's
        # posterior first (SQUAREM-accelerated, `finish_em`); the conditioned groups keep their values.
        init = finish_em(
            x, y, init, fix=fix, shared_noise=shared_noise, priors=priors, family=family, df=df, gate_x=gate_x
        )
    start = check_params(
        as_params(init, "init"), "init", dim=x.shape[1], gate_dim=None if gate_x is None else gate_x.shape[1]
    )
    family, df = check_family(family, df, start.num_experts)
    noise = jnp.asarray(start.noise, x.dtype)
    start = start.replace(
        noise=jnp.where(jnp.isfinite(noise) & (noise > 0), noise, jnp.std(y) / 2),
        df=starting_df(start.df, family, df, (start.num_experts,), x.dtype),
    )
    model_kwargs = dict(
        num_experts=start.num_experts,
        link=start.link,
        intercepts=start.has_intercepts,
        shared_noise=shared_noise,
        priors=priors,
        family=family,
        df=df,
        gate_x=gate_x,
    )
    fixed = fixed_sites(fix, start, shared_noise=shared_noise)
    model = handlers.condition(moe_regression, fixed) if fixed else moe_regression
    chain_key, run_key, predictive_key = jax.random.split(key, 3)
    mass_options = {"dense_mass": mass_matrix != "diagonal", "target_accept_prob": target_accept_prob}
    chain_start = start
    if mass_matrix in ("laplace", "laplace-fixed"):
        # Near a mode (a positive definite Hessian at the fit), the metric is the Laplace
        # approximation's at the mode of the density NUTS samples (in unconstrained space, a step
        # or two of Newton's from the fit).
        mode, inverse_mass = posterior_mode(
            model, start, model_args=(x, y), model_kwargs=model_kwargs, near_a_mode=True
        )
        if inverse_mass is None:
            warnings.warn(
                "mass_matrix: the potential's Hessian at init is not positive definite (init is not "
                "a posterior mode: start from an EM or MAP fit); adapting a dense mass matrix instead",
                ReliabilityWarning,
                stacklevel=2,
            )
        else:
            chain_start = mode
            mass_options.update(inverse_mass_matrix=_desynchronised(inverse_mass), adapt_mass_matrix=False)
    init_params = chain_init_params(
        model,
        chain_start,
        num_chains=num_chains,
        key=chain_key,
        jitter=jitter,
        model_args=(x, y),
        model_kwargs=model_kwargs,
    )
    if num_chains == 1:  # MCMC takes a single chain's start without the chain axis
        init_params = jax.tree_util.tree_map(lambda value: value[0], init_params)

    def sampled(options: dict, run_key) -> MCMC:
        """Warmup and ``num_samples`` draws from the chains' starts, under the metric ``options``."""
        mcmc = MCMC(
            NUTS(model, init_strategy=init_to_params(params=start), **options),
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            chain_method=chain_method or _chain_method(num_chains),
            progress_bar=progress_bar,
        )
        mcmc.run(run_key, x, y, init_params=init_params, extra_fields=SAMPLE_STATS, **model_kwargs)
        return mcmc

    options = mass_options
    mcmc = sampled(options, run_key)
    draws = _Draws(mcmc)
    adapted = mass_options.get("adapt_mass_matrix", True)
    metric = ("dense" if mass_options["dense_mass"] else "diagonal") if adapted else "laplace"
    checked = num_chains > 1 and (max_samples is not None or (mass_matrix == "laplace" and not adapted))

    def relabelled(draws):
        return to_datatree(draws, reference=start, relabel_draws=relabel_draws, log_likelihood=False)

    tree = relabelled(draws) if checked else None
    r_hat = _max_r_hat(tree) if checked else float("nan")
    if (
        mass_matrix == "laplace"
        and checked
        and not adapted
        and not r_hat <= RHAT_LIMIT
        and not _diagnostic_extreme(az.ess(tree, method="bulk"), min) >= STUCK_ESS
    ):
        # The chains disagree and barely move: the fixed Laplace metric does not suit this posterior
        # (far from Gaussian, as on real data), and more draws would not mend it. Warm up again from
        # the same starts, adapting a dense metric that begins at the Laplace one.
        metric = "laplace, adapted"
        options = {**mass_options, "adapt_mass_matrix": True}
        mcmc = sampled(options, jax.random.fold_in(run_key, 1))
        draws = _Draws(mcmc)
        r_hat = _max_r_hat(relabelled(draws)) if max_samples is not None else float("nan")
    accept = target_accept_prob
    if accept < RETRY_ACCEPT_PROB and np.mean(draws.get_extra_fields()["diverging"]) > DIVERGENT_LIMIT:
        # Divergent transitions in more than a percent of the draws: the tuned step size is too large
        # for a region the chains sit in, and their draws are biased there. Stan's remedy (a higher
        # adapt_delta: smaller steps), applied once: warm up again from the same starts.
        accept = RETRY_ACCEPT_PROB
        options = {**options, "target_accept_prob": accept}
        mcmc = sampled(options, jax.random.fold_in(run_key, 2))
        draws = _Draws(mcmc)
        r_hat = _max_r_hat(relabelled(draws)) if num_chains > 1 and max_samples is not None else float("nan")
    burn_in = 0
    while (
        num_chains > 1
        and max_samples is not None
        and draws.draws + num_samples <= max_samples
        and not r_hat <= RHAT_LIMIT
    ):
        mcmc.post_warmup_state = mcmc.last_state
        mcmc.run(mcmc.post_warmup_state.rng_key, x, y, extra_fields=SAMPLE_STATS, **model_kwargs)
        draws = draws.extended(mcmc)
        r_hat = _max_r_hat(relabelled(draws))
        if not r_hat <= RHAT_LIMIT:
            # A chain that spent its first draws away from the others (in a minor mode it then left)
            # keeps r_hat high however long the others run: judge the chains on the second half of
            # their draws, the first half counted as warmup (Gelman and Rubin 1992; Gelman et al.,
            # Bayesian Data Analysis, 3rd ed., section 11.4).
            half = draws.since(draws.draws // 2)
            later = _max_r_hat(relabelled(half))
            if later <= RHAT_LIMIT:
                burn_in, draws, r_hat = draws.draws // 2, half, later

    # The predictive is label-invariant: the raw draws give the same as relabelled ones.
    replicated = Predictive(model, posterior_samples=draws.get_samples(), return_sites=["y"])(
        predictive_key, x, **model_kwargs
    )["y"]
    datatree = to_datatree(
        draws,
        reference=start,
        relabel_draws=relabel_draws,
        posterior_predictive={"y": np.asarray(replicated).reshape(num_chains, draws.draws, -1)},
    )
    diverging = np.asarray(datatree["sample_stats"]["diverging"])
    chain_lp = np.asarray(datatree["sample_stats"]["lp"]).mean(axis=1)
    diagnostics = {
        "max_r_hat": _max_r_hat(datatree) if num_chains > 1 else float("nan"),
        "min_ess_bulk": _diagnostic_extreme(az.ess(datatree, method="bulk"), min),
        "divergences": int(diverging.sum()),
        "draws": draws.draws,
        "burn_in": burn_in,
        "metric": metric,
        "target_accept_prob": accept,
        "accept_raised": accept != target_accept_prob,
        "chain_log_density": [float(value) for value in chain_lp],
    }
    problems = _nuts_problems(diagnostics, num_chains, diverging.size)
    if problems:
        warnings.warn("NUTS: " + "; ".join(problems), ReliabilityWarning, stacklevel=2)
    return NutsResult(mcmc, datatree, diagnostics)


def _nuts_problems(diagnostics: dict, num_chains: int, transitions: int) -> list[str]:
    """What makes a run's draws untrustworthy, each with what to do: chains that disagree (max
    r_hat above `RHAT_LIMIT`; a NaN r_hat, from chains that never moved, counts) and divergent
    transitions. Empty when neither."""
    problems = []
    if num_chains > 1 and not diagnostics["max_r_hat"] <= RHAT_LIMIT:
        problems.append(
            f"the chains disagree (max r_hat {diagnostics['max_r_hat']:.3f}, limit {RHAT_LIMIT}): draw longer "
            "(max_samples), check the start, or look at az.plot_trace for chains in different modes"
            + _chain_heights(diagnostics)
        )
    if diagnostics["divergences"]:
        problems.append(
            f"{diagnostics['divergences']} of {transitions} transitions diverged: the sampler could not follow the "
            "posterior's curvature there and the draws may miss that region; see where with "
            "az.plot_pair(..., divergences=True); a higher target_accept_prob (0.9, 0.95: smaller steps), fewer "
            "experts or stronger priors usually remove them"
        )
    return problems


def _chain_heights(diagnostics: dict, tree: str = "tree") -> str:
    """The chains' mean log densities, for a warning that they disagree: a chain far below the
    others sits in a region of lower density (where it wandered, or a minor mode), one level with
    them in another mode or labelling. ``tree`` names the DataTree in the advice."""
    heights = diagnostics.get("chain_log_density")
    if not heights:
        return ""
    lowest = int(np.argmin(heights))
    return (
        f" (mean log density by chain: {', '.join(f'{value:.1f}' for value in heights)}; chain {lowest} is "
        f"{max(heights) - heights[lowest]:.1f} below the highest: see az.plot_trace({tree}, var_names='lp', "
        "group='sample_stats'))"
    )


def loo(datatree, **kwargs):
    """PSIS-LOO of a DataTree (``arviz.loo`` with pointwise values; ``kwargs`` go to it, e.g.
    ``var_name`` when the model has several likelihood terms).

    Warns (`ReliabilityWarning`) when any Pareto k exceeds ArviZ's threshold for the number of
    draws S, min(1 - 1 / log10(S), 0.7) (Vehtari et al. 2024, "Pareto smoothed importance
    sampling"): those points' leave-one-out estimates, and so the elpd, cannot be trusted.
    """
    import arviz as az

    result = az.loo(datatree, pointwise=True, **kwargs)
    pareto_k = np.asarray(result.pareto_k)
    limit = min(float(getattr(result, "good_k", None) or PARETO_K_LIMIT), PARETO_K_LIMIT)
    bad = int((pareto_k > limit).sum())
    if bad:
        warnings.warn(
            f"LOO: {bad} of {pareto_k.size} points have Pareto k > {limit:.2f} (max {pareto_k.max():.2f}); "
            "their leave-one-out estimates are unreliable: refit without them or use K-fold CV",
            ReliabilityWarning,
            stacklevel=2,
        )
    return result


class ComparisonResult(NamedTuple):
    """Result of `compare_num_experts`: ``table`` (``arviz.compare``, best first), the best
    ``num_experts``, and the DataTree of every candidate keyed ``"k=<k>"``."""

    table: object
    num_experts: int
    datatrees: dict


def compare_num_experts(
    x,
    y,
    *,
    key: jax.Array,
    candidates=(2, 3, 4),
    link: str | Link = "linear",
    intercepts: bool = False,
    num_starts: int = 5,
    **nuts_kwargs,
) -> ComparisonResult:
    """Fit each number of experts (`fit_moe`, then `run_nuts` from it) and rank them by PSIS-LOO.

    ``nuts_kwargs`` go to `run_nuts` (chains, draws, priors, ...).
    """
    import arviz as az

    key = check_key(key)
    candidates = [check_positive_int(k, "candidates") for k in candidates]
    if len(set(candidates)) < 2:
        raise ValueError(f"candidates: expected at least two distinct numbers of experts, got {candidates}")
    trees = {}
    for k, candidate_key in zip(candidates, jax.random.split(key, len(candidates)), strict=True):
        fit_key, nuts_key = jax.random.split(candidate_key)
        fit = fit_moe(
            x,
            y,
            num_experts=k,
            key=fit_key,
            link=link,
            intercepts=intercepts,
            num_starts=num_starts,
            shared_noise=nuts_kwargs.get("shared_noise", False),
            priors=nuts_kwargs.get("priors"),
            family=nuts_kwargs.get("family", "normal"),
            df=nuts_kwargs.get("df"),
            gate_x=nuts_kwargs.get("gate_x"),
        )
        trees[f"k={k}"] = run_nuts(x, y, fit, key=nuts_key, **nuts_kwargs).datatree
    for name, tree in trees.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReliabilityWarning)
            loo(tree)
        for warning in caught:  # ours name the candidate; others pass through as they were
            if issubclass(warning.category, ReliabilityWarning):
                warnings.warn(f"{name}: {warning.message}", ReliabilityWarning, stacklevel=2)
            else:
                warnings.warn(warning.message, warning.category, stacklevel=2)
    table = az.compare(trees)
    return ComparisonResult(table, int(str(table.index[0]).split("=")[1]), trees)
