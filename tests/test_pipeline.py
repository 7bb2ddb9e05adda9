"""`fit_moe`: the tensor start among random starts, all refined by joint EM, best one kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import numpyro_moe as moe
from numpyro_moe import metrics, simulation

numpyro.enable_x64()


@pytest.fixture(scope="module")
def papers():
    """The papers' setting: Gaussian x, unit experts, gates orthogonal to them."""
    return simulation.simulate(key=jax.random.key(3), num_samples=4000, dim=6, num_experts=3)


@pytest.fixture(scope="module")
def tensor_only(papers):
    x, y, _ = papers
    return moe.fit_moe(x, y, num_experts=3, key=jax.random.key(4), num_starts=1)


@pytest.fixture(scope="module")
def small():
    """The size of the CSV tests' fits (n=400, d=3, k=2, intercepts), so compiles are shared."""
    return simulation.simulate(key=jax.random.key(10), num_samples=400, dim=3, num_experts=2, noise=0.2)


@pytest.fixture(scope="module")
def with_restarts(small):
    x, y, _ = small
    return moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_starts=2, intercepts=True)


def _mean_log_likelihood(params, x, y):
    return float(jnp.mean(moe.MixtureOfExperts.from_params(params, x).log_prob(y)))


def test_fit_moe_keeps_the_best_start(small, with_restarts):
    x, y, _ = small
    fit = with_restarts
    assert isinstance(fit, moe.Fit)
    assert fit.method == "em" and fit.converged
    assert fit.history.shape == (fit.iterations,)
    assert np.all(np.diff(fit.history) >= -1e-10)
    # num_starts counts every start: the tensor estimate first, then one random start.
    assert fit.start_labels == ("tensor", "random")
    assert fit.start_log_likelihoods.shape == (2,)
    assert np.all(np.isfinite(fit.start_log_likelihoods))
    # The best start wins: the best objective (penalised EM, the default: log-likelihood plus log
    # prior over n), on a tie (within the EM tolerance, 1e-8) the first of them. The record keeps
    # each start's log-likelihood, not its objective; here both starts reach the same optimum
    # (log-likelihoods measured 9e-9 apart), so the first, the tensor start, wins.
    assert np.ptp(fit.start_log_likelihoods) < 1e-7
    assert fit.start == 0
    assert fit.log_likelihood == fit.start_log_likelihoods[fit.start]
    # The parameters returned are the ones that scored that likelihood.
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.log_likelihood, rel=1e-10)
    assert fit.params.link.name == "linear"
    assert fit.params.experts.shape == (2, 3) and fit.params.gates.shape == (2, 3)
    assert fit.params.expert_intercepts.shape == (2,) and fit.params.gate_intercepts.shape == (2,)
    np.testing.assert_array_equal(fit.params.gates[-1], 0)
    assert float(fit.params.gate_intercepts[-1]) == 0
    # One noise per expert by default: k separate sds (measured 0.189 and 0.200; the truth's 0.2).
    assert fit.params.noise.shape == (2,) and np.all(np.asarray(fit.params.noise) > 0)
    assert float(fit.params.noise[0]) != float(fit.params.noise[1])


def test_tensor_gap_is_how_far_the_moment_start_ended_below_the_winner(with_restarts):
    # The fixture's tensor start won (index 0): no gap.
    assert with_restarts.start == 0 and with_restarts.tensor_gap == 0.0
    record = {"params": with_restarts.params, "log_likelihood": -1.0, "history": np.zeros(1), "iterations": 1,
              "converged": True, "method": "em"}
    lost = moe.Fit(**record, start=0, start_labels=("random", "tensor", "random"),
                   start_objectives=np.array([-1.0, -1.25, -3.0]))
    assert lost.tensor_gap == pytest.approx(0.25, abs=1e-15)
    assert moe.Fit(**record, start_labels=("random", "random"), start_objectives=np.zeros(2)).tensor_gap is None
    assert moe.Fit(**record, start_labels=("tensor", "random")).tensor_gap is None  # objectives not kept


def test_fit_moe_is_reproducible_and_depends_on_the_key(small, with_restarts):
    x, y, _ = small
    again = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_starts=2, intercepts=True)
    np.testing.assert_array_equal(again.start_log_likelihoods, with_restarts.start_log_likelihoods)
    np.testing.assert_array_equal(again.params.experts, with_restarts.params.experts)
    assert again.start_labels == with_restarts.start_labels and again.start == with_restarts.start


