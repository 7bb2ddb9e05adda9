"""The package as a part of a user's own NumPyro model, written as a user would write it.

Two groups of data whose experts share a group-level prior: each group's mixture of experts is
the package's priors (`moe_priors`, with the experts' prior replaced by the shared one) and its
likelihood (`MixtureOfExperts`), each under its own ``handlers.scope``. NUTS is NumPyro's own,
started at the package's fits by its init strategy; the DataTree conversion, relabelling and
prediction find the blocks by their scope prefixes.
"""

from __future__ import annotations

import warnings

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

import numpyro_moe as moe
from numpyro_moe.metrics import match_experts
from numpyro_moe.simulation import sample_data, true_params

K, D, N = 2, 3, 300


def two_groups(x1, y1, x2, y2, *, num_experts):
    """Group experts drawn around a shared mean: Normal(expert_mean, expert_spread)."""
    dim = x1.shape[1]
    mean = numpyro.sample(
        "expert_mean", dist.Normal(0.0, 1.0).expand([num_experts, dim]).to_event(2),
        infer={"event_dims": ["expert", "feature"]},
    )
    spread = numpyro.sample("expert_spread", dist.HalfNormal(0.5))
    for group, x, y in (("g1", x1, y1), ("g2", x2, y2)):
        with handlers.scope(prefix=group):
            params = moe.moe_priors(num_experts, dim, priors={"experts": dist.Normal(mean, spread)})
            with numpyro.plate("obs", x.shape[0]):
                numpyro.sample("y", moe.MixtureOfExperts.from_params(params, x), obs=y)


@pytest.fixture(scope="module")
def groups():
    truth = true_params(key=jax.random.key(0), dim=D, num_experts=K, noise=0.2)
    shifted = truth.replace(experts=truth.experts + 0.15 * jax.random.normal(jax.random.key(1), (K, D)))
    x1, y1 = sample_data(truth, key=jax.random.key(2), num_samples=N)
    x2, y2 = sample_data(shifted, key=jax.random.key(3), num_samples=N)
    # n=300 is small for the moments, but fit_moe keeps the estimate's notes to itself (EM refines
    # it), and the fits themselves are reliable: no ReliabilityWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", moe.ReliabilityWarning)
        fit1 = moe.fit_moe(x1, y1, num_experts=K, key=jax.random.key(4))
        fit2 = moe.fit_moe(x2, y2, num_experts=K, key=jax.random.key(5))
    # The groups' labels are tied by the shared prior: give group 2's fit group 1's labelling.
    fit2 = fit2.params.permute(match_experts(fit2, fit1).permutation)
    data = (x1, y1, x2, y2)
    return data, fit1.params, fit2


def _start(fit1, fit2, prefix=""):
    join = (lambda name: f"{prefix}/{name}") if prefix else (lambda name: name)
    return moe.init_to_params(
        params={join("g1"): fit1, join("g2"): fit2},
        values={join("expert_mean"): (fit1.experts + fit2.experts) / 2, join("expert_spread"): 0.2},
    )


def test_nuts_started_at_the_package_fits_converges_in_a_users_hierarchical_model(groups):
    data, fit1, fit2 = groups
    kernel = NUTS(two_groups, init_strategy=_start(fit1, fit2))
    mcmc = MCMC(kernel, num_warmup=400, num_samples=800, num_chains=4, chain_method="vectorized",
                progress_bar=False)
    mcmc.run(jax.random.key(6), *data, num_experts=K)
    tree = moe.to_datatree(mcmc, reference=fit1)
    rhat = az.rhat(tree).to_dataset()
    assert max(float(rhat[name].max()) for name in rhat.data_vars) <= 1.01
    assert int(np.asarray(tree["sample_stats"]["diverging"]).sum()) == 0
    posterior = tree["posterior"]
    assert posterior["g1.experts"].dims == ("chain", "draw", "expert", "feature")
    assert posterior["expert_mean"].dims == ("chain", "draw", "expert", "feature")
    # The shared mean sits between the groups' experts: within a few posterior sds of their average.
    average = (posterior["g1.experts"] + posterior["g2.experts"]).mean(("chain", "draw")).values / 2
    mean = posterior["expert_mean"].mean(("chain", "draw")).values
    assert np.all(np.abs(mean - average) < 4 * posterior["expert_mean"].std(("chain", "draw")).values)


