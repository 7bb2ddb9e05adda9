"""Shared runner for the data-set models: standardise, split, fit, compare with one expert."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import numpy as np

import numpyro_moe as moe
from numpyro_moe.metrics import heldout_log_likelihood, mean_squared_error

DATA = Path(__file__).parent / "data"


def standardise(values: np.ndarray) -> np.ndarray:
    return (values - values.mean(axis=0)) / values.std(axis=0)


def run_dataset(x, y, feature_names, *, num_experts, link="linear", quick=False, nuts=False, seed=0):
    """Fit a held-out split by `fit_moe` (with intercepts) and compare with a single expert.

    Returns a dict of held-out log-likelihood per point and MSE for k experts and for 1, and the
    fitted parameters; with ``nuts``, also the NUTS DataTree on the training split.
    """
    x, y = standardise(np.asarray(x, float)), standardise(np.asarray(y, float)[:, None])[:, 0]
    order = np.asarray(jax.random.permutation(jax.random.key(seed), x.shape[0]))
    cut = int(0.8 * x.shape[0])
    train, test = order[:cut], order[cut:]
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", moe.ReliabilityWarning)
        for k in (1, num_experts):
            fit = moe.fit_moe(
                x[train],
                y[train],
                num_experts=k,
                key=jax.random.key(seed),
                link=link,
                num_starts=2 if quick else 9,
                intercepts=True,
            )
            results[k] = {
                "params": fit.params,
                "heldout_loglik": heldout_log_likelihood(fit, x[test], y[test]),
                "heldout_mse": mean_squared_error(fit, x[test], y[test]),
            }
    for warning in {str(w.message) for w in caught}:
        print(f"  note: {warning}")
    print(f"  features: {feature_names}; {len(train)} training and {len(test)} held-out rows (standardised)")
    for k, row in results.items():
        print(
            f"  {k} expert(s): held-out log-likelihood per point {row['heldout_loglik']:.4f}, MSE {row['heldout_mse']:.4f}"
        )
    if nuts:
        run = moe.run_nuts(
            x[train],
            y[train],
            results[num_experts]["params"],
            key=jax.random.key(seed + 1),
            num_warmup=100 if quick else 500,
            num_samples=100 if quick else 500,
        )
        results["datatree"] = run.datatree
        import arviz as az

        print(az.summary(run.datatree).to_string())
    return results
