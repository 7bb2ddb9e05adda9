"""The synthetic experiment of Makkuva, Kannan, Oh, Viswanath (ICML 2019): x ~ N(0, I_d), k
unit-norm experts, gate rows orthogonal to the experts, Gaussian noise. The experts are estimated
by the tensor method, the gate by EM with the experts fixed, then joint EM refines both.
"""

from __future__ import annotations

import jax

import numpyro_moe as moe
from numpyro_moe.metrics import expert_error, gating_error
from numpyro_moe.simulation import sample_data, simulate

NAME = "icml2019-synthetic"
DESCRIPTION = "ICML 2019 setting: d=10, k=3, orthogonal gates; tensor method -> gating EM -> joint EM"
DIM, NUM_EXPERTS, NOISE = 10, 3, 0.1


def load(*, num_samples=20_000, link="linear", seed=0):
    """``(x, y, truth)`` simulated in the paper's setting."""
    return simulate(
        key=jax.random.key(seed),
        num_samples=num_samples,
        dim=DIM,
        num_experts=NUM_EXPERTS,
        noise=NOISE,
        link=link,
    )


def model(x, y=None, link="linear"):
    """The NumPyro model definition of the experiment."""
    return moe.moe_regression(x, y, num_experts=NUM_EXPERTS, link=link)


def run(*, quick=False, nuts=False, seed=0):
    results = {}
    for link in ("linear",) if quick else ("linear", "tanh", "relu", "sigmoid"):
        x, y, truth = load(num_samples=5_000 if quick else 200_000, link=link, seed=seed)
        x_test, _ = sample_data(truth, key=jax.random.key(seed + 1), num_samples=5_000)
        estimate = moe.estimate_experts(x, y, num_experts=NUM_EXPERTS, link=link, key=jax.random.key(seed))
        gated = moe.fit_em(x, y, estimate, fix=("experts",))
        refined = moe.fit_em(x, y, gated).params
        results[link] = {
            "tensor": expert_error(estimate, truth),
            "tensor+em": expert_error(refined, truth),
            "gating": gating_error(refined, truth, x_test),
        }
        print(
            f"  {link:8s} n={x.shape[0]}: expert error tensor {results[link]['tensor']:.4f}, after EM "
            f"{results[link]['tensor+em']:.4f}; gating error {results[link]['gating']:.4f}"
        )
    if nuts:
        x, y, truth = load(num_samples=2000, seed=seed)
        fit = moe.fit_moe(x, y, num_experts=NUM_EXPERTS, key=jax.random.key(seed), num_starts=1)
        results["datatree"] = moe.run_nuts(
            x,
            y,
            fit,
            key=jax.random.key(seed),
            num_warmup=100 if quick else 500,
            num_samples=100 if quick else 500,
        ).datatree
    return results
