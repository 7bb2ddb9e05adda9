"""How results are judged (`moe.metrics`): expert error, gating error, held-out likelihood and MSE."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp, softmax
from scipy.stats import norm

import numpyro_moe as moe
from numpyro_moe import MoEParams

# One held-out design shared by the statistical checks (n large for small standard errors).
N, D, K = 20_000, 5, 3


@pytest.fixture(scope="module")
def heldout():
    x, y, truth = moe.simulation.simulate(key=jax.random.key(0), num_samples=N, dim=D, num_experts=K, noise=0.2)
    return np.asarray(x), np.asarray(y), truth


def fit_of(params: MoEParams) -> moe.Fit:
    """A fit result holding ``params`` (the metrics take anything with ``.params``)."""
    return moe.Fit(params=params, log_likelihood=0.0, history=np.zeros(1), iterations=1, converged=True, method="em")


def perturbed(truth: MoEParams, scale=0.2, seed=1) -> MoEParams:
    rng = np.random.default_rng(seed)
    return truth.replace(
        experts=truth.experts + scale * rng.normal(size=truth.experts.shape),
        gates=(truth.gates + scale * 5 * rng.normal(size=truth.gates.shape)).at[-1].set(0.0),
    )


# --------------------------------------------------------------------------- expert error


def test_expert_error_of_the_truth_is_zero():
    truth = moe.simulation.true_params(key=jax.random.key(1), dim=D, num_experts=K)
    assert moe.metrics.expert_error(truth, truth) == 0.0
    match = moe.metrics.match_experts(truth, truth)
    assert isinstance(match, moe.metrics.ExpertMatch)
    assert match.error == 0.0
    np.testing.assert_array_equal(match.permutation, np.arange(K))


def test_expert_error_scale():
    experts = np.random.default_rng(2).normal(size=(K, D))
    # ||1.1 A - A|| / ||A|| = 0.1 exactly.
    assert moe.metrics.expert_error(1.1 * experts, experts) == pytest.approx(0.1, abs=1e-12)
    assert moe.metrics.expert_error(0.5 * experts, experts) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("permutation", [(1, 2, 0), (2, 1, 0), (0, 2, 1)])
def test_expert_error_is_invariant_to_relabelling(permutation):
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(K, D))
    estimate = truth + 0.05 * rng.normal(size=(K, D))  # close, so the identity is the best match
    permutation = np.array(permutation)
    relabelled = estimate[permutation]
    assert moe.metrics.expert_error(relabelled, truth) == pytest.approx(moe.metrics.expert_error(estimate, truth), abs=1e-14)
    assert moe.metrics.expert_error(estimate, truth) > 0.01  # not trivially zero
    match = moe.metrics.match_experts(relabelled, truth)
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
        match = moe.metrics.match_experts(estimate, truth)
        assert match.error == pytest.approx(best, rel=1e-12)
        assert moe.metrics.expert_error(estimate, truth) == pytest.approx(best, rel=1e-12)
        assert errors[tuple(int(i) for i in match.permutation)] == pytest.approx(best, rel=1e-12)
        assert sorted(match.permutation.tolist()) == list(range(k))


def test_expert_error_accepts_params_and_arrays():
    truth = moe.simulation.true_params(key=jax.random.key(4), dim=D, num_experts=K)
    scaled = truth.replace(experts=1.1 * truth.experts)
    assert moe.metrics.expert_error(scaled, truth) == pytest.approx(0.1, abs=1e-12)
    assert moe.metrics.expert_error(scaled.experts, truth.experts) == pytest.approx(0.1, abs=1e-12)
    # Fit results (anything with .params) are accepted too, on either side.
    assert moe.metrics.expert_error(fit_of(scaled), truth) == pytest.approx(0.1, abs=1e-12)
    assert moe.metrics.expert_error(scaled, fit_of(truth)) == pytest.approx(0.1, abs=1e-12)
    relabelled = scaled.permute(np.array([2, 0, 1]))
    np.testing.assert_array_equal(moe.metrics.match_experts(fit_of(relabelled), truth).permutation, [1, 2, 0])


# --------------------------------------------------------------------------- gating error


def test_gating_error_zero_for_truth_and_its_relabellings(heldout):
    x, _, truth = heldout
    assert moe.metrics.gating_error(truth, truth, x) == 0.0
    for permutation in itertools.permutations(range(K)):
        relabelled = truth.permute(np.array(permutation))
        assert np.all(np.asarray(relabelled.gates[-1]) == 0.0)
        if permutation != (0, 1, 2):
            assert not np.allclose(np.asarray(relabelled.experts), np.asarray(truth.experts))
        assert moe.metrics.gating_error(relabelled, truth, x) < 1e-12


def test_gating_error_matches_direct_total_variation(heldout):
    x, _, truth = heldout
    estimate = perturbed(truth)
    value = moe.metrics.gating_error(estimate, truth, x)
    p_true = softmax(x @ np.asarray(truth.gates).T, axis=1)
    p_est = softmax(x @ np.asarray(estimate.gates).T, axis=1)
    assert value == pytest.approx(0.5 * np.abs(p_est - p_true).sum(1).mean(), rel=1e-10)
    assert 0.05 < value < 1.0
    # Relabelling the estimate does not change it (the experts decide the matching).
    assert moe.metrics.gating_error(estimate.permute(np.array([2, 0, 1])), truth, x) == pytest.approx(value, rel=1e-10)
    assert moe.metrics.gating_error(fit_of(estimate), fit_of(truth), x) == value  # fit results too


def test_gating_error_is_bounded_by_one(heldout):
    x, _, truth = heldout
    # Opposite, very sharp gates with the same experts: total variation close to 1 everywhere.
    sharp = truth.replace(gates=50.0 * truth.gates)
    opposite = truth.replace(gates=-50.0 * truth.gates)
    value = moe.metrics.gating_error(opposite, sharp, x)
    assert 0.9 < value <= 1.0
    rng = np.random.default_rng(5)
    for _ in range(5):
        wild = truth.replace(gates=jnp.asarray(20 * rng.normal(size=(K, D))))
        assert 0.0 <= moe.metrics.gating_error(wild, truth, x) <= 1.0


# --------------------------------------------------------------------------- held-out fit


def test_heldout_log_likelihood_is_the_mean_pointwise_value(heldout):
    x, y, truth = heldout
    logits = x @ np.asarray(truth.gates).T
    log_gate = logits - logsumexp(logits, axis=1, keepdims=True)
    component = norm.logpdf(y[:, None], x @ np.asarray(truth.experts).T, np.asarray(truth.noise)[None, :])
    expected = logsumexp(log_gate + component, axis=1).mean()
    assert moe.metrics.heldout_log_likelihood(truth, x, y) == pytest.approx(expected, rel=1e-10)
    assert moe.metrics.heldout_log_likelihood(fit_of(truth), x, y) == pytest.approx(expected, rel=1e-10)


def test_heldout_metrics_use_the_records_link_and_per_expert_noise(heldout):
    x, y, truth = heldout
    x, y = x[:2000], y[:2000]
    params = truth.replace(
        link="tanh",
        noise=jnp.array([0.1, 0.3, 0.6]),
        expert_intercepts=jnp.array([0.2, -0.1, 0.0]),
        gate_intercepts=jnp.array([0.5, -0.5, 0.0]),
    )
    logits = x @ np.asarray(params.gates).T + np.asarray(params.gate_intercepts)
    means = np.tanh(x @ np.asarray(params.experts).T + np.asarray(params.expert_intercepts))
    component = norm.logpdf(y[:, None], means, np.array([0.1, 0.3, 0.6])[None, :])
    expected = logsumexp(log_softmax(logits, axis=1) + component, axis=1).mean()
    assert moe.metrics.heldout_log_likelihood(params, x, y) == pytest.approx(expected, rel=1e-10)
    predictive = (softmax(logits, axis=1) * means).sum(1)
    assert moe.metrics.mean_squared_error(params, x, y) == pytest.approx(np.mean((y - predictive) ** 2), rel=1e-10)
    # A different link is a different model.
    assert abs(moe.metrics.heldout_log_likelihood(params.replace(link="linear"), x, y) - expected) > 0.01


def test_truth_beats_perturbed_parameters_on_held_out_data(heldout):
    x, y, truth = heldout
    at_truth = moe.metrics.heldout_log_likelihood(truth, x, y)
    for candidate in (
        perturbed(truth),
        truth.replace(noise=2 * truth.noise),
        truth.replace(noise=0.5 * truth.noise),
        truth.replace(gates=jnp.zeros_like(truth.gates)),
    ):
        # Differences here are O(0.1) nats per point against a standard error ~0.01 at n=20000.
        assert moe.metrics.heldout_log_likelihood(candidate, x, y) < at_truth - 0.02
    # The predictive mean does not involve the noise; wrong experts or gates move it.
    at_truth = moe.metrics.mean_squared_error(truth, x, y)
    assert moe.metrics.mean_squared_error(truth.replace(noise=2 * truth.noise), x, y) == pytest.approx(at_truth, rel=1e-12)
    assert moe.metrics.mean_squared_error(perturbed(truth), x, y) > at_truth + 0.01
    assert moe.metrics.mean_squared_error(truth.replace(gates=jnp.zeros_like(truth.gates)), x, y) > at_truth + 0.01
    assert moe.metrics.mean_squared_error(fit_of(truth), x, y) == at_truth


def test_mean_squared_error_at_the_truth_is_noise_plus_gate_variance(heldout):
    # E[(y - E[y|x])^2 | x] = s^2 + Var_{z|x}(a_z . x): the difference, averaged over the
    # held-out set, is zero up to its standard error (empirical std / sqrt(n)); allow 5.
    x, y, truth = heldout
    probs = softmax(x @ np.asarray(truth.gates).T, axis=1)
    means = x @ np.asarray(truth.experts).T
    mean = (probs * means).sum(1)
    conditional = 0.2**2 + (probs * means**2).sum(1) - mean**2
    terms = (y - mean) ** 2 - conditional
    mse = moe.metrics.mean_squared_error(truth, x, y)
    assert mse == pytest.approx(np.mean((y - mean) ** 2), rel=1e-10)
    assert abs(mse - conditional.mean()) < 5 * terms.std() / np.sqrt(N)


def test_mean_squared_error_single_linear_expert_is_the_noise_variance():
    noise = 0.3
    truth = moe.simulation.true_params(key=jax.random.key(6), dim=D, num_experts=1, noise=noise)
    x, y = moe.simulation.sample_data(truth, key=jax.random.key(7), num_samples=N)
    # Var of a squared N(0, s^2) is 2 s^4: standard error of the mean s^2 sqrt(2/n); allow 5.
    assert abs(moe.metrics.mean_squared_error(truth, x, y) - noise**2) < 5 * noise**2 * np.sqrt(2 / N)


# --------------------------------------------------------------------------- bad input


def test_expert_error_bad_inputs_name_the_argument():
    truth = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"^estimate: expected experts of shape \(3, 4\)"):
        moe.metrics.expert_error(np.ones((2, 4)), truth)
    with pytest.raises(ValueError, match=r"^estimate: expected experts of shape \(k, d\)"):
        moe.metrics.expert_error(np.ones(4), truth)
    with pytest.raises(ValueError, match=r"^estimate: expected finite"):
        moe.metrics.expert_error(np.full((3, 4), np.nan), truth)
    with pytest.raises(ValueError, match=r"^truth: expected finite"):
        moe.metrics.match_experts(truth, np.where(np.eye(3, 4) > 0, np.inf, 1.0))


def test_gating_error_bad_inputs_name_the_argument(heldout):
    x, _, truth = heldout
    x = x[:100]
    small = moe.simulation.true_params(key=jax.random.key(8), dim=D, num_experts=2)
    with pytest.raises(ValueError, match=r"^params: expected experts of shape \(3, 5\)"):
        moe.metrics.gating_error(small, truth, x)
    # Gates in the model's site form (k - 1 rows) are not MoEParams gates.
    with pytest.raises(ValueError, match=r"^params: expected gates of shape \(\d+, \d+\) \(all k gate rows"):
        moe.metrics.gating_error(truth.replace(gates=truth.gates[:-1]), truth, x)
    with pytest.raises(ValueError, match=r"^truth: expected gates of shape \(\d+, \d+\) \(all k gate rows"):
        moe.metrics.gating_error(truth, truth.replace(gates=truth.gates[:-1]), x)
    with pytest.raises(ValueError, match=r"^params: expected finite"):
        moe.metrics.gating_error(truth.replace(experts=truth.experts.at[0, 0].set(jnp.nan)), truth, x)
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        moe.metrics.gating_error(truth.experts, truth, x)
    fields = {field.name: getattr(truth, field.name) for field in dataclasses.fields(truth)}
    with pytest.raises(TypeError, match=r"^truth: expected MoEParams"):
        moe.metrics.gating_error(truth, fields, x)
    with pytest.raises(ValueError, match=r"^x: expected 5 columns"):
        moe.metrics.gating_error(truth, truth, x[:, :4])
    with pytest.raises(ValueError, match=r"^x: expected finite"):
        moe.metrics.gating_error(truth, truth, np.where(np.arange(5) == 2, np.nan, x))


@pytest.mark.parametrize("metric", [moe.metrics.heldout_log_likelihood, moe.metrics.mean_squared_error])
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
    two = moe.simulation.true_params(key=jax.random.key(9), dim=D, num_experts=2)
    with pytest.raises(ValueError, match=r"^params: expected gates of shape \(\d+, \d+\) \(all k gate rows"):
        metric(two.replace(gates=two.gates[:-1]), x, y)
    with pytest.raises(ValueError, match=r"^params: expected noise > 0"):
        metric(truth.replace(noise=jnp.array([0.2, 0.0, 0.2])), x, y)
    # The link is the record's: no link argument any more.
    with pytest.raises(TypeError):
        metric(truth, x, y, link="linear")
