"""The Bayesian layer: starts at an estimate (`init_to_params`, `chain_init_params`), the Laplace
metric, relabelling of DataTree draws, `run_nuts`, `to_datatree` for users' own (scoped) models,
`posterior_params`, `predict`, `loo` and `compare_num_experts`.

NUTS compiles dominate the cost, so the NUTS runs are module fixtures shared by many tests and
kept tiny (n=300, d=3, k=2): `run_nuts` from the truth (2 chains x (100 warmup + 100 draws)),
`run_nuts` from a moment estimate with the experts fixed, and a user's scoped model, free and
with its experts conditioned (2 x (50 + 50) and 1 x (30 + 30)). Everything else works on
DataTrees built from those runs, or synthetic ones.
"""

from __future__ import annotations

import itertools
import re
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
import xarray as xr
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta
from numpyro.infer.util import constrain_fn, initialize_model, unconstrain_fn
from scipy.stats import norm

import numpyro_moe as moe
from numpyro_moe._bayes import NutsResult, _desynchronised, _diagnostic_extreme, posterior_mode
from numpyro_moe.simulation import sample_data, simulate, true_params

numpyro.enable_x64()
matplotlib.use("Agg")

N, D, K = 300, 3, 2
CHAINS, WARMUP, DRAWS = 2, 100, 100
FIXED_WARMUP, FIXED_DRAWS = 50, 50
USER_WARMUP, USER_DRAWS = 50, 50
MODEL_KWARGS = {"num_experts": K}
DIMS = {  # named dims of the sites of moe_priors, for synthetic DataTrees
    "experts": ["expert", "feature"],
    "gates": ["gate", "feature"],
    "noise": ["expert"],
    "expert_intercepts": ["expert"],
    "gate_intercepts": ["gate"],
}


@pytest.fixture(scope="module")
def data():
    return simulate(key=jax.random.key(0), num_samples=N, dim=D, num_experts=K)


@pytest.fixture(scope="module")
def fresh(data):
    """A held-out set from the truth, for predictive coverage."""
    return sample_data(data.truth, key=jax.random.key(30), num_samples=2000)


