"""The NumPyro pieces: `moe_priors`, the models `moe_regression` and `moe_regression_enumerated`,
the site bridges `params_to_sites` / `sites_to_params` and the init strategy `init_to_params`.

The log densities are checked against an independent NumPy/SciPy computation of

    sum of log priors + sum_n log sum_i softmax(W x_n + b)_i N(y_n; g(a_i . x_n + c_i), s_i^2)

with the default priors Normal(0, 1) on experts (and expert intercepts), Normal(0, 2.5) on the
k - 1 free gate rows (and gate intercepts), HalfNormal(1) on the noise, or the user's ``priors=``.
"""

from __future__ import annotations

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from gate_prior import gate_contrast_logpdf
from numpyro import handlers
from numpyro.contrib.funsor import enum, infer_discrete
from numpyro.contrib.funsor import log_density as enum_log_density
from numpyro.infer import MCMC, NUTS, Predictive
from numpyro.infer.util import initialize_model, log_density
from scipy.special import expit, logsumexp, softmax
from scipy.stats import gamma, halfnorm, invgamma, laplace, multivariate_normal, norm

import numpyro_moe as moe
from numpyro_moe import (
    MixtureOfExperts,
    MoEParams,
    init_to_params,
    moe_priors,
    moe_regression,
    moe_regression_enumerated,
    params_to_sites,
    sites_to_params,
)

N, D, K = 60, 4, 3

NP_LINKS = {
    "linear": lambda t: t,
    "sigmoid": expit,
    "tanh": np.tanh,
    "relu": lambda t: np.maximum(t, 0.0),
}


def cubic(t):
    return t**3


NP_LINKS["cubic"] = cubic
MODEL_LINKS = {"cubic": cubic}  # user callables are passed as such; names as strings


def model_link(name):
    return MODEL_LINKS.get(name, name)


# Reference log densities of the default priors (scipy), keyed like the sites.
DEFAULT_PRIORS = {
    "experts": norm(0.0, 1.0).logpdf,
    "gates": gate_contrast_logpdf,  # Normal(0, 2.5) on each expert's row, their shift integrated out
    "noise": invgamma(2.0, scale=0.3).logpdf,
    "expert_intercepts": norm(0.0, 1.0).logpdf,
    "gate_intercepts": gate_contrast_logpdf,
    "df": gamma(2.0, scale=10.0).logpdf,  # Student-t experts' degrees of freedom, when estimated
}


# --------------------------------------------------------------------------- reference maths


def np_pointwise(sites: dict, x, y, link: str) -> np.ndarray:
    """log p(y_n | x_n) from the site values, by NumPy/SciPy only."""
    x, y = np.asarray(x), np.asarray(y)
    experts = np.asarray(sites["experts"])
    k, d = experts.shape
    free = np.asarray(sites["gates"]) if k > 1 else np.zeros((0, d))
    gates = np.vstack([free, np.zeros((1, d))])
    logits = x @ gates.T
    pre = x @ experts.T
    if "expert_intercepts" in sites:
        pre = pre + np.asarray(sites["expert_intercepts"])[None, :]
        free_bias = np.asarray(sites["gate_intercepts"]) if k > 1 else np.zeros(0)
        logits = logits + np.append(free_bias, 0.0)[None, :]
    log_gate = logits - logsumexp(logits, axis=1, keepdims=True)
    noise = np.broadcast_to(np.asarray(sites["noise"]), (k,))  # shared () or per expert (k,)
    component = norm.logpdf(y[:, None], loc=NP_LINKS[link](pre), scale=noise[None, :])
    return logsumexp(log_gate + component, axis=1)


def np_log_joint(sites: dict, x, y, link: str, priors: dict | None = None) -> float:
    """Sum of the site log priors (scipy log densities, defaults unless given) and the likelihood."""
    logpdf = {**DEFAULT_PRIORS, **(priors or {})}
    total = sum(float(np.sum(logpdf[name](np.asarray(value)))) for name, value in sites.items())
    return total + np_pointwise(sites, x, y, link).sum()


def make_truth(seed=0, *, intercepts=False, num_experts=K, noise=0.3):
    """Inputs x (N, D), responses y from the model with a linear link, and the parameters.

    Drawn with NumPy from a fixed seed, so these tests do not lean on `simulate`. ``noise`` is
    shared (a number) or one sd per expert.
    """
    rng = np.random.default_rng(seed)
    noise = np.broadcast_to(np.asarray(noise, dtype=float), (num_experts,))
    experts = rng.normal(size=(num_experts, D)) / np.sqrt(D)
    gates = np.vstack([1.5 * rng.normal(size=(num_experts - 1, D)), np.zeros((1, D))])
    x = rng.normal(size=(N, D))
    probs = softmax(x @ gates.T, axis=1)
    z = (probs.cumsum(1) < rng.uniform(size=(N, 1))).sum(1)
    y = (x @ experts.T)[np.arange(N), z] + noise[z] * rng.normal(size=N)
    truth = MoEParams(jnp.asarray(experts), jnp.asarray(gates), jnp.asarray(noise))
    if intercepts:
        truth = truth.replace(
            expert_intercepts=jnp.linspace(-0.5, 0.7, num_experts),
            gate_intercepts=jnp.linspace(0.8, 0.0, num_experts),
        )
    return x, y, truth


def trace_sites(model, *args, **kwargs):
    """The model's sample sites from one run, traced abstractly (shapes only, no compiling)."""
    sites = {}

    def run(key):
        trace = handlers.trace(handlers.seed(model, key)).get_trace(*args, **kwargs)
        sites.update({name: site for name, site in trace.items() if site["type"] == "sample"})
        return 0

    jax.eval_shape(run, jax.random.key(0))
    return sites


def run_trace(model, *args, key=0, **kwargs):
    """One concrete run of the model's trace (values, not shapes)."""
    return handlers.trace(handlers.seed(model, jax.random.key(key))).get_trace(*args, **kwargs)


