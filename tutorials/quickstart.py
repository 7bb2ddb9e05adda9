# %% [markdown]
# # Quick start: a mixture of experts inside your own NumPyro model
#
# `numpyro-moe` gives NumPyro three pieces, and everything else is ordinary NumPyro:
#
# - `moe_priors(k, d)` samples the parameter sites (`experts`, `gates`, `noise`) under priors you
#   can replace, and returns them as a `MoEParams` record;
# - `MixtureOfExperts.from_params(params, x)` is the likelihood of `y`, a NumPyro `Distribution`
#   with each point's expert summed out;
# - `init_to_params(params=...)` is an init strategy that starts any inference at an estimate.
#
# The estimate comes from the tensor method of moments (Makkuva, Kannan, Oh, Viswanath, ICML 2019),
# which reads the experts off a cross-moment tensor of the data: no random start, no local optimum.
# This tutorial writes a model, estimates its experts, then runs NumPyro's NUTS twice: once started
# at the estimate with everything free, once with the experts fixed at it. ArviZ checks both.
#
# Set the environment variable `CI` to run it at smoke size (small n, few draws).

# %%
import os
from pathlib import Path

import numpyro

numpyro.set_host_device_count(2)
numpyro.enable_x64()

import arviz as az
import jax
import matplotlib.pyplot as plt
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

import numpyro_moe as moe
from numpyro_moe.metrics import expert_error, match_experts
from numpyro_moe.simulation import simulate

smoke_test = "CI" in os.environ
num_samples = 2_000 if smoke_test else 20_000
nuts_rows = 500 if smoke_test else 2_000  # NUTS sees the first rows only: it is the slow step
num_warmup, num_draws = (100, 100) if smoke_test else (500, 500)

# Figures are shown inline and also written as PNG files into $TUTORIAL_FIGURES/quickstart.
FIGURES = Path(os.environ.get("TUTORIAL_FIGURES", "tutorial-figures")) / "quickstart"
FIGURES.mkdir(parents=True, exist_ok=True)


def save_figure(figure, name):
    """Write a matplotlib figure or an ArviZ PlotCollection to FIGURES/NAME.png."""
    figure.savefig(FIGURES / f"{name}.png", dpi=90, bbox_inches="tight")


# %% [markdown]
# ## Data with a known truth
#
# The papers' setting: inputs `x ~ N(0, I_10)`, three linear experts `y = a_i . x + noise`, a softmax
# gate over `x` that picks the expert, noise sd 0.1. `simulate` returns the data and the true
# `MoEParams`, so we can see how close each step gets.

# %%
x, y, truth = simulate(key=jax.random.key(0), num_samples=num_samples, dim=10, num_experts=3)
print("x", x.shape, "y", y.shape, "| true experts", truth.experts.shape, "gates", truth.gates.shape)

# %% [markdown]
# ## Your model
#
# The model below is yours: the package only provides the two lines inside it. Here the gate's prior
# is replaced (any site's prior can be, by passing a NumPyro distribution), and the plate over the
# observations is NumPyro's. Around these lines you could put a hierarchy over groups, other
# likelihood terms, or several mixtures under `handlers.scope`.


# %%
def model(x, y=None):
    params = moe.moe_priors(3, x.shape[1], priors={"gates": dist.Normal(0.0, 2.0)})
    with numpyro.plate("obs", x.shape[0]):
        numpyro.sample("y", moe.MixtureOfExperts.from_params(params, x), obs=y)


trace = handlers.trace(handlers.seed(model, 0)).get_trace(x[:5])
print({name: site["value"].shape for name, site in trace.items() if site["type"] == "sample"})

# %% [markdown]
# ## The tensor estimate
#
# `estimate_experts` makes two passes over the data and returns the experts (up to their order, which
# a mixture cannot identify), their mean gate probabilities and diagnostics: the eigen-gap of the
# second-moment matrix (large means the k experts stand out from sampling noise) and the residual of
# the tensor decomposition. It does not estimate the gate; `fit_em(..., fix=("experts",))` does,
# by EM over the gate alone, a convex problem once the experts are fixed.

# %%
estimate = moe.estimate_experts(x, y, num_experts=3, key=jax.random.key(1))
print("expert error of the tensor estimate:", round(expert_error(estimate, truth), 4))
print(
    "eigen-gap (noise-floor units):",
    round(float(estimate.diagnostics.eigen_gap), 1),
    "| decomposition residual:",
    round(float(estimate.diagnostics.decomposition_residual), 4),
)
gated = moe.fit_em(x, y, estimate, fix=("experts",))
print(
    "EM over the gate:",
    gated.iterations,
    "iterations, log-likelihood per point",
    round(gated.log_likelihood, 4),
)

# %%
match = match_experts(estimate, truth)
aligned = np.asarray(estimate.experts)[match.permutation]
figure, axis = plt.subplots(figsize=(4.5, 4.5))
for i in range(3):
    axis.scatter(truth.experts[i], aligned[i], label=f"expert {i + 1}")
limits = [float(np.min(truth.experts)) - 0.1, float(np.max(truth.experts)) + 0.1]
axis.plot(limits, limits, color="k", lw=0.8)
axis.set(xlabel="true coefficient", ylabel="tensor estimate", title="Experts from the moments alone")
axis.legend()
save_figure(figure, "estimate_against_truth")

