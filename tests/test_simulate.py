"""Simulated data with known truth: `moe.simulation`'s `true_params`, `sample_data`,
`sample_response` and `simulate`.

The papers' setting (Makkuva, Kannan, Oh, Viswanath, ICML 2019; Makkuva, Oh, Kannan, Viswanath,
AISTATS 2020): x ~ N(0, I_d), unit-norm linearly independent experts, every gate row orthogonal to
every expert, last gate row zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax

import numpyro_moe as moe
from numpyro_moe import MixtureOfExperts, MoEParams

NP_LINKS = {"linear": lambda t: t, "tanh": np.tanh, "relu": lambda t: np.maximum(t, 0.0)}


def np_gate_probs(params: MoEParams, x: np.ndarray) -> np.ndarray:
    logits = x @ np.asarray(params.gates).T
    if params.gate_intercepts is not None:
        logits = logits + np.asarray(params.gate_intercepts)[None, :]
    return softmax(logits, axis=1)


def np_expert_means(params: MoEParams, x: np.ndarray, link: str | None = None) -> np.ndarray:
    """g(x a_i + c_i) with NumPy; the link by name (default: the record's own)."""
    pre = x @ np.asarray(params.experts).T
    if params.expert_intercepts is not None:
        pre = pre + np.asarray(params.expert_intercepts)[None, :]
    return NP_LINKS[link or params.link.name](pre)


# --------------------------------------------------------------------------- shapes, truth


def test_shapes_and_unpacking():
    data = moe.simulation.simulate(key=jax.random.key(0), num_samples=50, dim=4, num_experts=2, noise=0.2)
    assert isinstance(data, moe.simulation.SimulatedData)
    assert data.x is data[0] and data.truth is data[2]
    x, y, truth = data
    assert x.shape == (50, 4)
    assert y.shape == (50,)
    assert isinstance(truth, MoEParams)
    assert truth.experts.shape == (2, 4)
    assert truth.gates.shape == (2, 4)
    assert jnp.shape(truth.noise) == (2,)  # one sd per expert, here shared
    np.testing.assert_array_equal(truth.noise, [0.2, 0.2])
    assert truth.link.name == "linear"
    assert truth.expert_intercepts is None and truth.gate_intercepts is None
    assert truth.num_experts == 2 and truth.dim == 4
    assert x.dtype == jnp.float64 and y.dtype == jnp.float64
    assert np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize(("dim", "num_experts"), [(5, 3), (4, 2), (6, 5), (4, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_orthogonal_gating_is_the_papers_setting(dim, num_experts, seed):
    truth = moe.simulation.true_params(key=jax.random.key(seed), dim=dim, num_experts=num_experts, gate_scale=3.0)
    experts, gates = np.asarray(truth.experts), np.asarray(truth.gates)
    assert experts.shape == (num_experts, dim) and gates.shape == (num_experts, dim)
    # Every gate row orthogonal to every expert.
    assert np.abs(gates @ experts.T).max() < 1e-10
    # Unit-norm, linearly independent experts.
    np.testing.assert_allclose(np.linalg.norm(experts, axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.linalg.matrix_rank(experts) == num_experts
    # Last gate row exactly zero, the others of norm gate_scale.
    assert np.all(gates[-1] == 0.0)
    np.testing.assert_allclose(np.linalg.norm(gates[:-1], axis=1), 3.0, rtol=1e-12)


def test_correlated_gating_is_not_orthogonal_but_keeps_the_gate_form():
    truth = moe.simulation.true_params(key=jax.random.key(3), dim=5, num_experts=3, gating="correlated", gate_scale=2.0)
    experts, gates = np.asarray(truth.experts), np.asarray(truth.gates)
    # Free random directions: inner products of a unit vector with a norm-2 row are O(1) here
    # (the orthogonal construction gives < 1e-10).
    assert np.abs(gates[:-1] @ experts.T).max() > 0.1
    assert np.all(gates[-1] == 0.0)
    np.testing.assert_allclose(np.linalg.norm(gates[:-1], axis=1), 2.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(experts, axis=1), 1.0, atol=1e-12)


def test_correlated_gating_allows_as_many_experts_as_dimensions():
    truth = moe.simulation.true_params(key=jax.random.key(0), dim=4, num_experts=4, gating="correlated")
    assert np.linalg.matrix_rank(np.asarray(truth.experts)) == 4


def test_unit_norm_experts_are_not_orthonormal_by_default():
    experts = np.asarray(moe.simulation.true_params(key=jax.random.key(0), dim=5, num_experts=3).experts)
    # Random unit vectors in R^5 are not mutually orthogonal (guards the flag below).
    assert np.abs(experts @ experts.T - np.eye(3)).max() > 1e-3


@pytest.mark.parametrize("gating", ["orthogonal", "correlated"])
def test_orthonormal_experts(gating):
    truth = moe.simulation.true_params(
        key=jax.random.key(5), dim=5, num_experts=3, gating=gating, orthonormal_experts=True
    )
    experts = np.asarray(truth.experts)
    np.testing.assert_allclose(experts @ experts.T, np.eye(3), atol=1e-12)
    if gating == "orthogonal":
        assert np.abs(np.asarray(truth.gates) @ experts.T).max() < 1e-10


def test_same_key_same_data_different_key_different_data():
    kwargs = {"num_samples": 50, "dim": 4, "num_experts": 2, "noise": 0.2, "link": "tanh"}
    first = moe.simulation.simulate(key=jax.random.key(7), **kwargs)
    again = moe.simulation.simulate(key=jax.random.key(7), **kwargs)
    other = moe.simulation.simulate(key=jax.random.key(8), **kwargs)
    assert first.truth.link.name == "tanh"
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first.x, other.x)
    assert not np.allclose(first.y, other.y)
    assert not np.allclose(first.truth.experts, other.truth.experts)


def test_raw_uint32_key_is_accepted():
    x, y, _ = moe.simulation.simulate(key=jax.random.PRNGKey(0), num_samples=50, dim=4, num_experts=2)
    assert x.shape == (50, 4) and y.shape == (50,)


# --------------------------------------------------------------------------- the law of the data


def _nearly_noiseless(seed, num_samples, link="linear"):
    """Data with noise 1e-6 and orthonormal experts: each y sits on its expert's mean.

    Two experts' means differ by (a_i - a_j) . x ~ N(0, 2), so the chance that the nearest
    mean is the wrong one is about 1e-6 per point: the nearest-mean label is the true z.
    """
    x, y, truth = moe.simulation.simulate(
        key=jax.random.key(seed), num_samples=num_samples, dim=5, num_experts=3, noise=1e-6,
        link=link, orthonormal_experts=True,
    )
    assert truth.link.name == link
    x, y = np.asarray(x), np.asarray(y)
    means = np_expert_means(truth, x, link)
    distance = np.abs(y[:, None] - means)
    return x, y, truth, distance


def test_every_response_lies_on_one_of_the_true_experts():
    *_, distance = _nearly_noiseless(11, 20_000, link="tanh")
    # noise 1e-6: |y - g(a_z . x)| < 6e-6 (6 standard deviations) at every point.
    assert distance.min(axis=1).max() < 6e-6


def test_expert_frequencies_follow_the_gate():
    num_samples = 20_000
    x, _, truth, distance = _nearly_noiseless(12, num_samples)
    z = distance.argmin(axis=1)
    probs = np_gate_probs(truth, x)
    k = probs.shape[1]
    # Given x, 1[z_n = i] is Bernoulli(p_i(x_n)) independently, so the count minus the sum of
    # the probabilities has standard error sqrt(sum p(1-p)). Allow 5 standard errors.
    for i in range(k):
        hits = z == i
        se = np.sqrt(np.sum(probs[:, i] * (1 - probs[:, i])))
        assert abs(hits.sum() - probs[:, i].sum()) < 5 * se, i
        assert hits.mean() > 0.05  # every expert is used
    # Calibration: the aggregate check above would pass if the gate's sign were flipped (x is
    # symmetric), so check it within deciles of p_i too, with the same 5-standard-error rule.
    for i in range(k):
        edges = np.quantile(probs[:, i], np.linspace(0, 1, 11))
        bins = np.clip(np.searchsorted(edges, probs[:, i], side="right") - 1, 0, 9)
        for b in range(10):
            inside = bins == b
            p = probs[inside, i]
            se = np.sqrt(np.sum(p * (1 - p)))
            assert abs((z[inside] == i).sum() - p.sum()) < 5 * se + 1e-9, (i, b)
    # And the extremes differ as they should: in the top decile the expert is far more common.
    top = probs[:, 0] > np.quantile(probs[:, 0], 0.9)
    bottom = probs[:, 0] < np.quantile(probs[:, 0], 0.1)
    assert (z[top] == 0).mean() > (z[bottom] == 0).mean() + 0.3


def test_single_expert_residual_is_the_noise():
    noise, n = 0.3, 20_000
    x, y, truth = moe.simulation.simulate(key=jax.random.key(21), num_samples=n, dim=5, num_experts=1, noise=noise)
    residual = np.asarray(y) - np.asarray(x) @ np.asarray(truth.experts)[0]
    # Standard errors: mean s/sqrt(n); sample std s/sqrt(2n) for Gaussian residuals. 5 of each.
    assert abs(residual.mean()) < 5 * noise / np.sqrt(n)
    assert abs(residual.std() - noise) < 5 * noise / np.sqrt(2 * n)
    # The residual is independent of x: correlations are O(1/sqrt(n)).
    corr = (np.asarray(x) * residual[:, None]).mean(0) / (residual.std() * np.asarray(x).std(0))
    assert np.abs(corr).max() < 5 / np.sqrt(n)


@pytest.mark.parametrize("link", ["linear", "tanh", "relu"])
def test_residual_variance_is_noise_plus_gate_variance_of_the_expert_means(link):
    # E[(y - E[y|x])^2 | x] = s^2 + Var_{z|x}(g(a_z . x)). Averaged over the sample, the
    # difference between the two sides is a mean of independent zero-mean terms; its standard
    # error is their empirical std / sqrt(n). Allow 5 standard errors.
    noise, n = 0.2, 20_000
    x, y, truth = moe.simulation.simulate(
        key=jax.random.key(31), num_samples=n, dim=5, num_experts=3, noise=noise, link=link
    )
    x, y = np.asarray(x), np.asarray(y)
    probs, means = np_gate_probs(truth, x), np_expert_means(truth, x, link)
    mean = (probs * means).sum(1)
    gate_variance = (probs * means**2).sum(1) - mean**2
    terms = (y - mean) ** 2 - (noise**2 + gate_variance)
    assert abs(terms.mean()) < 5 * terms.std() / np.sqrt(n)
    # Not vacuous: the gate's share is a sizeable part of the residual variance.
    assert gate_variance.mean() > 0.5 * noise**2


# --------------------------------------------------------------------------- held-out data


def test_sample_data_draws_a_held_out_set_from_the_same_truth():
    x, _y, truth = moe.simulation.simulate(key=jax.random.key(41), num_samples=20_000, dim=5, num_experts=3, noise=1e-6)
    x_test, y_test = moe.simulation.sample_data(truth, key=jax.random.key(42), num_samples=5000)
    assert x_test.shape == (5000, 5) and y_test.shape == (5000,)
    assert not np.allclose(np.asarray(x_test), np.asarray(x[:5000]))
    distance = np.abs(np.asarray(y_test)[:, None] - np_expert_means(truth, np.asarray(x_test), "linear"))
    assert distance.min(axis=1).max() < 6e-6  # on the truth's experts (6 noise sds)
    # A different truth does not explain it.
    other = moe.simulation.true_params(key=jax.random.key(43), dim=5, num_experts=3)
    distance = np.abs(np.asarray(y_test)[:, None] - np_expert_means(other, np.asarray(x_test), "linear"))
    assert np.median(distance.min(axis=1)) > 1e-2


def test_sample_data_uses_intercepts():
    truth = MoEParams(
        experts=jnp.eye(3, 5),
        gates=jnp.zeros((3, 5)).at[0, 4].set(2.0),
        noise=jnp.full(3, 1e-6),
        expert_intercepts=jnp.array([5.0, -5.0, 0.0]),
        gate_intercepts=jnp.array([1.5, 0.0, 0.0]),
    )
    n = 20_000
    x, y = moe.simulation.sample_data(truth, key=jax.random.key(44), num_samples=n)
    x, y = np.asarray(x), np.asarray(y)
    distance = np.abs(y[:, None] - np_expert_means(truth, x, "linear"))
    assert distance.min(axis=1).max() < 6e-6
    z = distance.argmin(axis=1)
    p0 = np_gate_probs(truth, x)[:, 0]
    # Binomial standard error of the count, 5 of them.
    assert abs((z == 0).sum() - p0.sum()) < 5 * np.sqrt(np.sum(p0 * (1 - p0)))
    # P(z=0) = E[e^{1.5 + 2 x_5} / (e^{1.5 + 2 x_5} + 2)] is about 0.62; without the intercept
    # it would be about 0.40.
    assert (z == 0).mean() > 0.5


# --------------------------------------------------------------------------- bad input

BASE = {"num_samples": 20, "dim": 4, "num_experts": 2}


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"num_experts": 5}, ValueError, r"^num_experts: expected at most dim=4"),
        ({"num_experts": 4}, ValueError, r"^num_experts: gating='orthogonal' needs num_experts < dim"),
        ({"num_experts": 0}, ValueError, r"^num_experts"),
        ({"num_experts": 2.0}, TypeError, r"^num_experts"),
        ({"noise": 0.0}, ValueError, r"^noise: expected a finite number > 0"),
        ({"noise": -0.1}, ValueError, r"^noise: expected a finite number > 0"),
        ({"noise": float("nan")}, ValueError, r"^noise"),
        ({"noise": "0.1"}, TypeError, r"^noise"),
        ({"gate_scale": 0.0}, ValueError, r"^gate_scale"),
        ({"gating": "diagonal"}, ValueError, r"^gating: expected one of"),
        ({"num_samples": 10.5}, TypeError, r"^num_samples"),
        ({"num_samples": "10"}, TypeError, r"^num_samples"),
        ({"num_samples": True}, TypeError, r"^num_samples"),
        ({"num_samples": 0}, ValueError, r"^num_samples"),
        ({"dim": 0}, ValueError, r"^dim"),
        ({"link": "nope"}, ValueError, r"^link: unknown link"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        moe.simulation.simulate(key=jax.random.key(0), **{**BASE, **overrides})


@pytest.mark.parametrize(
    "key",
    [0, None, np.array([0, 0], dtype=np.uint32), jax.random.split(jax.random.key(0), 2),
     jnp.zeros(2, dtype=jnp.float32)],
    ids=["int", "None", "numpy", "batch-of-keys", "float-array"],
)
def test_non_key_is_a_type_error_naming_key(key):
    with pytest.raises(TypeError, match=r"^key: expected a JAX PRNG key"):
        moe.simulation.simulate(key=key, **BASE)
    with pytest.raises(TypeError, match=r"^key: expected a JAX PRNG key"):
        moe.simulation.true_params(key=key, dim=4, num_experts=2)
    truth = moe.simulation.true_params(key=jax.random.key(0), dim=4, num_experts=2)
    with pytest.raises(TypeError, match=r"^key: expected a JAX PRNG key"):
        moe.simulation.sample_data(truth, key=key, num_samples=5)
    with pytest.raises(TypeError, match=r"^key: expected a JAX PRNG key"):
        moe.simulation.sample_response(truth, np.zeros((5, 4)), key=key)


def test_key_is_keyword_only():
    with pytest.raises(TypeError):
        moe.simulation.simulate(jax.random.key(0), **BASE)
    with pytest.raises(TypeError):
        moe.simulation.true_params(jax.random.key(0), dim=4, num_experts=2)
    truth = moe.simulation.true_params(key=jax.random.key(0), dim=4, num_experts=2)
    with pytest.raises(TypeError):
        moe.simulation.sample_data(truth, jax.random.key(1), num_samples=5)


def test_k_equal_d_is_fine_with_a_single_expert_or_correlated_gates():
    assert moe.simulation.true_params(key=jax.random.key(0), dim=1, num_experts=1).experts.shape == (1, 1)
    assert moe.simulation.true_params(key=jax.random.key(0), dim=4, num_experts=4, gating="correlated").num_experts == 4


def test_sample_data_checks_its_arguments():
    truth = moe.simulation.true_params(key=jax.random.key(0), dim=4, num_experts=2)
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        moe.simulation.sample_data({"experts": truth.experts}, key=jax.random.key(1), num_samples=5)
    with pytest.raises(TypeError, match=r"^num_samples"):
        moe.simulation.sample_data(truth, key=jax.random.key(1), num_samples=5.0)
    with pytest.raises(TypeError, match=r"^key"):
        moe.simulation.sample_data(truth, key=1, num_samples=5)
    # The link comes from the record: there is no link argument any more.
    with pytest.raises(TypeError):
        moe.simulation.sample_data(truth, key=jax.random.key(1), num_samples=5, link="softmax")
    with pytest.raises(ValueError, match=r"^params: expected noise > 0"):
        moe.simulation.sample_data(truth.replace(noise=jnp.array([0.1, 0.0])), key=jax.random.key(1), num_samples=5)
    with pytest.raises(ValueError, match=r"^params: expected gates of shape \(\d+, \d+\) \(all k gate rows"):
        moe.simulation.sample_data(truth.replace(gates=truth.gates[:-1]), key=jax.random.key(1), num_samples=5)


def test_sample_response_checks_its_arguments():
    truth = moe.simulation.true_params(key=jax.random.key(0), dim=4, num_experts=2)
    with pytest.raises(ValueError, match=r"^x: expected 4 columns"):
        moe.simulation.sample_response(truth, np.zeros((5, 3)), key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"^x: expected a 2-d array"):
        moe.simulation.sample_response(truth, np.zeros(4), key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"^x: expected finite values"):
        moe.simulation.sample_response(truth, np.full((5, 4), np.nan), key=jax.random.key(1))
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        moe.simulation.sample_response(truth.experts, np.zeros((5, 4)), key=jax.random.key(1))


# --------------------------------------------------------------------------- per-expert noise, links


def test_gatings_are_the_documented_ones():
    assert moe.simulation.GATINGS == ("orthogonal", "correlated")


def test_one_noise_per_expert_is_each_experts_residual_spread():
    # Expert means 100 apart (intercepts +-100, 0) and sds <= 1: the nearest mean is the true
    # expert at every point (a 50-sd error otherwise). Each expert's residual sd estimates its
    # noise with standard error s / sqrt(2 n_i); allow 5.
    noise = jnp.array([0.1, 0.5, 1.0])
    truth = MoEParams(
        experts=jnp.eye(3, 5),
        gates=jnp.zeros((3, 5)),
        noise=noise,
        expert_intercepts=jnp.array([100.0, 0.0, -100.0]),
    )
    x, y = moe.simulation.sample_data(truth, key=jax.random.key(50), num_samples=30_000)
    x, y = np.asarray(x), np.asarray(y)
    means = np_expert_means(truth, x)
    z = np.abs(y[:, None] - means).argmin(axis=1)
    residual = y - means[np.arange(len(y)), z]
    for i, sd in enumerate(np.asarray(noise)):
        inside = residual[z == i]
        assert len(inside) > 5000, i  # a uniform gate: about 10,000 each
        assert abs(inside.std() - sd) < 5 * sd / np.sqrt(2 * len(inside)), i
        assert abs(inside.mean()) < 5 * sd / np.sqrt(len(inside)), i


def test_simulate_accepts_one_noise_per_expert():
    data = moe.simulation.simulate(key=jax.random.key(51), num_samples=50, dim=5, num_experts=3, noise=np.array([0.1, 0.2, 0.3]))
    np.testing.assert_allclose(data.truth.noise, [0.1, 0.2, 0.3], rtol=0)
    assert data.truth.noise.shape == (3,)


@pytest.mark.parametrize(
    "noise",
    [np.array(value) for value in ([0.1, 0.2], [0.1, 0.0, 0.3], [0.1, -0.2, 0.3], [0.1, np.nan, 0.3])]
    + [np.full((3, 1), 0.1)],
    ids=["length", "zero", "negative", "nan", "2d"],
)
def test_bad_per_expert_noise_names_noise(noise):
    with pytest.raises(ValueError, match=r"^noise: expected a positive number or 3 positive sds"):
        moe.simulation.simulate(key=jax.random.key(0), num_samples=20, dim=5, num_experts=3, noise=noise)


def test_simulate_is_true_params_then_sample_data_then_the_mixture():
    # The documented random stream: the key splits into the truth's key and the data's key; the
    # data's key into x's and y's; y is a MixtureOfExperts draw at x.
    key = jax.random.key(52)
    kwargs = {"dim": 5, "num_experts": 3, "noise": 0.2, "link": "tanh"}
    data = moe.simulation.simulate(key=key, num_samples=40, **kwargs)
    params_key, data_key = jax.random.split(key)
    truth = moe.simulation.true_params(key=params_key, **kwargs)
    for field in ("experts", "gates", "noise"):
        np.testing.assert_array_equal(getattr(data.truth, field), getattr(truth, field))
    x, y = moe.simulation.sample_data(truth, key=data_key, num_samples=40)
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)
    x_key, y_key = jax.random.split(data_key)
    np.testing.assert_array_equal(x, jax.random.normal(x_key, (40, 5)))
    np.testing.assert_array_equal(y, moe.simulation.sample_response(truth, x, key=y_key))
    # The same draws as the mixture's own sampling, up to rounding (sample_response runs it as one
    # compiled program, whose fused arithmetic may differ in the last bit).
    np.testing.assert_allclose(y, MixtureOfExperts.from_params(truth, x).sample(y_key), rtol=1e-13, atol=1e-15)


def test_sample_response_shapes_and_keys():
    truth = moe.simulation.true_params(key=jax.random.key(53), dim=4, num_experts=2, noise=0.1)
    x = jax.random.normal(jax.random.key(54), (30, 4))
    y = moe.simulation.sample_response(truth, x, key=jax.random.key(55))
    assert y.shape == (30,) and y.dtype == jnp.float64
    np.testing.assert_array_equal(y, moe.simulation.sample_response(truth, x, key=jax.random.key(55)))
    assert not np.allclose(y, moe.simulation.sample_response(truth, x, key=jax.random.key(56)))
    # num_draws: independent replicates in one call, the distribution's own sample shape.
    draws = moe.simulation.sample_response(truth, x, key=jax.random.key(55), num_draws=400)
    assert draws.shape == (400, 30)
    # One compiled program: the mixture's own draws up to rounding in the last bit.
    np.testing.assert_allclose(
        draws, MixtureOfExperts.from_params(truth, x).sample(jax.random.key(55), (400,)), rtol=1e-13, atol=1e-15
    )
    assert np.unique(np.asarray(draws)[:, 0]).size == 400  # no two replicates alike
    # Each point's replicates follow its mixture: mean within 5 standard errors of the model's.
    mixture = MixtureOfExperts.from_params(truth, x)
    error = np.asarray(draws).mean(axis=0) - np.asarray(mixture.mean)
    assert np.all(np.abs(error) < 5 * np.sqrt(np.asarray(mixture.variance) / 400))
    for bad in (0, -1, 2.5):
        with pytest.raises((TypeError, ValueError), match=r"^num_draws: expected an integer >= 1"):
            moe.simulation.sample_response(truth, x, key=jax.random.key(55), num_draws=bad)


def test_a_callable_link_is_recorded_and_used():
    def cubic(t):
        return t**3

    x, y, truth = moe.simulation.simulate(
        key=jax.random.key(57), num_samples=2000, dim=5, num_experts=3, noise=1e-6, link=cubic,
        orthonormal_experts=True,
    )
    assert truth.link.function is cubic
    means = (np.asarray(x) @ np.asarray(truth.experts).T) ** 3
    # On a cubic expert at every point, within 6 noise sds ...
    assert np.abs(np.asarray(y)[:, None] - means).min(axis=1).max() < 6e-6
    # ... and not on the linear ones.
    linear = np.asarray(x) @ np.asarray(truth.experts).T
    assert np.median(np.abs(np.asarray(y)[:, None] - linear).min(axis=1)) > 1e-2


def test_sample_data_uses_the_records_link():
    truth = moe.simulation.true_params(key=jax.random.key(58), dim=5, num_experts=3, noise=1e-6, link="relu")
    x, y = moe.simulation.sample_data(truth, key=jax.random.key(59), num_samples=2000)
    means = np_expert_means(truth, np.asarray(x))  # relu, from the record
    assert np.abs(np.asarray(y)[:, None] - means).min(axis=1).max() < 6e-6
    assert (np.asarray(y) > -6e-6).all()  # relu experts: never below zero (beyond the noise)
    assert (np.abs(np.asarray(y)) < 1e-4).mean() > 0.1  # and often at zero
