# %% [markdown]
# # Inference over the gate
#
# The tensor method (Makkuva, Kannan, Oh, Viswanath, ICML 2019) estimates the experts of a mixture of
# experts, not its gate. This tutorial takes the experts' estimate as given and compares the ways the
# package offers to learn the gate on top of it, each on the same data and each judged against the
# known truth:
#
# - EM over the gate alone, `fit_em(..., fix=("experts",))` (the paper's algorithm: with the experts
#   fixed, each M-step is a convex soft-label logistic regression);
# - the penalised posterior mode by NumPyro's SVI, `fit_map` (the same priors as EM's penalty);
# - the posterior by NUTS, with the experts fixed at the estimate and with them free.
#
# The last part is about starting NUTS: chains started by NumPyro's default initialisation against
# chains started at the estimate (`init_to_params`, `chain_init_params`), and what label switching
# does to the first kind.
#
# Set the environment variable `CI` to run it at smoke size (fewer rows and draws).

# %%
import os
import time
from pathlib import Path

import numpyro

numpyro.set_host_device_count(4)
numpyro.enable_x64()

import arviz as az
import jax
import matplotlib.pyplot as plt
import numpy as np
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

import numpyro_moe as moe
from numpyro_moe.metrics import expert_error, gating_error, heldout_log_likelihood, match_experts
from numpyro_moe.simulation import sample_data, simulate

smoke_test = "CI" in os.environ
moment_samples = 20_000 if smoke_test else 100_000  # the moments are cheap: all rows
num_rows = 500 if smoke_test else 2_000  # the gate's inference, NUTS included, on the first rows
num_warmup, num_draws = (100, 100) if smoke_test else (500, 500)
num_chains = 4

# Figures are shown inline and also written as PNG files into $TUTORIAL_FIGURES/gate_inference.
FIGURES = Path(os.environ.get("TUTORIAL_FIGURES", "tutorial-figures")) / "gate_inference"
FIGURES.mkdir(parents=True, exist_ok=True)


def save_figure(figure, name):
    """Write a matplotlib figure or an ArviZ PlotCollection to FIGURES/NAME.png."""
    figure.savefig(FIGURES / f"{name}.png", dpi=90, bbox_inches="tight")


# %% [markdown]
# ## Data and the experts' estimate
#
# Five Gaussian inputs, three linear experts, a softmax gate orthogonal to them, noise sd 0.1, and a
# held-out set from the same truth to judge the gate on. The moment estimate uses every row; the gate
# is then learnt on the first rows only, where NUTS is affordable, so that every method sees the
# same data.

# %%
x_all, y_all, truth = simulate(key=jax.random.key(1), num_samples=moment_samples, dim=5, num_experts=3)
x_test, y_test = sample_data(truth, key=jax.random.key(2), num_samples=5_000)
x, y = x_all[:num_rows], y_all[:num_rows]
estimate = moe.estimate_experts(x_all, y_all, num_experts=3, key=jax.random.key(3))
print(
    f"tensor estimate from {moment_samples:,} rows: expert error {expert_error(estimate, truth):.4f}, "
    f"eigen-gap {estimate.diagnostics.eigen_gap:.1f} x noise floor"
)
print(f"the gate is learnt on the first {num_rows:,} rows; held-out set: {len(y_test):,} rows")

# %% [markdown]
# ## Point estimates of the gate
#
# `fit_em(x, y, estimate, fix=("experts",))` starts from a uniform gate (an expert estimate has no
# gate) and runs EM with the experts held: the E-step weighs each point's experts, the M-step is a
# Newton step of a multinomial logistic regression on those weights. By default EM is penalised by the
# priors of `moe_regression` (a Normal prior on the gates), so it climbs the same posterior
# that `fit_map` reaches by SVI with an `AutoDelta` guide and NUTS samples. The two should agree.
#
# Freeing the experts is one more call: joint EM from the gate-only fit (or `fit_map` without `fix`).
# The table reports the expert error, the gating error (mean total variation between the true and
# the fitted gate probabilities on the held-out inputs, after matching the labels), the held-out
# log-likelihood per point, and the time of each call.

