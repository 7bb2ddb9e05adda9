"""EM over the gate and jointly, MAP and gradient-descent gating, and the baselines."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import numpyro_moe as moe
from numpyro_moe import _em

numpyro.enable_x64()


@pytest.fixture(scope="module")
def papers_data():
    x, y, truth = moe.simulate(jax.random.key(3), num_samples=4000, dim=6, num_experts=3)
    x_test, y_test = moe.sample_data(jax.random.key(4), truth, num_samples=4000)
    return x, y, truth, x_test, y_test


def _gradient_size(params, x, y, link, *, experts=True):
    """Max |gradient| of the mean log-likelihood in the free parameters (autodiff, not EM)."""

    def mean_log_likelihood(free):
        gates = jnp.concatenate([free["gates"], jnp.zeros((1, x.shape[1]))])
        candidate = moe.MoEParams(free.get("experts", params.experts), gates, jnp.exp(free["log_noise"]))
        return jnp.mean(moe.pointwise_log_likelihood(candidate, x, y, link))

    free = {"gates": params.gates[:-1], "log_noise": jnp.log(params.noise)}
    if experts:
        free["experts"] = params.experts
    gradient = jax.grad(mean_log_likelihood)(free)
    return max(float(jnp.max(jnp.abs(value))) for value in jax.tree_util.tree_leaves(gradient))


@pytest.mark.parametrize("link", ["linear", "tanh"])
def test_joint_em_reaches_a_stationary_point_and_never_decreases(link):
    x, y, truth = moe.simulate(jax.random.key(5), num_samples=3000, dim=5, num_experts=2, link=link)
    start = moe.random_start(jax.random.key(6), x, y, num_experts=2)
    result = moe.fit_em(x, y, start, link=link, tol=1e-12, max_iterations=2000)
    assert result.converged
    # Generalised EM: each block increases the expected complete-data log-likelihood.
    assert np.all(np.diff(result.history) >= -1e-10)
    assert result.log_likelihood >= result.history[-1] - 1e-10
    # At an EM fixed point the likelihood's gradient vanishes; the scale of a random
    # perturbation's gradient here is O(1), so 1e-4 separates the two by four orders.
    assert _gradient_size(result.params, x, y, link) < 1e-4


def test_gating_em_with_true_experts_is_stationary_in_the_gate(papers_data):
    x, y, truth, *_ = papers_data
    fitted = moe.fit_gating(x, y, truth.experts, tol=1e-12)
    np.testing.assert_array_equal(fitted.experts, truth.experts)
    assert np.all(np.asarray(fitted.gates[-1]) == 0)
    assert _gradient_size(fitted, x, y, "linear", experts=False) < 1e-5


def test_gating_methods_agree(papers_data):
    x, y, truth, x_test, _ = papers_data
    em = moe.fit_gating(x, y, truth.experts, method="em")
    gd = moe.fit_gating(x, y, truth.experts, method="likelihood_gd", num_steps=3000, learning_rate=0.02)
    map_fit = moe.fit_gating(x, y, truth.experts, method="map", num_steps=3000, learning_rate=0.02)
    # EM and gradient descent maximise the same likelihood; MAP adds weak Normal(0, 2.5)
    # priors (a 1/n effect). Measured gate TV between them: ~1e-4 (GD) and ~1e-3 (MAP).
    assert moe.gating_error(gd, em, x_test) < 5e-3
    assert moe.gating_error(map_fit, em, x_test) < 1e-2
    # ... and all of them are close to the truth (gate TV at n=4000 measured ~0.02).
    assert moe.gating_error(em, truth, x_test) < 0.05
    assert abs(float(em.noise) - 0.1) < 0.01


def test_pipeline_from_tensor_estimate_matches_oracle(papers_data):
    x, y, truth, x_test, _ = papers_data
    estimate = moe.estimate_experts(x, y, num_experts=3)
    refined = moe.fit_em(x, y, moe.fit_gating(x, y, estimate))
    oracle = moe.fit_em(x, y, truth)
    assert refined.log_likelihood == pytest.approx(oracle.log_likelihood, abs=1e-7)
    assert moe.expert_error(refined.params, oracle.params) < 1e-3


def test_intercepts_are_learned():
    truth = moe.true_params(jax.random.key(7), dim=4, num_experts=2)
    truth = truth._replace(expert_intercepts=jnp.array([0.5, -0.5]), gate_intercepts=jnp.array([1.0, 0.0]))
    x, y = moe.sample_data(jax.random.key(8), truth, num_samples=6000)
    result = moe.fit_em(x, y, truth._replace(expert_intercepts=None, gate_intercepts=None), intercepts=True)
    aligned = result.params.permute(moe.match_experts(result.params, truth).permutation)
    # Standard errors at n=6000 are ~0.01 for the expert offsets and ~0.05 for the gate's.
    np.testing.assert_allclose(aligned.expert_intercepts, [0.5, -0.5], atol=0.03)
    np.testing.assert_allclose(aligned.gate_intercepts, [1.0, 0.0], atol=0.2)


def test_iteration_cap_warns_and_reports_not_converged(papers_data):
    x, y, *_ = papers_data
    start = moe.random_start(jax.random.key(9), x, y, num_experts=3)
    with pytest.warns(moe.ReliabilityWarning, match="max_iterations"):
        result = moe.fit_em(x, y, start, max_iterations=3, tol=1e-14)
    assert not result.converged
    assert result.iterations == 3
    assert result.history.shape == (3,)


def test_em_compiles_once_for_same_shapes(papers_data):
    x, y, truth, *_ = papers_data
    moe.fit_em(x, y, truth, max_iterations=50)
    size = _em._em_block._cache_size()
    moe.fit_em(x, y, truth._replace(noise=jnp.asarray(0.2)), max_iterations=50)
    moe.fit_gating(x, y, truth, max_iterations=50)  # a different program (experts fixed): +1
    moe.fit_gating(x, y, truth._replace(noise=jnp.asarray(0.3)), max_iterations=50)
    assert _em._em_block._cache_size() == size + 1


def test_restarts_keep_the_best_and_include_given_starts(papers_data):
    x, y, truth, *_ = papers_data
    result = moe.fit_em_restarts(x, y, num_experts=3, key=jax.random.key(10), num_restarts=4)
    assert result.log_likelihoods.shape == (4,)
    assert result.best.log_likelihood == pytest.approx(result.log_likelihoods.max())
    starts = jax.tree_util.tree_map(lambda value: jnp.stack([value, value]), truth)
    given = moe.fit_em_restarts(x, y, num_experts=3, key=jax.random.key(0), starts=starts)
    assert moe.expert_error(given.best.params, truth) < 0.02


def test_descent_baselines_decrease_their_own_objectives(papers_data):
    x, y, truth, *_ = papers_data
    squared = moe.fit_squared_loss_gd(x, y, num_experts=3, key=jax.random.key(11), init=truth, num_steps=200)
    likelihood = moe.fit_likelihood_gd(x, y, num_experts=3, key=jax.random.key(11), init=truth, num_steps=200)
    for params in (squared, likelihood):
        assert params.experts.shape == (3, 6) and params.gates.shape == (3, 6)
        assert float(params.noise) > 0
    # Started at the truth, each descent lowers its own objective. (The squared loss is so flat
    # around the truth that lowering it moves the experts far away: the AISTATS 2020 point.)
    assert moe.mean_squared_error(squared, x, y) < moe.mean_squared_error(truth, x, y)
    assert float(squared.noise) ** 2 == pytest.approx(moe.mean_squared_error(squared, x, y))
    assert moe.heldout_log_likelihood(likelihood, x, y) > moe.heldout_log_likelihood(truth, x, y)
    assert moe.expert_error(likelihood, truth) < 0.05


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, y, t: moe.fit_em(x, y, "nope"), TypeError, "init"),
        (lambda x, y, t: moe.fit_em(x, y, t.experts[:, :3]), ValueError, "init"),
        (lambda x, y, t: moe.fit_em(x, y[:10], t), ValueError, "y"),
        (lambda x, y, t: moe.fit_em(x, y, t, max_iterations=0), ValueError, "max_iterations"),
        (lambda x, y, t: moe.fit_em(x, y, t, noise=-1.0), ValueError, "noise"),
        (lambda x, y, t: moe.fit_gating(x, y, t, method="newton"), ValueError, "method"),
        (lambda x, y, t: moe.fit_gating(x, y, t, link="cubic"), ValueError, "link"),
        (lambda x, y, t: moe.fit_gating(x.at[0, 0].set(jnp.nan), y, t), ValueError, "x"),
        (lambda x, y, t: moe.fit_em_restarts(x, y, num_experts=0, key=jax.random.key(0)), ValueError, "num_experts"),
        (lambda x, y, t: moe.fit_em_restarts(x, y, num_experts=2, key=0), TypeError, "key"),
    ],
)
def test_bad_input_names_the_argument(papers_data, call, error, match):
    x, y, truth, *_ = papers_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moe.ReliabilityWarning)
        with pytest.raises(error, match=match):
            call(x, y, truth)