def joint_log_density(model, x, y, kwargs, sites, *, enumerated=False):
    """The model's log joint density at ``sites``, as inference evaluates it: under jit."""
    if enumerated:
        model = enum(model, first_available_dim=-2)
        density = enum_log_density
    else:
        density = log_density
    return float(jax.jit(lambda values: density(model, (x, y), kwargs, values)[0])(sites))


CASES = [
    ("linear", False),
    ("sigmoid", False),
    ("cubic", False),
    ("tanh", True),
    ("relu", True),
]


# --------------------------------------------------------------------------- log density


@pytest.mark.parametrize(("link", "intercepts"), CASES)
def test_log_density_matches_independent_computation(link, intercepts):
    x, y, truth = make_truth(1, intercepts=intercepts)
    sites = params_to_sites(truth)
    assert ("expert_intercepts" in sites) == intercepts
    priors = {
        "experts": dist.Normal(0.0, 0.7),
        "gates": dist.Normal(0.0, 1.9),
        "noise": dist.HalfNormal(0.4),
        "expert_intercepts": dist.Normal(0.1, 0.8),
        "gate_intercepts": dist.Laplace(0.0, 1.2),
    }
    reference = {
        "experts": norm(0.0, 0.7).logpdf,
        "gates": lambda free: gate_contrast_logpdf(free, scale=1.9),  # on every expert's row
        "noise": halfnorm(scale=0.4).logpdf,
        "expert_intercepts": norm(0.1, 0.8).logpdf,
        "gate_intercepts": laplace(0.0, 1.2).logpdf,  # not a Normal: on the free rows as given
    }
    value = joint_log_density(
        moe_regression, x, y,
        {"num_experts": K, "link": model_link(link), "intercepts": intercepts, "priors": priors}, sites,
    )
    expected = np_log_joint(sites, x, y, link, reference)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    # The priors are used: the default priors give another value.
    assert abs(expected - np_log_joint(sites, x, y, link)) > 1.0


def test_log_density_default_priors():
    x, y, truth = make_truth(2, intercepts=True)
    sites = params_to_sites(truth)
    value = joint_log_density(moe_regression, x, y, {"num_experts": K, "intercepts": True}, sites)
    np.testing.assert_allclose(value, np_log_joint(sites, x, y, "linear"), rtol=1e-10)
    assert set(moe._model.default_priors()) == set(DEFAULT_PRIORS)


@pytest.mark.parametrize("intercepts", [False, True])
def test_log_density_with_one_noise_per_expert(intercepts):
    x, y, truth = make_truth(3, intercepts=intercepts, noise=(0.2, 0.5, 0.9))
    sites = params_to_sites(truth, shared_noise=False)
    assert sites["noise"].shape == (K,)
    kwargs = {"num_experts": K, "intercepts": intercepts, "shared_noise": False}
    value = joint_log_density(moe_regression, x, y, kwargs, sites)
    # InverseGamma(2, 0.3) on each of the k noises, and each expert's own sd in the likelihood.
    np.testing.assert_allclose(value, np_log_joint(sites, x, y, "linear"), rtol=1e-10)
    shared = params_to_sites(truth, shared_noise=True)  # the mean noise in a shared-noise model: another value
    assert abs(joint_log_density(moe_regression, x, y, {**kwargs, "shared_noise": True}, shared) - value) > 1.0


def test_log_density_single_expert_is_a_plain_regression():
    x, y, truth = make_truth(3, num_experts=1)
    sites = params_to_sites(truth)
    assert set(sites) == {"experts", "noise"}
    assert set(trace_sites(moe_regression, x, y, num_experts=1)) == {"experts", "noise", "y"}
    value = joint_log_density(moe_regression, x, y, {"num_experts": 1}, sites)
    noise = float(truth.noise[0])
    expected = (
        norm.logpdf(np.asarray(truth.experts)).sum()
        + invgamma.logpdf(noise, 2.0, scale=0.3)
        + norm.logpdf(np.asarray(y), np.asarray(x) @ np.asarray(truth.experts)[0], noise).sum()
    )
    np.testing.assert_allclose(value, expected, rtol=1e-10)


@pytest.mark.parametrize(("link", "intercepts"), [("linear", False), ("tanh", True)])
def test_mixture_log_prob_matches_numpyro_log_likelihood(link, intercepts):
    x, y, truth = make_truth(4, intercepts=intercepts)
    truth = truth.replace(link=link)
    sites = params_to_sites(truth)
    draws = {name: value[None] for name, value in sites.items()}
    numpyro_ll = jax.jit(
        lambda draws: numpyro.infer.log_likelihood(
            moe_regression, draws, x, y, num_experts=K, link=link, intercepts=intercepts
        )["y"]
    )(draws)
    assert numpyro_ll.shape == (1, N)
    ours = MixtureOfExperts.from_params(truth, x).log_prob(jnp.asarray(y))
    assert ours.shape == (N,)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(numpyro_ll[0]), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(ours), np_pointwise(sites, x, y, link), rtol=1e-10)


def test_likelihood_site_is_a_mixture_of_experts_over_the_obs_plate():
    x, y, _ = make_truth(5)
    site = trace_sites(moe_regression, x, y, num_experts=K)["y"]
    assert isinstance(site["fn"], MixtureOfExperts)
    assert site["fn"].batch_shape == (N,)
    assert [frame.name for frame in site["cond_indep_stack"]] == ["obs"]
    assert site["is_observed"]


# --------------------------------------------------------------------------- priors=


