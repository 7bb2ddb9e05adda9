# %% [markdown]
# # Mixture of experts in NumPyro, from moments to posterior
#
# This tutorial walks through the workflow of `numpyro-moe` on simulated data with a known truth:
#
# 1. write the model as an ordinary NumPyro model from the package's pieces (`moe_priors` for the
#    parameters, `MixtureOfExperts` for the likelihood),
# 2. choose the number of experts from the spectrum of a moment matrix,
# 3. estimate the experts by the tensor method of moments (Makkuva, Kannan, Oh, Viswanath, ICML 2019),
#    which has no local optima,
# 4. learn the gate by EM with the experts fixed, then refine everything by joint EM,
# 5. run NumPyro's NUTS on that model with every chain started at the estimate (`init_to_params`),
#    relabel the draws, and check the posterior with ArviZ,
# 6. predict at new inputs.
#
# Set the environment variable `CI` to run it at smoke size.

# %%
import os
from pathlib import Path

import numpyro

numpyro.set_host_device_count(4)
numpyro.enable_x64()

import arviz as az
import jax
import matplotlib.pyplot as plt
import numpy as np
from numpyro.infer import MCMC, NUTS

import numpyro_moe as moe
from numpyro_moe.metrics import expert_error, gating_error
from numpyro_moe.simulation import sample_data, simulate

smoke_test = "CI" in os.environ
num_samples = 2_000 if smoke_test else 20_000
num_warmup, num_draws = (100, 100) if smoke_test else (500, 500)

# Figures are shown inline and also written as PNG files into $TUTORIAL_FIGURES/workflow.
FIGURES = Path(os.environ.get("TUTORIAL_FIGURES", "tutorial-figures")) / "workflow"
FIGURES.mkdir(parents=True, exist_ok=True)


def save_figure(figure, name):
    """Write a matplotlib figure or an ArviZ PlotCollection to FIGURES/NAME.png."""
    figure.savefig(FIGURES / f"{name}.png", dpi=90, bbox_inches="tight")


# %% [markdown]
# ## Data in the papers' setting
#
# Inputs `x ~ N(0, I_10)`, three unit-norm linear experts, a softmax gate whose rows are orthogonal to
# every expert, and noise sd 0.1. `sample_data` (in `numpyro_moe.simulation`) draws a held-out set from
# the same truth.

# %%
x, y, truth = simulate(key=jax.random.key(0), num_samples=num_samples, dim=10, num_experts=3)
x_test, y_test = sample_data(truth, key=jax.random.key(1), num_samples=5_000)
print("x", x.shape, "y", y.shape, "true experts", truth.experts.shape)


# %% [markdown]
# ## The model, in NumPyro
#
# A mixture of experts is an ordinary NumPyro model built from two pieces of the package.
# `moe.moe_priors(k, d)` samples the parameter sites, `experts` (k, d), `gates` (k - 1, d: the last
# gate row is fixed at zero, which identifies the softmax) and `noise`, under weakly informative default
# priors for standardised data (replace any of them with `priors={"gates": dist.Normal(0, 1), ...}`),
# and returns them as a `MoEParams` record. `moe.MixtureOfExperts.from_params(params, x)` is the
# likelihood of `y`, a NumPyro distribution with the expert of each point marginalised out. Your own
# model can add any sites of its own around them (a hierarchy over groups, other likelihood terms);
# this one is exactly the package's ready-made `moe.moe_regression`.


# %%
def model(x, y=None, *, num_experts=3):
    params = moe.moe_priors(num_experts, x.shape[1])
    with numpyro.plate("obs", x.shape[0]):
        numpyro.sample("y", moe.MixtureOfExperts.from_params(params, x), obs=y)


trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(x, y)
print({name: site["value"].shape for name, site in trace.items() if site["type"] == "sample"})

# %% [markdown]
# ## How many experts?
#
# Under the model the second-moment matrix `T2 = E[P2(y) (x x^T - I)]` has one eigenvalue per expert
# (the expert's mean gate probability) and the rest at zero up to sampling noise.

# %%
suggestion = moe.suggest_num_experts(x, y)
print("suggested number of experts:", suggestion.num_experts)
figure, axis = plt.subplots(figsize=(6, 3.5))
axis.bar(np.arange(1, 11), suggestion.t2_eigenvalues)
axis.axhline(suggestion.noise_floor, color="k", ls="--", label="sampling-noise floor")
axis.set(xlabel="eigenvalue index", ylabel="eigenvalue of T2 / c2")
axis.legend()
save_figure(figure, "t2_spectrum")

# %% [markdown]
# ## Experts by the tensor method, the gate by EM
#
# `estimate_experts` makes two streamed passes over the data; its diagnostics say how far to trust it.
# `fit_em(x, y, estimate, fix=("experts",))` runs EM over the gate with the experts held at the estimate
# (each M-step a convex multinomial logistic regression); `fit_em` from that fit then refines experts,
# gate and noise jointly. Both return a `Fit`, whose `.params` is a `MoEParams` record.