def _recorded(function, *args, **kwargs):
    """``function(*args, **kwargs)`` and the warnings it raised (recorded: tiny runs often warn)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(*args, **kwargs)
    return result, caught


def _reliability(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, moe.ReliabilityWarning)]


@pytest.fixture(scope="module")
def nuts_run(data):
    """`run_nuts` started at the truth: the run most tests read, with the warnings it raised. Its
    metric stays the Laplace one (``"laplace-fixed"``: the default would warm up again, adapting
    it, since two chains of 100 draws disagree; see the tests of that below)."""
    x, y, truth = data
    return _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(1), num_chains=CHAINS, num_warmup=WARMUP,
                     num_samples=DRAWS, mass_matrix="laplace-fixed")


@pytest.fixture(scope="module")
def nuts(nuts_run):
    return nuts_run[0]


@pytest.fixture(scope="module")
def estimate(data):
    """The moment estimate of the experts (its labels are the truth's swapped, as it happens)."""
    x, y, _ = data
    result, caught = _recorded(moe.estimate_experts, x, y, num_experts=K, key=jax.random.key(2))
    assert not _reliability(caught)
    return result


@pytest.fixture(scope="module")
def fixed_run(data, estimate):
    """`run_nuts` from the moment estimate with its experts fixed (the gate and noise sampled)."""
    x, y, _ = data
    return _recorded(moe.run_nuts, x, y, estimate, key=jax.random.key(41), fix=("experts",),
                     num_chains=CHAINS, num_warmup=FIXED_WARMUP, num_samples=FIXED_DRAWS,
                     chain_method="sequential")


def _trace_at_start(model, strategy, *args, **kwargs):
    """Site values of one model run with every latent site set by the init strategy."""
    substituted = handlers.substitute(handlers.seed(model, 0), substitute_fn=strategy)
    trace = handlers.trace(substituted).get_trace(*args, **kwargs)
    return {name: site["value"] for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"]}


def _shifted(params):
    """The same model with a non-zero last gate row (softmax is shift-invariant)."""
    return params.replace(gates=params.gates + jnp.array([0.3, -1.0, 2.0]))


def _label_matched(params, reference):
    """``params`` relabelled (by brute force over the k! orders) to be closest to ``reference``."""
    orders = list(itertools.permutations(range(params.num_experts)))
    costs = [float(jnp.sum((params.experts[np.array(order)] - reference.experts) ** 2)) for order in orders]
    return params.permute(np.array(orders[int(np.argmin(costs))]))


# ---------------------------------------------------------------------------------------------
# A user's own model: the package's priors under handlers.scope(prefix="a"), a site of the user's
# own (a hierarchical prior scale for the experts) and the MixtureOfExperts likelihood.


def user_model(x, y=None):
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    params = handlers.scope(moe.moe_priors, prefix="a")(
        K, x.shape[1], shared_noise=False, priors={"experts": dist.Normal(0.0, scale)}
    )
    with numpyro.plate("obs", x.shape[0]):
        numpyro.sample("y", moe.MixtureOfExperts.from_params(params, x), obs=y)


USER_SIZE = K * D + (K - 1) * D + K + 1  # unconstrained coordinates: a/experts, a/gates, a/noise, scale


@pytest.fixture(scope="module")
def user_fit(data):
    """EM with one noise per expert, from the truth: the user model's start and reference."""
    x, y, truth = data
    fit = moe.fit_em(x, y, truth, shared_noise=False)
    assert fit.converged
    return fit


@pytest.fixture(scope="module")
def user_mcmc(data, user_fit):
    """NUTS on the user model, started by init_to_params at the fit."""
    x, y, _ = data
    kernel = NUTS(user_model, init_strategy=moe.init_to_params(params=user_fit, prefix="a"))
    mcmc = MCMC(kernel, num_warmup=USER_WARMUP, num_samples=USER_DRAWS, num_chains=CHAINS,
                chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.key(8), x, y)
    return mcmc


@pytest.fixture(scope="module")
def user_tree(user_mcmc, user_fit):
    return moe.to_datatree(user_mcmc, reference=user_fit, prefix="a")


@pytest.fixture(scope="module")
def user_fixed_tree(data, user_fit):
    """The user model with its experts conditioned on the fit's (one chain, a few draws)."""
    x, y, _ = data
    fixed = {"a/experts": moe.params_to_sites(user_fit, prefix="a", shared_noise=False)["a/experts"]}
    conditioned = handlers.condition(user_model, fixed)
    kernel = NUTS(conditioned, init_strategy=moe.init_to_params(params=user_fit, prefix="a"))
    mcmc = MCMC(kernel, num_warmup=30, num_samples=30, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.key(9), x, y)
    return moe.to_datatree(mcmc, reference=user_fit, prefix="a")


# ---------------------------------------------------------------------------------------------
# init_to_params


def test_init_to_params_starts_every_site_at_the_params(data):
    x, y, truth = data
    start = _shifted(truth).replace(noise=jnp.array([0.2, 0.3]))
    values = _trace_at_start(moe.moe_regression, moe.init_to_params(params=start), x, y, **MODEL_KWARGS)
    assert set(values) == {"experts", "gates", "noise"}
    np.testing.assert_array_equal(values["experts"], truth.experts)
    # The shifted gates come back normalised to the model's form (last row zero, dropped).
    np.testing.assert_allclose(values["gates"], truth.gates[:-1], rtol=0, atol=1e-15)
    # A per-expert noise site (the default) starts at each noise; a shared one at their mean.
    np.testing.assert_array_equal(values["noise"], [0.2, 0.3])
    values = _trace_at_start(moe.moe_regression, moe.init_to_params(params=start), x, y, **MODEL_KWARGS,
                             shared_noise=True)
    assert float(values["noise"]) == pytest.approx(0.25, abs=1e-15)


def test_init_to_params_is_where_nuts_initialises(data):
    x, y, truth = data
    info = initialize_model(jax.random.key(5), moe.moe_regression,
                            init_strategy=moe.init_to_params(params=truth), model_args=(x, y),
                            model_kwargs=MODEL_KWARGS)
    # NUTS works in unconstrained space: log(noise) for the positive noise site.
    np.testing.assert_allclose(info.param_info.z["noise"], np.log(truth.noise), rtol=1e-12)
    constrained = constrain_fn(moe.moe_regression, (x, y), MODEL_KWARGS, info.param_info.z)
    for name, value in moe.params_to_sites(truth).items():
        np.testing.assert_allclose(constrained[name], value, rtol=1e-12, atol=1e-15)


def test_init_to_params_is_where_svi_starts(data):
    x, y, truth = data
    guide = AutoDelta(moe.moe_regression, init_loc_fn=moe.init_to_params(params=truth))
    svi = SVI(moe.moe_regression, guide, optax.adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.key(6), x, y, **MODEL_KWARGS)
    median = guide.median(svi.get_params(state))
    for name, value in moe.params_to_sites(truth).items():
        np.testing.assert_allclose(median[name], value, rtol=1e-12, atol=1e-15)


def test_init_to_params_accepts_an_estimate_and_fit_results(data, estimate):
    x, y, truth = data
    values = _trace_at_start(moe.moe_regression, moe.init_to_params(params=estimate), x, y, **MODEL_KWARGS)
    np.testing.assert_array_equal(values["experts"], estimate.experts)
    np.testing.assert_array_equal(values["gates"], np.zeros((K - 1, D)))  # an estimate has a uniform gate
    np.testing.assert_allclose(values["noise"], np.broadcast_to(estimate.noise, (K,)), rtol=1e-15)

    other = truth.replace(experts=truth.experts[::-1], noise=jnp.array([0.3, 0.3]))
    fit = moe.Fit(params=other, log_likelihood=0.0, history=np.zeros(1), iterations=1, converged=True,
                  method="em")
    values = _trace_at_start(moe.moe_regression, moe.init_to_params(params=fit), x, y, **MODEL_KWARGS)
    np.testing.assert_array_equal(values["experts"], other.experts)
    np.testing.assert_allclose(values["noise"], [0.3, 0.3], rtol=1e-15)


def test_init_to_params_leaves_conditioned_sites_to_the_model_and_other_sites_to_uniform(data, user_fit):
    x, y, truth = data
    # Under condition, the conditioned site is the one given, not the start.
    conditioned = handlers.condition(moe.moe_regression, {"experts": 2 * truth.experts})
    values = _trace_at_start(conditioned, moe.init_to_params(params=truth), x, y, **MODEL_KWARGS)
    assert set(values) == {"gates", "noise"}
    np.testing.assert_array_equal(values["gates"], truth.gates[:-1])
    # In the user's model the scoped sites start at the fit; the user's own site "scale" falls back
    # to init_to_uniform (uniform in (-2, 2) in unconstrained space: log scale), unless given.
    values = _trace_at_start(user_model, moe.init_to_params(params=user_fit, prefix="a"), x, y)
    assert set(values) == {"scale", "a/experts", "a/gates", "a/noise"}
    for name, value in moe.params_to_sites(user_fit, prefix="a", shared_noise=False).items():
        np.testing.assert_array_equal(values[name], value)
    assert np.exp(-2) < float(values["scale"]) < np.exp(2)
    strategy = moe.init_to_params(params=user_fit, prefix="a", values={"scale": 0.7})
    values = _trace_at_start(user_model, strategy, x, y)
    assert float(values["scale"]) == 0.7
    # Without the prefix no site matches: every site is left to init_to_uniform.
    values = _trace_at_start(user_model, moe.init_to_params(params=user_fit), x, y)
    assert not np.allclose(values["a/experts"], user_fit.params.experts, atol=1e-3)
    assert np.all(np.abs(values["a/experts"]) < 2)


def test_init_to_params_rejects_other_types():
    with pytest.raises(TypeError, match=r"^params: .*got str"):
        moe.init_to_params(params="truth")


# ---------------------------------------------------------------------------------------------
# chain_init_params


def test_chain_init_params_are_unconstrained_with_a_chain_axis(data):
    x, y, truth = data
    init = moe.chain_init_params(moe.moe_regression, truth, num_chains=3, key=jax.random.key(3), jitter=1e-8,
                                 model_args=(x, y), model_kwargs=MODEL_KWARGS)
    assert {name: value.shape for name, value in init.items()} == {
        "experts": (3, K, D), "gates": (3, K - 1, D), "noise": (3, K)}
    # The positive noise lives on the log scale in NUTS' space.
    np.testing.assert_allclose(init["noise"], np.log(0.1), atol=1e-7)
    sites = moe.params_to_sites(truth)
    expected = unconstrain_fn(moe.moe_regression, (x, y), MODEL_KWARGS, sites)
    for chain in range(3):
        one = {name: value[chain] for name, value in init.items()}
        for name in expected:
            np.testing.assert_allclose(one[name], expected[name], atol=1e-7)
        back = constrain_fn(moe.moe_regression, (x, y), MODEL_KWARGS, one)
        for name, value in sites.items():
            np.testing.assert_allclose(back[name], value, atol=1e-7)
    # The jitter is independent per chain: no two chains start at one point.
    assert not np.array_equal(init["experts"][0], init["experts"][1])


def test_chain_init_params_spread_matches_the_jitter(data):
    x, y, truth = data
    chains, jitter = 4000, 0.05
    init = moe.chain_init_params(moe.moe_regression, truth, num_chains=chains, key=jax.random.key(4),
                                 jitter=jitter, model_args=(x, y), model_kwargs=MODEL_KWARGS)
    centre = unconstrain_fn(moe.moe_regression, (x, y), MODEL_KWARGS, moe.params_to_sites(truth))
    flat = np.concatenate([np.asarray(init[name]).reshape(chains, -1) for name in sorted(init)], axis=1)
    mean = np.concatenate([np.asarray(centre[name]).reshape(-1) for name in sorted(init)])
    assert flat.shape == (chains, K * D + (K - 1) * D + K)
    # The sample sd of 4000 normals has relative SE 1/sqrt(2*4000) = 1.1%; 5% is > 4 SE.
    np.testing.assert_allclose(flat.std(axis=0), jitter, rtol=0.05)
    # The chain mean has SE jitter/sqrt(4000) = 8e-4; 4e-3 is 5 SE.
    np.testing.assert_allclose(flat.mean(axis=0), mean, atol=4e-3)
    # Coordinates are jittered independently (no key reused across sites): |corr| SE is 1/sqrt(4000).
    correlation = np.corrcoef(flat, rowvar=False)
    off_diagonal = correlation[~np.eye(flat.shape[1], dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < 5 / np.sqrt(chains)


def test_chain_init_params_are_reproducible(data):
    x, y, truth = data
    common = {"num_chains": 2, "jitter": 0.1, "model_args": (x, y), "model_kwargs": MODEL_KWARGS}
    first = moe.chain_init_params(moe.moe_regression, truth, key=jax.random.key(11), **common)
    again = moe.chain_init_params(moe.moe_regression, truth, key=jax.random.key(11), **common)
    other = moe.chain_init_params(moe.moe_regression, truth, key=jax.random.key(12), **common)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.allclose(first[name], other[name])


def test_chain_init_params_drop_conditioned_sites(data):
    x, y, truth = data
    model = handlers.condition(moe.moe_regression, {"experts": truth.experts})
    init = moe.chain_init_params(model, truth, num_chains=2, key=jax.random.key(3), jitter=1e-8,
                                 model_args=(x, y), model_kwargs=MODEL_KWARGS)
    assert set(init) == {"gates", "noise"}
    np.testing.assert_allclose(init["gates"], np.broadcast_to(truth.gates[:-1], (2, K - 1, D)), atol=1e-7)


def test_chain_init_params_with_intercepts(data):
    x, y, truth = data
    start = truth.replace(expert_intercepts=jnp.array([0.5, -0.5]), gate_intercepts=jnp.array([1.5, 0.5]))
    init = moe.chain_init_params(moe.moe_regression, start, num_chains=2, key=jax.random.key(3), jitter=1e-8,
                                 model_args=(x, y), model_kwargs={**MODEL_KWARGS, "intercepts": True})
    assert init["expert_intercepts"].shape == (2, K) and init["gate_intercepts"].shape == (2, K - 1)
    np.testing.assert_allclose(init["expert_intercepts"][1], [0.5, -0.5], atol=1e-7)
    np.testing.assert_allclose(init["gate_intercepts"][1], [1.0], atol=1e-7)  # normalised: 1.5 - 0.5


def test_chain_init_params_in_a_scoped_user_model(data, user_fit):
    x, y, _ = data
    init = moe.chain_init_params(user_model, user_fit, num_chains=3, key=jax.random.key(13), jitter=1e-8,
                                 prefix="a", model_args=(x, y))
    assert {name: value.shape for name, value in init.items()} == {
        "a/experts": (3, K, D), "a/gates": (3, K - 1, D), "a/noise": (3, K), "scale": (3,)}
    sites = moe.params_to_sites(user_fit, prefix="a", shared_noise=False)
    for chain in range(3):
        back = constrain_fn(user_model, (x, y), {}, {name: value[chain] for name, value in init.items()})
        for name, value in sites.items():
            np.testing.assert_allclose(back[name], value, rtol=1e-6, atol=1e-7)
        # The user's own site starts by init_to_uniform: log scale in (-2, 2).
        assert np.exp(-2) < float(back["scale"]) < np.exp(2)
    # Per-expert noise on the log scale, one value per expert (the fit's, not their mean).
    np.testing.assert_allclose(init["a/noise"][0], np.log(user_fit.params.noise), atol=1e-7)
    assert abs(float(user_fit.params.noise[0] - user_fit.params.noise[1])) > 1e-4


def test_chain_init_params_errors(data):
    x, y, truth = data
    common = {"model_args": (x, y), "model_kwargs": MODEL_KWARGS}
    with pytest.raises(ValueError, match="^num_chains: "):
        moe.chain_init_params(moe.moe_regression, truth, num_chains=0, key=jax.random.key(0), **common)
    with pytest.raises(ValueError, match="^jitter: "):
        moe.chain_init_params(moe.moe_regression, truth, num_chains=2, key=jax.random.key(0), jitter=0.0,
                              **common)
    with pytest.raises(TypeError, match="^key: "):
        moe.chain_init_params(moe.moe_regression, truth, num_chains=2, key=0, **common)
    with pytest.raises(TypeError, match="^init: "):
        moe.chain_init_params(moe.moe_regression, truth.experts, num_chains=2, key=jax.random.key(0),
                              **common)


# ---------------------------------------------------------------------------------------------
# laplace_inverse_mass_matrix


def _gaussian_model(y=None):
    mean = numpyro.sample("mean", dist.Normal(0.0, 2.0))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mean, scale), obs=y)


def test_laplace_inverse_mass_matrix_is_the_inverse_hessian():
    y = jnp.asarray(np.random.default_rng(3).normal(1.0, 0.5, size=50))
    start = {"mean": float(np.mean(y)) + 0.1, "scale": float(np.std(y))}  # off the mode: h_mu != 0
    inverse = np.asarray(moe.laplace_inverse_mass_matrix(_gaussian_model, start, model_args=(y,)))
    # Independently: the Hessian in unconstrained (mean, log scale) coordinates, by hand. The
    # potential is -log N(mean | 0, 2) - log LogNormal(scale | 0, 1) - log|d scale/d u| - sum log N(y).
    n, s = len(y), start["scale"]
    r = np.asarray(y) - start["mean"]
    h_mm = 1 / 4 + n / s**2
    h_mu = 2 * np.sum(r) / s**2
    h_uu = 1.0 + 2 * np.sum(r**2) / s**2  # LogNormal prior in u = log s: u^2/2 + const
    expected = np.linalg.inv(np.array([[h_mm, h_mu], [h_mu, h_uu]]))
    np.testing.assert_allclose(inverse, expected, rtol=1e-8)


def test_laplace_inverse_mass_matrix_is_none_away_from_a_mode(data, user_fit):
    x, y, truth = data
    # Experts at zero and gates far out: not a mode, the Hessian is indefinite.
    far = truth.replace(experts=jnp.zeros_like(truth.experts), gates=5 * jnp.ones_like(truth.gates))
    assert moe.laplace_inverse_mass_matrix(
        moe.moe_regression, far, model_args=(x, y), model_kwargs=MODEL_KWARGS
    ) is None
    # posterior_mode(near_a_mode=True), run_nuts' check, returns such a start as it is, with no metric.
    kept, none = posterior_mode(moe.moe_regression, far, model_args=(x, y), model_kwargs=MODEL_KWARGS,
                                near_a_mode=True)
    assert none is None
    np.testing.assert_array_equal(np.asarray(kept["experts"]), np.zeros_like(np.asarray(truth.experts)))
    # At an EM fit (near the mode) it is the positive definite inverse Hessian.
    inverse = np.asarray(moe.laplace_inverse_mass_matrix(moe.moe_regression, user_fit, model_args=(x, y),
                                                         model_kwargs=MODEL_KWARGS))
    size = K * D + (K - 1) * D + K
    assert inverse.shape == (size, size) and np.all(np.linalg.eigvalsh(inverse) > 0)


# ---------------------------------------------------------------------------------------------
# posterior_mode


def test_posterior_mode_reaches_the_mode_and_its_laplace_metric():
    from scipy.optimize import minimize

    y = jnp.asarray(np.random.default_rng(3).normal(1.0, 0.5, size=50))
    far = {"mean": -1.0, "scale": 3.0}  # far from the mode: the first Newton steps are damped
    mode, inverse = posterior_mode(_gaussian_model, far, model_args=(y,))
    # Independently: the potential in (mean, u = log scale), minimised by scipy.
    n, values = len(y), np.asarray(y)

    def potential(point):
        mean, u = point
        return mean**2 / 8 + u**2 / 2 + n * u + np.sum((values - mean) ** 2) / (2 * np.exp(2 * u))

    expected = minimize(potential, np.array([0.0, 0.0]), method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose([float(mode["mean"]), np.log(float(mode["scale"]))], expected, atol=1e-6)
    # The metric is the inverse Hessian at the mode it reached.
    np.testing.assert_allclose(
        np.asarray(inverse),
        np.asarray(moe.laplace_inverse_mass_matrix(_gaussian_model, mode, model_args=(y,))),
        rtol=1e-8,
    )


def test_posterior_mode_finishes_an_em_fit_stopped_short(data):
    from numpyro.infer.util import potential_energy

    x, y, _ = data
    kwargs = {**MODEL_KWARGS, "intercepts": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EM's own warning that it stopped before converging
        short = moe.fit_moe(x, y, num_experts=K, key=jax.random.key(1), intercepts=True, max_iterations=3)
    assert not short.converged

    def gradient_and_value(values):
        unconstrained = unconstrain_fn(moe.moe_regression, (x, y), kwargs, values)
        value, gradient = jax.value_and_grad(
            lambda point: potential_energy(moe.moe_regression, (x, y), kwargs, point)
        )(unconstrained)
        return float(value), np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(gradient)])

    start = {name: site for name, site in moe.params_to_sites(short.params).items()}
    mode, inverse = posterior_mode(moe.moe_regression, short, model_args=(x, y), model_kwargs=kwargs)
    start_value, start_gradient = gradient_and_value(start)
    value, gradient = gradient_and_value(mode)
    assert inverse is not None and np.all(np.linalg.eigvalsh(np.asarray(inverse)) > 0)
    assert value < start_value and np.max(np.abs(start_gradient)) > 1.0
    # At the mode the gradient vanishes (to the Newton decrement's 1e-9 in the potential's units).
    assert np.max(np.abs(gradient)) < 1e-3


def _unconstrained_draws(samples: dict, names) -> np.ndarray:
    """(draws, D) posterior draws in NUTS' coordinates (noise and scale on the log scale), the
    sites flattened in sorted-name order as the Laplace matrix is."""
    columns = []
    for name in sorted(names):
        value = np.asarray(samples[name])
        value = np.log(value) if name.split("/")[-1] in ("noise", "scale") else value
        columns.append(value.reshape(value.shape[0], -1))
    return np.concatenate(columns, axis=1)


def test_laplace_inverse_mass_matrix_in_a_scoped_user_model(data, user_fit, user_mcmc):
    x, y, _ = data
    inverse = np.asarray(moe.laplace_inverse_mass_matrix(user_model, user_fit, prefix="a", model_args=(x, y)))
    assert inverse.shape == (USER_SIZE, USER_SIZE)
    np.testing.assert_allclose(inverse, inverse.T, rtol=0, atol=1e-14 * np.abs(inverse).max())
    assert np.all(np.linalg.eigvalsh(inverse) > 0)
    # It is the covariance of the Laplace approximation at the fit, so for the sites the data
    # pin down (n=300: a near-Gaussian posterior) its diagonal is the posterior's variance. The
    # sd ratio of 100 NUTS draws (ESS ~100) has SE ~1/sqrt(2 * 100) = 7%; [0.6, 1.6] is > 5 SE.
    # This also checks the order (a/experts, a/gates, a/noise, scale): misplaced blocks differ by
    # orders of magnitude (sd ~0.01 for the experts, ~0.2 for the gates).
    draws = _unconstrained_draws(user_mcmc.get_samples(), ["a/experts", "a/gates", "a/noise", "scale"])
    moe_coordinates = slice(0, USER_SIZE - 1)  # the scale starts by init_to_uniform: not at its mode
    ratio = draws.std(axis=0)[moe_coordinates] / np.sqrt(np.diag(inverse))[moe_coordinates]
    assert np.all((0.6 < ratio) & (ratio < 1.6)), ratio


# ---------------------------------------------------------------------------------------------
# relabel


def _synthetic_tree(posterior: dict, sample_stats: dict | None = None):
    groups = {"posterior": posterior}
    if sample_stats is not None:
        groups["sample_stats"] = sample_stats
    dims = {name: value for name, value in DIMS.items() if name in posterior}
    dims.update({f"{block}.{name}": value for name, value in DIMS.items()
                 for block in ("g1", "g2") if f"{block}.{name}" in posterior})
    return az.from_dict(groups, dims=dims)


@pytest.fixture(scope="module")
def permuted_tree():
    """A DataTree whose draws are random relabellings of one reference (k=3, d=4, per-expert
    noise, intercepts, and a variable of the user's own without expert dims)."""
    reference = true_params(key=jax.random.key(20), dim=4, num_experts=3, gating="correlated",
                            noise=jnp.array([0.1, 0.2, 0.3]))
    reference = reference.replace(expert_intercepts=jnp.array([0.3, -0.2, 0.7]),
                                  gate_intercepts=jnp.array([0.5, -1.0, 0.0]))
    rng = np.random.default_rng(21)
    chains, draws = 3, 8
    applied = np.array([[rng.permutation(3) for _ in range(draws)] for _ in range(chains)])
    sites = [[moe.params_to_sites(reference.permute(applied[c, d]), shared_noise=False) for d in range(draws)]
             for c in range(chains)]
    posterior = {name: np.stack([np.stack([np.asarray(s[name]) for s in row]) for row in sites])
                 for name in sites[0][0]}
    posterior["tau"] = rng.standard_normal((chains, draws))
    tree = _synthetic_tree(posterior, {"diverging": np.zeros((chains, draws), dtype=bool)})
    return reference, tree, applied


def _undoes(applied, permutations) -> bool:
    """Whether each returned permutation undoes the applied one (applied[perm] is the identity)."""
    return np.array_equal(np.take_along_axis(applied, permutations, axis=-1),
                          np.broadcast_to(np.arange(applied.shape[-1]), applied.shape))


def test_relabel_restores_the_reference_labelling(permuted_tree):
    reference, tree, applied = permuted_tree
    # The fixture does relabel something: most draws are not in the reference order.
    assert (applied != np.arange(3)).any(axis=-1).mean() > 0.5
    original = tree["posterior"].to_dataset().copy(deep=True)
    relabelled, permutations = moe.relabel(tree, reference)
    expected = moe.params_to_sites(reference, shared_noise=False)
    posterior = relabelled["posterior"]
    assert set(posterior.data_vars) == set(expected) | {"tau"}
    for name, value in expected.items():
        assert posterior[name].dims == original[name].dims
        target = np.broadcast_to(np.asarray(value), original[name].shape)
        if name in ("experts", "expert_intercepts", "noise"):
            np.testing.assert_array_equal(posterior[name].values, target)  # a pure permutation
        else:  # gates are re-normalised (a subtraction): equal up to rounding
            np.testing.assert_allclose(posterior[name].values, target, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(posterior["tau"].values, original["tau"].values)
    assert permutations.shape == applied.shape and _undoes(applied, permutations)
    # The permutations are recorded in sample_stats beside what was there.
    stats = relabelled["sample_stats"]
    assert set(stats.data_vars) == {"diverging", "expert_permutation"}
    assert stats["expert_permutation"].dims == ("chain", "draw", "expert")
    np.testing.assert_array_equal(stats["expert_permutation"].values, permutations)
    # The reference may also be given as a bare (k, d) experts array.
    again, same = moe.relabel(tree, np.asarray(reference.experts))
    np.testing.assert_array_equal(same, permutations)
    assert again["posterior"].identical(relabelled["posterior"])
    # The input tree is not modified.
    assert tree["posterior"].to_dataset().identical(original)
    assert "expert_permutation" not in tree["sample_stats"].data_vars


def test_relabel_keeps_the_likelihood(permuted_tree):
    reference, tree, _ = permuted_tree
    relabelled, _ = moe.relabel(tree, reference)
    x, y = sample_data(reference, key=jax.random.key(22), num_samples=200)
    before, after = (moe.posterior_params(t, link="linear") for t in (tree, relabelled))
    for draw in (0, 11, 23):
        pick = lambda params, i=draw: jax.tree_util.tree_map(lambda leaf: leaf[i], params)  # noqa: E731
        np.testing.assert_allclose(moe.MixtureOfExperts.from_params(pick(after), x).log_prob(y),
                                   moe.MixtureOfExperts.from_params(pick(before), x).log_prob(y), rtol=1e-12)
        # ... and every draw is the reference itself, gates normalised (last row zero).
        np.testing.assert_array_equal(after.gates[draw, -1], 0)
        np.testing.assert_allclose(after.gates[draw], reference.gates, rtol=0, atol=1e-14)


def test_relabel_tolerates_noisy_draws(permuted_tree):
    reference, tree, applied = permuted_tree
    noisy = tree.copy()
    posterior = tree["posterior"].to_dataset()
    noise = 0.05 * np.random.default_rng(23).standard_normal(posterior["experts"].shape)
    noisy["posterior"] = posterior.assign(experts=posterior["experts"] + noise)
    _, permutations = moe.relabel(noisy, reference)
    assert _undoes(applied, permutations)


def test_relabel_tells_experts_of_near_equal_slopes_apart_by_level_and_noise(permuted_tree):
    # Slopes within 0.02 of one another, levels and noise sds distinct (as the High School and
    # Beyond set's k = 4 fit has them): the slopes' noise decides nothing, the level and noise do.
    reference, tree, applied = permuted_tree
    posterior = tree["posterior"].to_dataset()
    rng = np.random.default_rng(24)
    flat = reference.replace(experts=jnp.zeros_like(reference.experts))
    jitter = 0.01 * rng.standard_normal(posterior["experts"].shape)
    flattened = tree.copy()
    flattened["posterior"] = posterior.assign(experts=(posterior["experts"].dims, jitter))
    _, permutations = moe.relabel(flattened, flat)
    assert _undoes(applied, permutations)
    # The level alone, and the noise alone, each suffice.
    for dropped in ("expert_intercepts", "noise"):
        part = flattened.copy()
        part["posterior"] = flattened["posterior"].to_dataset().drop_vars(dropped)
        _, permutations = moe.relabel(part, flat)
        assert _undoes(applied, permutations), dropped
    # A bare slopes array has neither: the assignment is then the jitter's, not the labels'.
    _, permutations = moe.relabel(flattened, np.zeros((3, 4)))
    assert not _undoes(applied, permutations)


def test_relabel_aligns_several_blocks_jointly(permuted_tree):
    reference, tree, applied = permuted_tree
    posterior = tree["posterior"].to_dataset()
    # Two blocks under their own scopes with one labelling per draw: g2 carries the permuted
    # experts; g1's experts are all zero (they cannot tell the labels apart) but its intercepts,
    # distinct per expert, must follow the joint permutation.
    blocks = {
        "g1.experts": np.zeros_like(posterior["experts"].values),
        "g1.expert_intercepts": posterior["expert_intercepts"].values,
        "g2.experts": posterior["experts"].values,
        "g2.gates": posterior["gates"].values,
    }
    joint = _synthetic_tree(blocks)
    references = {"g1.experts": np.zeros((3, 4)), "g2.experts": reference}
    relabelled, permutations = moe.relabel(joint, references)
    assert _undoes(applied, permutations)
    np.testing.assert_array_equal(relabelled["posterior"]["g1.expert_intercepts"].values,
                                  np.broadcast_to(reference.expert_intercepts, (3, 8, 3)))
    np.testing.assert_array_equal(relabelled["posterior"]["g2.experts"].values,
                                  np.broadcast_to(reference.experts, (3, 8, 3, 4)))
    # With a prefix only that scope's variables move and the record is named under it.
    scoped, permutations = moe.relabel(joint, reference, prefix="g2")
    assert _undoes(applied, permutations)
    np.testing.assert_array_equal(scoped["posterior"]["g1.expert_intercepts"].values,
                                  posterior["expert_intercepts"].values)
    assert set(scoped["sample_stats"].data_vars) == {"g2.expert_permutation"}
    # A dict of references must name every block.
    message = "reference: no reference for the expert blocks ['g1.experts']"
    with pytest.raises(ValueError, match=re.escape(message)):
        moe.relabel(joint, {"g2.experts": reference})


def test_relabel_errors_and_trees_without_experts(permuted_tree, fixed_run):
    reference, tree, _ = permuted_tree
    with pytest.raises(ValueError, match=r"^reference: expected experts of shape \(3, 4\)"):
        moe.relabel(tree, np.zeros((2, 4)))
    with pytest.raises(TypeError, match=r"^reference: "):
        moe.relabel(tree, "truth")
    # No experts in the posterior (fixed experts), or none under the prefix: nothing to do.
    fixed_tree = fixed_run[0].datatree
    same, permutations = moe.relabel(fixed_tree, reference)
    assert permutations is None and same is fixed_tree
    same, permutations = moe.relabel(tree, reference, prefix="b")
    assert permutations is None and same is tree


def test_relabel_undoes_known_permutations_of_nuts_draws(user_tree, user_fit):
    # The user model's draws (scope "a", one noise per expert), with the experts, noises and gates
    # of some draws swapped on purpose: relabel must undo exactly those swaps.
    posterior = user_tree["posterior"].to_dataset()
    swapped = np.zeros((CHAINS, USER_DRAWS), dtype=bool)
    swapped[0, ::3] = True
    swapped[1, 10:] = True
    permuted = posterior.copy(deep=True)
    permuted["a.experts"].values[swapped] = posterior["a.experts"].values[swapped][:, ::-1]
    permuted["a.noise"].values[swapped] = posterior["a.noise"].values[swapped][:, ::-1]
    permuted["a.gates"].values[swapped] = -posterior["a.gates"].values[swapped]  # [g, 0] swapped, normalised
    tree = user_tree.copy()
    tree["posterior"] = permuted
    relabelled, permutations = moe.relabel(tree, user_fit, prefix="a")
    expected = np.where(swapped[..., None], [1, 0], [0, 1])
    np.testing.assert_array_equal(permutations, expected)
    np.testing.assert_array_equal(relabelled["sample_stats"]["a.expert_permutation"].values, expected)
    for name in ("a.experts", "a.gates", "a.noise", "scale"):
        np.testing.assert_allclose(relabelled["posterior"][name].values, posterior[name].values, rtol=0,
                                   atol=1e-15)
    draws = moe.posterior_params(relabelled, prefix="a")
    np.testing.assert_array_equal(draws.gates[:, -1], 0)
    # The swaps were real: the permuted tree's noises differ from the run's in the swapped draws.
    assert not np.allclose(permuted["a.noise"].values[swapped], posterior["a.noise"].values[swapped])


def test_relabelling_a_label_switched_chain_restores_r_hat(data, nuts):
    # The run's chain 1 with its two experts swapped: the same draws under the other labelling,
    # as label switching produces. Raw r_hat sees two modes; relabelled to the truth's labels,
    # the chains are the run's own again.
    raw = nuts.datatree["posterior"].to_dataset()
    switched = raw.copy(deep=True)
    switched["experts"].values[1] = raw["experts"].values[1][:, ::-1]
    switched["noise"].values[1] = raw["noise"].values[1][:, ::-1]  # one noise per expert: swapped too
    switched["gates"].values[1] = -raw["gates"].values[1]  # [g, 0] swapped is [0, g], normalised: [-g]
    tree = nuts.datatree.copy()
    tree["posterior"] = switched
    before = _diagnostic_extreme(az.rhat(tree))
    relabelled, permutations = moe.relabel(tree, data.truth)
    after = _diagnostic_extreme(az.rhat(relabelled))
    # Rank-normalised r_hat of two chains with no overlap saturates near 1.8.
    assert before > 1.5
    np.testing.assert_array_equal(permutations[0], np.broadcast_to([0, 1], (DRAWS, 2)))
    np.testing.assert_array_equal(permutations[1], np.broadcast_to([1, 0], (DRAWS, 2)))
    for name in raw.data_vars:
        np.testing.assert_allclose(relabelled["posterior"][name].values, raw[name].values, rtol=0, atol=1e-15)
    # ... so r_hat is that of the run: near 1 (measured 1.02 with 100 draws per chain, one noise per
    # expert).
    assert after == pytest.approx(_diagnostic_extreme(az.rhat(nuts.datatree)), rel=1e-12)
    assert after < 1.1


# ---------------------------------------------------------------------------------------------
# run_nuts: the DataTree


def test_run_nuts_datatree_groups_and_dims(data, nuts):
    _, y, _ = data
    tree = nuts.datatree
    assert set(tree.children) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                  "observed_data"}
    posterior = tree["posterior"]
    assert set(posterior.data_vars) == {"experts", "gates", "noise"}
    assert posterior["experts"].dims == ("chain", "draw", "expert", "feature")
    assert posterior["experts"].shape == (CHAINS, DRAWS, K, D)
    assert posterior["gates"].dims == ("chain", "draw", "gate", "feature")
    assert posterior["gates"].shape == (CHAINS, DRAWS, K - 1, D)
    assert posterior["noise"].dims == ("chain", "draw", "expert")  # one noise per expert (the default)
    assert posterior["noise"].shape == (CHAINS, DRAWS, K)
    for group in ("posterior_predictive", "log_likelihood"):
        assert set(tree[group].data_vars) == {"y"}
        assert tree[group]["y"].dims == ("chain", "draw", "obs")
        assert tree[group]["y"].shape == (CHAINS, DRAWS, N)
    assert set(tree["sample_stats"].data_vars) == {"diverging", "lp", "n_steps", "tree_depth", "reached_max_tree_depth",
                                                   "acceptance_rate", "expert_permutation"}
    assert tree["sample_stats"]["diverging"].dims == ("chain", "draw")
    assert tree["sample_stats"]["diverging"].dtype == bool
    # lp is the log density NUTS samples (minus its potential energy), draw by draw.
    energy = nuts.mcmc.get_extra_fields(group_by_chain=True)["potential_energy"]
    np.testing.assert_allclose(tree["sample_stats"]["lp"].values, -np.asarray(energy)[:, -DRAWS:])
    acceptance = tree["sample_stats"]["acceptance_rate"].values
    assert acceptance.shape == (CHAINS, DRAWS) and ((acceptance >= 0) & (acceptance <= 1)).all()
    assert tree["sample_stats"]["expert_permutation"].dims == ("chain", "draw", "expert")
    assert tree["observed_data"]["y"].dims == ("obs",)
    np.testing.assert_array_equal(tree["observed_data"]["y"], y)
    assert dict(tree.attrs) == {"moe_link": "linear"}
    assert nuts.mcmc.num_chains == CHAINS
    # One CPU device: the chains run vectorised by default.
    assert jax.local_device_count() == 1 and nuts.mcmc.chain_method == "vectorized"


def test_run_nuts_log_likelihood_and_predictive_match_the_draws(data, nuts):
    x, y, _ = data
    draws = moe.posterior_params(nuts.datatree)
    log_likelihood = nuts.datatree["log_likelihood"]["y"].values.reshape(CHAINS * DRAWS, N)
    for index in (0, DRAWS + 57):
        params = jax.tree_util.tree_map(lambda leaf, i=index: leaf[i], draws)
        expected = moe.MixtureOfExperts.from_params(params, x).log_prob(y)
        np.testing.assert_allclose(log_likelihood[index], expected, rtol=1e-10)
    # Replicated y: the spread of the data (sd(y) is 1.0 here) and not a copy of it.
    replicated = nuts.datatree["posterior_predictive"]["y"].values
    assert replicated.std() == pytest.approx(float(jnp.std(y)), rel=0.1)
    assert not np.allclose(replicated[0, 0], y)


def test_run_nuts_starts_from_the_init_and_keeps_its_labels(nuts):
    # Started at the truth, no draw switches labels, so relabelling is the identity...
    np.testing.assert_array_equal(nuts.datatree["sample_stats"]["expert_permutation"].values,
                                  np.broadcast_to(np.arange(K), (CHAINS, DRAWS, K)))
    raw = nuts.mcmc.get_samples(group_by_chain=True)
    for name in ("experts", "gates", "noise"):
        np.testing.assert_array_equal(nuts.datatree["posterior"][name].values, raw[name])


def test_run_nuts_posterior_is_near_the_truth(data, nuts):
    _, _, truth = data
    posterior = nuts.datatree["posterior"]
    sites = moe.params_to_sites(truth)
    for name in ("experts", "gates", "noise"):
        draws = posterior[name].values
        mean, sd = draws.mean(axis=(0, 1)), draws.std(axis=(0, 1))
        # With n=300 the posterior is near Gaussian around the MLE and covers the truth: each
        # coordinate is within a few posterior sds (4.5 sd: ~1e-5 chance per coordinate).
        # sd is the posterior's own: ~0.01 for the experts, ~0.2 for the gates, ~0.007 for each
        # expert's noise.
        assert np.all(np.abs(mean - np.asarray(sites[name])) < 4.5 * sd), name
        assert np.all(sd < {"experts": 0.05, "gates": 0.5, "noise": 0.02}[name]), name


def test_run_nuts_uses_the_laplace_metric(data, nuts):
    x, y, truth = data
    kwargs = {**MODEL_KWARGS, "link": "linear", "intercepts": False, "shared_noise": False, "priors": None}
    mode, laplace = posterior_mode(moe.moe_regression, truth, model_args=(x, y), model_kwargs=kwargs)
    laplace = np.asarray(laplace)
    np.testing.assert_allclose(
        laplace,
        np.asarray(moe.laplace_inverse_mass_matrix(moe.moe_regression, mode, model_args=(x, y), model_kwargs=kwargs)),
        rtol=1e-8,
    )
    # The kernel's metric is the Laplace covariance at the posterior mode Newton's steps reach from
    # the start, desynchronised, and warmup left it alone (adapt_mass_matrix=False): every chain
    # still has exactly that matrix.
    metric = nuts.mcmc.last_state.adapt_state.inverse_mass_matrix
    assert list(metric) == [("experts", "gates", "noise")]
    expected = np.asarray(_desynchronised(laplace))
    for chain in range(CHAINS):
        np.testing.assert_allclose(metric[("experts", "gates", "noise")][chain], expected, rtol=1e-10,
                                   atol=1e-15)
    # The desynchronised metric keeps the eigenvectors and scales each variance by a factor in [1/2, 2].
    values, vectors = np.linalg.eigh(laplace)
    factors = np.diag(vectors.T @ expected @ vectors) / values
    assert np.all((0.5 <= factors) & (factors <= 2)) and np.ptp(factors) > 0.5
    # The Laplace covariance is the posterior's: the sd ratio over 200 draws (ESS > 100) has SE
    # ~1/sqrt(2 * 100) = 7%, so [0.6, 1.6] is > 5 SE.
    draws = _unconstrained_draws(nuts.mcmc.get_samples(), ["experts", "gates", "noise"])
    ratio = draws.std(axis=0) / np.sqrt(np.diag(laplace))
    assert np.all((0.6 < ratio) & (ratio < 1.6)), ratio


def test_arviz_diagnostics_and_run_nuts_diagnostics(nuts):
    tree = nuts.datatree
    summary = az.summary(tree)
    expected_rows = [f"experts[{i}, {j}]" for i in range(K) for j in range(D)]
    expected_rows += [f"gates[0, {j}]" for j in range(D)] + [f"noise[{i}]" for i in range(K)]
    assert list(summary.index) == expected_rows
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(summary.columns)
    noise_mean = tree["posterior"]["noise"].values.mean(axis=(0, 1))  # one noise per expert
    np.testing.assert_allclose(summary.loc[[f"noise[{i}]" for i in range(K)], "mean"], noise_mean, rtol=1e-3)
    rhat, ess = az.rhat(tree), az.ess(tree, method="bulk")
    assert isinstance(rhat, xr.DataTree) and isinstance(ess, xr.DataTree)
    assert set(rhat.data_vars) == {"experts", "gates", "noise"}
    assert rhat["experts"].dims == ("expert", "feature")
    largest = max(float(value.max()) for value in rhat.data_vars.values())
    smallest_ess = min(float(value.min()) for value in ess.data_vars.values())
    assert _diagnostic_extreme(rhat) == largest
    assert _diagnostic_extreme(ess, min) == smallest_ess
    # run_nuts reports the same numbers.
    assert nuts.diagnostics == {"max_r_hat": largest, "min_ess_bulk": smallest_ess,
                                "divergences": int(tree["sample_stats"]["diverging"].values.sum()), "draws": DRAWS,
                                "burn_in": 0, "metric": "laplace", "target_accept_prob": 0.8,
                                "accept_raised": False,
                                "chain_log_density": list(tree["sample_stats"]["lp"].values.mean(axis=1))}
    # Both chains start at the mode and mix: r_hat is near 1 and ESS is not that of stuck chains
    # (measured: max r_hat 1.02, min bulk ESS ~140 of 200 draws).
    assert 0.99 < largest < 1.2
    assert smallest_ess > 40


def test_run_nuts_warns_when_chains_are_too_short_to_agree(nuts_run):
    # Two chains of 100 draws are too few for r_hat < 1.01, even started at the mode: with this
    # key the max r_hat is 1.024, so the run warns, once, with the number it measured.
    result, caught = nuts_run
    messages = _reliability(caught)
    assert len(messages) == 1
    assert "the chains disagree" in messages[0] and "limit 1.01" in messages[0]
    assert ("diverged" in messages[0]) == bool(result.diagnostics["divergences"])
    largest = _diagnostic_extreme(az.rhat(result.datatree))
    assert largest > 1.01
    assert re.search(r"max r_hat (\d+\.\d+)", messages[0]).group(1) == f"{largest:.3f}"
    # No mass-matrix fallback: the Hessian at the truth is positive definite.
    assert not any("mass_matrix" in message for message in messages)


def test_run_nuts_runs_longer_until_the_chains_agree(data, nuts):
    # The fixture's run (max r_hat 1.024 after 100 draws) continued in rounds of 100 draws from
    # where its chains stopped: its first round is the same draws, and the rounds go on until
    # r_hat <= 1.01 or max_samples.
    x, y, truth = data
    longer, caught = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(1), num_chains=CHAINS,
                               num_warmup=WARMUP, num_samples=DRAWS, max_samples=4 * DRAWS,
                               mass_matrix="laplace-fixed")
    draws = longer.diagnostics["draws"]
    assert draws in (2 * DRAWS, 3 * DRAWS, 4 * DRAWS)
    assert longer.diagnostics["max_r_hat"] <= 1.01 or draws == 4 * DRAWS
    assert longer.diagnostics["max_r_hat"] == _diagnostic_extreme(az.rhat(longer.datatree))
    posterior = longer.datatree["posterior"]
    assert posterior["experts"].shape == (CHAINS, draws, K, D)
    assert longer.datatree["posterior_predictive"]["y"].shape == (CHAINS, draws, N)
    assert longer.datatree["sample_stats"]["diverging"].shape == (CHAINS, draws)
    for name in ("experts", "gates", "noise"):
        np.testing.assert_array_equal(posterior[name].values[:, :DRAWS], nuts.datatree["posterior"][name].values)
        # ...and the later rounds are new draws that carry on (not a restart at the start).
        assert not np.allclose(posterior[name].values[:, DRAWS:2 * DRAWS], posterior[name].values[:, :DRAWS])
    # The last round is the MCMC's own (its state continues the chains).
    np.testing.assert_array_equal(longer.mcmc.get_samples(group_by_chain=True)["noise"],
                                  posterior["noise"].values[:, -DRAWS:])
    # The measured r_hat is what the warning, if any, reports.
    for message in _reliability(caught):
        assert f"max r_hat {longer.diagnostics['max_r_hat']:.3f}" in message


def test_run_nuts_stops_extending_once_r_hat_is_below_the_limit(data, monkeypatch):
    import numpyro_moe._bayes as bayes

    x, y, truth = data
    # Tiny runs diverge often: no second warmup for that here (its own test is below).
    monkeypatch.setattr(bayes, "DIVERGENT_LIMIT", 1.0)
    checks = []

    def agreed_after_two_rounds(datatree):
        checks.append(datatree["posterior"]["noise"].shape[1])
        return 1.0 if len(checks) >= 2 else 1.5

    monkeypatch.setattr(bayes, "_max_r_hat", agreed_after_two_rounds)
    result, _ = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(3), num_chains=CHAINS, num_warmup=20,
                          num_samples=10, max_samples=100, mass_matrix="laplace-fixed")
    # Checked after 10 draws (1.5: go on) and after 20 (1.0: stop); the last call is the report's.
    assert checks == [10, 20, 20] and result.diagnostics["draws"] == 20