def test_prior_with_batch_shape_k_d():
    # A hierarchical prior on the experts, Normal(group_mean, tau) with one mean per entry.
    x, y, truth = make_truth(6)
    group_mean = jnp.asarray(np.random.default_rng(60).normal(size=(K, D)))
    tau = 0.3
    priors = {"experts": dist.Normal(group_mean, tau)}
    sites = params_to_sites(truth)
    value = joint_log_density(moe_regression, x, y, {"num_experts": K, "priors": priors}, sites)
    expected = np_log_joint(sites, x, y, "linear", {"experts": lambda a: norm.logpdf(a, np.asarray(group_mean), tau)})
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    # Entry-wise alignment matters: the transposed-then-reshaped means give another value.
    scrambled = {"experts": dist.Normal(group_mean.T.reshape(K, D), tau)}
    other = joint_log_density(moe_regression, x, y, {"num_experts": K, "priors": scrambled}, sites)
    assert abs(other - value) > 1.0
    site = trace_sites(moe_regression, x, y, num_experts=K, priors=priors)["experts"]
    assert site["fn"].event_shape == (K, D) and site["fn"].batch_shape == ()


def test_prior_with_batch_shape_k_broadcasts_over_features():
    x, y, truth = make_truth(6, intercepts=True)
    scales = jnp.array([[0.5], [1.0], [2.0]])  # (k, 1): one scale per expert
    priors = {"experts": dist.Normal(0.0, scales), "noise": dist.Exponential(2.0)}
    sites = params_to_sites(truth)
    kwargs = {"num_experts": K, "intercepts": True, "priors": priors}
    value = joint_log_density(moe_regression, x, y, kwargs, sites)
    reference = {
        "experts": lambda a: norm.logpdf(a, 0.0, np.asarray(scales)),
        "noise": lambda s: np.log(2.0) - 2.0 * s,
    }
    np.testing.assert_allclose(value, np_log_joint(sites, x, y, "linear", reference), rtol=1e-10)


def test_prior_with_an_event_shape_ending_the_site_shape():
    x, y, truth = make_truth(7)
    mean = jnp.linspace(-0.5, 0.5, D)
    covariance = 0.5 * jnp.eye(D) + 0.2
    priors = {"experts": dist.MultivariateNormal(mean, covariance)}  # event (d,), one per expert
    sites = params_to_sites(truth)
    value = joint_log_density(moe_regression, x, y, {"num_experts": K, "priors": priors}, sites)
    mvn = multivariate_normal(np.asarray(mean), np.asarray(covariance))
    expected = np_log_joint(sites, x, y, "linear", {"experts": lambda a: mvn.logpdf(a)})
    np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_a_normal_gate_prior_is_on_every_experts_row_with_their_shift_integrated_out():
    # Normal(loc_i, scale_i) on each of the k gate rows; the softmax ignores their common shift, and
    # the free rows (the contrasts with the last) are, column by column, multivariate Normal with
    # mean loc_i - loc_k and covariance diag(scale_i^2, i < k) + scale_k^2 1 1^T.
    rng = np.random.default_rng(61)
    loc = rng.normal(size=(K, D))
    scales = np.array([[0.5], [1.0], [2.0]])
    prior = run_trace(moe_priors, K, D, priors={"gates": dist.Normal(loc, scales)})["gates"]["fn"]
    assert prior.event_shape == (K - 1, D) and prior.batch_shape == ()
    covariance = np.diag(scales[:-1, 0] ** 2) + scales[-1, 0] ** 2
    value = rng.normal(size=(K - 1, D))
    expected = sum(multivariate_normal(loc[:-1, a] - loc[-1, a], covariance).logpdf(value[:, a]) for a in range(D))
    np.testing.assert_allclose(prior.log_prob(jnp.asarray(value)), expected, rtol=1e-10)
    # Its draws have that law (100,000 draws: the means' standard errors are below 0.007, the
    # covariances' below 0.02).
    draws = np.asarray(prior.sample(jax.random.key(0), (100_000,)))
    for a in range(D):
        np.testing.assert_allclose(draws[:, :, a].mean(0), loc[:-1, a] - loc[-1, a], atol=0.04)
        np.testing.assert_allclose(np.cov(draws[:, :, a].T), covariance, atol=0.1)
    # The default, Normal(0, 2.5) on each row: with k = 2 the one contrast is Normal(0, 2.5 sqrt 2).
    two = run_trace(moe_priors, 2, D)["gates"]["fn"]
    expected = norm(0.0, 2.5 * np.sqrt(2.0)).logpdf(np.ones(D)).sum()
    np.testing.assert_allclose(two.log_prob(jnp.ones((1, D))), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("priors", "kwargs", "error", "pattern"),
    [
        ({"experts": dist.MultivariateNormal(jnp.zeros(D + 1), jnp.eye(D + 1))}, {}, ValueError,
         r"^priors\['experts'\]: expected a distribution with event shape"),
        ({"experts": dist.Normal(jnp.zeros((K, D)), 1.0).to_event(2).expand((2,))}, {}, ValueError,
         r"^priors\['experts'\]"),
        ({"experts": dist.Normal(jnp.zeros((K + 1, D)), 1.0)}, {}, ValueError,
         r"^priors\['experts'\]: its batch shape \(4, 4\) does not broadcast"),
        ({"noise": dist.HalfNormal(jnp.ones(K)).to_event(1)}, {"shared_noise": True}, ValueError,
         r"^priors\['noise'\]: expected a distribution with event shape"),
        ({"noise": dist.HalfNormal(jnp.ones(K + 1)).to_event(1)}, {"shared_noise": False}, ValueError,
         r"^priors\['noise'\]"),
        ({"expert": dist.Normal(0.0, 1.0)}, {}, ValueError, r"^priors: unknown sites \['expert'\]"),
        ({"gates": 2.5}, {}, TypeError, r"^priors\['gates'\]: expected a numpyro Distribution"),
        ({"gates": dist.Normal(jnp.zeros((K - 1, D)), 1.0)}, {}, ValueError,
         r"^priors\['gates'\]: a Normal gate prior is one on each of the k experts' rows"),
    ],
    ids=["event-shape", "batched-event", "batch-shape", "noise-event", "noise-per-expert", "unknown", "number",
         "gate-rows"],
)
def test_bad_priors_raise_errors_naming_the_site(priors, kwargs, error, pattern):
    x, y, _ = make_truth(8)
    with pytest.raises(error, match=pattern):
        handlers.seed(moe_regression, rng_seed=0)(x, y, num_experts=K, priors=priors, **kwargs)
    with pytest.raises(error, match=pattern):
        handlers.seed(moe_priors, rng_seed=0)(K, D, priors=priors, **kwargs)


