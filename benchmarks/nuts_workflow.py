"""Benchmark of the Bayesian workflow: NUTS started at the estimate against NumPyro's default init.

Prints, in one run:
A. Papers' setting with d=5, k=3, n=2000, 4 chains x (500 warmup + 500 draws), per seed: max r_hat
   and min bulk ESS over all posterior entries, (1) started at the estimate (`fit_moe`: tensor
   method -> EM; `run_nuts`: per-chain jitter, Laplace metric and relabelling), (2) NumPyro's
   own ``MCMC(NUTS(moe_regression))`` with its default init (uniform in (-2, 2) unconstrained),
   converted by `to_datatree` without a reference, so raw (not relabelled). Target for (1):
   r_hat <= 1.01 and ESS >= 400 on >= 19/20 seeds.
B. Experts fixed at the estimate (NUTS over gate and noise) against experts free: min bulk ESS of
   the shared parameters (gates, noise) per second of sampling.
C. Choosing the number of experts: `az.compare` (PSIS-LOO) among k = 2, 3, 4 on data with k = 3;
   target: the true k ranks first on >= 8/10 seeds.
D. Mass matrices for NUTS from the estimate (part A's setting and seeds): NumPyro's adapted
   diagonal one, the Laplace one (`run_nuts(mass_matrix="laplace-fixed")`: the inverse Hessian at
   the posterior mode, desynchronised, fixed) and the default (`"laplace"`: that one, adapted in a
   second warmup when the first round's chains disagree): max r_hat (rank-normalised, and its
   bulk part alone), min bulk and folded ESS, bulk ESS per second.

Writes every printed figure to benchmarks/results/nuts_workflow.csv (nuts_workflow-quick.csv with
--quick; benchmarks/results_csv.py describes the columns; --part replaces that part's rows).

Usage: python benchmarks/nuts_workflow.py [--quick] [--part A|B|C|D] [--seeds N]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from results_csv import ResultsCSV

SETTING = "papers' setting, d=5, k=3, 4 chains"


def _setup():
    import numpyro

    numpyro.set_host_device_count(4)
    numpyro.enable_x64()
    import jax

    import numpyro_moe

    warnings.simplefilter("ignore")
    return jax, numpyro_moe


def _data(jax, moe, seed):
    """Every part's data: the papers' setting with d=5, k=3, n=2000."""
    return moe.simulation.simulate(key=jax.random.key(seed), num_samples=2000, dim=5, num_experts=3)


def _extreme(result, reduce=max) -> float:
    """Max (or min) over all variables of an ArviZ diagnostic's DataTree; NaN if any is NaN
    (e.g. the r_hat of chains that never moved)."""
    dataset = result.to_dataset() if hasattr(result, "to_dataset") else result
    values = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in dataset.data_vars.values()])
    return float("nan") if np.isnan(values).any() else float(reduce(values))


def _extremes(datatree, var_names=None):
    import arviz as az

    rhat = _extreme(az.rhat(datatree, var_names=var_names), max)
    ess = _extreme(az.ess(datatree, var_names=var_names), min)
    return rhat, ess


def _default_init_run(jax, moe, x, y, key, num_warmup, num_samples):
    """NumPyro's NUTS on the package's model from NumPyro's default init, draws left raw."""
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(moe.moe_regression), num_warmup=num_warmup, num_samples=num_samples, num_chains=4,
                chain_method="parallel", progress_bar=False)
    mcmc.run(key, x, y, num_experts=3, link="linear")
    # No reference: nothing is relabelled (the posterior is as NumPyro drew it).
    return moe.to_datatree(mcmc, log_likelihood=False)


