"""The ready-made models in models/: registry, data, model definitions, runs by name."""

import numpy as np
import pytest
from numpyro.infer.util import log_density

import numpyro_moe as moe
from models import MODELS
from models.__main__ import main


def test_registry_lists_every_model(capsys):
    assert set(MODELS) == {"icml2019-synthetic", "motorcycle", "diabetes"}
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in MODELS)


@pytest.mark.parametrize("name", ["motorcycle", "diabetes"])
def test_data_sets_load_and_their_models_have_finite_density(name):
    module = MODELS[name]
    x, y, feature_names = module.load()
    expected_rows = {"motorcycle": 133, "diabetes": 442}[name]
    assert x.shape == (expected_rows, len(feature_names)) and y.shape == (expected_rows,)
    assert np.isfinite(x).all() and np.isfinite(y).all()
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    params = moe.MoEParams(
        np.zeros((module.NUM_EXPERTS, x.shape[1])), np.zeros((module.NUM_EXPERTS, x.shape[1])), 1.0,
        np.zeros(module.NUM_EXPERTS), np.zeros(module.NUM_EXPERTS),
    )
    density, _ = log_density(module.model, (x, y), {}, moe.params_to_sites(params))
    # Zero experts and unit noise: the log density is N(0, 1) on standardised y plus the priors.
    likelihood = float(np.sum(moe.pointwise_log_likelihood(params, x, y)))
    assert likelihood == pytest.approx(-0.5 * np.sum(y**2) - 0.5 * len(y) * np.log(2 * np.pi))
    assert np.isfinite(float(density)) and float(density) != pytest.approx(likelihood)


def test_motorcycle_mixture_beats_one_expert_out_of_sample():
    results = MODELS["motorcycle"].run(quick=True)
    # Measured: -0.84 (3 experts) against -1.56 (1 expert) per held-out point; the regimes of
    # the crash (flat, dip, rebound) are what a single cubic cannot follow.
    assert results[3]["heldout_loglik"] > results[1]["heldout_loglik"] + 0.3


def test_unknown_model_name_is_an_error(capsys):
    assert main(["run", "nope"]) == 2
    assert "name: unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["icml2019-synthetic", "diabetes"])
def test_models_run_by_name_at_smoke_size(name):
    assert main(["run", name, "--quick"]) == 0


def test_icml_synthetic_quick_run_recovers_the_experts():
    results = MODELS["icml2019-synthetic"].run(quick=True)
    # n=5000, d=10, k=3: EM from the tensor estimate reaches the MLE, whose error is ~0.01.
    assert results["linear"]["tensor+em"] < 0.05
    assert results["linear"]["gating"] < 0.1