def test_run_nuts_drops_the_first_half_when_only_the_second_agrees(data, monkeypatch):
    import numpyro_moe._bayes as bayes

    x, y, truth = data
    # Tiny runs diverge often: no second warmup for that here (its own test is below).
    monkeypatch.setattr(bayes, "DIVERGENT_LIMIT", 1.0)
    checks = []

    def second_half_agrees(datatree):
        # 10 draws: disagree; 20 draws: disagree; their last 10: agree.
        checks.append(datatree["posterior"]["noise"].shape[1])
        return 1.0 if len(checks) >= 3 else 1.5

    monkeypatch.setattr(bayes, "_max_r_hat", second_half_agrees)
    result, caught = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(3), num_chains=CHAINS,
                               num_warmup=20, num_samples=10, max_samples=100, mass_matrix="laplace-fixed")
    # Checked after 10 draws, after 20, then on the last 10 of the 20 (agree: stop), and once more
    # for the report: the first round's draws count as warmup and are not in the result.
    assert checks == [10, 20, 10, 10]
    assert result.diagnostics["draws"] == 10 and result.diagnostics["burn_in"] == 10
    posterior = result.datatree["posterior"]
    assert posterior["noise"].shape[:2] == (CHAINS, 10)
    np.testing.assert_array_equal(result.mcmc.get_samples(group_by_chain=True)["noise"], posterior["noise"].values)
    assert result.datatree["posterior_predictive"]["y"].shape == (CHAINS, 10, N)
    assert result.datatree["sample_stats"]["diverging"].shape == (CHAINS, 10)
    assert not any("the chains disagree" in message for message in _reliability(caught))
    # Where every window disagrees, nothing is dropped: all 100 draws are kept and reported.
    checks.clear()
    monkeypatch.setattr(bayes, "_max_r_hat", lambda datatree: checks.append(1) or 1.5)
    kept, caught = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(3), num_chains=CHAINS,
                             num_warmup=20, num_samples=10, max_samples=40, mass_matrix="laplace-fixed")
    assert kept.diagnostics["draws"] == 40 and kept.diagnostics["burn_in"] == 0
    assert any("the chains disagree" in message for message in _reliability(caught))