# %%
estimate = moe.estimate_experts(x, y, num_experts=3, key=jax.random.key(2))
print("tensor estimate, expert error:", round(expert_error(estimate, truth), 4))
print("T2 eigen-gap in noise-floor units:", round(estimate.diagnostics.eigen_gap, 1))
print("decomposition residual:", round(estimate.diagnostics.decomposition_residual, 3))

gated = moe.fit_em(x, y, estimate, fix=("experts",))
refined = moe.fit_em(x, y, gated)
print(
    "after EM: expert error",
    round(expert_error(refined, truth), 4),
    "gating error",
    round(gating_error(refined, truth, x_test), 4),
    "EM iterations",
    refined.iterations,
)

# %% [markdown]
# `fit_moe` does the same in one call and also runs a few random EM starts beside the tensor start
# (`num_starts` counts them all, the tensor start included), keeping the best likelihood: that is the
# robust choice on real data, where the design assumptions fail. The `Fit` says which start won.

# %%
fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(3), num_starts=3)
print("winning start:", fit.start, f"({fit.start_labels[fit.start]})", "of", fit.start_labels)
print("final log-likelihood per point of each start:", np.round(fit.start_log_likelihoods, 4))

# %% [markdown]
# ## NUTS started at the estimate
#
# From NumPyro's default initialisation the chains of a mixture land in different label permutations.
# `moe.init_to_params(params=fit)` is an init strategy for NumPyro's `NUTS` that starts the sites of
# `moe_priors` at the fit (any other site of your model falls back to `init_to_uniform`), and
# `moe.chain_init_params` gives each chain its own start near the fit (a small jitter in unconstrained
# space) for `MCMC.run(init_params=...)`. `moe.to_datatree` converts the run with `arviz.from_numpyro`
# (named dims `expert`, `gate`, `feature`) and aligns each draw's labels with the fit's.

# %%
nuts_x, nuts_y = x[:2000], y[:2000]
kernel = NUTS(model, init_strategy=moe.init_to_params(params=fit))
mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_draws, num_chains=4, progress_bar=False)
starts = moe.chain_init_params(model, fit, num_chains=4, key=jax.random.key(4), model_args=(nuts_x, nuts_y))
mcmc.run(jax.random.key(5), nuts_x, nuts_y, init_params=starts)
tree = moe.to_datatree(mcmc, reference=fit)
print(az.summary(tree, var_names=["noise", "gates"]))

# %% [markdown]
# `run_nuts` does the same for `moe_regression` (the model above) in one call, and fixes NUTS's metric
# at the Laplace approximation around the posterior mode nearest the fit, so warmup only tunes the
# step size (a second warmup adapts it when the chains disagree); its `DataTree` also
# holds the posterior predictive, and `diagnostics` the worst r_hat, the smallest bulk ESS and the
# divergences. With `fix=("experts",)` the model is conditioned on the fit's experts
# (`numpyro.handlers.condition`) and NUTS samples the gate and noise only.

# %%
run = moe.run_nuts(
    nuts_x, nuts_y, fit, key=jax.random.key(4), num_chains=4, num_warmup=num_warmup, num_samples=num_draws
)
print(run.diagnostics)
print(
    "posterior mean of the noise sd: own model",
    round(float(tree["posterior"]["noise"].mean()), 4),
    "| run_nuts",
    round(float(run.datatree["posterior"]["noise"].mean()), 4),
)
print(az.summary(run.datatree, var_names=["noise", "gates"]))

# %%
save_figure(az.plot_trace(run.datatree, var_names=["noise"], backend="matplotlib"), "trace_noise")

# %%
save_figure(az.plot_ppc_dist(run.datatree, backend="matplotlib"), "posterior_predictive")

# %%
loo = moe.loo(run.datatree)
print("elpd_loo:", round(float(loo.elpd), 1), "+-", round(float(loo.se), 1))

# %% [markdown]
# ## Predictions at new inputs
#
# `predict` gives the posterior mean of `E[y | x]`, a central interval of the posterior predictive of `y`,
# and the gate probabilities per point (for a point fit, pass the `Fit` instead of the `DataTree`).

# %%
prediction = moe.predict(run.datatree, x_test[:200], key=jax.random.key(5))
covered = np.mean(
    (np.asarray(y_test[:200]) >= prediction.lower) & (np.asarray(y_test[:200]) <= prediction.upper)
)
print(f"90% predictive intervals cover {covered:.0%} of 200 held-out points")
order = np.argsort(np.asarray(x_test[:200] @ truth.gates[0]))
figure, axis = plt.subplots(figsize=(6, 3.5))
axis.plot(prediction.gate_probabilities[order])
axis.set(xlabel="held-out points, ordered along the first gate direction", ylabel="P(expert | x)")
save_figure(figure, "gate_probabilities")