def test_priors_replace_only_the_sites_they_name():
    priors = {"gates": dist.Normal(0.0, 0.1)}
    trace = run_trace(moe_priors, K, D, priors=priors)
    assert list(priors) == ["gates"]  # the caller's dict is not filled with the defaults
    at = np.full((K - 1, D), 0.2)
    expected = gate_contrast_logpdf(at, scale=0.1)  # a Normal on each expert's row, the shift integrated out
    assert float(trace["gates"]["fn"].log_prob(at)) == pytest.approx(expected, rel=1e-12)
    at = np.full((K, D), 0.2)  # the defaults are kept for the other sites
    assert float(trace["experts"]["fn"].log_prob(at)) == pytest.approx(norm.logpdf(at).sum(), rel=1e-12)
    at = np.full(K, 0.2)  # one noise per expert by default
    expected = invgamma.logpdf(at, 2.0, scale=0.3).sum()
    assert float(trace["noise"]["fn"].log_prob(at)) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- moe_priors


EVENT_DIMS = {
    "experts": ["expert", "feature"],
    "gates": ["gate", "feature"],
    "expert_intercepts": ["expert"],
    "gate_intercepts": ["gate"],
}


@pytest.mark.parametrize("intercepts", [False, True])
def test_moe_priors_returns_the_record_of_its_sites(intercepts):
    kwargs = {"link": "tanh", "intercepts": intercepts, "shared_noise": True}
    trace = run_trace(moe_priors, K, D, **kwargs)
    params = handlers.seed(moe_priors, jax.random.key(0))(K, D, **kwargs)
    assert isinstance(params, MoEParams)
    assert params.link.name == "tanh" and params.link.function is jnp.tanh
    assert params.experts.shape == (K, D) and params.gates.shape == (K, D)
    np.testing.assert_array_equal(params.experts, trace["experts"]["value"])
    np.testing.assert_array_equal(params.gates[:-1], trace["gates"]["value"])
    np.testing.assert_array_equal(params.gates[-1], np.zeros(D))
    # A shared noise: one site of shape (), k equal entries in the record.
    assert trace["noise"]["value"].shape == ()
    assert params.noise.shape == (K,)
    np.testing.assert_array_equal(params.noise, np.full(K, trace["noise"]["value"]))
    assert params.has_intercepts == intercepts
    if intercepts:
        np.testing.assert_array_equal(params.expert_intercepts, trace["expert_intercepts"]["value"])
        np.testing.assert_array_equal(params.gate_intercepts[:-1], trace["gate_intercepts"]["value"])
        assert float(params.gate_intercepts[-1]) == 0.0
    else:
        assert params.expert_intercepts is None and params.gate_intercepts is None
        assert "expert_intercepts" not in trace and "gate_intercepts" not in trace


def test_moe_priors_one_noise_per_expert():
    trace = run_trace(moe_priors, K, D, shared_noise=False)
    params = handlers.seed(moe_priors, jax.random.key(0))(K, D, shared_noise=False)
    site = trace["noise"]
    assert site["value"].shape == (K,)
    assert site["fn"].event_shape == (K,)
    assert site["infer"]["event_dims"] == ["expert"]
    np.testing.assert_array_equal(params.noise, site["value"])
    assert len(np.unique(np.asarray(params.noise))) == K  # k separate draws
    assert np.all(np.asarray(params.noise) > 0)


@pytest.mark.parametrize("shared_noise", [True, False])
def test_every_site_names_its_event_dims(shared_noise):
    trace = run_trace(moe_regression, *make_truth(9)[:2], num_experts=K, intercepts=True, shared_noise=shared_noise)
    expected = {**EVENT_DIMS, "noise": [] if shared_noise else ["expert"]}
    latent = {name: site for name, site in trace.items() if site["type"] == "sample" and name != "y"}
    assert set(latent) == set(expected)
    for name, site in latent.items():
        assert site["infer"].get("event_dims", []) == expected[name], name
        # One name per event axis, in order.
        assert len(expected[name]) == len(site["fn"].event_shape) == np.ndim(site["value"]), name
    assert "event_dims" not in trace["y"]["infer"]  # the plate names the observation axis


def test_moe_priors_single_expert_has_no_gate_sites():
    trace = run_trace(moe_priors, 1, D, intercepts=True)
    assert {name for name, site in trace.items() if site["type"] == "sample"} == {
        "experts", "noise", "expert_intercepts",
    }
    params = handlers.seed(moe_priors, jax.random.key(0))(1, D, intercepts=True)
    assert params.gates.shape == (1, D) and np.all(np.asarray(params.gates) == 0)
    assert params.gate_intercepts.shape == (1,) and float(params.gate_intercepts[0]) == 0.0
    assert params.noise.shape == (1,)


def test_moe_priors_under_a_scope_prefixes_every_site():
    def model():
        with handlers.scope(prefix="a"):
            first = moe_priors(K, D, intercepts=True)
        with handlers.scope(prefix="b"):
            second = moe_priors(2, D, shared_noise=False)
        return first, second

    trace = run_trace(model)
    names = {name for name, site in trace.items() if site["type"] == "sample"}
    assert names == {
        "a/experts", "a/gates", "a/noise", "a/expert_intercepts", "a/gate_intercepts",
        "b/experts", "b/gates", "b/noise",
    }
    first, second = handlers.seed(model, jax.random.key(0))()
    np.testing.assert_array_equal(first.experts, trace["a/experts"]["value"])
    np.testing.assert_array_equal(second.noise, trace["b/noise"]["value"])
    assert trace["b/noise"]["infer"]["event_dims"] == ["expert"]