def test_run_nuts_warms_up_again_with_smaller_steps_when_many_transitions_diverge(data, monkeypatch):
    import numpyro_moe._bayes as bayes

    x, y, truth = data
    options = dict(key=jax.random.key(3), num_chains=CHAINS, num_warmup=20, num_samples=10, mass_matrix="dense")
    # A limit of -1 makes any first round "too divergent": warmup runs again at 0.95.
    monkeypatch.setattr(bayes, "DIVERGENT_LIMIT", -1.0)
    raised, _ = _recorded(moe.run_nuts, x, y, truth, **options)
    assert raised.diagnostics["target_accept_prob"] == 0.95 and raised.diagnostics["accept_raised"] is True
    assert raised.mcmc.sampler._target_accept_prob == 0.95
    # Asked for 0.95 already: no second warmup, and its draws are not the raised run's (those came
    # from the second warmup, on another key).
    asked, _ = _recorded(moe.run_nuts, x, y, truth, target_accept_prob=0.95, **options)
    assert asked.diagnostics["accept_raised"] is False and asked.diagnostics["target_accept_prob"] == 0.95
    assert not np.array_equal(asked.datatree["posterior"]["noise"].values, raised.datatree["posterior"]["noise"].values)
    # Within the limit (no transition can exceed a share of 1), nothing is run again.
    monkeypatch.setattr(bayes, "DIVERGENT_LIMIT", 1.0)
    kept, _ = _recorded(moe.run_nuts, x, y, truth, **options)
    assert kept.diagnostics["target_accept_prob"] == 0.8 and kept.diagnostics["accept_raised"] is False
    assert kept.mcmc.sampler._target_accept_prob == 0.8