def part_a(num_seeds, num_warmup, num_samples, out):
    jax, moe = _setup()
    rows = []
    for seed in range(num_seeds):
        x, y, truth = _data(jax, moe, seed)
        fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(seed), num_starts=1)
        start = time.perf_counter()
        ours = moe.run_nuts(x, y, fit, key=jax.random.key(100 + seed), num_warmup=num_warmup,
                            num_samples=num_samples)
        ours_seconds = time.perf_counter() - start
        default = _default_init_run(jax, moe, x, y, jax.random.key(100 + seed), num_warmup, num_samples)
        rows.append((*_extremes(ours.datatree), *_extremes(default), ours_seconds))
        print(
            f"  seed {seed:2d}: from estimate r_hat {rows[-1][0]:.4f} ESS {rows[-1][1]:7.0f} ({ours_seconds:.0f} s) | "
            f"default init r_hat {rows[-1][2]:.3f} ESS {rows[-1][3]:6.1f}",
            flush=True,
        )
    rows = np.array(rows)
    ok_ours = (rows[:, 0] <= 1.01) & (rows[:, 1] >= 400)
    ok_default = (rows[:, 2] <= 1.01) & (rows[:, 3] >= 400)
    print(
        f"  started at the estimate: r_hat <= 1.01 and ESS >= 400 on {ok_ours.sum()}/{num_seeds} seeds "
        f"(target >= 19/20); max r_hat median {np.median(rows[:, 0]):.4f}, min ESS median {np.median(rows[:, 1]):.0f}\n"
        f"  NumPyro default init: same criterion on {ok_default.sum()}/{num_seeds} seeds (failure rate "
        f"{1 - ok_default.mean():.0%}); max r_hat median {np.median(rows[:, 2]):.2f}, min ESS median {np.median(rows[:, 3]):.0f}"
    )
    draws = f"{num_warmup} warmup + {num_samples} draws"
    for name, ok, column in (("from the estimate", ok_ours, 0), ("NumPyro default init", ok_default, 2)):
        setting = f"{SETTING} x ({draws}) | {name}"
        out.record("A", setting, "successes_rhat_1.01_ess_400", int(ok.sum()), n=2000, seeds=num_seeds)
        out.record("A", setting, "median_max_rhat", float(np.median(rows[:, column])), n=2000, seeds=num_seeds)
        out.record("A", setting, "median_min_ess", float(np.median(rows[:, column + 1])), n=2000, seeds=num_seeds)
    out.record("A", f"{SETTING} x ({draws}) | from the estimate", "median_nuts_seconds", float(np.median(rows[:, 4])),
               n=2000, seeds=num_seeds)


def part_b(num_seeds, num_warmup, num_samples, out):
    jax, moe = _setup()
    for seed in range(num_seeds):
        x, y, truth = _data(jax, moe, seed)
        fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(seed), num_starts=1)
        results = {}
        for fixed in (False, True):
            fix = ("experts",) if fixed else ()
            # Run once to compile, then time a second run with another key.
            moe.run_nuts(x, y, fit, key=jax.random.key(1), fix=fix, num_warmup=20, num_samples=20)
            start = time.perf_counter()
            run = moe.run_nuts(x, y, fit, key=jax.random.key(2), fix=fix, num_warmup=num_warmup,
                               num_samples=num_samples)
            seconds = time.perf_counter() - start
            _, ess = _extremes(run.datatree, var_names=["gates", "noise"])
            results[fixed] = (ess, seconds, ess / seconds)
        free, fixed = results[False], results[True]
        print(
            f"  seed {seed}: experts free: min ESS(gates, noise) {free[0]:.0f} in {free[1]:.1f} s = {free[2]:.1f}/s | "
            f"experts fixed: {fixed[0]:.0f} in {fixed[1]:.1f} s = {fixed[2]:.1f}/s | ratio fixed/free {fixed[2] / free[2]:.2f}x",
            flush=True,
        )
        for name, (ess, seconds, rate) in (("experts free", free), ("experts fixed", fixed)):
            setting = f"{SETTING}, seed {seed} | {name}"
            out.record("B", setting, "min_ess_gates_noise", float(ess), n=2000, seeds=1)
            out.record("B", setting, "ess_per_second", float(rate), n=2000, seeds=1)
        out.record("B", f"{SETTING}, seed {seed} | fixed / free", "ess_per_second_ratio", float(fixed[2] / free[2]),
                   n=2000, seeds=1)