def test_tensor_start_alone_reaches_the_oracle_optimum(papers, tensor_only):
    x, y, truth = papers
    fit = tensor_only
    assert fit.start_labels == ("tensor",)
    assert fit.start_log_likelihoods.shape == (1,)
    assert fit.start == 0
    assert fit.log_likelihood == fit.start_log_likelihoods[0]
    # The oracle starts at the truth in the fit's labelling: penalised EM's gate prior is on the
    # k - 1 gate rows relative to the last expert, so its optimum depends on which expert is last
    # (in the truth's own labelling: 1.5e-7 apart in log-likelihood, 6.5e-5 in the objective).
    oracle = moe.fit_em(x, y, truth.permute(np.argsort(metrics.match_experts(fit, truth).permutation)))
    # No local optimum in the papers' setting: EM from the tensor estimate ends where EM from
    # the truth does (both stop when the per-point change is below tol=1e-8). Measured: 9.7e-10
    # apart in log-likelihood, 2.9e-10 in the objective, 2.2e-7 in the experts.
    assert fit.log_likelihood == pytest.approx(oracle.log_likelihood, abs=1e-6)
    assert fit.history[-1] == pytest.approx(oracle.history[-1], abs=1e-6)
    assert metrics.expert_error(fit, oracle) < 1e-3
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.log_likelihood, rel=1e-10)


def test_estimate_options_reach_estimate_experts(small):
    x, y, _ = small
    # An option of estimate_experts is passed through (its own check names it) ...
    with pytest.raises(ValueError, match=r"^method: expected one of \('tensor', 'landscape'\), got 'bogus'"):
        moe.fit_moe(x, y, num_experts=2, key=jax.random.key(0), estimate_options={"method": "bogus"})
    # ... but those fit_moe sets itself are refused, naming estimate_options.
    for taken in ({"link": "tanh"}, {"key": jax.random.key(1)}, {"num_experts": 2}):
        with pytest.raises(ValueError, match=r"^estimate_options: \['(link|key|num_experts)'\] are set by fit_moe"):
            moe.fit_moe(x, y, num_experts=2, key=jax.random.key(0), estimate_options=taken)


@pytest.mark.slow
def test_more_experts_than_dimensions_uses_random_starts_only():
    # Slow only for its EM compile (~6 s).
    x, y, _ = simulation.simulate(key=jax.random.key(5), num_samples=500, dim=2, num_experts=2, gating="correlated")
    fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(6), num_starts=3)
    # k > d: the tensor method cannot apply, so every start is random (num_starts of them).
    assert fit.start_labels == ("random",) * 3
    assert fit.start_log_likelihoods.shape == (3,)
    assert np.all(np.isfinite(fit.start_log_likelihoods))
    # The best objective wins (penalised EM, the default), on a tie (within the EM tolerance, 1e-8)
    # the first of them; here that start also has the best log-likelihood (measured 0.47367,
    # against 0.47366 and 0.47365).
    assert fit.start == int(np.argmax(fit.start_log_likelihoods >= fit.start_log_likelihoods.max() - 1e-8))
    assert fit.params.experts.shape == (3, 2)
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.log_likelihood, rel=1e-10)
    # One start is enough: the random one.
    single = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(6), num_starts=1)
    assert single.start_labels == ("random",)


@pytest.mark.slow
def test_intercepts_are_recovered():
    # Slow only for its compiles (~10 s); the CSV tests run fit_moe with intercepts by default.
    truth = simulation.true_params(key=jax.random.key(7), dim=4, num_experts=2)
    truth = truth.replace(expert_intercepts=jnp.array([0.5, -0.5]), gate_intercepts=jnp.array([1.0, 0.0]))
    x, y = simulation.sample_data(truth, key=jax.random.key(8), num_samples=6000)
    fit = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(9), num_starts=2, intercepts=True)
    assert fit.start_labels == ("tensor", "random")
    assert fit.start_log_likelihoods.shape == (2,)
    aligned = fit.params.permute(metrics.match_experts(fit.params, truth).permutation)
    # Standard errors at n=6000 are ~0.01 for the expert offsets and ~0.05 for the gate's
    # (measured here: 0.503, -0.506 and 1.045; expert error 0.005).
    np.testing.assert_allclose(aligned.expert_intercepts, [0.5, -0.5], atol=0.03)
    np.testing.assert_allclose(aligned.gate_intercepts, [1.0, 0.0], atol=0.2)
    assert metrics.expert_error(aligned, truth) < 0.05
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.log_likelihood, rel=1e-10)


@pytest.mark.slow
def test_tanh_experts_with_their_own_noise():
    # Slow for its compiles (the tanh moments and EM). The fit carries the data's link, and
    # shared_noise=False reaches EM through fit_moe.
    noise = jnp.array([0.05, 0.15])
    x, y, truth = simulation.simulate(key=jax.random.key(30), num_samples=4000, dim=4, num_experts=2, link="tanh",
                                      noise=noise)
    assert truth.link.name == "tanh"
    fit = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(31), link="tanh", shared_noise=False, num_starts=2)
    assert fit.params.link.name == "tanh"
    assert fit.start_labels == ("tensor", "random")
    aligned = fit.params.permute(metrics.match_experts(fit, truth).permutation)
    # Measured on four data sets (keys 30-33): expert error 0.007-0.011 (here 0.007), noise sds
    # within 3.0% of the truth (here 0.1% and 0.7%); the bounds leave a factor of 3 or more.
    assert metrics.expert_error(aligned, truth) < 0.05
    np.testing.assert_allclose(aligned.noise, noise, rtol=0.1)
    assert _mean_log_likelihood(fit.params, x, y) == pytest.approx(fit.log_likelihood, rel=1e-10)


