"""Penalised (MAP) EM under the model's priors, choosing k, thin experts, and scoring held-out y."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import numpyro_moe as moe
from numpyro_moe import metrics, simulation
from numpyro_moe._em import ACCELERATE_AFTER

numpyro.enable_x64()


def _log_joint_gradient(fit, x, y, *, intercepts=False, priors=None):
    """Max |gradient| of the log joint density of `moe_regression` (its own priors, by NumPyro)
    over the constrained sites, at the fit: zero at a posterior mode."""
    sites = moe.params_to_sites(fit)
    kwargs = dict(num_experts=fit.params.num_experts, intercepts=intercepts, priors=priors)

    def log_joint(sites):
        return log_density(moe.moe_regression, (x, y), kwargs, sites)[0]

    gradient = jax.grad(log_joint)(sites)
    return max(float(jnp.max(jnp.abs(value))) for value in gradient.values())


@pytest.mark.parametrize("intercepts", [False, True])
def test_penalized_em_reaches_the_mode_of_the_models_posterior(intercepts):
    # A small sample, so the priors move the fit visibly: EM's closed-form M-steps must maximise
    # exactly the log joint density NumPyro computes from moe_regression's priors.
    x, y, truth = simulation.simulate(key=jax.random.key(0), num_samples=150, dim=3, num_experts=2)
    start = moe.random_starts(x, y, num_experts=2, num_starts=1, key=jax.random.key(1), intercepts=intercepts)
    em = moe.fit_em(x, y, start, tol=1e-14, max_iterations=5000)
    plain = moe.fit_em(x, y, start, tol=1e-14, max_iterations=5000, penalized=False)
    assert em.converged and plain.converged
    assert np.all(np.diff(em.history) >= -1e-12)  # the log posterior per point never decreases
    # At EM's fixed point the log joint's gradient is what the stopping rule leaves (measured
    # 2.1e-5 and 2.4e-5 after 23 iterations); at the maximum-likelihood fit, which the priors move,
    # it is 2.9 and 3.0.
    assert _log_joint_gradient(em, x, y, intercepts=intercepts) < 1e-3
    assert _log_joint_gradient(plain, x, y, intercepts=intercepts) > 0.5
    # ... and it has the higher likelihood, the penalised one the higher posterior.
    assert plain.log_likelihood > em.log_likelihood


def test_penalized_em_takes_other_normal_and_noise_priors():
    x, y, _ = simulation.simulate(key=jax.random.key(2), num_samples=120, dim=3, num_experts=2)
    priors = {"experts": dist.Normal(0.5, 0.3), "gates": dist.Normal(0.0, 1.0), "noise": dist.HalfNormal(0.5)}
    start = moe.random_starts(x, y, num_experts=2, num_starts=1, key=jax.random.key(3))
    em = moe.fit_em(x, y, start, priors=priors, tol=1e-14, max_iterations=5000)
    assert _log_joint_gradient(em, x, y, priors=priors) < 1e-3
    with pytest.raises(ValueError, match=r"priors\['noise'\].*fit_map"):
        moe.fit_em(x, y, start, priors={"noise": dist.LogNormal(0.0, 1.0)})
    with pytest.raises(ValueError, match=r"priors\['gates'\].*Normal"):
        moe.fit_em(x, y, start, priors={"gates": dist.Laplace(0.0, 1.0)})
    with pytest.raises(ValueError, match="penalized=False"):
        moe.fit_em(x, y, start, priors=priors, penalized=False)
    with pytest.raises(ValueError, match="unknown sites"):
        moe.fit_em(x, y, start, priors={"slopes": dist.Normal(0.0, 1.0)})


def test_map_by_svi_agrees_with_penalized_em():
    # The same model's priors: NumPyro's SVI + AutoDelta started at EM's mode stays there.
    x, y, _ = simulation.simulate(key=jax.random.key(4), num_samples=200, dim=3, num_experts=2)
    start = moe.random_starts(x, y, num_experts=2, num_starts=1, key=jax.random.key(5))
    em = moe.fit_em(x, y, start, tol=1e-14, max_iterations=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moe.ReliabilityWarning)  # Adam's last steps jitter at 1e-4
        svi = moe.fit_map(x, y, em, key=jax.random.key(6), num_steps=300, learning_rate=1e-3)
    np.testing.assert_allclose(svi.params.experts, em.params.experts, atol=5e-3)
    np.testing.assert_allclose(svi.params.noise, em.params.noise, rtol=2e-2)


def test_a_collapsing_expert_wins_by_likelihood_but_not_under_the_priors():
    # Expert 1 starts exactly through two points with a tiny noise: maximum-likelihood EM sends
    # its noise to zero (an unbounded likelihood); under the noise prior it cannot collapse.
    x, y, truth = simulation.simulate(key=jax.random.key(7), num_samples=200, dim=2, num_experts=1, noise=0.3)
    through = np.linalg.solve(np.asarray(x[:2]), np.asarray(y[:2]))
    start = moe.MoEParams(
        jnp.stack([truth.experts[0], jnp.asarray(through)]),
        jnp.asarray([[0.0, 0.0], [0.0, 0.0]]),
        jnp.asarray([0.3, 1e-3]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", moe.ReliabilityWarning)
        plain = moe.fit_em(x, y, start, penalized=False, max_iterations=300)
        penalized = moe.fit_em(x, y, start, max_iterations=300)
    # Collapsing (measured 3e-4 after 300 iterations, still shrinking): its likelihood grows without bound.
    assert float(jnp.min(plain.params.noise)) < 1e-3
    # Under the priors the expert leaves the two points (measured: it ends with 104 of the 200 points).
    assert float(jnp.min(penalized.params.noise)) > 0.02
    assert penalized.expert_weights.shape == (2,)
    assert penalized.expert_weights.sum() == pytest.approx(1.0)


def test_an_expert_with_almost_no_data_is_reported():
    # A gate held so that expert 0 gets about e^-12 of the data: far fewer points than its
    # 3 parameters (2 weights and a noise).
    x, y, truth = simulation.simulate(key=jax.random.key(7), num_samples=200, dim=2, num_experts=1, noise=0.3)
    start = moe.MoEParams(
        jnp.stack([-truth.experts[0], truth.experts[0]]),
        jnp.zeros((2, 2)),
        jnp.asarray([0.3, 0.3]),
        expert_intercepts=jnp.zeros(2),
        gate_intercepts=jnp.asarray([-12.0, 0.0]),
    )
    with pytest.warns(moe.ReliabilityWarning, match=r"expert 0 carries 0\.0 points .* fewer than its 4 parameters"):
        fit = moe.fit_em(x, y, start, fix=("gates",), max_iterations=50)
    assert fit.expert_weights[0] < 1e-4


def test_default_priors_warn_on_an_unstandardised_response():
    x, y, _ = simulation.simulate(key=jax.random.key(8), num_samples=200, dim=3, num_experts=2)
    start = moe.random_starts(x, 100 * y, num_experts=2, num_starts=1, key=jax.random.key(9))
    with pytest.warns(moe.ReliabilityWarning, match="standardise x and y"):
        moe.fit_em(x, 100 * y, start, max_iterations=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", moe.ReliabilityWarning)
        moe.fit_em(x, 100 * y, start, max_iterations=400, penalized=False)


def test_select_num_experts_ranks_k_by_bic_and_icl():
    x, y, truth = simulation.simulate(key=jax.random.key(10), num_samples=1500, dim=4, num_experts=2)
    selection = moe.select_num_experts(x, y, key=jax.random.key(11), num_experts=(1, 2, 3), num_starts=2)
    assert selection.num_experts == 2 and selection.criterion == "bic"
    assert [row["num_experts"] for row in selection.table] == [1, 2, 3]
    n = x.shape[0]
    for row in selection.table:
        k, d = row["num_experts"], 4
        assert row["num_parameters"] == k * d + (k - 1) * d + k
        fit = selection.fits[k]
        assert row["bic"] == pytest.approx(-2 * n * fit.log_likelihood + row["num_parameters"] * np.log(n))
        assert row["icl"] >= row["bic"]
    assert selection.fit is selection.fits[2]
    assert metrics.expert_error(selection.fit, truth) < 0.1
    with pytest.raises(ValueError, match="criterion"):
        moe.select_num_experts(x, y, key=jax.random.key(0), criterion="aic")
    with pytest.raises(ValueError, match="distinct"):
        moe.select_num_experts(x, y, key=jax.random.key(0), num_experts=(2, 2))


def test_select_num_experts_by_cross_validation():
    # Two well-separated linear experts, n = 600: the held-out deviance of k = 2 is far below
    # k = 1's (one line through two), and -cv / (2 n) estimates the log density of new data.
    x, y, truth = simulation.simulate(key=jax.random.key(20), num_samples=600, dim=3, num_experts=2)
    options = dict(key=jax.random.key(21), num_experts=(1, 2), num_starts=2)
    by_cv = moe.select_num_experts(x, y, criterion="cv", folds=3, **options)
    by_bic = moe.select_num_experts(x, y, **options)
    assert by_cv.criterion == "cv" and by_cv.num_experts == 2
    assert by_cv.table[1]["cv"] < by_cv.table[0]["cv"]
    assert "cv" not in by_bic.table[0]
    # The folds do not change the fits to all the data: the same keys, the same fits.
    for k in (1, 2):
        assert by_cv.fits[k].log_likelihood == by_bic.fits[k].log_likelihood
    # Fresh data from the truth: the chosen fit's held-out log density per point. The folds' fits
    # see 2/3 of the data, so CV is a little pessimistic (measured: 0.461 against 0.482); the log
    # densities' sd is 0.85, so the 600-point mean's standard error is 0.035 and 0.1 is about 3.
    x_new = jax.random.normal(jax.random.key(22), (20_000, 3))
    y_new = simulation.sample_response(truth, x_new, key=jax.random.key(23))
    fresh = metrics.heldout_log_likelihood(by_cv.fit, x_new, y_new)
    assert -by_cv.table[1]["cv"] / (2 * x.shape[0]) == pytest.approx(fresh, abs=0.1)
    for folds in (1, 601, 2.5):
        with pytest.raises((ValueError, TypeError), match="folds"):
            moe.select_num_experts(x, y, criterion="cv", folds=folds, **options)


def test_select_num_experts_auto_cross_validates_small_data_only(monkeypatch):
    import numpyro_moe._select as select

    x, y, _ = simulation.simulate(key=jax.random.key(20), num_samples=600, dim=3, num_experts=2)
    options = dict(key=jax.random.key(21), num_experts=(1, 2), num_starts=2, folds=3)
    by_cv = moe.select_num_experts(x, y, criterion="cv", **options)
    # 600 rows are at most CV_ROWS: "auto" is cross-validation, the same folds and scores.
    small = moe.select_num_experts(x, y, criterion="auto", **options)
    assert small.criterion == "cv" and [row["cv"] for row in small.table] == [row["cv"] for row in by_cv.table]
    # Above CV_ROWS it is BIC (no folds fitted).
    monkeypatch.setattr(select, "CV_ROWS", 599)
    large = moe.select_num_experts(x, y, criterion="auto", **options)
    assert large.criterion == "bic" and "cv" not in large.table[0]


def _nearly_cancelling_columns(n=300, seed=0):
    """Standardised data whose least-squares coefficients are about +-9: y follows the small
    difference of two columns that are 0.995 correlated (as in a polynomial basis)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    x = np.column_stack([z, z + 0.1 * rng.standard_normal(n), rng.standard_normal(n)])
    y = 10 * x[:, 0] - 10 * x[:, 1] + 0.5 * x[:, 2] + 0.3 * rng.standard_normal(n)
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def test_select_expert_prior_scale_widens_the_prior_where_the_coefficients_are_large():
    x, y = _nearly_cancelling_columns()
    key = jax.random.key(3)
    chosen = moe.select_expert_prior_scale(x, y, key=key, num_experts=1, intercepts=True, num_starts=2)
    deviance = {row["scale"]: row["cv"] for row in chosen.table}
    se = {row["scale"]: row["cv_se_difference"] for row in chosen.table}
    assert list(deviance) == [1.0, 3.0, 10.0]
    # sd 1 shrinks the two +-9 coefficients towards each other: measured deviance 102.0 against
    # 87.3 (sd 3) and 87.0 (sd 10, the lowest) on 300 rows, standard errors of the differences to
    # the lowest 8.6 and 0.9. The one-standard-error rule takes the smallest sd within one
    # standard error of the lowest: 3.
    best = min(deviance, key=deviance.get)
    assert se[best] == 0.0
    assert deviance[1.0] - deviance[best] > se[1.0] > 0
    assert chosen.scale == min(scale for scale in deviance if deviance[scale] - deviance[best] <= se[scale]) == 3.0
    # The fit is fit_moe's with the chosen prior and the same key, and nearer least squares.
    wide = dist.Normal(0.0, chosen.scale)
    again = moe.fit_moe(x, y, num_experts=1, key=key, intercepts=True, num_starts=2,
                        priors={"experts": wide, "expert_intercepts": wide})
    assert chosen.fit.log_likelihood == again.log_likelihood
    narrow = moe.fit_moe(x, y, num_experts=1, key=key, intercepts=True, num_starts=2)
    least_squares = np.linalg.lstsq(np.column_stack([x, np.ones(len(y))]), y, rcond=None)[0][:3]
    # (measured: at most 0.50 from least squares with sd 1, 0.06 with sd 3)
    assert np.abs(chosen.fit.params.experts[0] - least_squares).max() < 0.15
    assert np.abs(narrow.params.experts[0] - least_squares).max() > 0.3
    # The folds are select_num_experts' with the same key (k = 1 has one optimum, so the
    # deviances agree whatever the starts).
    by_k = moe.select_num_experts(x, y, key=key, num_experts=[1], criterion="cv", intercepts=True, num_starts=2,
                                  priors={"experts": wide, "expert_intercepts": wide})
    assert by_k.table[0]["cv"] == pytest.approx(deviance[chosen.scale], rel=1e-6)