def part_c(num_seeds, num_warmup, num_samples, out):
    jax, moe = _setup()
    hits = 0
    for seed in range(num_seeds):
        x, y, truth = _data(jax, moe, seed)
        comparison = moe.compare_num_experts(
            x, y, candidates=(2, 3, 4), key=jax.random.key(200 + seed), num_warmup=num_warmup,
            num_samples=num_samples,
        )
        hits += comparison.num_experts == 3
        table = comparison.table
        elpd = ", ".join(f"{name} {table.loc[name, 'elpd']:.1f}" for name in ("k=2", "k=3", "k=4"))
        print(f"  seed {seed}: best k={comparison.num_experts} (elpd_loo: {elpd})", flush=True)
    print(f"  az.compare ranks the true k=3 first on {hits}/{num_seeds} seeds (target >= 8/10)")
    out.record("C", f"{SETTING}, k = 2, 3, 4 by PSIS-LOO", "true_k_first", int(hits), n=2000, seeds=num_seeds)


def part_d(num_seeds, num_warmup, num_samples, out):
    import arviz as az

    jax, moe = _setup()
    rows = {"diagonal": [], "laplace-fixed": [], "laplace": []}
    for seed in range(num_seeds):
        x, y, truth = _data(jax, moe, seed)
        fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(seed), num_starts=1)
        line = []
        for mass_matrix in rows:
            start = time.perf_counter()
            run = moe.run_nuts(x, y, fit, key=jax.random.key(100 + seed), num_warmup=num_warmup,
                               num_samples=num_samples, mass_matrix=mass_matrix)
            seconds = time.perf_counter() - start
            rhat, ess = _extremes(run.datatree)
            bulk_rhat = _extreme(az.rhat(run.datatree, method="z_scale"), max)
            folded = _extreme(az.ess(run.datatree, method="folded"), min)
            rows[mass_matrix].append((rhat, bulk_rhat, ess, ess / seconds, folded))
            line.append(
                f"{mass_matrix}: r_hat {rhat:.4f} (bulk {bulk_rhat:.4f}) ESS {ess:5.0f}, folded {folded:4.0f} "
                f"({ess / seconds:4.0f}/s)"
            )
        print(f"  seed {seed:2d}: " + " | ".join(line), flush=True)
    for mass_matrix, values in rows.items():
        values = np.array(values)
        ok = (values[:, 0] <= 1.01) & (values[:, 2] >= 400)
        print(
            f"  {mass_matrix:8s}: r_hat <= 1.01 and ESS >= 400 on {ok.sum()}/{num_seeds}; bulk r_hat <= 1.01 on "
            f"{(values[:, 1] <= 1.01).sum()}/{num_seeds}; median min ESS {np.median(values[:, 2]):.0f}, "
            f"median ESS/s {np.median(values[:, 3]):.0f}; median min folded ESS {np.median(values[:, 4]):.0f}"
        )
        setting = f"{SETTING}, NUTS from the estimate | mass matrix {mass_matrix}"
        for measure, value in (
            ("successes_rhat_1.01_ess_400", int(ok.sum())), ("bulk_rhat_within_1.01", int((values[:, 1] <= 1.01).sum())),
            ("median_min_ess", float(np.median(values[:, 2]))), ("median_ess_per_second", float(np.median(values[:, 3]))),
            ("median_min_folded_ess", float(np.median(values[:, 4]))),
        ):
            out.record("D", setting, measure, value, n=2000, seeds=num_seeds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["A", "B", "C", "D"], default=None)
    parser.add_argument("--seeds", type=int, default=None, help="seeds of every part run (defaults 20, 3, 10, 20)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = ResultsCSV("nuts_workflow", args.quick)
    draws = (100, 100) if args.quick else (500, 500)
    if args.part in (None, "A"):
        print("A. NUTS from the estimate vs NumPyro's default init (d=5, k=3, n=2000, 4 chains)")
        part_a(args.seeds or (2 if args.quick else 20), *draws, out)
    if args.part in (None, "B"):
        print("B. ESS per second, experts fixed vs free")
        part_b(args.seeds or (1 if args.quick else 3), *draws, out)
    if args.part in (None, "C"):
        print("C. LOO choice of k among 2, 3, 4 (true k = 3)")
        part_c(args.seeds or (1 if args.quick else 10), *((100, 100) if args.quick else (300, 300)), out)
    if args.part in (None, "D"):
        print("D. Mass matrix of NUTS from the estimate: adapted diagonal, fixed Laplace, Laplace (the default)")
        part_d(args.seeds or (2 if args.quick else 20), *draws, out)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s; figures in {out.path}")


if __name__ == "__main__":
    main()
