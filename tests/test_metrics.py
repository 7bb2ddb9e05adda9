"""How results are judged: expert error, gating error, held-out likelihood and MSE."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from scipy.stats import norm

from numpyro_moe import (
    MoEParams,
    expert_error,
    gating_error,
    heldout_log_likelihood,
    match_experts,
    mean_squared_error,
    sample_data,
    simulate,
    true_params,
)

# One held-out design shared by the statistical checks (n large for small standard errors).
N, D, K = 20_000, 5, 3


@pytest.fixture(scope="module")
def heldout():
    x, y, truth = simulate(jax.random.key(0), num_samples=N, dim=D, num_experts=K, noise=0.2)
    return np.asarray(x), np.asarray(y), truth


def perturbed(truth: MoEParams, scale=0.2, seed=1) -> MoEParams:
    rng = np.random.default_rng(seed)
    return truth._replace(
        experts=truth.experts + scale * rng.normal(size=truth.experts.shape),
        gates=(truth.gates + scale * 5 * rng.normal(size=truth.gates.shape)).at[-1].set(0.0),
    )


# --------------------------------------------------------------------------- expert error


def test_expert_error_of_the_truth_is_zero():
    truth = true_params(jax.random.key(1), dim=D, num_experts=K)
    assert expert_error(truth, truth) == 0.0
    match = match_experts(truth, truth)
    assert match.error == 0.0
    np.testing.assert_array_equal(match.permutation, np.arange(K))


def test_expert_error_scale():
    experts = np.random.default_rng(2).normal(size=(K, D))
    # ||1.1 A - A|| / ||A|| = 0.1 exactly.
    assert expert_error(1.1 * experts, experts) == pytest.approx(0.1, abs=1e-12)
    assert expert_error(0.5 * experts, experts) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("permutation", [(1, 2, 0), (2, 1, 0), (0, 2, 1)])
def test_expert_error_is_invariant_to_relabelling(permutation):
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(K, D))
    estimate = truth + 0.05 * rng.normal(size=(K, D))  # close, so the identity is the best match
    permutation = np.array(permutation)
    relabelled = estimate[permutation]
    assert expert_error(relabelled, truth) == pytest.approx(expert_error(estimate, truth), abs=1e-14)
    assert expert_error(estimate, truth) > 0.01  # not trivially zero
    match = match_experts(relabelled, truth)
    # estimate[permutation] is aligned with the truth: it undoes the relabelling.
    np.testing.assert_array_equal(match.permutation, np.argsort(permutation))
    np.testing.assert_array_equal(relabelled[match.permutation], estimate)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_expert_error_is_the_brute_force_minimum(k):
    rng = np.random.default_rng(10 + k)
    for trial in range(5):
        truth = rng.normal(size=(k, k + 2))
        estimate = truth[rng.permutation(k)] + rng.normal(scale=0.3 + 0.3 * trial, size=(k, k + 2))
        errors = {
            perm: np.linalg.norm(estimate[list(perm)] - truth) / np.linalg.norm(truth)
            for perm in itertools.permutations(range(k))
        }
        best = min(errors.values())
        match = match_experts(estimate, truth)
        assert match.error == pytest.approx(best, rel=1e-12)
        assert expert_error(estimate, truth) == pytest.approx(best, rel=1e-12)
        assert errors[tuple(int(i) for i in match.permutation)] == pytest.approx(best, rel=1e-12)
        assert sorted(match.permutation.tolist()) == list(range(k))


def test_expert_error_accepts_params_and_arrays():
    truth = true_params(jax.random.key(4), dim=D, num_experts=K)
    scaled = truth._replace(experts=1.1 * truth.experts)
    assert expert_error(scaled, truth) == pytest.approx(0.1, abs=1e-12)
    assert expert_error(scaled.experts, truth.experts) == pytest.approx(0.1, abs=1e-12)


# --------------------------------------------------------------------------- gating error


def test_gating_error_zero_for_truth_and_its_relabellings(heldout):
    x, _, truth = heldout
    assert gating_error(truth, truth, x) == 0.0
    for permutation in itertools.permutations(range(K)):
        relabelled = truth.permute(np.array(permutation))
        assert np.all(np.asarray(relabelled.gates[-1]) == 0.0)
        if permutation != (0, 1, 2):
            assert not np.allclose(np.asarray(relabelled.experts), np.asarray(truth.experts))
        assert gating_error(relabelled, truth, x) < 1e-12


def test_gating_error_matches_direct_total_variation(heldout):
    x, _, truth = heldout
    estimate = perturbed(truth)
    value = gating_error(estimate, truth, x)
    p_true = softmax(x @ np.asarray(truth.gates).T, axis=1)
    p_est = softmax(x @ np.asarray(estimate.gates).T, axis=1)
    assert value == pytest.approx(0.5 * np.abs(p_est - p_true).sum(1).mean(), rel=1e-10)
    assert 0.05 < value < 1.0
    # Relabelling the estimate does not change it (the experts decide the matching).
    assert gating_error(estimate.permute(np.array([2, 0, 1])), truth, x) == pytest.approx(value, rel=1e-10)


def test_gating_error_is_bounded_by_one(heldout):
    x, _, truth = heldout
    # Opposite, very sharp gates with the same experts: total variation close to 1 everywhere.
    sharp = truth._replace(gates=50.0 * truth.gates)
    opposite = truth._replace(gates=-50.0 * truth.gates)
    value = gating_error(opposite, sharp, x)
    assert 0.9 < value <= 1.0
    rng = np.random.default_rng(5)
    for _ in range(5):
        wild = truth._replace(gates=jnp.asarray(20 * rng.normal(size=(K, D))))
        assert 0.0 <= gating_error(wild, truth, x) <= 1.0


# --------------------------------------------------------------------------- held-out fit


def test_heldout_log_likelihood_is_the_mean_pointwise_value(heldout):
    x, y, truth = heldout
    logits = x @ np.asarray(truth.gates).T
    log_gate = logits - logsumexp(logits, axis=1, keepdims=True)
    component = norm.logpdf(y[:, None], x @ np.asarray(truth.experts).T, float(truth.noise))
    expected = logsumexp(log_gate + component, axis=1).mean()
    assert heldout_log_likelihood(truth, x, y) == pytest.approx(expected, rel=1e-10)


def test_truth_beats_perturbed_parameters_on_held_out_data(heldout):
    x, y, truth = heldout
    at_truth = heldout_log_likelihood(truth, x, y)
    for candidate in (
        perturbed(truth),
        truth._replace(noise=2 * truth.noise),
        truth._replace(noise=0.5 * truth.noise),
        truth._replace(gates=jnp.zeros_like(truth.gates)),
    ):
        # Differences here are O(0.1) nats per point against a standard error ~0.01 at n=20000.
        assert heldout_log_likelihood(candidate, x, y) < at_truth - 0.02
    # The predictive mean does not involve the noise; wrong experts or gates move it.
    at_truth = mean_squared_error(truth, x, y)
    assert mean_squared_error(truth._replace(noise=2 * truth.noise), x, y) == pytest.approx(at_truth, rel=1e-12)
    assert mean_squared_error(perturbed(truth), x, y) > at_truth + 0.01
    assert mean_squared_error(truth._replace(gates=jnp.zeros_like(truth.gates)), x, y) > at_truth + 0.01


def test_mean_squared_error_at_the_truth_is_noise_plus_gate_variance(heldout):
    # E[(y - E[y|x])^2 | x] = s^2 + Var_{z|x}(a_z . x): the difference, averaged over the
    # held-out set, is zero up to its standard error (empirical std / sqrt(n)); allow 5.
    x, y, truth = heldout
    probs = softmax(x @ np.asarray(truth.gates).T, axis=1)
    means = x @ np.asarray(truth.experts).T
    mean = (probs * means).sum(1)
    conditional = 0.2**2 + (probs * means**2).sum(1) - mean**2
    terms = (y - mean) ** 2 - conditional
    mse = mean_squared_error(truth, x, y)
    assert mse == pytest.approx(np.mean((y - mean) ** 2), rel=1e-10)
    assert abs(mse - conditional.mean()) < 5 * terms.std() / np.sqrt(N)


def test_mean_squared_error_single_linear_expert_is_the_noise_variance():
    noise = 0.3
    truth = true_params(jax.random.key(6), dim=D, num_experts=1, noise=noise)
    x, y = sample_data(jax.random.key(7), truth, num_samples=N)
    # Var of a squared N(0, s^2) is 2 s^4: standard error of the mean s^2 sqrt(2/n); allow 5.
    assert abs(mean_squared_error(truth, x, y) - noise**2) < 5 * noise**2 * np.sqrt(2 / N)


# --------------------------------------------------------------------------- bad input


def test_expert_error_bad_inputs_name_the_argument():
    truth = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"^estimate: expected experts of shape \(3, 4\)"):
        expert_error(np.ones((2, 4)), truth)
    with pytest.raises(ValueError, match=r"^estimate: expected experts of shape \(k, d\)"):
        expert_error(np.ones(4), truth)
    with pytest.raises(ValueError, match=r"^estimate: expected finite"):
        expert_error(np.full((3, 4), np.nan), truth)
    with pytest.raises(ValueError, match=r"^truth: expected finite"):
        match_experts(truth, np.where(np.eye(3, 4) > 0, np.inf, 1.0))


def test_gating_error_bad_inputs_name_the_argument(heldout):
    x, _, truth = heldout
    x = x[:100]
    small = true_params(jax.random.key(8), dim=D, num_experts=2)
    with pytest.raises(ValueError, match=r"^params: expected experts of shape \(3, 5\)"):
        gating_error(small, truth, x)
    # Gates in the model's site form (k - 1 rows) are not MoEParams gates.
    with pytest.raises(ValueError, match=r"^params: expected experts and gates of one shape"):
        gating_error(truth._replace(gates=truth.gates[:-1]), truth, x)
    with pytest.raises(ValueError, match=r"^truth: expected experts and gates of one shape"):
        gating_error(truth, truth._replace(gates=truth.gates[:-1]), x)
    with pytest.raises(ValueError, match=r"^params: expected finite"):
        gating_error(truth._replace(experts=truth.experts.at[0, 0].set(jnp.nan)), truth, x)
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        gating_error(truth.experts, truth, x)
    with pytest.raises(TypeError, match=r"^truth: expected MoEParams"):
        gating_error(truth, dict(truth._asdict()), x)
    with pytest.raises(ValueError, match=r"^x: expected 5 columns"):
        gating_error(truth, truth, x[:, :4])
    with pytest.raises(ValueError, match=r"^x: expected finite"):
        gating_error(truth, truth, np.where(np.arange(5) == 2, np.nan, x))


@pytest.mark.parametrize("metric", [heldout_log_likelihood, mean_squared_error])
def test_heldout_metrics_bad_inputs_name_the_argument(metric, heldout):
    x, y, truth = heldout
    x, y = x[:100], y[:100]
    with pytest.raises(ValueError, match=r"^y: expected length 100"):
        metric(truth, x, y[:-1])
    with pytest.raises(ValueError, match=r"^x: expected 5 columns"):
        metric(truth, x[:, :4], y)
    with pytest.raises(ValueError, match=r"^x: expected finite values, found 1 "):
        metric(truth, np.where((np.arange(100) == 7)[:, None] & (np.arange(5) == 0), np.nan, x), y)
    with pytest.raises(ValueError, match=r"^y: expected finite values, found 1 "):
        metric(truth, x, np.where(np.arange(100) == 3, np.inf, y))
    with pytest.raises(ValueError, match=r"^x: expected a 2-d array"):
        metric(truth, x[:, 0], y)
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        metric(truth.experts, x, y)
    # Site-form gates (k - 1 rows) would otherwise broadcast silently for k = 2.
    two = true_params(jax.random.key(9), dim=D, num_experts=2)
    with pytest.raises(ValueError, match=r"^params: expected experts and gates of one shape"):
        metric(two._replace(gates=two.gates[:-1]), x, y)
    with pytest.raises(ValueError, match=r"^link: unknown link"):
        metric(truth, x, y, link="nope")