def test_select_expert_prior_scale_bad_input():
    x, y = _nearly_cancelling_columns(n=40)
    options = dict(key=jax.random.key(0), num_experts=1)
    for scales in ((), (1.0, -1.0), (1.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match=r"^scales: expected distinct positive numbers"):
            moe.select_expert_prior_scale(x, y, scales=scales, **options)
    with pytest.raises(TypeError, match=r"^scales: expected an iterable of positive numbers"):
        moe.select_expert_prior_scale(x, y, scales=3.0, **options)
    with pytest.raises(ValueError, match=r"^priors: the experts' prior is what is chosen here; leave out \['experts'\]"):
        moe.select_expert_prior_scale(x, y, priors={"experts": dist.Normal(0.0, 2.0)}, **options)
    for folds in (1, 41):
        with pytest.raises(ValueError, match=r"^folds: expected between 2 and the number of rows \(40\)"):
            moe.select_expert_prior_scale(x, y, folds=folds, **options)


def test_predict_scores_held_out_responses():
    x, y, truth = simulation.simulate(key=jax.random.key(12), num_samples=400, dim=3, num_experts=2)
    prediction = moe.predict(truth, x[:50], key=jax.random.key(13), y=y[:50])
    expected = moe.MixtureOfExperts.from_params(truth, x[:50]).log_prob(y[:50])
    np.testing.assert_allclose(prediction.log_density, expected, rtol=1e-12)
    assert moe.predict(truth, x[:5], key=jax.random.key(13)).log_density is None
    with pytest.raises(ValueError, match="y"):
        moe.predict(truth, x[:5], key=jax.random.key(13), y=y[:4])


@pytest.mark.parametrize("family", ["normal", "student_t"])
def test_squarem_reaches_the_same_optimum_monotonically_in_fewer_iterations(family):
    """SQUAREM (accelerate=True) changes the path, not the optimum: same objective per start (to
    the tolerance's order), a history that never decreases, and no more iterations (measured:
    Student-t experts 730 plain against 186 accelerated at n = 4000)."""
    x, y, _ = simulation.simulate(key=jax.random.key(0), num_samples=1500, dim=4, num_experts=3)
    x, y = np.asarray(x), np.asarray(y)
    starts = moe.random_starts(x, y, num_experts=3, num_starts=2, key=jax.random.key(1))
    plain = moe.fit_em(x, y, starts, family=family, tol=1e-10, max_iterations=3000, accelerate=False)
    fast = moe.fit_em(x, y, starts, family=family, tol=1e-10, max_iterations=3000, accelerate=True)
    np.testing.assert_allclose(fast.start_objectives, plain.start_objectives, atol=1e-7)
    assert np.min(np.diff(fast.history)) > -1e-12
    assert fast.iterations <= plain.iterations
    # "auto": plain EM for the first ACCELERATE_AFTER iterations (the same path, exactly), SQUAREM
    # after them; the same optimum.
    auto = moe.fit_em(x, y, starts, family=family, tol=1e-10, max_iterations=3000, accelerate="auto")
    np.testing.assert_allclose(auto.start_objectives, plain.start_objectives, atol=1e-7)
    shared = min(ACCELERATE_AFTER, int(plain.iterations))
    np.testing.assert_array_equal(auto.history[:shared], plain.history[:shared])
    assert np.min(np.diff(auto.history)) > -1e-12
    if family == "student_t":  # where EM crawls (measured: 494 plain, 126 accelerated, 198 auto)
        assert plain.iterations > ACCELERATE_AFTER
        assert fast.iterations < 0.7 * plain.iterations
        assert auto.iterations < 0.85 * plain.iterations
    else:  # converged before the switch: plain EM throughout
        assert plain.iterations <= ACCELERATE_AFTER and auto.iterations == plain.iterations


def test_accelerate_takes_true_false_or_auto():
    x, y, truth = simulation.simulate(key=jax.random.key(0), num_samples=200, dim=3, num_experts=2)
    with pytest.raises(ValueError, match="accelerate: expected True, False or 'auto', got 'yes'"):
        moe.fit_em(x, y, truth, accelerate="yes")


def test_finish_em_continues_a_capped_fit_to_the_optimum_of_the_full_run():
    """A fit stopped at its iteration cap (Student-t experts, where EM crawls: 494 plain iterations
    to converge here) continues by SQUAREM to the optimum of plain EM run to convergence, keeping
    the record of its starts; a converged fit comes back unchanged."""
    from numpyro_moe._fit import finish_em

    x, y, _ = simulation.simulate(key=jax.random.key(0), num_samples=1500, dim=4, num_experts=3)
    x, y = np.asarray(x), np.asarray(y)
    starts = moe.random_starts(x, y, num_experts=3, num_starts=2, key=jax.random.key(1))
    full = moe.fit_em(x, y, starts, family="student_t", tol=1e-10, max_iterations=3000)
    with pytest.warns(moe.ReliabilityWarning, match="max_iterations=50"):
        capped = moe.fit_em(x, y, starts, family="student_t", tol=1e-10, max_iterations=50)
    assert not capped.converged and full.converged
    finished = finish_em(x, y, capped, family="student_t", tol=1e-10)
    assert finished.converged
    assert finished.start == capped.start and finished.start_labels == capped.start_labels
    # The winner's objective is the finished one; the other start's record is untouched.
    other = 1 - capped.start
    assert finished.start_objectives[other] == capped.start_objectives[other]
    assert finished.start_objectives[capped.start] > capped.start_objectives[capped.start]
    np.testing.assert_allclose(finished.start_objectives[capped.start], full.start_objectives[capped.start], atol=1e-7)
    # The log-likelihood is not what EM maximises (the log posterior is): along the posterior's flat
    # directions it moves more (measured 5e-7).
    np.testing.assert_allclose(finished.log_likelihood, full.start_log_likelihoods[capped.start], atol=5e-6)
    # The history runs on from the capped fit's and never decreases; iterations add up.
    np.testing.assert_array_equal(finished.history[: len(capped.history)], capped.history)
    assert np.min(np.diff(finished.history)) > -1e-12
    assert finished.iterations == len(finished.history) and finished.iterations > capped.iterations
    assert finish_em(x, y, full, family="student_t", tol=1e-10) is full


@pytest.mark.parametrize("intercepts", [False, True])
def test_the_gate_prior_and_the_map_fit_do_not_depend_on_which_expert_is_last(intercepts):
    # The softmax ignores a shift common to the gate rows, so the model keeps the last row at zero.
    # The prior is on every expert's row with that shift integrated out: relabelling the experts
    # (another one last, the free rows re-expressed against it) changes neither the model's log
    # density nor EM's objective and optimum. A prior on the k - 1 free rows alone would leave the
    # last expert's gate unpenalised, and the MAP fit would depend on the labelling of its start.
    x, y, _ = simulation.simulate(key=jax.random.key(7), num_samples=200, dim=4, num_experts=3)
    start = moe.random_starts(x, y, num_experts=3, num_starts=1, key=jax.random.key(8), intercepts=intercepts)
    start = jax.tree_util.tree_map(lambda leaf: leaf[0], start)
    em = moe.fit_em(x, y, start, tol=1e-14, max_iterations=5000)
    assert em.converged
    assert _log_joint_gradient(em, x, y, intercepts=intercepts) < 1e-3  # the model's posterior mode, k = 3
    permutation, inverse = [2, 0, 1], [1, 2, 0]
    relabelled = moe.fit_em(x, y, start.permute(permutation), tol=1e-14, max_iterations=5000)
    assert relabelled.converged
    np.testing.assert_allclose(relabelled.start_objectives, em.start_objectives, rtol=1e-10)
    back = relabelled.params.permute(inverse)
    for name in ("experts", "gates", "noise", "expert_intercepts", "gate_intercepts"):
        if getattr(em.params, name) is not None:
            np.testing.assert_allclose(getattr(back, name), getattr(em.params, name), atol=1e-6, err_msg=name)

    def log_joint(params):
        kwargs = dict(num_experts=3, intercepts=intercepts)
        return float(log_density(moe.moe_regression, (x, y), kwargs, moe.params_to_sites(params))[0])

    np.testing.assert_allclose(log_joint(em.params.permute(permutation)), log_joint(em.params), rtol=1e-12)


def test_penalized_em_reaches_the_posterior_mode_under_a_gate_prior_with_one_scale_per_expert():
    # EM's gate prior (gate_prior_terms) and the model's (_GateContrasts) are written apart; with a
    # scale per expert's row they must still give the same posterior mode.
    x, y, _ = simulation.simulate(key=jax.random.key(9), num_samples=200, dim=4, num_experts=3)
    priors = {"gates": dist.Normal(jnp.array([[0.3], [0.0], [-0.2]]), jnp.array([[0.5], [1.0], [2.0]]))}
    start = moe.random_starts(x, y, num_experts=3, num_starts=1, key=jax.random.key(10))
    em = moe.fit_em(x, y, start, priors=priors, tol=1e-14, max_iterations=5000)
    assert em.converged
    assert _log_joint_gradient(em, x, y, priors=priors) < 1e-3
    default = moe.fit_em(x, y, start, tol=1e-14, max_iterations=5000)  # the priors are used
    assert _log_joint_gradient(default, x, y, priors=priors) > 1e-2