# %% [markdown]
# ## NUTS started at the estimate
#
# `init_to_params(params=gated)` starts every site of `moe_priors` at the fit (the experts from the
# tensor method, the gate from EM). From NumPyro's default start the chains of a mixture would settle
# in different orderings of the experts; from the estimate they agree. `to_datatree` converts the run
# with `arviz.from_numpyro`, with named dims (`expert`, `gate`, `feature`), and orders each draw's
# experts as the reference's.

# %%
x_nuts, y_nuts = x[:nuts_rows], y[:nuts_rows]
mcmc = MCMC(
    NUTS(model, init_strategy=moe.init_to_params(params=gated)),
    num_warmup=num_warmup,
    num_samples=num_draws,
    num_chains=2,
    progress_bar=False,
)
mcmc.run(jax.random.key(2), x_nuts, y_nuts)
free = moe.to_datatree(mcmc, reference=gated)
print(az.summary(free, var_names=["noise", "experts"]))

# %% [markdown]
# ## The estimate as fixed experts
#
# Fixing the experts is NumPyro's `handlers.condition`, with the package's site names from
# `params_to_sites`. NUTS then samples the gate and the noise only: a smaller, better-shaped
# posterior, at the price of trusting the estimate. The estimate's error (printed above; it falls
# like 1/sqrt(n), and the eigen-gap says when n is too small to separate the experts) does not go
# away: the fixed experts miss some points, and the noise sd grows to cover them.

# %%
fixed_experts = moe.params_to_sites(estimate)["experts"]
conditioned = handlers.condition(model, {"experts": fixed_experts})
mcmc_fixed = MCMC(
    NUTS(conditioned, init_strategy=moe.init_to_params(params=gated)),
    num_warmup=num_warmup,
    num_samples=num_draws,
    num_chains=2,
    progress_bar=False,
)
mcmc_fixed.run(jax.random.key(3), x_nuts, y_nuts)
fixed = moe.to_datatree(mcmc_fixed, reference=gated)
print(az.summary(fixed, var_names=["noise"]))

# %% [markdown]
# ## ArviZ checks
#
# The chains should agree (r_hat near 1), carry enough independent draws (bulk ESS in the hundreds)
# and the trace plots should look like stationary noise. Below: the trace of the free run, and the
# posterior of each expert's noise sd with the experts free and fixed, against the true 0.1 (dashed):
# free experts recover it; fixed ones pay for the estimate's error.

# %%
for label, tree in [("experts free", free), ("experts fixed", fixed)]:
    summary = az.summary(tree, var_names=["noise", "gates"])
    print(
        f"{label:14s} max r_hat {summary['r_hat'].astype(float).max():.3f}, "
        f"min bulk ESS {summary['ess_bulk'].astype(float).min():.0f}"
    )

save_figure(az.plot_trace(free, var_names=["noise"], backend="matplotlib"), "trace_noise")

# %%
figure, axes = plt.subplots(1, 3, figsize=(10, 3))
for i, axis in enumerate(axes):
    for label, tree in [("experts free", free), ("experts fixed", fixed)]:
        draws = np.asarray(tree["posterior"]["noise"]).reshape(-1, 3)[:, i]
        axis.hist(draws, bins=30, alpha=0.6, density=True, label=label)
    axis.axvline(float(np.atleast_1d(truth.noise)[0]), color="k", ls="--")
    axis.set(title=f"noise sd, expert {i + 1}", xlabel="sd")
axes[0].legend()
figure.tight_layout()
save_figure(figure, "noise_free_against_fixed")

# %% [markdown]
# ## The same in one call
#
# `run_nuts` does all of the above for the ready-made `moe_regression` model (the priors, the plate and
# the likelihood): per-chain starts near the posterior mode (a Newton step or two from the fit),
# NUTS's metric fixed at the Laplace approximation there (so warmup only tunes the step size; should
# the chains disagree and barely move, a second warmup adapts that metric), relabelled draws and the posterior
# predictive. Its `diagnostics` hold the worst r_hat, the smallest bulk ESS, the divergences and the
# metric used, and `predict` turns the draws into predictions with intervals.
#
# The Laplace metric needs a start near the posterior's mode: joint EM on the rows NUTS will see
# (penalised by the same default priors that `moe_regression` samples under) refines the experts
# and the gate together. Started at `gated`, whose experts are the tensor estimate's, `run_nuts`
# would warn that the start is not a mode and adapt a dense metric instead.

# %%
mode = moe.fit_em(x_nuts, y_nuts, gated)
print("joint EM on the NUTS rows:", mode.iterations, "iterations, converged:", mode.converged)
run = moe.run_nuts(
    x_nuts, y_nuts, mode, key=jax.random.key(4), num_chains=2, num_warmup=num_warmup, num_samples=num_draws
)
print(run.diagnostics)
save_figure(az.plot_ppc_dist(run.datatree, backend="matplotlib"), "posterior_predictive")
prediction = moe.predict(run.datatree, x[-5:], key=jax.random.key(5))
print("predictive mean  ", np.round(prediction.mean, 3))
print("90% interval     ", np.round(prediction.lower, 3), np.round(prediction.upper, 3))
print("observed         ", np.round(np.asarray(y[-5:]), 3))
