"""A gate with covariates of its own (``gate_x``, flexmix's concomitant variables): the gate reads z
(n, q), the experts read x (n, d), through the distribution, the model, EM, MAP, NUTS, prediction,
the metrics, choosing k and the CLI's fit folder."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from cli_helpers import run_cli
from numpyro.infer.util import log_density

import numpyro_moe as moe
from numpyro_moe import MixtureOfExperts, MoEParams, metrics
from numpyro_moe.simulation import sample_response

numpyro.enable_x64()

# Three experts on d = 3 inputs x; the gate reads q = 2 other covariates z only (scale 3: each
# expert owns a region of z), the experts read x only.
TRUTH = MoEParams(
    jnp.eye(3),
    jnp.array([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0]]),
    jnp.full(3, 0.1),
)


def _data(seed: int, n: int):
    x_key, z_key, y_key = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(x_key, (n, 3))
    z = jax.random.normal(z_key, (n, 2))
    return x, z, sample_response(TRUTH, x, key=y_key, gate_x=z)


@pytest.fixture(scope="module")
def data():
    x, z, y = _data(0, 2000)
    held_x, held_z, held_y = _data(1, 2000)
    return x, z, y, held_x, held_z, held_y


@pytest.fixture(scope="module")
def fits(data):
    x, z, y, *_ = data
    fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(2), gate_x=z)
    oracle = moe.fit_em(x, y, TRUTH, gate_x=z)  # EM started at the truth
    plain = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(2))  # the gate reads x
    return fit, oracle, plain


def test_a_gate_on_its_own_covariates_is_recovered_at_the_oracles_level(data, fits):
    _, _, _, held_x, held_z, held_y = data
    fit, oracle, plain = fits
    assert fit.params.gates.shape == (3, 2) and fit.params.experts.shape == (3, 3)
    assert "tensor" in fit.start_labels  # k <= d: the moment estimate of the experts is a start
    # Measured on three seeds: the default fit reaches the oracle's optimum (expert error 0.0015-
    # 0.006, gating error 0.012-0.014, identical to 4 decimals); 0.1 is the success line.
    assert metrics.expert_error(fit, TRUTH) <= metrics.expert_error(oracle, TRUTH) + 1e-3
    assert metrics.expert_error(fit, TRUTH) < 0.05
    gate = metrics.gating_error(fit, TRUTH, held_x, gate_x=held_z)
    assert gate <= metrics.gating_error(oracle, TRUTH, held_x, gate_x=held_z) + 1e-3
    assert gate < 0.05
    # A gate that reads x cannot see z: its held-out log-likelihood is far lower (measured
    # -0.02..-0.05 per point against 0.42..0.47).
    ours = metrics.heldout_log_likelihood(fit, held_x, held_y, gate_x=held_z)
    assert ours == pytest.approx(metrics.heldout_log_likelihood(oracle, held_x, held_y, gate_x=held_z), abs=1e-3)
    assert ours > metrics.heldout_log_likelihood(plain, held_x, held_y) + 0.3


def test_penalized_em_with_gate_covariates_reaches_the_mode_of_the_models_posterior():
    # EM's gate step on z maximises the log joint density NumPyro computes from moe_regression
    # with gate_x (the same check as for a gate on x, tests/test_penalized.py).
    x, z, y = _data(3, 150)
    start = moe.random_starts(x, y, num_experts=2, num_starts=1, key=jax.random.key(4), gate_x=z, intercepts=True)
    assert start.gates.shape == (1, 2, 2)
    em = moe.fit_em(x, y, start, gate_x=z, tol=1e-14, max_iterations=5000)
    assert em.converged and np.all(np.diff(em.history) >= -1e-12)
    sites = moe.params_to_sites(em)
    assert sites["gates"].shape == (1, 2)
    kwargs = {"num_experts": 2, "intercepts": True, "gate_x": z}
    gradient = jax.grad(lambda s: log_density(moe.moe_regression, (x, y), kwargs, s)[0])(sites)
    assert max(float(jnp.max(jnp.abs(value))) for value in gradient.values()) < 1e-3


def test_the_distribution_and_the_model_read_the_gate_covariates():
    x, z, y = _data(5, 50)
    likelihood = MixtureOfExperts.from_params(TRUTH, x, gate_x=z)
    manual = jax.scipy.special.logsumexp(
        jax.nn.log_softmax(z @ TRUTH.gates.T, axis=-1)
        + jax.scipy.stats.norm.logpdf(y[:, None], x @ TRUTH.experts.T, TRUTH.noise),
        axis=-1,
    )
    np.testing.assert_allclose(likelihood.log_prob(y), manual, rtol=1e-12)
    np.testing.assert_allclose(
        TRUTH.predictive_mean(x, z), jnp.sum(jax.nn.softmax(z @ TRUTH.gates.T) * (x @ TRUTH.experts.T), -1)
    )
    trace = numpyro.handlers.trace(numpyro.handlers.seed(moe.moe_regression, 0)).get_trace(
        x, y, num_experts=3, gate_x=z
    )
    assert trace["gates"]["value"].shape == (2, 2)
    assert trace["gates"]["infer"]["event_dims"] == ["gate", "gate_feature"]
    assert trace["experts"]["value"].shape == (3, 3)
    with numpyro.handlers.seed(rng_seed=0):
        params = moe.moe_priors(3, 3, gate_dim=2)
    assert params.gates.shape == (3, 2) and params.gate_dim == 2 and params.dim == 3


def test_predict_takes_the_gate_covariates(data, fits):
    _, _, _, held_x, held_z, held_y = data
    fit, _, _ = fits
    prediction = moe.predict(fit, held_x[:20], key=jax.random.key(6), y=held_y[:20], gate_x=held_z[:20])
    np.testing.assert_allclose(prediction.mean, fit.params.predictive_mean(held_x[:20], held_z[:20]), rtol=1e-10)
    np.testing.assert_allclose(prediction.gate_probabilities, fit.params.gate_probabilities(held_z[:20]), rtol=1e-10)
    # Scored with the experts' unbiased noise sds (Fit.predictive_noise), the experts' d inputs
    # counted, not the gate's.
    corrected = fit.params.replace(noise=fit.predictive_noise)
    expected = MixtureOfExperts.from_params(corrected, held_x[:20], gate_x=held_z[:20]).log_prob(held_y[:20])
    np.testing.assert_allclose(prediction.log_density, expected, rtol=1e-10)
    # Forgetting the gate's covariates, or giving the wrong ones, is an error naming gate_x.
    with pytest.raises(ValueError, match="gate_x"):
        moe.predict(fit, held_x[:20], key=jax.random.key(6))
    with pytest.raises(ValueError, match=r"gate_x: expected 2 columns|gates of shape \(3, 3\)"):
        moe.predict(fit, held_x[:20], key=jax.random.key(6), gate_x=held_x[:20])
    with pytest.raises(ValueError, match="gate_x: expected 20 rows"):
        moe.predict(fit, held_x[:20], key=jax.random.key(6), gate_x=held_z[:10])


def test_bad_gate_covariates_meet_clear_errors(data, fits):
    x, z, y, *_ = data
    fit, _, _ = fits
    with pytest.raises(ValueError, match="gate_x: expected 2000 rows"):
        moe.fit_em(x, y, fit, gate_x=z[:100])
    with pytest.raises(ValueError, match="gate_x: expected a 2-d array"):
        moe.fit_moe(x, y, num_experts=2, key=jax.random.key(0), gate_x=z[:, 0])
    with pytest.raises(ValueError, match="gate_x: expected finite"):
        moe.fit_em(x, y, fit, gate_x=z.at[3, 1].set(jnp.nan))
    # A start whose gates do not match the gate's covariates.
    with pytest.raises(ValueError, match=r"init: expected gates of shape \(3, 4\)"):
        moe.fit_em(x, y, fit, gate_x=jnp.ones((2000, 4)))
    # A record with gate covariates used without them.
    with pytest.raises(ValueError, match="needs gate_x"):
        moe.fit_em(x, y, fit)
    with pytest.raises(ValueError, match="needs gate_x"):
        metrics.heldout_log_likelihood(fit, x, y)


def test_one_expert_ignores_the_gate_covariates(data):
    x, z, y, *_ = data
    one = moe.fit_moe(x, y, num_experts=1, key=jax.random.key(7), gate_x=z)
    np.testing.assert_allclose(one.params.gate_probabilities(z), 1.0)
    assert one.log_likelihood == pytest.approx(moe.fit_moe(x, y, num_experts=1, key=jax.random.key(7)).log_likelihood)


def test_select_num_experts_counts_the_gate_covariates(data):
    x, z, y, *_ = data
    with pytest.warns(moe.ReliabilityWarning, match="the largest tried"):
        selection = moe.select_num_experts(
            x[:600], y[:600], key=jax.random.key(8), num_experts=(2, 3), gate_x=z[:600]
        )
    assert selection.num_experts == 3
    row = {r["num_experts"]: r for r in selection.table}
    # k experts on 3 inputs (k * 3), k - 1 free gate rows on 2 covariates, k noises.
    assert row[3]["num_parameters"] == 3 * 3 + 2 * 2 + 3
    assert selection.fit.params.gates.shape == (3, 2)


def test_map_takes_the_gate_covariates(data, fits):
    x, z, y, *_ = data
    fit, _, _ = fits
    x, z, y = x[:300], z[:300], y[:300]
    em = moe.fit_em(x, y, fit, gate_x=z)
    # NumPyro's SVI on moe_regression with gate_x, started at EM's mode of the same model, stays.
    svi = moe.fit_map(x, y, em, key=jax.random.key(9), gate_x=z, num_steps=100, learning_rate=1e-3)
    assert svi.params.gates.shape == (3, 2)
    np.testing.assert_allclose(svi.params.experts, em.params.experts, atol=0.01)
    np.testing.assert_allclose(svi.params.gates, em.params.gates, atol=0.1)


@pytest.mark.slow
def test_nuts_takes_the_gate_covariates(data, fits):
    x, z, y, held_x, held_z, held_y = data
    fit, _, _ = fits
    x, z, y = x[:300], z[:300], y[:300]
    em = moe.fit_em(x, y, fit, gate_x=z)
    result = moe.run_nuts(
        x, y, em, key=jax.random.key(10), gate_x=z, num_chains=2, num_warmup=300, num_samples=300,
    )
    tree = result.datatree
    assert tuple(tree["posterior"]["gates"].dims) == ("chain", "draw", "gate", "gate_feature")
    posterior = moe.posterior_params(tree)
    assert posterior.gates.shape[1:] == (3, 2)
    # The posterior predictive scores held-out points as well as the point fit does (both near
    # the truth: measured within 0.01 per point).
    prediction = moe.predict(tree, held_x[:200], key=jax.random.key(11), y=held_y[:200], gate_x=held_z[:200])
    point = moe.predict(em, held_x[:200], key=jax.random.key(11), y=held_y[:200], gate_x=held_z[:200])
    assert abs(np.mean(prediction.log_density) - np.mean(point.log_density)) < 0.05


# --- The CLI: --gate-features in the fit folder, and predict -----------------------------------------





def _write(path, x, z, y, *, target=True):
    names = ["x1", "x2", "x3", "z1", "z2"] + (["y"] if target else [])
    columns = [np.asarray(x), np.asarray(z)] + ([np.asarray(y)[:, None]] if target else [])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        # Units far from standardised: the folder's standardisation must be undone by predict.
        for row in np.concatenate(columns, axis=1):
            writer.writerow([f"{10 * value + 5:.10g}" for value in row])


def test_cli_fits_and_predicts_with_gate_features(tmp_path, data):
    x, z, y, held_x, held_z, held_y = data
    train, new = tmp_path / "train.csv", tmp_path / "new.csv"
    _write(train, x[:800], z[:800], y[:800])
    _write(new, held_x[:200], held_z[:200], held_y[:200])
    out = tmp_path / "fit"
    code, _, stderr = run_cli(
        ["fit", str(train), "--target", "y", "--gate-features", "z1,z2", "--experts", "3", "--out", str(out), "--quiet"]
    )
    assert code == 0, stderr
    model = json.loads((out / "model.json").read_text())
    assert model["gate_features"] == ["z1", "z2"] and model["expert_features"] == ["x1", "x2", "x3"]
    assert "parameter,z1,z2,intercept" in (out / "parameters.csv").read_text()
    code, _, stderr = run_cli(["predict", str(out), str(new), "--out", str(tmp_path / "p.csv"), "--point", "--quiet"])
    assert code == 0, stderr
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The folder's point fit, in the file's units: the library's predict on standardised columns.
    fit = moe.io.load_result(out / "fit.npz")
    standard = model["standardization"]
    raw_new = np.concatenate([np.asarray(held_x[:200]), np.asarray(held_z[:200])], 1) * 10 + 5
    scaled = (raw_new - np.asarray(standard["feature_mean"])) / np.asarray(standard["feature_scale"])
    expected = fit.params.predictive_mean(scaled[:, :3], scaled[:, 3:])
    mean = standard["target_mean"] + standard["target_scale"] * np.asarray(expected)
    np.testing.assert_allclose([float(r["mean"]) for r in rows], mean, rtol=1e-8)
    # Held out, the gate on z gives a density no worse than the library's fit on the raw data.
    density = np.mean([float(r["log_density"]) for r in rows]) + np.log(10.0)  # back to y's units
    assert density > 0.3
    # Bad input: an unknown gate feature; a new file without a gate column.
    code, _, stderr = run_cli(["fit", str(train), "--target", "y", "--gate-features", "w", "--out", str(tmp_path / "f2")])
    assert code == 2 and "--gate-features: columns ['w'] are not in" in stderr
    code, _, stderr = run_cli(["fit", str(train), "--target", "y", "--gate-features", "y", "--out", str(tmp_path / "f3")])
    assert code == 2 and "--gate-features: the target 'y' cannot feed the gate" in stderr
    lacking = tmp_path / "lacking.csv"
    with open(new, newline="") as source, open(lacking, "w", newline="") as target:
        table = list(csv.reader(source))
        csv.writer(target).writerows([row[:4] + row[5:] for row in table])  # drop z2
    code, _, stderr = run_cli(["predict", str(out), str(lacking), "--out", str(tmp_path / "q.csv")])
    assert code == 2 and "z2" in stderr


def test_an_expert_estimate_starts_a_gate_on_its_own_covariates(data):
    # The estimate's uniform gate is widened to the gate's q covariates; EM over the gate alone
    # (the ICML 2019 second stage) then fits it on z.
    x, z, y, held_x, held_z, _ = data
    estimate = moe.estimate_experts(x, y, num_experts=3, key=jax.random.key(12))
    gated = moe.fit_em(x, y, estimate, gate_x=z, fix=("experts",))
    assert gated.params.gates.shape == (3, 2)
    np.testing.assert_array_equal(gated.params.experts, estimate.to_params().experts)
    assert metrics.gating_error(gated, TRUTH, held_x, gate_x=held_z) < 0.1  # measured 0.019 (experts 0.19 off)
