"""`fit_moe`: the tensor start among random restarts, all refined by joint EM, best one kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import numpyro_moe as moe

numpyro.enable_x64()


@pytest.fixture(scope="module")
def papers():
    """The papers' setting: Gaussian x, unit experts, gates orthogonal to them."""
    return moe.simulate(jax.random.key(3), num_samples=4000, dim=6, num_experts=3)


@pytest.fixture(scope="module")
def tensor_only(papers):
    x, y, _ = papers
    return moe.fit_moe(x, y, num_experts=3, key=jax.random.key(4), num_restarts=0)


@pytest.fixture(scope="module")
def small():
    """The size of the CSV tests' fits (n=400, d=3, k=2, intercepts), so compiles are shared."""
    return moe.simulate(jax.random.key(10), num_samples=400, dim=3, num_experts=2, noise=0.2)


@pytest.fixture(scope="module")
def with_restarts(small):
    x, y, _ = small
    return moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_restarts=1, intercepts=True)


def _mean_log_likelihood(params, x, y):
    return float(jnp.mean(moe.pointwise_log_likelihood(params, x, y)))


def test_fit_moe_keeps_the_best_start(small, with_restarts):
    x, y, _ = small
    fit = with_restarts
    assert isinstance(fit, moe.MoEFit)
    assert isinstance(fit.estimate, moe.ExpertEstimate)
    assert isinstance(fit.em, moe.EMResult) and fit.em.converged
    assert fit.start_log_likelihoods.shape == (2,)  # the tensor start + 1 random one
    assert np.all(np.isfinite(fit.start_log_likelihoods))
    assert fit.chosen_start == int(np.argmax(fit.start_log_likelihoods))
    assert fit.em.log_likelihood == fit.start_log_likelihoods[fit.chosen_start]
    assert fit.em.params is fit.params
    # The parameters returned are the ones that scored that likelihood.
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.em.log_likelihood, rel=1e-10)
    assert fit.params.experts.shape == (2, 3) and fit.params.gates.shape == (2, 3)
    assert fit.params.expert_intercepts.shape == (2,) and fit.params.gate_intercepts.shape == (2,)
    np.testing.assert_array_equal(fit.params.gates[-1], 0)
    assert float(fit.params.gate_intercepts[-1]) == 0


def test_fit_moe_is_reproducible_and_depends_on_the_key(small, with_restarts):
    x, y, _ = small
    again = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_restarts=1, intercepts=True)
    np.testing.assert_array_equal(again.start_log_likelihoods, with_restarts.start_log_likelihoods)
    np.testing.assert_array_equal(again.params.experts, with_restarts.params.experts)


def test_tensor_start_alone_reaches_the_oracle_optimum(papers, tensor_only):
    x, y, truth = papers
    fit = tensor_only
    assert fit.start_log_likelihoods.shape == (1,)
    assert fit.chosen_start == 0
    assert fit.em.log_likelihood == fit.start_log_likelihoods[0]
    oracle = moe.fit_em(x, y, truth)
    # No local optimum in the papers' setting: EM from the tensor estimate ends where EM from
    # the truth does (both stop when the per-point change is below tol=1e-8).
    assert fit.em.log_likelihood == pytest.approx(oracle.log_likelihood, abs=1e-6)
    assert moe.expert_error(fit.params, oracle.params) < 1e-3
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.em.log_likelihood, rel=1e-10)


def test_more_experts_than_dimensions_needs_a_random_start(small):
    x, y, _ = small
    with pytest.raises(ValueError, match=r"^num_restarts: with num_experts=4 > dim=3 the tensor method"):
        moe.fit_moe(x, y, num_experts=4, key=jax.random.key(6), num_restarts=0)


@pytest.mark.slow
def test_more_experts_than_dimensions_uses_random_starts_only():
    # Slow only for its EM compile (~6 s).
    x, y, _ = moe.simulate(jax.random.key(5), num_samples=500, dim=2, num_experts=2, gating="correlated")
    fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(6), num_restarts=2)
    assert fit.estimate is None
    assert fit.start_log_likelihoods.shape == (3,)
    assert fit.start_log_likelihoods[0] == -np.inf
    assert np.all(np.isfinite(fit.start_log_likelihoods[1:]))
    assert fit.chosen_start == int(np.argmax(fit.start_log_likelihoods)) >= 1
    assert fit.params.experts.shape == (3, 2)
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.em.log_likelihood, rel=1e-10)
    with pytest.raises(ValueError, match=r"^num_restarts: with num_experts=3 > dim=2"):
        moe.fit_moe(x, y, num_experts=3, key=jax.random.key(6), num_restarts=0)


@pytest.mark.slow
def test_intercepts_are_recovered():
    # Slow only for its compiles (~10 s); the CSV tests run fit_moe with intercepts by default.
    truth = moe.true_params(jax.random.key(7), dim=4, num_experts=2)
    truth = truth._replace(expert_intercepts=jnp.array([0.5, -0.5]), gate_intercepts=jnp.array([1.0, 0.0]))
    x, y = moe.sample_data(jax.random.key(8), truth, num_samples=6000)
    fit = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(9), num_restarts=1, intercepts=True)
    assert fit.start_log_likelihoods.shape == (2,)
    aligned = fit.params.permute(moe.match_experts(fit.params, truth).permutation)
    # Standard errors at n=6000 are ~0.01 for the expert offsets and ~0.05 for the gate's.
    np.testing.assert_allclose(aligned.expert_intercepts, [0.5, -0.5], atol=0.03)
    np.testing.assert_allclose(aligned.gate_intercepts, [1.0, 0.0], atol=0.2)
    assert moe.expert_error(aligned, truth) < 0.05
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.em.log_likelihood, rel=1e-10)


@pytest.mark.slow
def test_iteration_cap_warns(small):
    x, y, _ = small
    with pytest.warns(moe.ReliabilityWarning, match="max_iterations=2"):
        fit = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(4), num_restarts=1, max_iterations=2)
    assert not fit.em.converged


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_restarts": -1}, ValueError, r"^num_restarts: expected an integer >= 0"),
        ({"num_restarts": 1.5}, TypeError, r"^num_restarts: "),
        ({"num_experts": 0}, ValueError, r"^num_experts: "),
        ({"key": None}, TypeError, r"^key: "),
        ({"link": "cubic"}, ValueError, r"^link: "),
    ],
)
def test_bad_arguments_name_the_argument(small, kwargs, error, match):
    x, y, _ = small
    options = {"num_experts": 2, "key": jax.random.key(0), **kwargs}
    with pytest.raises(error, match=match):
        moe.fit_moe(x, y, **options)