def test_run_nuts_adapts_the_laplace_metric_when_its_chains_disagree(data, monkeypatch):
    import numpyro_moe._bayes as bayes

    x, y, truth = data
    # Tiny runs diverge often: no second warmup for that here (its own test is below).
    monkeypatch.setattr(bayes, "DIVERGENT_LIMIT", 1.0)
    checks = []

    def disagree_once(datatree):
        checks.append(datatree["posterior"]["noise"].shape[1])
        return 1.5 if len(checks) == 1 else 1.0

    monkeypatch.setattr(bayes, "_max_r_hat", disagree_once)
    result, _ = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(3), num_chains=CHAINS, num_warmup=60,
                          num_samples=10, max_samples=100)
    # The first round (r_hat 1.5, and 2 x 10 draws have a bulk ESS far below STUCK_ESS) is dropped;
    # warmup runs again, adapting the metric, and its draws agree (1.0): 10 draws per chain, not
    # 20, checked once more for the report.
    assert checks == [10, 10, 10] and result.diagnostics["draws"] == 10
    assert result.diagnostics["metric"] == "laplace, adapted"
    # The adapted metric began at the Laplace one and moved away from it during warmup.
    kwargs = {**MODEL_KWARGS, "link": "linear", "intercepts": False, "shared_noise": False, "priors": None}
    _, laplace = posterior_mode(moe.moe_regression, truth, model_args=(x, y), model_kwargs=kwargs)
    metric = result.mcmc.last_state.adapt_state.inverse_mass_matrix[("experts", "gates", "noise")]
    for chain in range(CHAINS):
        assert not np.allclose(metric[chain], np.asarray(_desynchronised(laplace)), rtol=1e-3)
    # Where chains that disagree still move (bulk ESS at least STUCK_ESS, here lowered to 0), more
    # draws with the fixed metric come first: no second warmup.
    checks.clear()
    monkeypatch.setattr(bayes, "STUCK_ESS", 0.0)
    extended, _ = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(3), num_chains=CHAINS, num_warmup=20,
                            num_samples=10, max_samples=100)
    assert checks == [10, 20, 20] and extended.diagnostics["metric"] == "laplace"
    # Where the chains agree at once, the metric stays the fixed Laplace one.
    checks.clear()
    monkeypatch.setattr(bayes, "_max_r_hat", lambda datatree: checks.append(1) or 1.0)
    fixed, _ = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(3), num_chains=CHAINS, num_warmup=20,
                         num_samples=10)
    assert fixed.diagnostics["metric"] == "laplace"


def test_run_nuts_max_samples_errors(data):
    x, y, truth = data
    with pytest.raises(ValueError, match=r"^max_samples: expected at least num_samples \(50\) draws per chain, got 20$"):
        moe.run_nuts(x, y, truth, key=jax.random.key(0), num_samples=50, max_samples=20)
    with pytest.raises(ValueError, match=r"^max_samples"):
        moe.run_nuts(x, y, truth, key=jax.random.key(0), max_samples=0)


def test_datatree_round_trips_through_netcdf(nuts, tmp_path):
    path = tmp_path / "posterior.nc"
    nuts.datatree.to_netcdf(path, engine="h5netcdf")
    with xr.open_datatree(path, engine="h5netcdf") as back:
        assert back.identical(nuts.datatree)
        assert back.attrs["moe_link"] == "linear"
        np.testing.assert_array_equal(back["sample_stats"]["expert_permutation"],
                                      nuts.datatree["sample_stats"]["expert_permutation"])


def test_arviz_plots_save_pngs(nuts, tmp_path):
    import matplotlib.pyplot as plt

    paths = {"trace": tmp_path / "trace.png", "ppc": tmp_path / "ppc.png"}
    az.plot_trace(nuts.datatree, backend="matplotlib").savefig(paths["trace"])
    az.plot_ppc_dist(nuts.datatree, backend="matplotlib").savefig(paths["ppc"])
    plt.close("all")
    for path in paths.values():
        content = path.read_bytes()
        assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 5000


# ---------------------------------------------------------------------------------------------
# posterior_params


def test_posterior_params_stacks_the_draws(nuts):
    draws = moe.posterior_params(nuts.datatree)
    assert isinstance(draws, moe.MoEParams) and draws.link.name == "linear"
    assert draws.experts.shape == (CHAINS * DRAWS, K, D)
    assert draws.gates.shape == (CHAINS * DRAWS, K, D)
    assert draws.noise.shape == (CHAINS * DRAWS, K)  # one noise per expert
    assert draws.expert_intercepts is None and draws.gate_intercepts is None
    np.testing.assert_array_equal(draws.gates[:, -1], 0)
    posterior = nuts.datatree["posterior"]
    # Chain-major order: draw d of chain c is row c * DRAWS + d.
    np.testing.assert_array_equal(draws.experts[DRAWS + 7], posterior["experts"].values[1, 7])
    np.testing.assert_array_equal(draws.gates[DRAWS - 1, :-1], posterior["gates"].values[0, -1])
    np.testing.assert_array_equal(draws.noise, posterior["noise"].values.reshape(-1, K))


def test_posterior_params_errors(nuts, user_mcmc):
    with pytest.raises(TypeError, match=r"^datatree: .*got dict"):
        moe.posterior_params({"posterior": {}})
    with pytest.raises(ValueError, match=re.escape("prefix: no 'a.experts' in the DataTree's posterior")):
        moe.posterior_params(nuts.datatree, prefix="a")
    # A tree converted without a reference does not know the link: it must be given.
    bare = moe.to_datatree(user_mcmc, prefix="a", log_likelihood=False)
    assert "a.moe_link" not in bare.attrs and "sample_stats" in bare.children
    assert "a.expert_permutation" not in bare["sample_stats"].data_vars  # no reference: no relabelling
    with pytest.raises(ValueError, match=r"^link: the DataTree does not record the experts' link"):
        moe.posterior_params(bare, prefix="a")
    draws = moe.posterior_params(bare, prefix="a", link="tanh")
    assert draws.link.name == "tanh" and draws.experts.shape == (CHAINS * USER_DRAWS, K, D)


# ---------------------------------------------------------------------------------------------
# fixed experts (run_nuts from the moment estimate)


def test_fix_experts_moves_the_experts_to_constant_data(data, estimate, fixed_run):
    x, y, _ = data
    result, caught = fixed_run
    tree = result.datatree
    assert set(tree.children) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                  "observed_data", "constant_data"}
    assert set(tree["posterior"].data_vars) == {"gates", "noise"}
    assert tree["posterior"]["gates"].dims == ("chain", "draw", "gate", "feature")
    assert tree["posterior"]["gates"].shape == (CHAINS, FIXED_DRAWS, K - 1, D)
    assert set(tree["constant_data"].data_vars) == {"experts"}
    assert tree["constant_data"]["experts"].dims == ("expert", "feature")
    np.testing.assert_array_equal(tree["constant_data"]["experts"], estimate.experts)
    # The fixed experts are not data: neither observed nor in the log-likelihood.
    assert set(tree["observed_data"].data_vars) == {"y"} and set(tree["log_likelihood"].data_vars) == {"y"}
    assert set(result.mcmc.get_samples()) == {"gates", "noise"}
    assert result.mcmc.chain_method == "sequential"
    # Nothing to relabel: no permutations recorded.
    assert "expert_permutation" not in tree["sample_stats"].data_vars
    draws = moe.posterior_params(tree)
    np.testing.assert_array_equal(draws.experts,
                                  np.broadcast_to(estimate.experts, (CHAINS * FIXED_DRAWS, K, D)))
    np.testing.assert_array_equal(draws.gates[:, :-1],
                                  tree["posterior"]["gates"].values.reshape(-1, K - 1, D))
    # The likelihood is evaluated with the fixed experts.
    params = moe.MoEParams(estimate.experts, draws.gates[3], draws.noise[3])
    np.testing.assert_allclose(tree["log_likelihood"]["y"].values.reshape(CHAINS * FIXED_DRAWS, N)[3],
                               moe.MixtureOfExperts.from_params(params, x).log_prob(y), rtol=1e-10)
    rows = {f"gates[0, {j}]" for j in range(D)} | {f"noise[{i}]" for i in range(K)}  # one noise per expert
    assert set(az.summary(tree).index) == rows
    # The Hessian at the estimate (experts fixed) is positive definite: no fallback warning.
    assert not any("mass_matrix" in message for message in _reliability(caught))


