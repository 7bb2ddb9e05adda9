"""The NumPyro models `moe_regression` and `moe_regression_enumerated`.

The log densities are checked against an independent NumPy/SciPy computation of

    sum of log priors + sum_n log sum_i softmax(W x_n + b)_i N(y_n; g(a_i . x_n + c_i), s^2)

with Normal(0, expert_prior_scale) on experts (and expert intercepts), Normal(0, gate_prior_scale)
on the k - 1 free gate rows (and gate intercepts), HalfNormal(noise_prior_scale) on the noise.
"""

from __future__ import annotations

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro import handlers
from numpyro.contrib.funsor import enum, infer_discrete
from numpyro.contrib.funsor import log_density as enum_log_density
from numpyro.infer import MCMC, NUTS, Predictive, init_to_value
from numpyro.infer.util import log_density
from scipy.special import expit, logsumexp, softmax
from scipy.stats import halfnorm, norm

from numpyro_moe import (
    MoEParams,
    expert_error,
    moe_regression,
    moe_regression_enumerated,
    normalize_gates,
    params_to_sites,
    pointwise_log_likelihood,
    simulate,
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
    noise = float(sites["noise"])
    component = norm.logpdf(y[:, None], loc=NP_LINKS[link](pre), scale=noise)
    return logsumexp(log_gate + component, axis=1)


def np_log_joint(sites: dict, x, y, link: str, expert_scale=1.0, gate_scale=2.5, noise_scale=1.0):
    total = norm.logpdf(np.asarray(sites["experts"]), 0.0, expert_scale).sum()
    if "gates" in sites:
        total += norm.logpdf(np.asarray(sites["gates"]), 0.0, gate_scale).sum()
    total += halfnorm.logpdf(float(sites["noise"]), scale=noise_scale)
    if "expert_intercepts" in sites:
        total += norm.logpdf(np.asarray(sites["expert_intercepts"]), 0.0, expert_scale).sum()
    if "gate_intercepts" in sites:
        total += norm.logpdf(np.asarray(sites["gate_intercepts"]), 0.0, gate_scale).sum()
    return total + np_pointwise(sites, x, y, link).sum()


def make_truth(seed=0, *, intercepts=False, num_experts=K, noise=0.3):
    """Inputs x (N, D), responses y from the model with a linear link, and the parameters.

    Drawn with NumPy from a fixed seed, so these tests do not lean on `simulate`.
    """
    rng = np.random.default_rng(seed)
    experts = rng.normal(size=(num_experts, D)) / np.sqrt(D)
    gates = np.vstack([1.5 * rng.normal(size=(num_experts - 1, D)), np.zeros((1, D))])
    x = rng.normal(size=(N, D))
    probs = softmax(x @ gates.T, axis=1)
    z = (probs.cumsum(1) < rng.uniform(size=(N, 1))).sum(1)
    y = (x @ experts.T)[np.arange(N), z] + noise * rng.normal(size=N)
    truth = MoEParams(jnp.asarray(experts), jnp.asarray(gates), jnp.asarray(noise))
    if intercepts:
        truth = truth._replace(
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


def joint_log_density(model, x, y, kwargs, sites, *, enumerated=False):
    """The model's log joint density at ``sites``, as inference evaluates it: under jit.

    (x and y are closed over, so they stay concrete and the model's input checks still run.)
    """
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
    priors = {"expert_prior_scale": 0.7, "gate_prior_scale": 1.9, "noise_prior_scale": 0.4}
    value = joint_log_density(
        moe_regression, x, y,
        dict(num_experts=K, link=model_link(link), intercepts=intercepts, **priors), sites,
    )
    expected = np_log_joint(sites, x, y, link, 0.7, 1.9, 0.4)
    np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_log_density_default_priors():
    x, y, truth = make_truth(2, intercepts=True)
    sites = params_to_sites(truth)
    value = joint_log_density(moe_regression, x, y, {"num_experts": K, "intercepts": True}, sites)
    np.testing.assert_allclose(value, np_log_joint(sites, x, y, "linear"), rtol=1e-10)


def test_log_density_single_expert_is_a_plain_regression():
    x, y, truth = make_truth(3, num_experts=1)
    sites = params_to_sites(truth)
    assert set(sites) == {"experts", "noise"}
    assert set(trace_sites(moe_regression, x, y, num_experts=1)) == {"experts", "noise", "y"}
    value = joint_log_density(moe_regression, x, y, {"num_experts": 1}, sites)
    noise = float(truth.noise)
    expected = (
        norm.logpdf(np.asarray(truth.experts)).sum()
        + halfnorm.logpdf(noise)
        + norm.logpdf(np.asarray(y), np.asarray(x) @ np.asarray(truth.experts)[0], noise).sum()
    )
    np.testing.assert_allclose(value, expected, rtol=1e-10)


@pytest.mark.parametrize(("link", "intercepts"), [("linear", False), ("tanh", True)])
def test_pointwise_log_likelihood_matches_numpyro_log_likelihood(link, intercepts):
    x, y, truth = make_truth(4, intercepts=intercepts)
    sites = params_to_sites(truth)
    draws = {name: value[None] for name, value in sites.items()}
    numpyro_ll = jax.jit(
        lambda draws: numpyro.infer.log_likelihood(
            moe_regression, draws, x, y, num_experts=K, link=link, intercepts=intercepts
        )["y"]
    )(draws)
    assert numpyro_ll.shape == (1, N)
    ours = pointwise_log_likelihood(truth, x, y, link)
    assert ours.shape == (N,)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(numpyro_ll[0]), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(ours), np_pointwise(sites, x, y, link), rtol=1e-10)


# --------------------------------------------------------------------------- handlers, inference


def test_condition_on_experts_makes_them_observed():
    x, y, truth = make_truth(5)
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
    x, y, truth = simulate(jax.random.key(10), num_samples=200, dim=4, num_experts=2, noise=0.1)
    kernel = NUTS(moe_regression, init_strategy=init_to_value(values=params_to_sites(truth)))
    mcmc = MCMC(kernel, num_warmup=50, num_samples=50, progress_bar=False)
    mcmc.run(jax.random.key(11), x, y, num_experts=2)
    return mcmc, x, y, truth


def test_nuts_from_the_truth_recovers_noise_and_experts(nuts_run):
    mcmc, _, _, truth = nuts_run
    samples = mcmc.get_samples()
    assert samples["experts"].shape == (50, 2, 4)
    assert samples["gates"].shape == (50, 1, 4)
    assert samples["noise"].shape == (50,)
    assert not mcmc.get_extra_fields()["diverging"].any()
    # The posterior of s concentrates with sd about s/sqrt(2n) = 0.005 at n=200; the posterior
    # mean sits within a few of those of the truth. Allow 5 (0.025).
    assert abs(float(samples["noise"].mean()) - 0.1) < 5 * 0.1 / np.sqrt(2 * 200)
    # Started at the truth, the chain stays in the truth's labelling.
    posterior_mean = sites_to_params({name: value.mean(0) for name, value in samples.items()})
    assert expert_error(posterior_mean, truth) < 0.1
    np.testing.assert_allclose(
        np.asarray(posterior_mean.experts), np.asarray(truth.experts), atol=0.15
    )


def test_arviz_conversion_names_the_dims(nuts_run):
    mcmc, x, y, _ = nuts_run
    idata = az.from_numpyro(mcmc, log_likelihood=True)
    posterior = idata["posterior"]
    assert posterior["experts"].dims == ("chain", "draw", "expert", "feature")
    assert posterior["gates"].dims == ("chain", "draw", "gate", "feature")
    assert posterior["noise"].dims == ("chain", "draw")
    assert posterior.sizes["expert"] == 2 and posterior.sizes["gate"] == 1
    assert posterior.sizes["feature"] == 4
    log_lik = idata["log_likelihood"]["y"]
    assert log_lik.dims == ("chain", "draw", "obs")
    assert log_lik.shape == (1, 50, 200)
    # The stored pointwise values are the model's: check one draw.
    draw = {name: value[7] for name, value in mcmc.get_samples().items()}
    np.testing.assert_allclose(
        log_lik.values[0, 7], np.asarray(pointwise_log_likelihood(sites_to_params(draw), x, y)),
        rtol=1e-10,
    )
    assert idata["observed_data"]["y"].dims == ("obs",)


def test_prior_predictive_shapes():
    x, _, _ = make_truth(6)
    predictive = Predictive(moe_regression, num_samples=7)
    # A tight noise prior makes each drawn y sit on one of its own draw's expert means.
    draws = jax.jit(lambda key: predictive(key, x, num_experts=K, noise_prior_scale=1e-4))(
        jax.random.key(12)
    )
    draws = {name: np.asarray(value) for name, value in draws.items()}
    assert draws["y"].shape == (7, N)
    assert draws["experts"].shape == (7, K, D)
    assert draws["gates"].shape == (7, K - 1, D)
    assert draws["noise"].shape == (7,)
    assert (draws["noise"] > 0).all()
    assert np.isfinite(draws["y"]).all()
    # Draws differ from one another (each has its own parameters).
    assert np.std(draws["experts"][:, 0, 0]) > 0
    for j in range(7):
        means = x @ draws["experts"][j].T
        gap = np.abs(draws["y"][j][:, None] - means).min(axis=1)
        assert gap.max() < 6 * draws["noise"][j], j  # 6 noise sds
        # ... and not by accident: another draw's experts do not explain it.
        other = x @ draws["experts"][(j + 1) % 7].T
        assert np.median(np.abs(draws["y"][j][:, None] - other).min(axis=1)) > 1e-2


# --------------------------------------------------------------------------- enumerated variant


@pytest.mark.parametrize(("link", "intercepts"), [("linear", False), ("tanh", True)])
def test_enumerated_model_has_the_marginal_log_density(link, intercepts):
    x, y, truth = make_truth(8, intercepts=intercepts)
    sites = params_to_sites(truth)
    kwargs = {"num_experts": K, "link": link, "intercepts": intercepts}
    marginal = joint_log_density(moe_regression, x, y, kwargs, sites)
    enumerated = joint_log_density(moe_regression_enumerated, x, y, kwargs, sites, enumerated=True)
    np.testing.assert_allclose(enumerated, marginal, rtol=1e-10)
    np.testing.assert_allclose(enumerated, np_log_joint(sites, x, y, link), rtol=1e-10)


def test_enumerated_model_site_is_marked_for_enumeration():
    x, y, _ = make_truth(9)
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
    truth = MoEParams(jnp.asarray(experts), jnp.asarray(gates), jnp.asarray(0.05))
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


def test_sites_round_trip():
    _, _, truth = make_truth(15)
    sites = params_to_sites(truth)
    assert set(sites) == {"experts", "gates", "noise"}
    assert sites["gates"].shape == (K - 1, D)
    back = sites_to_params(sites)
    for field in ("experts", "gates", "noise"):
        np.testing.assert_array_equal(np.asarray(getattr(back, field)), np.asarray(getattr(truth, field)))
    assert back.expert_intercepts is None and back.gate_intercepts is None


def test_sites_round_trip_with_intercepts_and_unnormalised_gates():
    _, _, truth = make_truth(16, intercepts=True)
    shifted = truth._replace(
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
    expected = normalize_gates(shifted)
    np.testing.assert_allclose(np.asarray(back.gates), np.asarray(expected.gates), atol=1e-12)


def test_sites_match_the_model_trace():
    x, _, truth = make_truth(17, intercepts=True)
    sites = params_to_sites(truth)
    trace = trace_sites(moe_regression, x, num_experts=K, intercepts=True)
    assert not trace["y"]["is_observed"] and trace["y"]["value"].shape == (N,)
    latent = {name: site for name, site in trace.items() if name != "y"}
    assert set(latent) == set(sites)
    for name, value in sites.items():
        assert latent[name]["value"].shape == jnp.shape(value), name


def test_sites_round_trip_single_expert():
    _, _, truth = make_truth(18, num_experts=1, intercepts=True)
    sites = params_to_sites(truth)
    assert set(sites) == {"experts", "noise", "expert_intercepts"}
    back = sites_to_params(sites)
    assert back.gates.shape == (1, D) and np.all(np.asarray(back.gates) == 0)
    assert back.gate_intercepts.shape == (1,) and float(back.gate_intercepts[0]) == 0.0


def test_params_to_sites_rejects_other_types():
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        params_to_sites({"experts": jnp.zeros((2, 3))})


# --------------------------------------------------------------------------- bad input

MODELS = [moe_regression, moe_regression_enumerated]


def _bad_inputs():
    x = np.random.default_rng(0).normal(size=(N, D))
    y = np.zeros(N)
    x_nan, y_inf = x.copy(), y.copy()
    x_nan[3, 1] = np.nan
    y_inf[5] = np.inf
    ok = {"num_experts": K}
    return [
        ("x-1d", (x[:, 0], y), ok, ValueError, r"^x: expected a 2-d array"),
        ("x-3d", (x[None], y), ok, ValueError, r"^x: expected a 2-d array"),
        ("x-empty", (x[:0], y[:0]), ok, ValueError, r"^x: expected a non-empty"),
        ("x-text", ([["a", "b"]], None), ok, TypeError, r"^x"),
        ("x-nan", (x_nan, y), ok, ValueError, r"^x: expected finite values, found 1 "),
        ("y-length", (x, y[:-1]), ok, ValueError, rf"^y: expected length {N}"),
        ("y-2d", (x, y[:, None]), ok, ValueError, r"^y: expected a 1-d array"),
        ("y-inf", (x, y_inf), ok, ValueError, r"^y: expected finite values, found 1 "),
        ("k-zero", (x, y), {"num_experts": 0}, ValueError, r"^num_experts"),
        ("k-float", (x, y), {"num_experts": 2.0}, TypeError, r"^num_experts"),
        ("link", (x, y), {"num_experts": K, "link": "nope"}, ValueError, r"^link: unknown link"),
        ("link-type", (x, y), {"num_experts": K, "link": 3}, TypeError, r"^link"),
    ]


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "pattern"),
    [case[1:] for case in _bad_inputs()],
    ids=[case[0] for case in _bad_inputs()],
)
def test_bad_model_inputs_raise_errors_naming_the_argument(model, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        handlers.seed(model, rng_seed=0)(*args, **kwargs)