def test_moe_priors_rejects_an_unknown_link():
    with pytest.raises(ValueError, match=r"^link: unknown link"):
        handlers.seed(moe_priors, rng_seed=0)(K, D, link="nope")
    with pytest.raises(TypeError, match=r"^link"):
        handlers.seed(moe_regression, rng_seed=0)(np.zeros((5, D)), num_experts=K, link=3)


# --------------------------------------------------------------------------- handlers, inference


def test_condition_on_experts_makes_them_observed():
    x, y, truth = make_truth(10)
    sites = params_to_sites(truth)
    conditioned = handlers.condition(moe_regression, {"experts": truth.experts})
    trace = trace_sites(conditioned, x, y, num_experts=K)
    assert trace["experts"]["is_observed"]
    assert trace["experts"]["value"] is truth.experts
    assert {name for name, site in trace.items() if not site["is_observed"]} == {"gates", "noise"}
    assert trace["y"]["is_observed"]
    # The joint density is unchanged: the fixed experts still carry their prior term.
    rest = {name: value for name, value in sites.items() if name != "experts"}
    fixed = joint_log_density(conditioned, x, y, {"num_experts": K}, rest)
    full = joint_log_density(moe_regression, x, y, {"num_experts": K}, sites)
    np.testing.assert_allclose(fixed, full, rtol=1e-12)


@pytest.fixture(scope="module")
def nuts_run():
    """A tiny NUTS run started at the truth: n=200, d=4, k=2, 50 warmup, 50 samples."""
    x, y, truth = moe.simulation.simulate(key=jax.random.key(10), num_samples=200, dim=4, num_experts=2, noise=0.1)
    kernel = NUTS(moe_regression, init_strategy=init_to_params(params=truth))
    mcmc = MCMC(kernel, num_warmup=50, num_samples=50, progress_bar=False)
    mcmc.run(jax.random.key(11), x, y, num_experts=2)
    return mcmc, x, y, truth


@pytest.mark.slow  # the NUTS run costs about 20 s of CPU (compiling and sampling)
def test_nuts_from_the_truth_recovers_noise_and_experts(nuts_run):
    mcmc, _, _, truth = nuts_run
    samples = mcmc.get_samples()
    assert samples["experts"].shape == (50, 2, 4)
    assert samples["gates"].shape == (50, 1, 4)
    assert samples["noise"].shape == (50, 2)  # one noise per expert (the default)
    assert not mcmc.get_extra_fields()["diverging"].any()
    # The posterior of each expert's s_i concentrates with sd about s/sqrt(2 n_i) = 0.007 with
    # n_i ~ 100 of the 200 points (the gate's shares; measured sds 0.0066 and 0.0060); each
    # posterior mean sits within a few of those of the truth (measured 0.102 and 0.093). Allow 5
    # (0.035).
    np.testing.assert_array_less(np.abs(np.asarray(samples["noise"].mean(0)) - 0.1), 5 * 0.1 / np.sqrt(2 * 100))
    # Started at the truth, the chain stays in the truth's labelling.
    posterior_mean = sites_to_params({name: value.mean(0) for name, value in samples.items()})
    assert moe.metrics.expert_error(posterior_mean, truth) < 0.1
    np.testing.assert_allclose(
        np.asarray(posterior_mean.experts), np.asarray(truth.experts), atol=0.15
    )


@pytest.mark.slow  # the NUTS run costs about 20 s of CPU (compiling and sampling)
def test_arviz_conversion_names_the_dims(nuts_run):
    mcmc, x, y, _ = nuts_run
    idata = az.from_numpyro(mcmc, log_likelihood=True)
    posterior = idata["posterior"]
    assert posterior["experts"].dims == ("chain", "draw", "expert", "feature")
    assert posterior["gates"].dims == ("chain", "draw", "gate", "feature")
    assert posterior["noise"].dims == ("chain", "draw", "expert")  # one noise per expert (the default)
    assert posterior.sizes["expert"] == 2 and posterior.sizes["gate"] == 1
    assert posterior.sizes["feature"] == 4
    log_lik = idata["log_likelihood"]["y"]
    assert log_lik.dims == ("chain", "draw", "obs")
    assert log_lik.shape == (1, 50, 200)
    # The stored pointwise values are the model's: check one draw.
    draw = {name: value[7] for name, value in mcmc.get_samples().items()}
    np.testing.assert_allclose(
        log_lik.values[0, 7],
        np.asarray(MixtureOfExperts.from_params(sites_to_params(draw), x).log_prob(y)),
        rtol=1e-10,
    )
    assert idata["observed_data"]["y"].dims == ("obs",)


def test_prior_predictive_shapes():
    x, _, _ = make_truth(11)
    predictive = Predictive(moe_regression, num_samples=7)
    # A tight noise prior makes each drawn y sit on one of its own draw's expert means.
    priors = {"noise": dist.HalfNormal(1e-4)}
    draws = jax.jit(lambda key: predictive(key, x, num_experts=K, priors=priors))(jax.random.key(12))
    draws = {name: np.asarray(value) for name, value in draws.items()}
    assert draws["y"].shape == (7, N)
    assert draws["experts"].shape == (7, K, D)
    assert draws["gates"].shape == (7, K - 1, D)
    assert draws["noise"].shape == (7, K)  # one noise sd per expert (the default)
    assert (draws["noise"] > 0).all()
    assert np.isfinite(draws["y"]).all()
    # Draws differ from one another (each has its own parameters).
    assert np.std(draws["experts"][:, 0, 0]) > 0
    for j in range(7):
        means = x @ draws["experts"][j].T
        gap = (np.abs(draws["y"][j][:, None] - means) / draws["noise"][j][None, :]).min(axis=1)
        assert gap.max() < 6, j  # within 6 noise sds of some expert's mean (in that expert's sd)
        # ... and not by accident: another draw's experts do not explain it.
        other = x @ draws["experts"][(j + 1) % 7].T
        assert np.median(np.abs(draws["y"][j][:, None] - other).min(axis=1)) > 1e-2