def test_fix_experts_gate_posterior_follows_the_estimates_labels(data, estimate, fixed_run):
    _, _, truth = data
    gates = fixed_run[0].datatree["posterior"]["gates"].values.reshape(-1, D)
    # The estimate's labels are the truth's swapped, so the gate learned for them is the truth's
    # relabelled (for k=2: negated). With experts ~0.15 off, the gate direction is still close
    # (measured cosine 0.99) and its sign is unambiguous.
    matched = _label_matched(truth, estimate.to_params())
    assert not np.allclose(matched.experts, truth.experts)  # the labels do differ
    mean = gates.mean(axis=0)
    cosine = mean @ np.asarray(matched.gates[0]) / (np.linalg.norm(mean) * np.linalg.norm(matched.gates[0]))
    assert cosine > 0.9
    # The noise absorbs the estimate's error in the experts: above the truth's 0.1, below sd(y).
    noise = fixed_run[0].datatree["posterior"]["noise"].values.mean(axis=(0, 1))  # one per expert
    assert np.all((0.1 < noise) & (noise < float(jnp.std(data.y))))


def test_fix_experts_loo_needs_no_var_name(fixed_run):
    tree = fixed_run[0].datatree
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = moe.loo(tree)
    assert result.n_data_points == N and result.n_samples == CHAINS * FIXED_DRAWS
    # Only 100 draws: a few points have Pareto k above ArviZ's threshold for that many draws,
    # and exactly those are reported.
    limit = _pareto_k_limit(result.n_samples)
    bad = int((np.asarray(result.pareto_k) > limit).sum())
    messages = _reliability(caught)
    assert len(messages) == (1 if bad else 0)
    if bad:
        assert messages[0].startswith(f"LOO: {bad} of {N} points have Pareto k > {limit:.2f}")


# ---------------------------------------------------------------------------------------------
# a user's own model under handlers.scope(prefix="a")


def test_user_model_datatree_names_and_dims(user_tree, user_mcmc, user_fit):
    tree = user_tree
    posterior = tree["posterior"]
    # The tree spells NumPyro's "a/experts" as "a.experts" (xarray forbids "/" in names).
    assert set(posterior.data_vars) == {"a.experts", "a.gates", "a.noise", "scale"}
    assert posterior["a.experts"].dims == ("chain", "draw", "expert", "feature")
    assert posterior["a.gates"].dims == ("chain", "draw", "gate", "feature")
    assert posterior["a.noise"].dims == ("chain", "draw", "expert")
    assert posterior["scale"].dims == ("chain", "draw")
    assert posterior["a.experts"].shape == (CHAINS, USER_DRAWS, K, D)
    assert tree["log_likelihood"]["y"].dims == ("chain", "draw", "obs")
    assert dict(tree.attrs) == {"a.moe_link": "linear"}
    # Started at the fit: the draws keep its labels, and the relabelling is the identity.
    np.testing.assert_array_equal(tree["sample_stats"]["a.expert_permutation"].values,
                                  np.broadcast_to(np.arange(K), (CHAINS, USER_DRAWS, K)))
    raw = user_mcmc.get_samples(group_by_chain=True)
    np.testing.assert_array_equal(posterior["a.experts"].values, raw["a/experts"])
    # The posterior sits at the fit: each expert coordinate within 4.5 posterior sd of the MLE.
    draws = posterior["a.experts"].values
    assert np.all(np.abs(draws.mean(axis=(0, 1)) - user_fit.params.experts) < 4.5 * draws.std(axis=(0, 1)))


def test_user_model_posterior_params_and_predict(data, user_tree, fresh):
    x_new = fresh[0]
    draws = moe.posterior_params(user_tree, prefix="a")
    assert isinstance(draws, moe.MoEParams) and draws.link.name == "linear"
    assert draws.experts.shape == (CHAINS * USER_DRAWS, K, D)
    assert draws.gates.shape == (CHAINS * USER_DRAWS, K, D)
    np.testing.assert_array_equal(draws.gates[:, -1], 0)
    np.testing.assert_array_equal(draws.noise, user_tree["posterior"]["a.noise"].values.reshape(-1, K))
    prediction = moe.predict(user_tree, x_new, key=jax.random.key(33), prefix="a")
    assert prediction.mean.shape == prediction.lower.shape == prediction.upper.shape == (len(x_new),)
    expected = jax.vmap(lambda params: params.predictive_mean(x_new))(draws).mean(0)
    np.testing.assert_allclose(prediction.mean, expected, rtol=1e-10)
    gates = jax.vmap(lambda params: params.gate_probabilities(x_new))(draws).mean(0)
    np.testing.assert_allclose(prediction.gate_probabilities, gates, rtol=1e-10)
    # The prefix matters: under no prefix there is no experts site.
    with pytest.raises(ValueError, match=r"^prefix: .*expert blocks found: \['a.experts'\]"):
        moe.predict(user_tree, x_new, key=jax.random.key(33))