# %%
rows = []


def record(label, fit, seconds):
    rows.append(
        (
            label,
            expert_error(fit, truth),
            gating_error(fit, truth, x_test),
            heldout_log_likelihood(fit, x_test, y_test),
            seconds,
        )
    )
    return fit


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


em_fixed = record("EM, experts fixed", *timed(moe.fit_em, x, y, estimate, fix=("experts",)))
map_fixed = record(
    "MAP (SVI), experts fixed", *timed(moe.fit_map, x, y, estimate, key=jax.random.key(4), fix=("experts",))
)
em_free = record("EM, experts free", *timed(moe.fit_em, x, y, em_fixed))
record("EM from the truth", *timed(moe.fit_em, x, y, truth))


def print_table():
    print(f"{'method':34s}{'expert err':>11s}{'gating err':>11s}{'held-out ll':>12s}{'seconds':>9s}")
    for label, experts, gating, loglik, seconds in rows:
        print(f"{label:34s}{experts:11.4f}{gating:11.4f}{loglik:12.4f}{seconds:9.1f}")


print_table()
print(f"EM over the gate: {em_fixed.iterations} iterations, converged: {em_fixed.converged}")
print(
    "largest gate difference, EM against MAP with the experts fixed:",
    f"{np.max(np.abs(np.asarray(em_fixed.params.gates) - np.asarray(map_fixed.params.gates))):.4f}",
)

# %% [markdown]
# With the experts fixed, the gate can only be as good as they are: the fitted gate sends points to
# the estimated experts, and the estimate's error shows up in the held-out log-likelihood. Freeing the
# experts lets EM correct them from the data; the "EM from the truth" row is the best a point fit of
# these rows can do. EM solves each M-step in closed form (the experts) or by Newton steps (the gate)
# and stops at its tolerance; MAP runs a fixed number of Adam steps (and warns if they did not
# converge); the seconds column, compilation included, shows what each costs here. MAP's advantage
# is reach: `fit_map` is SVI on the NumPyro model, and the same two lines work for a model of your own.
#
# ## NUTS over the gate, experts fixed or free
#
# A posterior says how sure the gate is. Below, NumPyro's NUTS runs on the package's `moe_regression`
# twice, both times started at the EM fits (`init_to_params` as init strategy, and
# `chain_init_params` for a start per chain, jittered in unconstrained space): once with the experts
# fixed at the estimate (`handlers.condition` on the `experts` site), once with everything free.
# `to_datatree` converts each run to an ArviZ DataTree and relabels the draws to the fit's labels.
# (`run_nuts(x, y, fit, key=..., fix=("experts",))` does the same in one call, with a Laplace metric.)

# %%
model_kwargs = {"num_experts": 3}


def run_chains(model, start, key):
    """NUTS on ``model`` with 4 chains; started at ``start`` unless it is None (NumPyro's default)."""
    init_strategy = {} if start is None else {"init_strategy": moe.init_to_params(params=start)}
    mcmc = MCMC(
        NUTS(model, **init_strategy),
        num_warmup=num_warmup,
        num_samples=num_draws,
        num_chains=num_chains,
        progress_bar=False,
    )
    chain_key, run_key = jax.random.split(key)
    starts = None
    if start is not None:
        starts = moe.chain_init_params(
            model, start, num_chains=num_chains, key=chain_key, model_args=(x, y), model_kwargs=model_kwargs
        )
    begin = time.perf_counter()
    mcmc.run(run_key, x, y, init_params=starts, extra_fields=("diverging",), **model_kwargs)
    return mcmc, time.perf_counter() - begin


fixed_sites = {"experts": moe.params_to_sites(estimate)["experts"]}
mcmc_fixed, seconds_fixed = run_chains(
    handlers.condition(moe.moe_regression, fixed_sites), em_fixed, jax.random.key(6)
)
mcmc_free, seconds_free = run_chains(moe.moe_regression, em_free, jax.random.key(7))
tree_fixed = moe.to_datatree(mcmc_fixed, reference=em_fixed, log_likelihood=False)
tree_free = moe.to_datatree(mcmc_free, reference=em_free, log_likelihood=False)
truth_probabilities = np.asarray(truth.gate_probabilities(x_test))