# --------------------------------------------------------------------------- enumerated variant


@pytest.mark.parametrize(
    ("link", "intercepts", "shared_noise"), [("linear", False, True), ("tanh", True, True), ("tanh", True, False)]
)
def test_enumerated_model_has_the_marginal_log_density(link, intercepts, shared_noise):
    noise = 0.3 if shared_noise else (0.2, 0.5, 0.9)
    x, y, truth = make_truth(12, intercepts=intercepts, noise=noise)
    sites = params_to_sites(truth, shared_noise=shared_noise)
    kwargs = {"num_experts": K, "link": link, "intercepts": intercepts, "shared_noise": shared_noise}
    marginal = joint_log_density(moe_regression, x, y, kwargs, sites)
    enumerated = joint_log_density(moe_regression_enumerated, x, y, kwargs, sites, enumerated=True)
    np.testing.assert_allclose(enumerated, marginal, rtol=1e-10)
    np.testing.assert_allclose(enumerated, np_log_joint(sites, x, y, link), rtol=1e-10)


def test_enumerated_model_site_is_marked_for_enumeration():
    x, y, _ = make_truth(13)
    site = trace_sites(moe_regression_enumerated, x, y, num_experts=K)["expert_assignment"]
    assert site["infer"]["enumerate"] == "parallel"
    assert site["value"].shape == (N,)
    assert not site["is_observed"]


def test_infer_discrete_recovers_the_assignments():
    # Well-separated experts (norm 3, orthonormal directions) and small noise (0.05): the
    # posterior of z is sharp except where two expert means nearly coincide.
    n, rng = 300, np.random.default_rng(20)
    experts = 3.0 * np.eye(K, D)
    gates = np.vstack([rng.normal(size=(K - 1, D)), np.zeros((1, D))])
    x = rng.normal(size=(n, D))
    probs = softmax(x @ gates.T, axis=1)
    z = np.array([rng.choice(K, p=p) for p in probs])
    y = (x @ experts.T)[np.arange(n), z] + 0.05 * rng.normal(size=n)
    truth = MoEParams(jnp.asarray(experts), jnp.asarray(gates), jnp.full(K, 0.05))
    sites = params_to_sites(truth)

    decoder = infer_discrete(
        handlers.substitute(moe_regression_enumerated, data=sites),
        first_available_dim=-2, temperature=0, rng_key=jax.random.key(14),
    )

    def decode(x, y):
        return handlers.trace(decoder).get_trace(x, y, num_experts=K)["expert_assignment"]["value"]

    assignment = np.asarray(jax.jit(decode)(jnp.asarray(x), jnp.asarray(y)))
    assert assignment.shape == (n,)
    # temperature=0 is the per-point MAP: argmax_i p_i(x_n) N(y_n; a_i . x_n, s^2), exactly.
    posterior = np.log(probs) + norm.logpdf(y[:, None], x @ experts.T, 0.05)
    np.testing.assert_array_equal(assignment, posterior.argmax(1))
    # Agreement with the true z: misassignments need |(a_i - a_j) . x| of the order of the
    # noise, which has probability of a few percent here.
    assert (assignment == z).mean() > 0.9


# --------------------------------------------------------------------------- sites <-> params


def _assert_same_params(actual: MoEParams, expected: MoEParams, atol=0.0):
    for field in ("experts", "gates", "noise", "expert_intercepts", "gate_intercepts"):
        a, b = getattr(actual, field), getattr(expected, field)
        if b is None:
            assert a is None, field
        else:
            assert np.shape(a) == np.shape(b), field
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol, err_msg=field)
    assert actual.link == expected.link


def test_sites_round_trip():
    _, _, truth = make_truth(15)
    sites = params_to_sites(truth)
    assert set(sites) == {"experts", "gates", "noise"}
    assert sites["gates"].shape == (K - 1, D)
    assert sites["noise"].shape == (K,)  # one noise per expert by default
    back = sites_to_params(sites)
    _assert_same_params(back, truth)  # exact
    assert back.expert_intercepts is None and back.gate_intercepts is None
    shared = params_to_sites(truth, shared_noise=True)
    assert shared["noise"].shape == ()
    _assert_same_params(sites_to_params(shared), truth)  # exact: k equal noises become their common value


@pytest.mark.parametrize("intercepts", [False, True])
def test_sites_round_trip_noise_shared_or_per_expert(intercepts):
    _, _, truth = make_truth(16, intercepts=intercepts, noise=(0.2, 0.5, 0.8))
    # One noise per expert: exact both ways.
    per_expert = params_to_sites(truth, shared_noise=False)
    assert per_expert["noise"].shape == (K,)
    _assert_same_params(sites_to_params(per_expert), truth)
    # Shared: the mean of the k noises, broadcast back to (k,).
    shared = params_to_sites(truth, shared_noise=True)
    assert shared["noise"].shape == ()
    assert float(shared["noise"]) == pytest.approx(0.5, rel=1e-15)
    _assert_same_params(sites_to_params(shared), truth.replace(noise=jnp.full(K, 0.5)), atol=1e-15)
    # A scalar noise in the record is accepted either way.
    scalar = truth.replace(noise=jnp.asarray(0.4))
    assert float(params_to_sites(scalar, shared_noise=True)["noise"]) == 0.4
    np.testing.assert_array_equal(params_to_sites(scalar, shared_noise=False)["noise"], np.full(K, 0.4))