@pytest.fixture(scope="module")
def scoped(groups):
    """The same model under handlers.scope(prefix="a"): a short run, raw (not relabelled)."""
    data, fit1, fit2 = groups
    model = handlers.scope(two_groups, prefix="a")
    mcmc = MCMC(NUTS(model, init_strategy=_start(fit1, fit2, prefix="a")), num_warmup=100, num_samples=100,
                num_chains=2, chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.key(7), *data, num_experts=K)
    return mcmc, fit1


def test_the_scoped_model_converts_with_named_dims_and_its_link(scoped):
    mcmc, fit1 = scoped
    tree = moe.to_datatree(mcmc, reference=fit1, prefix="a")
    posterior = tree["posterior"]
    # xarray forbids "/" in names: the tree spells a/g1/experts as a.g1.experts.
    assert set(posterior.data_vars) == {
        "a.expert_mean", "a.expert_spread", "a.g1.experts", "a.g1.gates", "a.g1.noise",
        "a.g2.experts", "a.g2.gates", "a.g2.noise",
    }
    for group in ("g1", "g2"):
        assert posterior[f"a.{group}.experts"].dims == ("chain", "draw", "expert", "feature")
        assert posterior[f"a.{group}.gates"].dims == ("chain", "draw", "gate", "feature")
        assert tree["observed_data"][f"a.{group}.y"].dims == (f"a.{group}.obs",)
        assert tree["log_likelihood"][f"a.{group}.y"].dims == ("chain", "draw", f"a.{group}.obs")
        params = moe.posterior_params(tree, prefix=f"a/{group}")
        assert params.link.name == "linear"
        assert params.experts.shape == (2 * 100, K, D) and params.noise.shape == (2 * 100, K)
    assert posterior.sizes["expert"] == K and posterior.sizes["gate"] == K - 1 and posterior.sizes["feature"] == D


def test_the_scoped_model_relabels_planted_label_switches_jointly(scoped):
    mcmc, fit1 = scoped
    tree = moe.to_datatree(mcmc, reference=fit1, prefix="a", relabel_draws=False)
    original = tree["posterior"].to_dataset()
    # Swap the two experts' labels in the second half of chain 0, in every block at once, as a
    # label switch of the joint posterior would.
    swapped = original.copy(deep=True)
    late = slice(50, None)
    for name, value in original.data_vars.items():
        if "expert" in value.dims:
            swapped[name][{"chain": 0, "draw": late}] = value[{"chain": 0, "draw": late}].isel(expert=[1, 0]).values
        if "gate" in value.dims:  # k = 2: rows (w, 0) become (0, w), i.e. (-w, 0) after the shift
            swapped[name][{"chain": 0, "draw": late}] = -value[{"chain": 0, "draw": late}].values
    planted = tree.copy()
    planted["posterior"] = swapped
    relabelled, permutations = moe.relabel(planted, fit1, prefix="a")
    expected = np.zeros((2, 100, K), dtype=int) + np.arange(K)
    expected[0, 50:] = [1, 0]
    np.testing.assert_array_equal(permutations, expected)
    for name in original.data_vars:
        np.testing.assert_allclose(relabelled["posterior"][name].values, original[name].values, atol=1e-12)
    np.testing.assert_array_equal(relabelled["sample_stats"]["a.expert_permutation"].values, expected)


def test_predict_from_a_scoped_block_matches_its_point_fit(scoped, groups):
    mcmc, fit1 = scoped
    (x1, y1, _, _), _, _ = groups
    tree = moe.to_datatree(mcmc, reference=fit1, prefix="a")
    prediction = moe.predict(tree, x1[:50], key=jax.random.key(8), prefix="a/g1")
    point = fit1.predictive_mean(x1[:50])
    assert prediction.mean.shape == (50,) and prediction.gate_probabilities.shape == (50, K)
    # The posterior mean of E[y | x] and the MLE's differ by posterior uncertainty only (n = 300).
    assert np.max(np.abs(prediction.mean - np.asarray(point))) < 0.15
    assert np.all(prediction.lower < prediction.mean) and np.all(prediction.mean < prediction.upper)
    with pytest.raises(ValueError, match="prefix"):
        moe.posterior_params(tree, prefix="b")