def posterior_gate_probabilities(tree, reference):
    """Posterior mean of P(expert | x) at the held-out inputs, experts in the truth's order."""
    draws = moe.posterior_params(tree, link="linear")  # MoEParams stacked over draws: gates (S, k, d)
    logits = np.einsum("nd,skd->snk", np.asarray(x_test), np.asarray(draws.gates))
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1)).mean(axis=0)
    return probabilities[:, match_experts(reference, truth).permutation]


def posterior_gating_error(tree, reference):
    """The gating error (as `gating_error`) of the posterior mean of the gate probabilities."""
    difference = posterior_gate_probabilities(tree, reference) - truth_probabilities
    return float(0.5 * np.abs(difference).sum(axis=1).mean())


def chain_summary(label, tree, reference, seconds):
    summary = az.summary(tree, var_names=["gates", "noise"])
    divergences = int(np.asarray(tree["sample_stats"]["diverging"]).sum())
    noise = float(tree["posterior"]["noise"].mean())
    return (
        label,
        summary["r_hat"].astype(float).max(),
        summary["ess_bulk"].astype(float).min(),
        divergences,
        posterior_gating_error(tree, reference),
        noise,
        seconds,
    )


nuts_rows = [
    chain_summary("NUTS, experts fixed", tree_fixed, em_fixed, seconds_fixed),
    chain_summary("NUTS, experts free", tree_free, em_free, seconds_free),
]


def print_nuts_table():
    print(
        f"{num_chains} chains x ({num_warmup} warmup + {num_draws} draws) on {num_rows:,} rows; "
        "r_hat and bulk ESS over the gates and noise"
    )
    print(
        f"{'run':36s}{'max r_hat':>10s}{'min ESS':>9s}{'diverg.':>8s}{'gating err':>11s}{'noise sd':>9s}{'seconds':>9s}"
    )
    for label, rhat, ess, divergences, gating, noise, seconds in nuts_rows:
        print(f"{label:36s}{rhat:10.3f}{ess:9.0f}{divergences:8d}{gating:11.4f}{noise:9.4f}{seconds:9.1f}")


print_nuts_table()
print("true noise sd:", float(truth.noise[0]))

# %% [markdown]
# With the experts fixed the posterior has fewer dimensions and no experts to trade off against the
# gate; but the fixed experts' error stays in the model, and the noise sd grows to absorb it. Free
# experts recover the noise. The trace of every gate coefficient in the free run should look like
# stationary noise, every chain overlapping the others, around the true value (dashed; the truth is
# relabelled to the fit's expert order, as the draws are):

# %%
truth_as_fit = truth.permute(match_experts(truth, em_free).permutation)
gate_draws = np.asarray(tree_free["posterior"]["gates"].transpose("chain", "draw", "gate", "feature"))
figure, axes = plt.subplots(2, 5, figsize=(13, 4.5), sharex=True)
for (row, column), axis in np.ndenumerate(axes):
    for chain in range(num_chains):
        axis.plot(gate_draws[chain, :, row, column], lw=0.7, label=f"chain {chain + 1}")
    axis.axhline(float(truth_as_fit.gates[row, column]), color="k", ls="--", lw=1)
    axis.set_title(f"gates[{row + 1}, {column + 1}]", fontsize=10)
    if row == 1:
        axis.set_xlabel("draw")
axes[0, 0].legend(fontsize=7, loc="lower left")
figure.suptitle("NUTS started at the estimate, experts free: trace of each gate coefficient (dashed: truth)")
figure.tight_layout()
save_figure(figure, "trace_gates")

# %% [markdown]
# The gate probabilities themselves, for each expert at the held-out inputs: the true probability
# against the posterior mean (experts free) and the EM fit with the experts fixed. Points on the
# diagonal are a gate learnt exactly.