@pytest.mark.parametrize("shared_noise", [True, False])
@pytest.mark.parametrize("intercepts", [False, True])
def test_sites_round_trip_with_a_prefix(shared_noise, intercepts):
    _, _, truth = make_truth(17, intercepts=intercepts, noise=(0.2, 0.3, 0.4))
    truth = truth.replace(link="tanh")
    sites = params_to_sites(truth, prefix="a", shared_noise=shared_noise)
    names = {"experts", "gates", "noise"} | ({"expert_intercepts", "gate_intercepts"} if intercepts else set())
    assert set(sites) == {f"a/{name}" for name in names}
    back = sites_to_params(sites, prefix="a", link="tanh")
    expected = truth if not shared_noise else truth.replace(noise=jnp.full(K, 0.3))
    _assert_same_params(back, expected, atol=1e-15)
    # The prefix selects the block: other entries (another block, other sites) are ignored.
    mixed = {**sites, **params_to_sites(make_truth(18)[2], prefix="b"), "extra": jnp.ones(2)}
    _assert_same_params(sites_to_params(mixed, prefix="a", link="tanh"), expected, atol=1e-15)
    with pytest.raises(KeyError, match="'experts'"):
        sites_to_params(sites)  # no unprefixed experts


def test_sites_to_params_records_the_link():
    _, _, truth = make_truth(19)
    sites = params_to_sites(truth)
    assert sites_to_params(sites).link.name == "linear"
    assert sites_to_params(sites, link="relu").link.name == "relu"
    assert sites_to_params(sites, link=cubic).link.function is cubic


def test_sites_round_trip_with_intercepts_and_unnormalised_gates():
    _, _, truth = make_truth(16, intercepts=True)
    shifted = truth.replace(
        gates=truth.gates + jnp.array([0.3, -1.0, 0.5, 2.0]),
        gate_intercepts=truth.gate_intercepts + 0.9,
    )
    sites = params_to_sites(shifted)
    assert set(sites) == {"experts", "gates", "noise", "expert_intercepts", "gate_intercepts"}
    assert sites["gate_intercepts"].shape == (K - 1,)
    back = sites_to_params(sites)
    # The gates come back normalised (last row and intercept zero): the same model.
    assert np.all(np.asarray(back.gates[-1]) == 0.0)
    assert float(back.gate_intercepts[-1]) == 0.0
    np.testing.assert_allclose(np.asarray(back.gates), np.asarray(truth.gates), atol=1e-12)
    np.testing.assert_allclose(np.asarray(back.gate_intercepts), np.asarray(truth.gate_intercepts), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(back.expert_intercepts), np.asarray(truth.expert_intercepts))
    expected = shifted.normalized()
    np.testing.assert_allclose(np.asarray(back.gates), np.asarray(expected.gates), atol=1e-12)


@pytest.mark.parametrize("shared_noise", [True, False])
def test_sites_to_params_keeps_leading_batch_axes(shared_noise):
    records = [make_truth(seed, intercepts=True, noise=(0.1 + seed, 0.2, 0.3))[2] for seed in range(3)]
    per_record = [params_to_sites(record, shared_noise=shared_noise) for record in records]
    stacked = {name: jnp.stack([sites[name] for sites in per_record]) for name in per_record[0]}
    batch = sites_to_params(stacked)
    assert batch.experts.shape == (3, K, D) and batch.gates.shape == (3, K, D)
    assert batch.noise.shape == (3, K)
    assert batch.expert_intercepts.shape == (3, K) and batch.gate_intercepts.shape == (3, K)
    for index, sites in enumerate(per_record):
        single = sites_to_params(sites)
        _assert_same_params(jax.tree.map(lambda leaf, i=index: leaf[i], batch), single)
    # The same as vmapping over the draws.
    vmapped = jax.vmap(sites_to_params)(stacked)
    _assert_same_params(vmapped, batch)


def test_sites_match_the_model_trace():
    for shared_noise in (True, False):
        x, _, truth = make_truth(17, intercepts=True)
        sites = params_to_sites(truth, shared_noise=shared_noise)
        trace = trace_sites(moe_regression, x, num_experts=K, intercepts=True, shared_noise=shared_noise)
        assert not trace["y"]["is_observed"] and trace["y"]["value"].shape == (N,)
        latent = {name: site for name, site in trace.items() if name != "y"}
        assert set(latent) == set(sites)
        for name, value in sites.items():
            assert latent[name]["value"].shape == jnp.shape(value), (name, shared_noise)


def test_sites_round_trip_single_expert():
    _, _, truth = make_truth(18, num_experts=1, intercepts=True)
    sites = params_to_sites(truth)
    assert set(sites) == {"experts", "noise", "expert_intercepts"}
    back = sites_to_params(sites)
    assert back.gates.shape == (1, D) and np.all(np.asarray(back.gates) == 0)
    assert back.gate_intercepts.shape == (1,) and float(back.gate_intercepts[0]) == 0.0
    assert back.noise.shape == (1,)


def test_params_to_sites_accepts_fit_results_and_rejects_other_types():
    _, _, truth = make_truth(19)
    fit = moe.Fit(params=truth, log_likelihood=0.0, history=np.zeros(1), iterations=1, converged=True, method="em")
    from_fit, direct = params_to_sites(fit), params_to_sites(truth)
    assert set(from_fit) == set(direct)
    for name in direct:
        np.testing.assert_array_equal(from_fit[name], direct[name])
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        params_to_sites({"experts": jnp.zeros((2, 3))})


# --------------------------------------------------------------------------- init_to_params


def scoped_model(x, y=None, *, shared_noise=True, intercepts=False):
    """A user's model: its own latent site, the mixture under the prefix "a"."""
    spread = numpyro.sample("spread", dist.LogNormal(0.0, 1.0))
    with handlers.scope(prefix="a"):
        params = moe_priors(K, D, intercepts=intercepts, shared_noise=shared_noise)
    with numpyro.plate("obs", x.shape[0]):
        numpyro.sample("y", MixtureOfExperts.from_params(params.replace(noise=params.noise * spread), x), obs=y)


def init_trace(model, strategy, *args, key=0, **kwargs):
    """The trace of one run with every latent site at the strategy's value (as NumPyro inits)."""
    seeded = handlers.substitute(handlers.seed(model, jax.random.key(key)), substitute_fn=strategy)
    return handlers.trace(seeded).get_trace(*args, **kwargs)