@pytest.mark.slow
def test_iteration_cap_warns(small):
    x, y, _ = small
    with pytest.warns(moe.ReliabilityWarning, match="max_iterations=2"):
        fit = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(4), num_starts=2, max_iterations=2)
    assert not fit.converged
    assert fit.iterations == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_starts": 0}, ValueError, r"^num_starts: expected an integer >= 1, got 0"),
        ({"num_starts": 1.5}, TypeError, r"^num_starts: "),
        ({"num_experts": 0}, ValueError, r"^num_experts: "),
        ({"key": None}, TypeError, r"^key: "),
        ({"link": "cubic"}, ValueError, r"^link: "),
        ({"max_iterations": 0}, ValueError, r"^max_iterations: "),
        ({"tol": 0.0}, ValueError, r"^tol: "),
        ({"estimate_options": {"link": "tanh"}}, ValueError, r"^estimate_options: \['link'\]"),
    ],
)
def test_bad_arguments_name_the_argument(small, kwargs, error, match):
    x, y, _ = small
    options = {"num_experts": 2, "key": jax.random.key(0), **kwargs}
    with pytest.raises(error, match=match):
        moe.fit_moe(x, y, **options)


def test_short_em_screening_keeps_the_best_starts_and_the_tensor_start(small):
    # Eight starts run 5 EM iterations; the two best by the objective, and the tensor start, run
    # to convergence (Biernacki, Celeux and Govaert 2003).
    x, y, _ = small
    screened = moe.fit_moe(
        x, y, num_experts=2, key=jax.random.key(11), num_starts=8, num_finalists=2, screen_iterations=5, intercepts=True
    )
    assert "tensor" in screened.start_labels and 2 <= len(screened.start_labels) <= 3
    assert screened.start_objectives.shape == (len(screened.start_labels),)
    assert screened.converged
    # The screen discards only starts that were behind: the screened fit is as good as running
    # all eight to convergence (both reach the optimum here).
    full = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_starts=8, intercepts=True)
    assert len(full.start_labels) == 8
    assert screened.history[-1] >= full.history[-1] - 1e-6
    with pytest.raises(ValueError, match="num_finalists"):
        moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_finalists=0)
    with pytest.raises(ValueError, match="screen_iterations"):
        moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_finalists=1, screen_iterations=0)



def test_short_em_screening_reads_a_subsample_above_screen_rows(monkeypatch):
    # Above screen_rows the screen runs on that many rows and the finalists on all of them, so the
    # screen's cost does not grow with n; in this easy setting every start's basin is the
    # optimum's, and the fit is the one screening all the rows finds.
    import numpyro_moe._fit as fit_module

    x, y, truth = simulation.simulate(key=jax.random.key(8), num_samples=3000, dim=4, num_experts=2)
    x, y = np.asarray(x), np.asarray(y)
    seen = []
    em_all = fit_module._em_all

    def spy(x, y, init, **options):
        seen.append((x.shape[0], options["max_iterations"]))
        return em_all(x, y, init, **options)

    monkeypatch.setattr(fit_module, "_em_all", spy)
    options = {"num_experts": 2, "key": jax.random.key(1), "num_starts": 6, "num_finalists": 2}
    sampled = moe.fit_moe(x, y, screen_rows=1000, **options)
    assert (1000, 10) in seen and all(rows == 3000 for rows, iterations in seen if iterations != 10)
    seen.clear()
    everything = moe.fit_moe(x, y, screen_rows=None, **options)
    assert (3000, 10) in seen and all(rows == 3000 for rows, _ in seen)
    assert sampled.start_objectives.max() == pytest.approx(everything.start_objectives.max(), abs=1e-7)
    assert metrics.expert_error(sampled, truth) < 0.05
    with pytest.raises(ValueError, match="screen_rows"):
        moe.fit_moe(x, y, screen_rows=0, **options)

def test_fit_moe_passes_the_design_to_the_moment_estimate(small):
    x, y, _ = small
    fit = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), num_starts=2, intercepts=True, design="mixture")
    assert fit.start_labels == ("tensor", "random") and fit.converged
    with pytest.raises(ValueError, match=r"estimate_options: \['design'\] are set by fit_moe's own arguments"):
        moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), estimate_options={"design": "auto"})
    with pytest.raises(ValueError, match="design"):
        moe.fit_moe(x, y, num_experts=2, key=jax.random.key(11), design="uniform")
