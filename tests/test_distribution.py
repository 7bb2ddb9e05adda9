"""`MixtureOfExperts`, the likelihood of a softmax-gated mixture of Gaussian experts.

For one observation with gate logits l (k,), expert means m (k,) and expert sds s (k,)::

    log p(y) = logsumexp_i [ log softmax(l)_i + log N(y; m_i, s_i^2) ]

Everything is checked against NumPy/SciPy written out by hand here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from gate_prior import gate_contrast_logpdf
from numpyro.infer.util import log_density
from scipy.special import log_softmax, logsumexp, softmax
from scipy.stats import invgamma, norm

import numpyro_moe as moe
from numpyro_moe import MixtureOfExperts

N, K, D = 6, 3, 4
SCALES = np.array([0.3, 0.7, 1.5])


def np_log_prob(y, logits, locs, scales):
    """log p(y_n) by NumPy/SciPy: logsumexp over experts of log gate + Normal log density."""
    y = np.asarray(y)
    return logsumexp(log_softmax(logits, axis=-1) + norm.logpdf(y[..., None], locs, scales), axis=-1)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=1.5, size=(N, K))
    locs = rng.normal(scale=2.0, size=(N, K))
    y = rng.normal(scale=2.0, size=N)
    return logits, locs, y


def make_params(*, intercepts=True, link="tanh", seed=1):
    rng = np.random.default_rng(seed)
    experts = jnp.asarray(rng.normal(size=(K, D)))
    gates = jnp.asarray(np.vstack([rng.normal(size=(K - 1, D)), np.zeros((1, D))]))
    noise = jnp.asarray(SCALES)
    if not intercepts:
        return moe.MoEParams(experts, gates, noise, link=link)
    return moe.MoEParams(
        experts, gates, noise,
        expert_intercepts=jnp.array([0.3, -0.2, 0.5]),
        gate_intercepts=jnp.array([0.7, -0.4, 0.0]),
        link=link,
    )


def design(seed=2, n=N):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, D))), jnp.asarray(rng.normal(size=n))


# --------------------------------------------------------------------------- log_prob


def test_log_prob_is_the_logsumexp_of_log_gate_plus_expert_density(arrays):
    logits, locs, y = arrays
    mixture = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.asarray(SCALES))
    value = mixture.log_prob(jnp.asarray(y))
    assert value.shape == (N,)
    np.testing.assert_allclose(value, np_log_prob(y, logits, locs, SCALES), rtol=1e-12)
    # Per-expert scales matter: with all scales equal to the first the value differs.
    shared = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), SCALES[0]).log_prob(jnp.asarray(y))
    np.testing.assert_allclose(shared, np_log_prob(y, logits, locs, np.full(K, SCALES[0])), rtol=1e-12)
    assert np.abs(np.asarray(shared) - np.asarray(value)).max() > 0.1


def test_log_prob_is_invariant_to_shifting_the_logits(arrays):
    logits, locs, y = arrays
    base = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.asarray(SCALES)).log_prob(y)
    shifted = MixtureOfExperts(jnp.asarray(logits + 7.0), jnp.asarray(locs), jnp.asarray(SCALES)).log_prob(y)
    np.testing.assert_allclose(shifted, base, rtol=1e-12)


def test_log_prob_broadcasts_over_a_sample_of_values(arrays):
    logits, locs, _ = arrays
    values = np.random.default_rng(3).normal(size=(5, N))
    mixture = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.asarray(SCALES))
    out = mixture.log_prob(jnp.asarray(values))
    assert out.shape == (5, N)
    np.testing.assert_allclose(out, np_log_prob(values, logits, locs, SCALES), rtol=1e-12)


def test_log_prob_is_stable_far_in_the_tails(arrays):
    logits, locs, _ = arrays
    y = np.full(N, 60.0)  # densities underflow to 0 in float64; log densities do not
    value = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.asarray(SCALES)).log_prob(y)
    assert np.isfinite(np.asarray(value)).all()
    np.testing.assert_allclose(value, np_log_prob(y, logits, locs, SCALES), rtol=1e-12)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("logits_shape", "locs_shape", "scales_shape", "batch_shape"),
    [
        ((N, K), (N, K), (K,), (N,)),
        ((N, K), (N, K), (), (N,)),  # one shared scalar scale
        ((N, K), (N, K), (N, K), (N,)),  # per-point scales
        ((N, K), (K,), (K,), (N,)),  # the same expert means for every point
        ((2, N, K), (N, K), (K,), (2, N)),
        ((2, 1, K), (1, N, K), (2, 1, K), (2, N)),
        ((K,), (K,), (K,), ()),
    ],
)
def test_batch_and_event_shapes(logits_shape, locs_shape, scales_shape, batch_shape):
    rng = np.random.default_rng(4)
    mixture = MixtureOfExperts(
        jnp.asarray(rng.normal(size=logits_shape)),
        jnp.asarray(rng.normal(size=locs_shape)),
        jnp.asarray(rng.uniform(0.5, 1.5, size=scales_shape)),
    )
    assert mixture.batch_shape == batch_shape
    assert mixture.event_shape == ()
    assert mixture.mixture_size == K
    assert mixture.mean.shape == batch_shape and mixture.variance.shape == batch_shape
    # The gate probabilities cover the whole batch, whatever axes the logits had.
    probs = mixture.gate_probabilities
    assert probs.shape == (*batch_shape, K)
    np.testing.assert_allclose(probs, jnp.broadcast_to(jax.nn.softmax(mixture.gate_logits, -1), probs.shape))
    assert mixture.log_prob(jnp.zeros(batch_shape)).shape == batch_shape
    assert mixture.expert_probabilities(jnp.zeros(batch_shape)).shape == (*batch_shape, K)


@pytest.mark.parametrize(
    ("logits_shape", "scales_shape", "batch_shape", "sample_shape"),
    [((N, K), (K,), (N,), ()), ((N, K), (), (N,), (7,)), ((2, N, K), (), (2, N), (2, 3))],
)
def test_sample_shapes(logits_shape, scales_shape, batch_shape, sample_shape):
    rng = np.random.default_rng(4)
    mixture = MixtureOfExperts(
        jnp.asarray(rng.normal(size=logits_shape)),
        jnp.asarray(rng.normal(size=(N, K))),
        jnp.asarray(rng.uniform(0.5, 1.5, size=scales_shape)),
    )
    draws = mixture.sample(jax.random.key(0), sample_shape)
    assert draws.shape == (*sample_shape, *batch_shape)
    assert np.isfinite(np.asarray(draws)).all()
    assert len(np.unique(np.asarray(draws))) == draws.size  # continuous: no repeats


def test_shared_scalar_scale_equals_k_equal_scales(arrays):
    logits, locs, y = arrays
    scalar = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), 0.8)
    vector = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.full(K, 0.8))
    assert scalar.batch_shape == vector.batch_shape == (N,)
    np.testing.assert_allclose(scalar.log_prob(y), vector.log_prob(y), rtol=1e-14)
    np.testing.assert_allclose(scalar.variance, vector.variance, rtol=1e-14)


# --------------------------------------------------------------------------- moments and samples


def test_mean_and_variance_are_the_mixture_moments(arrays):
    logits, locs, _ = arrays
    mixture = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.asarray(SCALES))
    probs = softmax(logits, axis=-1)
    mean = (probs * locs).sum(-1)
    second = (probs * (SCALES**2 + locs**2)).sum(-1)
    np.testing.assert_allclose(mixture.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(mixture.variance, second - mean**2, rtol=1e-12)
    np.testing.assert_allclose(mixture.gate_probabilities, probs, rtol=1e-12)


def test_sample_moments_match_mean_and_variance(arrays):
    logits, locs, _ = arrays
    mixture = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.asarray(SCALES))
    num_draws = 40_000
    draws = np.asarray(mixture.sample(jax.random.key(5), (num_draws,)))
    assert draws.shape == (num_draws, N)
    mean, variance = np.asarray(mixture.mean), np.asarray(mixture.variance)
    # Independent draws: the sample mean has standard error sqrt(Var / S); the sample variance
    # sqrt((mu_4 - Var^2) / S) with mu_4 the fourth central moment (estimated from the draws).
    # Allow 5 standard errors at each of the N points.
    centred = draws - draws.mean(0)
    mu4 = (centred**4).mean(0)
    assert np.all(np.abs(draws.mean(0) - mean) < 5 * np.sqrt(variance / num_draws))
    assert np.all(np.abs(draws.var(0) - variance) < 5 * np.sqrt((mu4 - variance**2) / num_draws))
    # Different keys give different draws; the same key the same draws.
    again = np.asarray(mixture.sample(jax.random.key(5), (num_draws,)))
    np.testing.assert_array_equal(draws, again)
    assert not np.allclose(draws[:10], np.asarray(mixture.sample(jax.random.key(6), (10,))))


def test_samples_pick_experts_with_the_gate_probabilities():
    # Expert means 0, 10, 20 and scales 1e-6: each draw sits on its expert, so the expert
    # counts are Binomial(S, p_i). Allow 5 binomial standard errors.
    logits = jnp.array([[0.5, -0.3, 0.0], [-2.0, 1.0, 0.2]])
    locs = jnp.broadcast_to(jnp.array([0.0, 10.0, 20.0]), (2, K))
    mixture = MixtureOfExperts(logits, locs, 1e-6)
    num_draws = 20_000
    draws = np.asarray(mixture.sample(jax.random.key(7), (num_draws,)))
    chosen = np.rint(draws / 10.0).astype(int)
    assert np.abs(draws - 10.0 * chosen).max() < 6e-6  # on an expert mean, within 6 sds
    probs = softmax(np.asarray(logits), axis=-1)
    for point in range(2):
        counts = np.bincount(chosen[:, point], minlength=K)
        se = np.sqrt(num_draws * probs[point] * (1 - probs[point]))
        assert np.all(np.abs(counts - num_draws * probs[point]) < 5 * se), point


# --------------------------------------------------------------------------- expert probabilities


def test_expert_probabilities_are_the_posterior_of_the_expert(arrays):
    logits, locs, y = arrays
    mixture = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.asarray(SCALES))
    joint = log_softmax(logits, axis=-1) + norm.logpdf(y[:, None], locs, SCALES)
    component = np.asarray(mixture.component_log_probs(jnp.asarray(y)))
    assert component.shape == (N, K)
    np.testing.assert_allclose(component, joint, rtol=1e-12)
    posterior = np.asarray(mixture.expert_probabilities(jnp.asarray(y)))
    assert posterior.shape == (N, K)
    np.testing.assert_allclose(posterior.sum(-1), 1.0, rtol=0, atol=1e-14)
    np.testing.assert_allclose(posterior, softmax(component, axis=-1), rtol=1e-12)
    # Bayes' rule by hand: p(z = i | y) = pi_i N(y; m_i, s_i) / p(y).
    by_hand = softmax(logits, -1) * norm.pdf(y[:, None], locs, SCALES) / np.exp(np_log_prob(y, logits, locs, SCALES))[:, None]
    np.testing.assert_allclose(posterior, by_hand, rtol=1e-10)


# --------------------------------------------------------------------------- from_params


@pytest.mark.parametrize("intercepts", [False, True])
def test_from_params_equals_the_manual_construction(intercepts):
    params = make_params(intercepts=intercepts)
    x, y = design()
    xn = np.asarray(x)
    logits = xn @ np.asarray(params.gates).T
    pre = xn @ np.asarray(params.experts).T
    if intercepts:
        logits = logits + np.asarray(params.gate_intercepts)
        pre = pre + np.asarray(params.expert_intercepts)
    mixture = MixtureOfExperts.from_params(params, x)
    assert isinstance(mixture, MixtureOfExperts)
    assert mixture.batch_shape == (N,)
    np.testing.assert_allclose(mixture.gate_logits, logits, rtol=1e-12)
    np.testing.assert_allclose(mixture.expert_locs, np.tanh(pre), rtol=1e-12)
    np.testing.assert_array_equal(mixture.expert_scales, SCALES)
    manual = MixtureOfExperts(jnp.asarray(logits), jnp.asarray(np.tanh(pre)), jnp.asarray(SCALES))
    np.testing.assert_allclose(mixture.log_prob(y), manual.log_prob(y), rtol=1e-12)
    np.testing.assert_allclose(mixture.log_prob(y), np_log_prob(y, logits, np.tanh(pre), SCALES), rtol=1e-12)
    np.testing.assert_allclose(mixture.mean, params.predictive_mean(x), rtol=1e-12)


def test_from_params_with_a_scalar_noise_is_a_shared_noise():
    params = make_params()
    x, y = design()
    scalar = MixtureOfExperts.from_params(params.replace(noise=jnp.asarray(0.4)), x)
    vector = MixtureOfExperts.from_params(params.replace(noise=jnp.full(K, 0.4)), x)
    np.testing.assert_allclose(scalar.log_prob(y), vector.log_prob(y), rtol=1e-14)


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_validate_args_rejects_a_non_positive_scale(arrays, bad):
    logits, locs, _ = arrays
    scales = jnp.array([0.3, bad, 1.0])
    with pytest.raises(ValueError, match="expert_scales"):
        MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), scales, validate_args=True)
    with pytest.raises(ValueError, match="expert_scales"):
        MixtureOfExperts.from_params(make_params().replace(noise=scales), design()[0], validate_args=True)
    # validate_args=False skips the check (NumPyro's convention): no error at construction.
    MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), scales, validate_args=False)


def test_wrong_last_axis_names_the_argument(arrays):
    logits, locs, _ = arrays
    with pytest.raises(ValueError, match=r"^expert_locs: expected a last axis of 3 experts"):
        MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs[:, :2]), jnp.asarray(SCALES))
    with pytest.raises(ValueError, match=r"^expert_scales: expected a last axis of 3 experts"):
        MixtureOfExperts(jnp.asarray(logits), jnp.asarray(locs), jnp.ones(2))
    with pytest.raises(ValueError, match=r"^gate_logits: expected an array whose last axis"):
        MixtureOfExperts(jnp.asarray(1.0), jnp.asarray(locs), jnp.asarray(SCALES))
    with pytest.raises(ValueError, match=r"^expert_locs: expected an array whose last axis"):
        MixtureOfExperts(jnp.asarray(logits), jnp.asarray(1.0), jnp.asarray(SCALES))
    with pytest.raises(ValueError, match=r"^gate_logits, expert_locs, expert_scales: shapes .* do not broadcast"):
        MixtureOfExperts(jnp.asarray(logits), jnp.zeros((N + 1, K)), jnp.asarray(SCALES))


# --------------------------------------------------------------------------- JAX transformations


def test_log_prob_under_jit():
    params = make_params()
    x, y = design()
    eager = MixtureOfExperts.from_params(params, x).log_prob(y)
    jitted = jax.jit(lambda p, y: MixtureOfExperts.from_params(p, x).log_prob(y))(params, y)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)
    # The distribution itself is a PyTree and can cross a jit boundary.
    mixture = MixtureOfExperts.from_params(params, x)
    np.testing.assert_allclose(jax.jit(lambda d: d.log_prob(y))(mixture), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda d: d.mean)(mixture), mixture.mean, rtol=1e-12)


def test_vmap_over_a_leading_batch_of_distributions():
    x, y = design()
    records = [make_params(seed=seed) for seed in range(4)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *records)
    assert stacked.experts.shape == (4, K, D) and stacked.link.name == "tanh"
    batched = jax.vmap(lambda p: MixtureOfExperts.from_params(p, x).log_prob(y))(stacked)
    assert batched.shape == (4, N)
    for index, record in enumerate(records):
        np.testing.assert_allclose(batched[index], MixtureOfExperts.from_params(record, x).log_prob(y), rtol=1e-12)
    means = jax.vmap(lambda p: MixtureOfExperts.from_params(p, x).mean)(stacked)
    for index, record in enumerate(records):
        np.testing.assert_allclose(means[index], record.predictive_mean(x), rtol=1e-12)
    # The same batch as one distribution with batch shape (4, N): identical values.
    direct = MixtureOfExperts(
        jax.vmap(lambda p: p.gate_logits(x))(stacked),
        jax.vmap(lambda p: p.expert_means(x))(stacked),
        stacked.noise[:, None, :],
    )
    assert direct.batch_shape == (4, N)
    np.testing.assert_allclose(direct.log_prob(y), batched, rtol=1e-12)
    # (vmapping the distribution object itself is not tested: NumPyro keeps its batch_shape as
    # static aux data, so properties such as .mean broadcast to the unmapped shape.)


def test_grad_of_log_prob_with_respect_to_the_params_matches_finite_differences():
    params = make_params()
    x, y = design()

    def total(p):
        return jnp.sum(MixtureOfExperts.from_params(p, x).log_prob(y))

    grads = jax.grad(total)(params)
    assert isinstance(grads, moe.MoEParams)
    assert grads.experts.shape == (K, D) and grads.noise.shape == (K,)
    assert grads.expert_intercepts.shape == (K,) and grads.link == params.link
    # Central differences in float64: truncation O(h^2) ~ 1e-12, rounding ~ eps |f| / h ~ 1e-9.
    h = 1e-6
    for field, index in (("experts", (1, 2)), ("gates", (0, 3)), ("noise", (2,)), ("expert_intercepts", (0,))):
        value = getattr(params, field)
        up = total(params.replace(**{field: value.at[index].add(h)}))
        down = total(params.replace(**{field: value.at[index].add(-h)}))
        numeric = float(up - down) / (2 * h)
        analytic = float(getattr(grads, field)[index])
        assert abs(analytic) > 1e-3, field  # a non-trivial entry
        assert analytic == pytest.approx(numeric, rel=1e-6), field
    # Adding one vector to every gate row shifts a point's logits equally: nothing changes.
    shifted = params.replace(gates=params.gates + 0.3)
    np.testing.assert_allclose(total(shifted), total(params), rtol=1e-12)


# --------------------------------------------------------------------------- inside a model


def test_log_density_of_a_model_is_the_sum_of_log_prob_and_the_priors():
    params = make_params(intercepts=True)
    x, y = design(n=25)

    def model(x, y=None):
        sampled = moe.moe_priors(K, D, link="tanh", intercepts=True, shared_noise=False)
        with numpyro.plate("obs", x.shape[0]):
            numpyro.sample("y", MixtureOfExperts.from_params(sampled, x), obs=y)

    sites = moe.params_to_sites(params, shared_noise=False)
    total, trace = log_density(model, (x, y), {}, sites)
    assert trace["y"]["fn"].__class__ is MixtureOfExperts
    likelihood = float(jnp.sum(MixtureOfExperts.from_params(params, x).log_prob(y)))
    priors = (
        norm.logpdf(np.asarray(params.experts), 0, 1).sum()
        + gate_contrast_logpdf(np.asarray(params.gates[:-1]))
        + invgamma.logpdf(np.asarray(params.noise), 2.0, scale=0.3).sum()  # the default noise prior
        + norm.logpdf(np.asarray(params.expert_intercepts), 0, 1).sum()
        + gate_contrast_logpdf(np.asarray(params.gate_intercepts[:-1]))
    )
    np.testing.assert_allclose(float(total), likelihood + priors, rtol=1e-12)
    # The observed site's log density is the likelihood alone, per point.
    np.testing.assert_allclose(
        trace["y"]["fn"].log_prob(trace["y"]["value"]), MixtureOfExperts.from_params(params, x).log_prob(y), rtol=1e-12
    )


def test_prior_predictive_draws_through_numpyro():
    x, _ = design(n=8)

    def model(x, y=None):
        sampled = moe.moe_priors(K, D, priors={"noise": dist.HalfNormal(1e-6)})
        with numpyro.plate("obs", x.shape[0]):
            return numpyro.sample("y", MixtureOfExperts.from_params(sampled, x), obs=y)

    draws = numpyro.infer.Predictive(model, num_samples=5)(jax.random.key(8), x)
    assert draws["y"].shape == (5, 8)
    # A HalfNormal(1e-6) noise is below 6e-6 with probability 1 - 2e-9, and a draw lies within 6
    # noise sds (< 3.6e-5) of its expert's mean: each y sits on one of its own draw's experts.
    for j in range(5):
        means = np.asarray(x) @ np.asarray(draws["experts"][j]).T
        assert np.abs(np.asarray(draws["y"][j])[:, None] - means).min(1).max() < 6e-5