@pytest.mark.parametrize("intercepts", [False, True])
def test_init_to_params_under_a_scope(intercepts):
    x, y, truth = make_truth(21, intercepts=intercepts, noise=(0.2, 0.3, 0.7))
    strategy = init_to_params(params=truth, prefix="a")
    trace = init_trace(scoped_model, strategy, x, y, shared_noise=False, intercepts=intercepts)
    np.testing.assert_array_equal(trace["a/experts"]["value"], truth.experts)
    np.testing.assert_array_equal(trace["a/gates"]["value"], truth.gates[:-1])
    np.testing.assert_array_equal(trace["a/noise"]["value"], truth.noise)
    if intercepts:
        np.testing.assert_array_equal(trace["a/expert_intercepts"]["value"], truth.expert_intercepts)
        np.testing.assert_array_equal(trace["a/gate_intercepts"]["value"], truth.gate_intercepts[:-1])
    # The user's own latent site falls back to init_to_uniform: finite and in its support.
    spread = float(trace["spread"]["value"])
    assert np.isfinite(spread) and spread > 0
    # init_to_uniform draws log(spread) in (-2, 2).
    assert np.exp(-2) < spread < np.exp(2)
    # The observed site keeps the data.
    np.testing.assert_array_equal(trace["y"]["value"], y)


def test_init_to_params_adapts_the_noise_to_the_model():
    x, y, truth = make_truth(22, noise=(0.2, 0.3, 0.7))
    strategy = init_to_params(params=truth, prefix="a")
    shared = init_trace(scoped_model, strategy, x, y, shared_noise=True)["a/noise"]["value"]
    assert jnp.shape(shared) == ()
    assert float(shared) == pytest.approx(0.4, rel=1e-15)  # the mean of the k noises
    per_expert = init_trace(scoped_model, strategy, x, y, shared_noise=False)["a/noise"]["value"]
    np.testing.assert_array_equal(per_expert, truth.noise)


def test_init_to_params_respects_the_prefix_and_conditioning():
    x, y, truth = make_truth(23)
    # Unscoped strategy, scoped model: no site matches, all fall back to init_to_uniform.
    trace = init_trace(scoped_model, init_to_params(params=truth), x, y)
    assert not np.allclose(trace["a/experts"]["value"], truth.experts)
    assert np.all(np.abs(np.asarray(trace["a/experts"]["value"])) < 2)  # uniform on (-2, 2)
    # Conditioned sites are left to the model.
    fixed = jnp.full((K, D), 0.25)
    conditioned = handlers.condition(scoped_model, {"a/experts": fixed})
    trace = init_trace(conditioned, init_to_params(params=truth, prefix="a"), x, y)
    np.testing.assert_array_equal(trace["a/experts"]["value"], fixed)
    assert trace["a/experts"]["is_observed"]
    np.testing.assert_array_equal(trace["a/gates"]["value"], truth.gates[:-1])


def test_init_to_params_called_with_a_site():
    x, y, truth = make_truth(24)
    trace = run_trace(moe_regression, x, y, num_experts=K)
    value = init_to_params(trace["experts"], params=truth)
    np.testing.assert_array_equal(value, truth.experts)
    value = init_to_params(trace["noise"], params=truth)  # one noise per expert by default
    np.testing.assert_array_equal(value, truth.noise)
    shared = run_trace(moe_regression, x, y, num_experts=K, shared_noise=True)
    value = init_to_params(shared["noise"], params=truth)
    assert float(value) == pytest.approx(0.3, rel=1e-15)  # shared: the mean


def test_init_to_params_is_what_numpyro_initialises_from():
    x, y, truth = make_truth(25, intercepts=True, noise=(0.2, 0.3, 0.7))
    info = initialize_model(
        jax.random.key(26), scoped_model, init_strategy=init_to_params(params=truth, prefix="a"),
        model_args=(x, y), model_kwargs={"shared_noise": False, "intercepts": True},
    )
    constrained = info.postprocess_fn(info.param_info.z)
    np.testing.assert_allclose(constrained["a/experts"], truth.experts, rtol=1e-12)
    np.testing.assert_allclose(constrained["a/gates"], truth.gates[:-1], rtol=1e-12)
    np.testing.assert_allclose(constrained["a/noise"], truth.noise, rtol=1e-12)
    np.testing.assert_allclose(constrained["a/expert_intercepts"], truth.expert_intercepts, rtol=1e-12)
    assert np.isfinite(float(constrained["spread"]))


def test_init_to_params_with_several_blocks_and_other_values():
    x, y, first = make_truth(27, noise=(0.2, 0.3, 0.7))
    second = make_truth(28, num_experts=2, intercepts=True)[2]

    def model(x, y=None):
        spread = numpyro.sample("spread", dist.LogNormal(0.0, 1.0))
        with handlers.scope(prefix="g1"):
            one = moe_priors(K, D, shared_noise=False)
        with handlers.scope(prefix="g2"):
            two = moe_priors(2, D, intercepts=True, shared_noise=True)
        with numpyro.plate("obs", x.shape[0]):
            mean = one.predictive_mean(x) + two.predictive_mean(x)
            numpyro.sample("y", dist.Normal(mean, spread), obs=y)

    strategy = init_to_params(params={"g1": first, "g2": second}, values={"spread": 1.5})
    trace = init_trace(model, strategy, x, y)
    np.testing.assert_array_equal(trace["g1/experts"]["value"], first.experts)
    np.testing.assert_array_equal(trace["g1/noise"]["value"], first.noise)
    np.testing.assert_array_equal(trace["g2/experts"]["value"], second.experts)
    np.testing.assert_array_equal(trace["g2/gates"]["value"], second.gates[:-1])
    np.testing.assert_array_equal(trace["g2/expert_intercepts"]["value"], second.expert_intercepts)
    assert float(trace["g2/noise"]["value"]) == pytest.approx(0.3, rel=1e-15)  # shared: the mean
    assert float(trace["spread"]["value"]) == 1.5