# %%
posterior_probabilities = posterior_gate_probabilities(tree_free, em_free)
em_probabilities = np.asarray(
    em_fixed.params.permute(match_experts(em_fixed, truth).permutation).gate_probabilities(x_test)
)
figure, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharey=True)
for i, axis in enumerate(axes):
    axis.plot(
        truth_probabilities[:500, i],
        em_probabilities[:500, i],
        ".",
        ms=3,
        alpha=0.5,
        label="EM, experts fixed",
    )
    axis.plot(
        truth_probabilities[:500, i],
        posterior_probabilities[:500, i],
        ".",
        ms=3,
        alpha=0.5,
        label="NUTS posterior mean, experts free",
    )
    axis.plot([0, 1], [0, 1], color="k", lw=0.8)
    axis.set(title=f"expert {i + 1}", xlabel="true P(expert | x)")
axes[0].set_ylabel("fitted P(expert | x)")
axes[0].legend(fontsize=8, markerscale=3)
figure.suptitle("Gate probabilities at 500 held-out inputs")
figure.tight_layout()
save_figure(figure, "gate_probabilities")

# %% [markdown]
# ## Chains from NumPyro's default start
#
# Without an init strategy, NumPyro starts every chain at a random point (uniform in (-2, 2) in
# unconstrained space). A mixture's likelihood is the same under any relabelling of its experts, so
# its posterior has k! = 6 copies of each mode, and chains started at random settle in different
# copies: each chain may be fine on its own, yet they disagree, and r_hat says so. Below, the same
# model and settings as the free run above, from NumPyro's default start, converted once as drawn
# (`to_datatree` without a reference) and once relabelled to the EM fit's labels.

# %%
mcmc_default, seconds_default = run_chains(moe.moe_regression, None, jax.random.key(10))
tree_default_raw = moe.to_datatree(mcmc_default, log_likelihood=False)
tree_default, _ = moe.relabel(tree_default_raw, em_free)
permutations = np.asarray(tree_default["sample_stats"]["expert_permutation"])
for chain in range(num_chains):
    labels, counts = np.unique(permutations[chain], axis=0, return_counts=True)
    print(
        f"default-start chain {chain}: its expert labels map to the EM fit's as {labels[np.argmax(counts)]} "
        f"in {counts.max() / counts.sum():.0%} of its draws"
    )
rhat = {
    label: float(az.rhat(tree, var_names=["experts"])["experts"].max())
    for label, tree in [
        ("default start, as drawn", tree_default_raw),
        ("default start, relabelled", tree_default),
        ("started at the estimate", tree_free),
    ]
}
for label, value in rhat.items():
    print(f"max r_hat of the experts, {label:26s} {value:.3f}")
nuts_rows.append(chain_summary("NUTS, experts free, default start", tree_default, em_free, seconds_default))
print()
print_nuts_table()

# %% [markdown]
# The trace of one coefficient, the first feature's weight in the first expert, in each chain: from
# the default start the chains that settled in a different labelling sit at another expert's value
# (the dashed lines are the three true experts' coefficients); from the estimate they all sit at one.
# When r_hat falls back near 1 once the draws are relabelled, label switching was the whole problem,
# as it is for well-separated experts; a relabelled r_hat that stays high means a chain found a
# different mode or had not converged, and relabelling cannot fix that. Starting at the estimate
# avoids both questions: every chain begins in the same labelling, near the mode.

# %%
figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for axis, mcmc, title in [
    (axes[0], mcmc_default, "NumPyro's default start (as drawn)"),
    (axes[1], mcmc_free, "started at the estimate (as drawn)"),
]:
    draws = np.asarray(mcmc.get_samples(group_by_chain=True)["experts"])[:, :, 0, 0]  # expert 1, feature 1
    for chain in range(num_chains):
        axis.plot(draws[chain], lw=0.8, label=f"chain {chain + 1}")
    for value in np.asarray(truth.experts)[:, 0]:
        axis.axhline(value, color="k", ls="--", lw=0.8)
    axis.set(title=title, xlabel="draw (after warmup)")
axes[0].set_ylabel("experts[1, 1] (first expert, first feature)")
axes[1].legend(fontsize=8, loc="center right")
figure.suptitle("Label switching: one coefficient's trace per chain; dashed, the true experts' values")
figure.tight_layout()
save_figure(figure, "label_switching")
