"""The Bayesian workflow (DESIGN section 5): NUTS started at the estimate, relabelling, ArviZ.

From the default init, NUTS chains of a mixture of experts land in different label permutations
(label switching), which wrecks r_hat and ESS. Starting every chain near the estimate (per-chain
points in unconstrained space with a small jitter) and aligning each draw's labels to the
estimate's removes that; the experts may be fixed (``handlers.condition``) or free.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, Predictive, init_to_value, log_likelihood
from jax.flatten_util import ravel_pytree
from numpyro.infer.util import potential_energy, unconstrain_fn
from scipy.optimize import linear_sum_assignment

from numpyro_moe._experts import ExpertEstimate
from numpyro_moe._fit import _check_xy, as_params
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._model import moe_regression, params_to_sites, sites_to_params
from numpyro_moe._params import MoEParams, expert_means, gate_probabilities, predictive_mean
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_key,
    check_num_experts,
    check_positive,
    check_positive_int,
)

__all__ = [
    "ComparisonResult",
    "NutsResult",
    "Prediction",
    "chain_init_params",
    "compare_num_experts",
    "diagnostic_extreme",
    "loo",
    "init_to_estimate",
    "laplace_inverse_mass_matrix",
    "posterior_params",
    "predict",
    "relabel_draws",
    "run_nuts",
]

DIMS = {
    "experts": ["expert", "feature"],
    "gates": ["gate", "feature"],
    "expert_intercepts": ["expert"],
    "gate_intercepts": ["gate"],
    "y": ["obs"],
    "x": ["obs", "feature"],
}
RHAT_LIMIT = 1.01
MASS_MATRICES = ("laplace", "dense", "diagonal")


def _as_start(init) -> MoEParams:
    if isinstance(init, ExpertEstimate):
        return init.to_params()
    if hasattr(init, "params") and isinstance(init.params, MoEParams):  # MoEFit, EMResult, MapResult
        return init.params
    if isinstance(init, MoEParams):
        return init
    raise TypeError(
        f"init: expected MoEParams, ExpertEstimate, or a fit result with .params, got {type(init).__name__}"
    )


def init_to_estimate(params, *, exclude: tuple[str, ...] = ()):
    """NumPyro init strategy starting every site at ``params`` (`MoEParams` or an estimate).

    For NUTS (``NUTS(model, init_strategy=init_to_estimate(fit))``) and SVI guides. Sites in
    ``exclude`` (e.g. conditioned ones) are left to the model.
    """
    sites = params_to_sites(_as_start(params))
    return init_to_value(values={name: value for name, value in sites.items() if name not in exclude})


def _unconstrained_start(model, sites: dict, model_args, model_kwargs) -> dict:
    """``sites`` restricted to the model's latent sample sites (conditioned ones drop out),
    mapped to unconstrained space."""
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(*model_args, **model_kwargs)
    latent = {name for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]}
    values = {name: jnp.asarray(value) for name, value in sites.items() if name in latent}
    return unconstrain_fn(model, model_args, model_kwargs, values)


def chain_init_params(
    model, params, *, num_chains: int, key: jax.Array, jitter: float = 0.01, model_args=(), model_kwargs=None,
):
    """Per-chain starting points for ``MCMC.run(init_params=...)``, in unconstrained space.

    Every chain starts at ``params`` plus independent Normal(0, ``jitter``) noise on each
    unconstrained coordinate, so all chains begin near one mode yet not at one point. Sites the
    model does not sample (e.g. conditioned experts) are dropped.
    """
    key = check_key(key)
    num_chains = check_positive_int(num_chains, "num_chains")
    model_kwargs = model_kwargs or {}
    unconstrained = _unconstrained_start(model, params_to_sites(_as_start(params)), model_args, model_kwargs)
    leaves, tree = jax.tree_util.tree_flatten(unconstrained)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        leaf[None] + jitter * jax.random.normal(leaf_key, (num_chains, *jnp.shape(leaf)), jnp.result_type(leaf))
        for leaf, leaf_key in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noisy)


def laplace_inverse_mass_matrix(model, params, *, model_args=(), model_kwargs=None):
    """Inverse Hessian of ``model``'s potential energy at ``params``, in unconstrained space.

    A (D, D) array over the model's latent sites flattened in sorted-name order (NumPyro's
    order for a dense mass matrix), for ``NUTS(inverse_mass_matrix=...)``; None when the
    Hessian is not positive definite (``params`` is not a mode). ``params``: `MoEParams` (or an
    estimate or fit result) for `moe_regression`, or a dict of site values for any model.
    """
    model_kwargs = model_kwargs or {}
    sites = dict(params) if isinstance(params, dict) else params_to_sites(_as_start(params))
    flat, unravel = ravel_pytree(_unconstrained_start(model, sites, model_args, model_kwargs))
    hessian = jax.hessian(lambda point: potential_energy(model, model_args, model_kwargs, unravel(point)))(flat)
    hessian = np.asarray((hessian + hessian.T) / 2, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    if not np.all(np.isfinite(eigenvalues)) or eigenvalues[0] <= 1e-10 * max(eigenvalues[-1], 1e-300):
        return None
    return jnp.asarray((eigenvectors / eigenvalues) @ eigenvectors.T, flat.dtype)


# Rescaling range of the Laplace metric's eigen-directions (see `_desynchronised`).
METRIC_SPREAD = 2.0


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


def relabel_draws(samples: dict, reference) -> tuple[dict, np.ndarray]:
    """Align each draw's expert labels with ``reference`` experts (k, d).

    ``samples`` holds arrays with leading (chain, draw) axes. For each draw the permutation
    minimising ||experts[perm] - reference||_F (a linear assignment) is applied to the experts,
    their intercepts and the gates (then shifted so the last gate row stays zero).

    Returns the relabelled samples and the (chain, draw, k) permutations.
    """
    reference = np.asarray(reference.experts if hasattr(reference, "experts") else reference)
    experts = np.asarray(samples["experts"])
    chains, draws, k, _ = experts.shape
    permutations = np.empty((chains, draws, k), dtype=np.int64)
    for chain in range(chains):
        for draw in range(draws):
            cost = ((reference[:, None, :] - experts[chain, draw][None]) ** 2).sum(-1)
            rows, cols = linear_sum_assignment(cost)
            permutations[chain, draw] = cols[np.argsort(rows)]
    take = lambda array: np.take_along_axis(  # noqa: E731
        array, permutations.reshape(chains, draws, k, *([1] * (array.ndim - 3))), axis=2
    )
    relabelled = dict(samples)
    relabelled["experts"] = take(experts)
    if "expert_intercepts" in samples:
        relabelled["expert_intercepts"] = take(np.asarray(samples["expert_intercepts"]))
    if "gates" in samples:
        free = np.asarray(samples["gates"])
        full = np.concatenate([free, np.zeros_like(free[:, :, :1])], axis=2)
        full = take(full)
        relabelled["gates"] = (full - full[:, :, -1:])[:, :, :-1]
    if "gate_intercepts" in samples:
        free = np.asarray(samples["gate_intercepts"])
        full = take(np.concatenate([free, np.zeros_like(free[:, :, :1])], axis=2))
        relabelled["gate_intercepts"] = (full - full[:, :, -1:])[:, :, :-1]
    return relabelled, permutations


class NutsResult(NamedTuple):
    """Result of `run_nuts`.

    Attributes
    ----------
    mcmc
        The ``numpyro.infer.MCMC`` object (raw, un-relabelled draws).
    datatree
        ``xarray.DataTree`` with groups posterior (relabelled), posterior_predictive,
        log_likelihood, sample_stats, observed_data and constant_data; dims expert, gate,
        feature, obs.
    permutations
        (chain, draw, k) relabelling permutations applied (identity when experts are fixed).
    """

    mcmc: MCMC
    datatree: object
    permutations: np.ndarray


def _chain_method(num_chains: int) -> str:
    # Parallel chains need one device each (numpyro.set_host_device_count before JAX starts);
    # otherwise the chains run vectorised in one program.
    return "parallel" if jax.local_device_count() >= num_chains else "vectorized"


def run_nuts(
    x,
    y,
    *,
    num_experts: int,
    init,
    key: jax.Array,
    fix_experts: bool = False,
    link: str | Link = "linear",
    intercepts: bool = False,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    jitter: float = 0.01,
    relabel: bool = True,
    chain_method: str | None = None,
    mass_matrix: str = "laplace",
    progress_bar: bool = False,
    **model_kwargs,
) -> NutsResult:
    """NUTS on `moe_regression` with every chain started near ``init``; relabelled; as a DataTree.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses.
    num_experts
        k.
    init
        Start: `MoEParams`, an `ExpertEstimate`, or a fit result with ``.params`` (`fit_moe`,
        `fit_em`). Its experts are the reference labelling.
    key
        PRNG key (chain jitter, NUTS, posterior predictive).
    fix_experts
        Condition the model on ``init``'s experts (``handlers.condition``): NUTS over the gate
        and noise only.
    link, intercepts, **model_kwargs
        Passed to `moe_regression`.
    num_chains, num_warmup, num_samples
        Chains and draws per chain. Chains run in parallel when there is a device per chain,
        else vectorised (``chain_method`` overrides).
    jitter
        Standard deviation of the per-chain perturbation in unconstrained space.
    relabel
        Align draws with ``init``'s expert labels (`relabel_draws`).
    mass_matrix
        ``"laplace"`` (default): a dense inverse mass matrix fixed at the Laplace approximation's
        covariance, the inverse Hessian of the potential (negative log joint density) at ``init``
        in unconstrained space (`laplace_inverse_mass_matrix`), with the correlations between
        experts and gates; its eigen-directions are rescaled by fixed factors within [1/2, 2] so
        that NUTS draws are not antithetic (see `_desynchronised`). Warmup then only tunes the
        step size. Meant for ``init`` at a mode (an EM, MAP or `fit_moe` fit); if the Hessian is
        not positive definite there, ``"dense"`` is used with a warning. ``"dense"`` and
        ``"diagonal"``: NumPyro's adapted dense or diagonal mass matrix. Measured in
        benchmarks/nuts_workflow.py (part D; d=5, k=3, n=2000, 4 x (500 + 500)): r_hat <= 1.01
        and ESS >= 400 on 19/20 seeds with ``"laplace"`` against 16/20 with ``"diagonal"``, and
        3.7x the bulk ESS per second.

    Warns
    -----
    ReliabilityWarning
        When the maximum r_hat exceeds 1.01 or there were divergences.
    """
    import arviz as az

    x, y = _check_xy(x, y)
    link = resolve_link(link)
    key = check_key(key)
    num_experts = check_num_experts(num_experts, x.shape[1], require_k_le_d=False)
    num_chains = check_positive_int(num_chains, "num_chains")
    num_warmup = check_positive_int(num_warmup, "num_warmup")
    num_samples = check_positive_int(num_samples, "num_samples")
    jitter = check_positive(jitter, "jitter")
    if mass_matrix not in MASS_MATRICES:
        raise ValueError(f"mass_matrix: expected one of {MASS_MATRICES}, got {mass_matrix!r}")
    if chain_method not in (None, "parallel", "sequential", "vectorized"):
        raise ValueError(
            f"chain_method: expected None, 'parallel', 'sequential' or 'vectorized', got {chain_method!r}"
        )
    start = as_params(_as_start(init), "init", x.shape[1], num_experts=num_experts)
    if not np.isfinite(float(start.noise)) or float(start.noise) <= 0:
        start = start._replace(noise=jnp.std(y) / 2)
    if intercepts and start.expert_intercepts is None:
        zeros = jnp.zeros(num_experts)
        start = start._replace(expert_intercepts=zeros, gate_intercepts=zeros)

    model = moe_regression
    if fix_experts:
        model = handlers.condition(moe_regression, {"experts": jnp.asarray(start.experts, x.dtype)})
    model_kwargs = dict(num_experts=num_experts, link=link, intercepts=intercepts, **model_kwargs)
    chain_key, run_key, predictive_key = jax.random.split(key, 3)
    init_params = chain_init_params(
        model, start, num_chains=num_chains, key=chain_key, jitter=jitter, model_args=(x, y),
        model_kwargs=model_kwargs,
    )
    if num_chains == 1:  # MCMC takes a single chain's start without the chain axis
        init_params = jax.tree_util.tree_map(lambda value: value[0], init_params)
    mass_options = {"dense_mass": mass_matrix != "diagonal"}
    if mass_matrix == "laplace":
        inverse_mass = laplace_inverse_mass_matrix(model, start, model_args=(x, y), model_kwargs=model_kwargs)
        if inverse_mass is None:
            warnings.warn(
                "mass_matrix: the potential's Hessian at init is not positive definite (init is not "
                "a posterior mode: start from an EM or MAP fit); adapting a dense mass matrix instead",
                ReliabilityWarning,
                stacklevel=2,
            )
        else:
            mass_options.update(inverse_mass_matrix=_desynchronised(inverse_mass), adapt_mass_matrix=False)
    kernel = NUTS(model, init_strategy=init_to_estimate(start), **mass_options)
    mcmc = MCMC(
        kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
        chain_method=chain_method or _chain_method(num_chains), progress_bar=progress_bar,
    )
    mcmc.run(run_key, x, y, init_params=init_params, extra_fields=("diverging",), **model_kwargs)

    samples = {name: np.asarray(value) for name, value in mcmc.get_samples(group_by_chain=True).items()}
    permutations = np.broadcast_to(np.arange(num_experts), (num_chains, num_samples, num_experts))
    if fix_experts:
        samples["experts"] = np.broadcast_to(
            np.asarray(start.experts), (num_chains, num_samples, *np.shape(start.experts))
        ).copy()
    elif relabel:
        samples, permutations = relabel_draws(samples, start)

    flat = {name: jnp.asarray(value.reshape(-1, *value.shape[2:])) for name, value in samples.items()}
    # The likelihood and the predictive are label-invariant: relabelled draws give the same.
    pointwise = log_likelihood(moe_regression, flat, x, y, **model_kwargs)["y"]
    predictive = Predictive(moe_regression, posterior_samples=flat, return_sites=["y"])(
        predictive_key, x, **model_kwargs
    )
    shape = (num_chains, num_samples)
    diverging = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"])
    posterior = {name: value for name, value in samples.items() if not (fix_experts and name == "experts")}
    groups = {
        "posterior": posterior,
        "posterior_predictive": {"y": np.asarray(predictive["y"]).reshape(*shape, -1)},
        "log_likelihood": {"y": np.asarray(pointwise).reshape(*shape, -1)},
        "sample_stats": {"diverging": diverging},
        "observed_data": {"y": np.asarray(y)},
        "constant_data": {"x": np.asarray(x)},
    }
    if fix_experts:
        groups["constant_data"]["experts"] = np.asarray(start.experts)
    coords = {
        "expert": np.arange(num_experts),
        "gate": np.arange(num_experts - 1),
        "feature": np.arange(x.shape[1]),
        "obs": np.arange(x.shape[0]),
    }
    datatree = az.from_dict(groups, dims=DIMS, coords=coords)
    datatree.attrs["link"] = link.name
    datatree.attrs["fix_experts"] = int(fix_experts)
    datatree.attrs["intercepts"] = int(intercepts)

    max_rhat = diagnostic_extreme(az.rhat(datatree), max) if num_chains > 1 else float("nan")
    divergences = int(diverging.sum())
    # A NaN r_hat (chains that never moved) fails the check too.
    if (num_chains > 1 and not max_rhat <= RHAT_LIMIT) or divergences:
        warnings.warn(
            f"NUTS: max r_hat {max_rhat:.3f} (limit {RHAT_LIMIT}) and {divergences} divergent transitions; "
            "the chains may not agree: run longer, check the start, or inspect az.plot_trace",
            ReliabilityWarning,
            stacklevel=2,
        )
    return NutsResult(mcmc, datatree, np.asarray(permutations))


def diagnostic_extreme(result, reduce=max) -> float:
    """Max (or min, with ``reduce=min``) over all variables of an ArviZ diagnostic's DataTree.

    NaN if any entry is NaN (e.g. the r_hat of chains that never moved).
    """
    dataset = result.to_dataset() if hasattr(result, "to_dataset") else result
    values = np.concatenate([np.ravel(np.asarray(value, dtype=float)) for value in dataset.data_vars.values()])
    if np.isnan(values).any():
        return float("nan")
    return float(reduce(values))


def posterior_params(datatree) -> MoEParams:
    """`MoEParams` stacked over all (chain, draw) pairs of a `run_nuts` DataTree."""
    posterior = datatree["posterior"]
    sites = {name: np.asarray(posterior[name]) for name in posterior.data_vars}
    if "experts" not in sites:
        experts = np.asarray(datatree["constant_data"]["experts"])
        sites["experts"] = np.broadcast_to(experts, (*sites["noise"].shape, *experts.shape))
    sites = {name: value.reshape(-1, *value.shape[2:]) for name, value in sites.items()}
    return jax.vmap(sites_to_params)({name: jnp.asarray(value) for name, value in sites.items()})


class Prediction(NamedTuple):
    """Posterior predictions at new inputs (n_new points).

    ``mean`` (n,) posterior mean of E[y | x]; ``lower``/``upper`` (n,) the central interval of
    posterior predictive draws of y; ``gate_probabilities`` (n, k) posterior mean of P(z | x).
    """

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gate_probabilities: np.ndarray


def predict(datatree, x_new, *, key: jax.Array, interval: float = 0.9, link: str | Link | None = None) -> Prediction:
    """Posterior predictive mean and interval of y, and gate probabilities, at new inputs.

    Parameters
    ----------
    datatree
        The DataTree of `run_nuts`.
    x_new
        (n_new, d) inputs, in the units the model was fitted in.
    key
        PRNG key for the predictive draws of y.
    interval
        Probability of the central predictive interval.
    link
        Defaults to the link recorded in the DataTree.
    """
    key = check_key(key)
    x_new = check_design(x_new, "x_new")
    if not 0 < interval < 1:
        raise ValueError(f"interval: expected a probability in (0, 1), got {interval}")
    if not hasattr(datatree, "children") or "posterior" not in datatree.children:
        raise TypeError(
            f"datatree: expected the DataTree of run_nuts (with a posterior group), got {type(datatree).__name__}"
        )
    link = resolve_link(link or datatree.attrs.get("link", "linear"))
    draws = posterior_params(datatree)
    if x_new.shape[1] != draws.experts.shape[-1]:
        raise ValueError(f"x_new: expected {draws.experts.shape[-1]} columns, got {x_new.shape[1]}")

    def one(params, draw_key):
        choice_key, noise_key = jax.random.split(draw_key)
        probabilities = gate_probabilities(params, x_new)
        expert = jax.random.categorical(choice_key, jnp.log(probabilities), axis=-1)
        expert_mean = jnp.take_along_axis(expert_means(params, x_new, link), expert[:, None], axis=1)[:, 0]
        y_draw = expert_mean + params.noise * jax.random.normal(noise_key, expert_mean.shape)
        return probabilities, predictive_mean(params, x_new, link), y_draw

    keys = jax.random.split(key, draws.experts.shape[0])
    probabilities, means, y_draws = jax.vmap(one)(draws, keys)
    tail = (1 - interval) / 2
    y_draws = np.asarray(y_draws)
    return Prediction(
        mean=np.asarray(means.mean(0)),
        lower=np.quantile(y_draws, tail, axis=0),
        upper=np.quantile(y_draws, 1 - tail, axis=0),
        gate_probabilities=np.asarray(probabilities.mean(0)),
    )


PARETO_K_LIMIT = 0.7


def loo(datatree, **kwargs):
    """PSIS-LOO of a `run_nuts` DataTree (``arviz.loo`` with pointwise values).

    Warns (`ReliabilityWarning`) when any Pareto k exceeds 0.7: those points' leave-one-out
    estimates, and so the elpd, cannot be trusted.
    """
    import arviz as az

    result = az.loo(datatree, pointwise=True, **kwargs)
    pareto_k = np.asarray(result.pareto_k)
    bad = int((pareto_k > PARETO_K_LIMIT).sum())
    if bad:
        warnings.warn(
            f"LOO: {bad} of {pareto_k.size} points have Pareto k > {PARETO_K_LIMIT} (max {pareto_k.max():.2f}); "
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
    candidates=(2, 3, 4),
    key: jax.Array,
    link: str | Link = "linear",
    num_restarts: int = 4,
    **nuts_kwargs,
) -> ComparisonResult:
    """Fit each number of experts (`fit_moe`, then `run_nuts` from it) and rank them by PSIS-LOO.

    ``nuts_kwargs`` go to `run_nuts` (chains, draws, intercepts, ...).
    """
    import arviz as az

    from numpyro_moe._pipeline import fit_moe

    key = check_key(key)
    candidates = [check_positive_int(k, "candidates") for k in candidates]
    if len(set(candidates)) < 2:
        raise ValueError(f"candidates: expected at least two distinct numbers of experts, got {candidates}")
    trees = {}
    for k, candidate_key in zip(candidates, jax.random.split(key, len(candidates)), strict=True):
        fit_key, nuts_key = jax.random.split(candidate_key)
        fit = fit_moe(x, y, num_experts=k, key=fit_key, link=link, num_restarts=num_restarts,
                      intercepts=nuts_kwargs.get("intercepts", False))
        trees[f"k={k}"] = run_nuts(x, y, num_experts=k, init=fit, key=nuts_key, link=link, **nuts_kwargs).datatree
    for name, tree in trees.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReliabilityWarning)
            loo(tree)
        for warning in caught:
            warnings.warn(f"{name}: {warning.message}", ReliabilityWarning, stacklevel=2)
    table = az.compare(trees)
    return ComparisonResult(table, int(str(table.index[0]).split("=")[1]), trees)