def test_user_model_with_fixed_experts_keeps_them_out_of_the_likelihood(data, user_fixed_tree, user_fit):
    x, y, _ = data
    tree = user_fixed_tree
    assert set(tree["posterior"].data_vars) == {"a.gates", "a.noise", "scale"}
    assert set(tree["constant_data"].data_vars) == {"a.experts"}
    assert tree["constant_data"]["a.experts"].dims == ("expert", "feature")
    np.testing.assert_array_equal(tree["constant_data"]["a.experts"], user_fit.params.experts)
    assert set(tree["observed_data"].data_vars) == {"y"}
    assert set(tree["log_likelihood"].data_vars) == {"y"}
    # ... so loo needs no var_name.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moe.loo(tree)
    assert result.n_data_points == N and result.n_samples == 30
    # The experts come from the constant data, the rest from the draws.
    draws = moe.posterior_params(tree, prefix="a")
    np.testing.assert_array_equal(draws.experts, np.broadcast_to(user_fit.params.experts, (30, K, D)))
    params = jax.tree_util.tree_map(lambda leaf: leaf[5], draws)
    np.testing.assert_allclose(tree["log_likelihood"]["y"].values.reshape(30, N)[5],
                               moe.MixtureOfExperts.from_params(params, x).log_prob(y), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# predict


def _mixture_cdf(params, x, t):
    """The exact predictive CDF of the mixture of experts at (x_n, t_n)."""
    probabilities = np.asarray(params.gate_probabilities(x))
    means = np.asarray(params.expert_means(x))
    scales = np.broadcast_to(np.asarray(params.noise), means.shape)
    return np.sum(probabilities * norm.cdf((np.asarray(t)[:, None] - means) / scales), axis=1)


def test_predict_from_a_point_fit_is_its_predictive_distribution(data, fresh):
    _, _, truth = data
    x_new, _ = fresh
    prediction = moe.predict(truth, x_new, key=jax.random.key(34), num_draws=1000)
    np.testing.assert_allclose(prediction.mean, truth.predictive_mean(x_new), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(prediction.gate_probabilities, truth.gate_probabilities(x_new), rtol=1e-12)
    # The interval ends are sample quantiles of 1000 draws: the exact CDF there is (nearly) Beta
    # distributed with sd sqrt(0.05 * 0.95 / 1000) = 0.0069, independently per point, and mean
    # ((m - 1) p + 1) / (m + 1) for NumPy's linear interpolation between order statistics of m
    # draws (0.0509 and 0.9491: a 1/m bias toward the centre). The worst of 2000 points stays
    # within 5 sd (0.035); their mean within 5 SE (5 * 0.0069 / sqrt(2000) = 0.0008).
    for end, p in ((prediction.lower, 0.05), (prediction.upper, 0.95)):
        level = _mixture_cdf(truth, x_new, end)
        assert np.max(np.abs(level - p)) < 0.035
        assert abs(level.mean() - (999 * p + 1) / 1001) < 0.0008


@pytest.mark.parametrize("interval", [0.5, 0.9])
def test_predict_from_a_fit_covers_held_out_data(data, fresh, user_fit, interval):
    x_new, y_new = fresh
    prediction = moe.predict(user_fit, x_new, key=jax.random.key(35), interval=interval)
    # An EM fit predicts as its params do with its experts' unbiased noise sds.
    assert user_fit.predictive_noise is not None
    corrected = user_fit.params.replace(noise=user_fit.predictive_noise)
    same = moe.predict(corrected, x_new, key=jax.random.key(35), interval=interval)
    for got, expected in zip(prediction, same, strict=True):
        np.testing.assert_array_equal(got, expected)
    # Coverage of 2000 fresh y: binomial SE sqrt(p (1 - p) / 2000) (0.011 for 0.5, 0.0067 for 0.9);
    # the fit's own error (n=300) moves it by about 0.01; 4 SE + 0.01. (Measured: 0.479 and 0.890,
    # the truth's own intervals 0.479 and 0.894.)
    covered = (prediction.lower <= y_new) & (y_new <= prediction.upper)
    tolerance = 4 * np.sqrt(interval * (1 - interval) / len(y_new)) + 0.01
    assert abs(covered.mean() - interval) < tolerance


def test_predict_from_the_posterior(data, nuts, fresh):
    _, _, truth = data
    x_new, y_new = fresh
    prediction = moe.predict(nuts.datatree, x_new, key=jax.random.key(31))
    assert prediction.mean.shape == prediction.lower.shape == prediction.upper.shape == (2000,)
    assert prediction.gate_probabilities.shape == (2000, K)
    np.testing.assert_allclose(prediction.gate_probabilities.sum(axis=1), 1, atol=1e-12)
    assert np.all(prediction.lower < prediction.upper)
    # Coverage of fresh y from the truth: binomial SE sqrt(0.9 * 0.1 / 2000) = 0.0067; 4 SE plus
    # 0.01 for the posterior's own error (measured 0.901).
    covered = (prediction.lower <= y_new) & (y_new <= prediction.upper)
    assert abs(covered.mean() - 0.9) < 4 * 0.0067 + 0.01
    # The posterior mean of E[y | x] is near the truth's: y has sd 1.0; the gate's posterior sd
    # (~0.2 per weight) moves E[y | x] by a few hundredths (measured RMSE 0.08).
    error = prediction.mean - np.asarray(truth.predictive_mean(x_new))
    assert np.sqrt(np.mean(error**2)) < 0.15
    # ... and so are the gate probabilities (measured mean absolute error 0.04).
    truth_gate = np.asarray(truth.gate_probabilities(x_new))
    assert np.mean(np.abs(prediction.gate_probabilities - truth_gate)) < 0.08


def test_predict_mean_averages_over_the_draws(nuts, fresh):
    x_new = fresh[0]
    prediction = moe.predict(nuts.datatree, x_new, key=jax.random.key(32))
    draws = moe.posterior_params(nuts.datatree)
    expected = jax.vmap(lambda params: params.predictive_mean(x_new))(draws).mean(0)
    np.testing.assert_allclose(prediction.mean, expected, rtol=1e-10)
    gates = jax.vmap(lambda params: params.gate_probabilities(x_new))(draws).mean(0)
    np.testing.assert_allclose(prediction.gate_probabilities, gates, rtol=1e-10)


def test_predict_interval_width_follows_the_probability(nuts, fresh):
    x_new, _ = fresh
    narrow = moe.predict(nuts.datatree, x_new, key=jax.random.key(31), interval=0.5)
    wide = moe.predict(nuts.datatree, x_new, key=jax.random.key(31), interval=0.9)
    np.testing.assert_array_equal(narrow.mean, wide.mean)
    assert np.all(narrow.upper - narrow.lower <= wide.upper - wide.lower)
    assert np.mean(narrow.upper - narrow.lower) < 0.8 * np.mean(wide.upper - wide.lower)


def test_predict_is_reproducible(nuts, fresh):
    x_new = fresh[0][:50]
    first = moe.predict(nuts.datatree, x_new, key=jax.random.key(36))
    again = moe.predict(nuts.datatree, x_new, key=jax.random.key(36))
    other = moe.predict(nuts.datatree, x_new, key=jax.random.key(37))
    for got, expected in zip(first, again, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(first.lower, other.lower)
    np.testing.assert_array_equal(first.mean, other.mean)  # the mean needs no random draws


def test_predict_errors(nuts, fresh, data):
    x_new, _ = fresh
    with pytest.raises(ValueError, match=r"^x_new: expected 3 columns, got 4"):
        moe.predict(nuts.datatree, np.ones((5, 4)), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^x_new: expected 3 columns, got 4"):
        moe.predict(data.truth, np.ones((5, 4)), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^x_new: expected a 2-d array"):
        moe.predict(nuts.datatree, np.ones(3), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^x_new: expected finite"):
        moe.predict(nuts.datatree, np.full((2, 3), np.nan), key=jax.random.key(0))
    for interval in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"^interval: "):
            moe.predict(nuts.datatree, x_new[:5], key=jax.random.key(0), interval=interval)
    with pytest.raises(TypeError, match=r"^key: "):
        moe.predict(nuts.datatree, x_new[:5], key=None)
    with pytest.raises(TypeError, match=r"^source: .*got str"):
        moe.predict("truth", x_new[:5], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^source: "):  # a point fit needs a positive noise
        moe.predict(data.truth.replace(noise=jnp.zeros(K)), x_new[:5], key=jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# loo


def _loo_tree(heavy_tailed_point: bool, *, draws: int = 200, seed: int = 50):
    """A synthetic DataTree of 20 points' log-likelihoods; optionally one point whose draws are
    heavy-tailed (log-likelihood sd 30), so its importance ratios have a Pareto k far above 0.7."""
    rng = np.random.default_rng(seed)
    log_likelihood = rng.normal(-1.0, 0.1, size=(2, draws, 20))
    if heavy_tailed_point:
        log_likelihood[..., 0] = 30 * rng.standard_normal((2, draws))
    return az.from_dict({"posterior": {"theta": rng.standard_normal((2, draws))},
                         "log_likelihood": {"y": log_likelihood}}, dims={"y": ["obs"]})


def test_loo_is_arviz_loo_with_pointwise_values(nuts):
    tree = nuts.datatree
    result, caught = _recorded(moe.loo, tree)
    reference = az.loo(tree, pointwise=True)
    # 200 draws near the mode: almost every Pareto k is below the threshold for 200 draws (0.57;
    # measured: 1 of 300 above, max 0.6 with this key), and the warning says exactly how many are not.
    above = int(np.sum(np.asarray(result.pareto_k) > _pareto_k_limit(CHAINS * DRAWS)))
    assert above <= 3
    messages = _reliability(caught)
    assert (messages == []) if above == 0 else (len(messages) == 1 and messages[0].startswith(f"LOO: {above} of {N}"))
    assert result.n_data_points == N and result.n_samples == CHAINS * DRAWS
    assert result.elpd == pytest.approx(reference.elpd, rel=1e-12)
    assert np.asarray(result.pareto_k).shape == (N,) and np.asarray(result.elpd_i).shape == (N,)
    log_lik = tree["log_likelihood"]["y"].values.reshape(CHAINS * DRAWS, N)
    lppd = float(np.sum(np.log(np.mean(np.exp(log_lik), axis=0))))
    # elpd_loo = lppd - p_loo; p_loo is about the number of free parameters (6 + 3 + 1).
    assert result.elpd == pytest.approx(lppd - result.p, rel=1e-6)
    assert 5 < result.p < 20


def _pareto_k_limit(num_draws: int) -> float:
    """ArviZ's Pareto k threshold for S draws, min(1 - 1 / log10(S), 0.7) (Vehtari et al. 2024)."""
    return min(1 - 1 / np.log10(num_draws), 0.7)


def test_loo_warns_about_large_pareto_k():
    result, caught = _recorded(moe.loo, _loo_tree(True))
    pareto_k = np.asarray(result.pareto_k)
    limit = _pareto_k_limit(result.n_samples)
    assert pareto_k[0] > 0.7 and np.all(pareto_k[1:] <= limit)
    assert _reliability(caught) == [
        f"LOO: 1 of 20 points have Pareto k > {limit:.2f} (max {pareto_k[0]:.2f}); their leave-one-out "
        "estimates are unreliable: refit without them or use K-fold CV"
    ]
    # A well-behaved tree gives no warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moe.loo(_loo_tree(False))
    assert not _reliability(caught)


def test_loo_passes_options_to_arviz():
    tree = _loo_tree(False)
    pointwise = tree["log_likelihood"].to_dataset()
    two = tree.copy()
    two["log_likelihood"] = pointwise.assign(z=pointwise["y"] - 1.0)
    with pytest.raises(TypeError, match="var_name"):  # two likelihood terms: name the one wanted
        moe.loo(two)
    first, second = moe.loo(two, var_name="y"), moe.loo(two, var_name="z")
    assert first.elpd == pytest.approx(moe.loo(tree).elpd, rel=1e-12)
    # z is y one nat lower at each of the 20 points: the same weights, elpd 20 lower.
    assert first.elpd - second.elpd == pytest.approx(20, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# compare_num_experts


def _posterior_near(params, x, y, *, seed: int, draws: int = 50):
    """A stand-in for run_nuts' DataTree: 2 chains of draws scattered closely around ``params``,
    with their log-likelihoods (what loo reads)."""
    rng = np.random.default_rng(seed)
    sites = {name: np.asarray(value) for name, value in moe.params_to_sites(params).items()}
    posterior = {}
    for name, value in sites.items():
        spread = 0.01 * rng.standard_normal((2, draws, *value.shape))
        posterior[name] = value * np.exp(spread) if name == "noise" else value + spread
    stacked = moe.sites_to_params({name: jnp.asarray(v.reshape(2 * draws, *v.shape[2:]))
                                   for name, v in posterior.items()})
    log_likelihood = jax.vmap(lambda p: moe.MixtureOfExperts.from_params(p, x).log_prob(y))(stacked)
    groups = {"posterior": posterior,
              "log_likelihood": {"y": np.asarray(log_likelihood).reshape(2, draws, -1)},
              "observed_data": {"y": np.asarray(y)}}
    dims = {name: DIMS[name] for name in posterior} | {"y": ["obs"]}  # noise: one per expert
    return az.from_dict(groups, dims=dims)


def test_compare_num_experts_ranks_the_candidates_by_loo(data, monkeypatch):
    # fit_moe and run_nuts are replaced by stand-ins (k=1: the least-squares line, k=2: the truth;
    # draws scattered near them) so that this checks the comparison itself cheaply; the real
    # pipeline is in the slow test below.
    x, y, truth = data
    line = np.linalg.lstsq(np.asarray(x), np.asarray(y), rcond=None)[0]
    residual_sd = np.std(np.asarray(y) - np.asarray(x) @ line)
    one_expert = moe.MoEParams(line[None], np.zeros((1, D)), np.array([residual_sd]))
    fits, runs = [], []

    def fake_fit_moe(x, y, *, num_experts, key, **kwargs):
        params = {1: one_expert, 2: truth}[num_experts]
        fit = moe.Fit(params=params, log_likelihood=0.0, history=np.zeros(1), iterations=1, converged=True,
                      method="em")
        fits.append({"num_experts": num_experts, "key": np.asarray(jax.random.key_data(key)),
                     "kwargs": kwargs, "fit": fit})
        return fit

    def fake_run_nuts(x, y, init, *, key, **kwargs):
        runs.append({"init": init, "key": np.asarray(jax.random.key_data(key)), "kwargs": kwargs})
        return NutsResult(None, _posterior_near(init.params, x, y, seed=len(runs)), {})

    monkeypatch.setattr("numpyro_moe._bayes.fit_moe", fake_fit_moe)
    monkeypatch.setattr("numpyro_moe._bayes.run_nuts", fake_run_nuts)
    result, caught = _recorded(moe.compare_num_experts, x, y, key=jax.random.key(60), candidates=(1, 2),
                               num_starts=3, num_chains=2, num_samples=50, shared_noise=False)
    # Each candidate is fitted, then sampled from its fit, each step with its own key; the
    # options reach the step they belong to.
    assert [fit["num_experts"] for fit in fits] == [1, 2]
    expected = {"link": "linear", "intercepts": False, "num_starts": 3, "shared_noise": False, "priors": None,
                "family": "normal", "df": None, "gate_x": None}
    assert all(fit["kwargs"] == expected for fit in fits)
    assert [run["init"] for run in runs] == [fit["fit"] for fit in fits]
    assert all(run["kwargs"] == {"num_chains": 2, "num_samples": 50, "shared_noise": False} for run in runs)
    keys = [call["key"].tobytes() for call in fits + runs]
    assert len(set(keys)) == 4
    # Data from two experts: one expert (a straight line) is far worse out of sample.
    assert result.num_experts == 2
    assert list(result.table.index) == ["k=2", "k=1"]
    assert set(result.datatrees) == {"k=1", "k=2"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        elpd = {name: moe.loo(tree).elpd for name, tree in result.datatrees.items()}
    assert elpd["k=2"] - elpd["k=1"] > 100
    # The table's elpd is rounded to the precision of its standard error.
    assert abs(result.table.loc["k=2", "elpd"] - elpd["k=2"]) <= result.table.loc["k=2", "se"]
    # The warnings of each candidate's LOO are passed on, named by the candidate, for exactly the
    # points above the threshold for its 100 stand-in draws.
    messages = _reliability(caught)
    assert all(re.match(r"^k=[12]: ", message) for message in messages)
    expected = []
    for name, tree in result.datatrees.items():
        pareto_k = np.asarray(az.loo(tree, pointwise=True).pareto_k)
        limit = _pareto_k_limit(tree["posterior"].sizes["chain"] * tree["posterior"].sizes["draw"])
        if (pareto_k > limit).any():
            expected.append(
                f"{name}: LOO: {int((pareto_k > limit).sum())} of 300 points have Pareto k > {limit:.2f} (max "
                f"{pareto_k.max():.2f}); their leave-one-out estimates are unreliable: refit without them or use "
                "K-fold CV"
            )
    assert [m for m in messages if "LOO: " in m] == expected and expected


def test_compare_num_experts_errors(data):
    x, y, _ = data
    with pytest.raises(ValueError, match=r"^candidates: expected at least two distinct"):
        moe.compare_num_experts(x, y, key=jax.random.key(0), candidates=(2, 2))
    with pytest.raises(ValueError, match=r"^candidates: "):
        moe.compare_num_experts(x, y, key=jax.random.key(0), candidates=(0, 2))
    with pytest.raises(TypeError, match=r"^key: "):
        moe.compare_num_experts(x, y, key=0, candidates=(1, 2))


# ---------------------------------------------------------------------------------------------
# errors and diagnostics


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (lambda truth: {"init": "truth"}, TypeError, r"^init: .*got str"),
        (lambda truth: {"init": np.ones((K, D))}, TypeError, r"^init: .*got ndarray"),
        (lambda truth: {"init": truth.replace(experts=np.ones((K, D + 1)), gates=np.zeros((K, D + 1)))},
         ValueError, r"^init: expected experts with 3 columns"),
        (lambda truth: {"fix": "experts"}, TypeError, r"^fix: .*got the string"),
        (lambda truth: {"fix": ("weights",)}, ValueError, r"^fix: unknown parameter groups \['weights'\]"),
        (lambda truth: {"num_chains": 0}, ValueError, r"^num_chains: "),
        (lambda truth: {"num_warmup": 0}, ValueError, r"^num_warmup: "),
        (lambda truth: {"num_samples": 0}, ValueError, r"^num_samples: "),
        (lambda truth: {"jitter": -1.0}, ValueError, r"^jitter: "),
        (lambda truth: {"mass_matrix": "identity"}, ValueError, r"^mass_matrix: expected one of"),
        (lambda truth: {"chain_method": "threads"}, ValueError, r"^chain_method: "),
        (lambda truth: {"key": 0}, TypeError, r"^key: "),
        (lambda truth: {"key": jax.random.split(jax.random.key(0), 2)}, TypeError, r"^key: "),
    ],
)
def test_run_nuts_bad_arguments_name_the_argument(data, changes, error, match):
    x, y, truth = data
    options = {"init": truth, "key": jax.random.key(0), "num_chains": 2, "num_warmup": 5, "num_samples": 5}
    options.update(changes(truth))
    with pytest.raises(error, match=match):
        moe.run_nuts(x, y, **options)


def test_diagnostic_extreme_on_synthetic_chains():
    rng = np.random.default_rng(50)
    agree = rng.standard_normal((4, 1000, 2))
    apart = agree + np.array([0.0, 0.0, 0.0, 3.0])[:, None, None]
    dims = {"theta": ["coordinate"]}
    good = _diagnostic_extreme(az.rhat(az.from_dict({"posterior": {"theta": agree}}, dims=dims)))
    bad = _diagnostic_extreme(az.rhat(az.from_dict({"posterior": {"theta": apart}}, dims=dims)))
    # Independent normal chains: r_hat - 1 is O(1/draws); one chain shifted by 3 sd: r_hat ~1.5.
    assert good < 1.01 and bad > 1.2
    ess = az.ess(az.from_dict({"posterior": {"theta": agree}}, dims=dims))
    assert _diagnostic_extreme(ess, min) <= _diagnostic_extreme(ess, max)
    assert _diagnostic_extreme(ess, min) > 2000  # 4000 independent draws


def test_diagnostic_extreme_is_nan_when_any_entry_is():
    # Chains that never move have r_hat NaN (zero variance): the extreme must say so, whatever
    # the order of the variables, rather than let a finite entry hide it.
    stuck = np.ones((2, 50))
    apart = np.stack([np.ones(50), 2 * np.ones(50)])
    moving = np.arange(100.0).reshape(2, 50)
    for posterior in ({"a": stuck, "b": apart}, {"b": apart, "a": stuck}, {"a": stuck, "c": moving}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # ArviZ divides 0 by 0
            rhat = az.rhat(az.from_dict({"posterior": posterior}))
        assert np.isnan(_diagnostic_extreme(rhat, max)) and np.isnan(_diagnostic_extreme(rhat, min))


# ---------------------------------------------------------------------------------------------
# slow: the Laplace fallback, reproducibility, NaN r_hat, intercepts, label switching from
# NumPyro's default init, and compare_num_experts with real NUTS runs


@pytest.mark.slow
def test_run_nuts_from_an_estimate_falls_back_to_an_adapted_metric(data, estimate):
    # The moment estimate (gate uniform) is not a posterior mode: the Hessian there is indefinite,
    # so run_nuts warns and adapts a dense mass matrix; the draws keep the estimate's labels.
    x, y, truth = data
    result, caught = _recorded(moe.run_nuts, x, y, estimate, key=jax.random.key(42), num_chains=CHAINS,
                               num_warmup=WARMUP, num_samples=DRAWS)
    messages = [m for m in _reliability(caught) if m.startswith("mass_matrix: ")]
    assert len(messages) == 1 and "not positive definite" in messages[0]
    metric = result.mcmc.last_state.adapt_state.inverse_mass_matrix[("experts", "gates", "noise")]
    size = K * D + (K - 1) * D + K  # one noise per expert (the default)
    assert metric.shape == (CHAINS, size, size)
    assert np.abs(metric[0] - np.diag(np.diag(metric[0]))).max() > 0  # dense and adapted
    assert not np.allclose(metric[0], metric[1])  # adapted per chain
    # The posterior sits at the truth in the estimate's labelling (the truth's swapped).
    matched = _label_matched(truth, estimate.to_params())
    experts = result.datatree["posterior"]["experts"].values
    assert np.all(np.abs(experts.mean(axis=(0, 1)) - matched.experts) < 4.5 * experts.std(axis=(0, 1)))


@pytest.mark.slow
def test_run_nuts_is_reproducible(data, fixed_run, estimate):
    x, y, _ = data
    again, _ = _recorded(moe.run_nuts, x, y, estimate, key=jax.random.key(41), fix=("experts",),
                         num_chains=CHAINS, num_warmup=FIXED_WARMUP, num_samples=FIXED_DRAWS,
                         chain_method="sequential")
    first = fixed_run[0].datatree
    for group in ("posterior", "posterior_predictive", "log_likelihood", "sample_stats"):
        assert set(again.datatree[group].data_vars) == set(first[group].data_vars)
        for name in first[group].data_vars:
            np.testing.assert_array_equal(again.datatree[group][name].values, first[group][name].values)
    assert again.diagnostics == fixed_run[0].diagnostics


@pytest.mark.slow
def test_run_nuts_warns_when_r_hat_is_nan(data, monkeypatch):
    # Chains that never move give r_hat NaN; that must warn, not pass as "not above 1.01".
    # ArviZ's r_hat is replaced by one that is 1 everywhere but NaN for the noise.
    real_rhat = az.rhat

    def nan_rhat(tree, *args, **kwargs):
        result = real_rhat(tree, *args, **kwargs)
        for name in result.data_vars:
            result[name] = result[name] * 0 + (np.nan if name == "noise" else 1.0)
        return result

    monkeypatch.setattr(az, "rhat", nan_rhat)
    x, y, truth = data
    result, caught = _recorded(moe.run_nuts, x, y, truth, key=jax.random.key(1), fix=("experts",),
                               num_chains=2, num_warmup=50, num_samples=50)
    messages = _reliability(caught)
    assert len(messages) == 1 and "max r_hat nan" in messages[0]
    assert np.isnan(result.diagnostics["max_r_hat"])


@pytest.mark.slow
def test_run_nuts_with_intercepts_recovers_them():
    truth = true_params(key=jax.random.key(60), dim=3, num_experts=2)
    truth = truth.replace(expert_intercepts=jnp.array([0.5, -0.5]), gate_intercepts=jnp.array([1.0, 0.0]))
    x, y = sample_data(truth, key=jax.random.key(61), num_samples=1000)
    # Intercepts come from the start: zero ones, to be learned.
    start = truth.replace(expert_intercepts=jnp.zeros(2), gate_intercepts=jnp.zeros(2))
    fit = moe.fit_em(x, y, start)
    result, _ = _recorded(moe.run_nuts, x, y, fit, key=jax.random.key(62), num_chains=CHAINS, num_warmup=200,
                          num_samples=200)
    posterior = result.datatree["posterior"]
    assert set(posterior.data_vars) == {"experts", "gates", "noise", "expert_intercepts", "gate_intercepts"}
    assert posterior["expert_intercepts"].dims == ("chain", "draw", "expert")
    assert posterior["gate_intercepts"].dims == ("chain", "draw", "gate")
    for name, value in [("expert_intercepts", [0.5, -0.5]), ("gate_intercepts", [1.0])]:
        draws = posterior[name].values
        # The posterior covers the truth within 4.5 sd (~1e-5 chance per coordinate otherwise).
        assert np.all(np.abs(draws.mean(axis=(0, 1)) - value) < 4.5 * draws.std(axis=(0, 1))), name
    draws = moe.posterior_params(result.datatree)
    assert draws.expert_intercepts.shape == (CHAINS * 200, 2)
    np.testing.assert_array_equal(draws.gate_intercepts[:, -1], 0)


@pytest.mark.slow
def test_default_init_label_switching_is_undone_by_relabelling(data):
    # From NumPyro's default init the chains settle in different labellings (with this key and one
    # noise per expert, three chains in one and one in the other); relabelled to the truth's
    # experts (to_datatree with a reference), they agree.
    x, y, truth = data
    mcmc = MCMC(NUTS(moe.moe_regression), num_warmup=300, num_samples=200, num_chains=4,
                chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.key(73), x, y, **MODEL_KWARGS)
    raw = moe.to_datatree(mcmc, reference=truth, relabel_draws=False, log_likelihood=False)
    relabelled = moe.to_datatree(mcmc, reference=truth, log_likelihood=False)
    assert "expert_permutation" not in raw["sample_stats"].data_vars
    permutations = relabelled["sample_stats"]["expert_permutation"].values
    switched = (permutations != np.arange(K)).any(axis=-1).mean(axis=1)  # per chain
    # Each chain stays in one labelling, and the chains do not all share one.
    assert np.all((switched == 0) | (switched == 1))
    assert 0 < switched.mean() < 1
    before = _diagnostic_extreme(az.rhat(raw))
    after = _diagnostic_extreme(az.rhat(relabelled))
    # Label switching: raw r_hat far above 1 (two modes; measured 1.54); relabelled it is that of
    # one mode (measured 1.013).
    assert before > 1.3
    assert after < 1.06


@pytest.mark.slow
def test_compare_num_experts_with_nuts(data):
    x, y, _ = data
    result, caught = _recorded(moe.compare_num_experts, x, y, key=jax.random.key(61), candidates=(1, 2),
                               num_starts=2, num_chains=2, num_warmup=50, num_samples=50)
    assert result.num_experts == 2
    assert list(result.table.index) == ["k=2", "k=1"]
    assert set(result.datatrees["k=1"]["posterior"].data_vars) == {"experts", "noise"}
    assert result.datatrees["k=2"]["posterior"]["experts"].shape == (2, 50, 2, D)
    assert all(re.match(r"^(k=[12]: |NUTS: )", message) for message in _reliability(caught))


def test_nuts_problems_name_each_problem_with_its_remedy():
    from numpyro_moe._bayes import _nuts_problems

    fine = {"max_r_hat": 1.004, "divergences": 0}
    assert _nuts_problems(fine, 4, 2000) == []
    # Divergences alone: no word of disagreeing chains (mathachieve at k = 4: r_hat 1.009, 13 of
    # 8,000 transitions diverged).
    (only,) = _nuts_problems({**fine, "divergences": 13}, 4, 8000)
    assert only.startswith("13 of 8000 transitions diverged") and "disagree" not in only
    assert "divergences=True" in only
    (apart,) = _nuts_problems({**fine, "max_r_hat": 1.04}, 4, 8000)
    assert apart.startswith("the chains disagree (max r_hat 1.040, limit 1.01)") and "max_samples" in apart
    # With each chain's mean log density, the warning names the lowest chain and how far below it is
    # (High School and Beyond at k = 4: one chain wandered 12 below the others in its second half).
    (heights,) = _nuts_problems({**fine, "max_r_hat": 1.33, "chain_log_density": [-6729.6, -6723.8, -6727.3,
                                                                                   -6723.5]}, 4, 8000)
    assert "mean log density by chain: -6729.6, -6723.8, -6727.3, -6723.5; chain 0 is 6.1 below the highest" in heights
    # Chains that never moved (NaN r_hat) disagree too; one chain has no r_hat to judge.
    assert len(_nuts_problems({**fine, "max_r_hat": float("nan"), "divergences": 2}, 4, 8000)) == 2
    assert _nuts_problems({**fine, "max_r_hat": float("nan")}, 1, 500) == []


def test_run_nuts_tunes_its_step_size_to_the_target_acceptance_rate(monkeypatch):
    import numpyro_moe._bayes as bayes

    x, y, truth = simulate(key=jax.random.key(3), num_samples=200, dim=3, num_experts=2)
    with pytest.raises(ValueError, match=r"^target_accept_prob: expected a number strictly between 0 and 1, got 1"):
        moe.run_nuts(x, y, truth, key=jax.random.key(0), target_accept_prob=1)
    # The rate reaches NumPyro's NUTS (whose step-size adaptation targets it).
    built = []

    class Recording(bayes.NUTS):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["target_accept_prob"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bayes, "NUTS", Recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moe.ReliabilityWarning)
        moe.run_nuts(x, y, truth, key=jax.random.key(0), num_chains=1, num_warmup=5, num_samples=5,
                     target_accept_prob=0.95)
    assert built == [0.95]


def test_run_nuts_finishes_an_em_fit_stopped_by_its_cap_before_seeking_the_mode(data, monkeypatch):
    """An EM fit stopped at its iteration cap is not a mode: run_nuts continues it by EM under its
    own priors (`finish_em`) and seeks the posterior mode from there; a converged fit is used as
    it is."""
    import numpyro_moe._bayes as bayes
    from numpyro_moe._fit import finish_em

    x, y, truth = data
    x, y = np.asarray(x), np.asarray(y)
    with pytest.warns(moe.ReliabilityWarning, match="max_iterations=3"):
        capped = moe.fit_em(x, y, truth.replace(gates=truth.gates * 0), max_iterations=3)
    assert not capped.converged
    seen = []
    original = bayes.posterior_mode
    monkeypatch.setattr(
        bayes, "posterior_mode", lambda model, init, **kw: seen.append(init) or original(model, init, **kw)
    )
    options = dict(key=jax.random.key(3), num_chains=CHAINS, num_warmup=20, num_samples=10)
    _recorded(moe.run_nuts, x, y, capped, **options)
    finished = finish_em(x, y, capped).params
    assert finished.experts.shape == capped.params.experts.shape
    assert not np.allclose(finished.experts, capped.params.experts, atol=1e-4)
    for name in ("experts", "gates", "noise"):
        np.testing.assert_allclose(getattr(seen[0], name), getattr(finished, name), rtol=1e-10, atol=1e-12)
    # A converged fit (the finished one) starts Newton's steps at itself.
    seen.clear()
    converged = finish_em(x, y, capped)
    _recorded(moe.run_nuts, x, y, converged, **options)
    np.testing.assert_array_equal(seen[0].experts, converged.params.experts)
