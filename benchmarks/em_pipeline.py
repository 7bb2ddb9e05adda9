"""Benchmark of the fitting pipeline (ICML 2019 tensor method -> EM) against the oracle and baselines.

Prints, in one run:
A. Papers' setting (orthogonal gates, d=10, k=3, noise 0.1, linear, n=20k), per seed: expert and
   gating error of tensor -> gating EM -> joint EM, divided by the oracle's (joint EM started at
   the truth). Target: expert ratio <= 1.1 on >= 48/50 seeds, gating ratio <= 1.2.
B. Harder regimes: success rates (expert error < 0.1) of every method on the same seeds:
   tensor -> EM (one start), `fit_moe` (num_starts=5: the tensor start + 4 random starts), joint
   EM from 1 random start, best of 5 random-start EM (`fit_em` on `random_starts`, the same number
   of starts as `fit_moe`), gradient descent on the squared loss and on the likelihood
   (`numpyro_moe.baselines`, from 1 random start each), and the oracle.
C. Speed at n=200k, d=10, k=3: tensor + EM against R's flexmix
   (`flexmix(y ~ x, k = 3, concomitant = FLXPmultinom(~ x))`) on the same data in the same run,
   with the expert and gating error of each. Skipped, with a note, when R/flexmix is missing.
D. The rare-expert regime (k=8, n=4000, d=10, gate scale 8: one expert holds about 1% of the
   data): the methods of B on the same footing, to say whether the moment start helps where one
   expert has few points; and `fit_moe` with two rounds of split-and-merge moves (Ueda et al.
   2000) after EM.
E. The moment start against random starts as n grows, in the two regimes where one start fails
   often (relu experts, k=5; the rare expert, k=8 at gate scale 8): expert error of the tensor
   estimate alone, success of tensor -> EM, of EM from 1 random start and of the oracle, at n from
   the regime's own size to 10x-50x more, same seeds at every n.

Writes every printed figure to benchmarks/results/em_pipeline.csv (em_pipeline-quick.csv with
--quick; benchmarks/results_csv.py describes the columns; --only replaces that part's rows).

Usage: python benchmarks/em_pipeline.py [--quick] [--seeds N] [--papers-seeds N] [--skip-flexmix]
       [--only A|B|C|D|E]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from results_csv import ResultsCSV


def _setup():
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpyro_moe

    warnings.simplefilter("ignore")  # benchmarks report errors; warnings are tested elsewhere
    return jax, numpyro_moe


def _tensor_then_em(moe, x, y, estimate):
    """The pipeline with one start: EM over the gate with the experts fixed at the moment
    estimate (the ICML 2019 paper's gating stage), then joint EM from there."""
    gated = moe.fit_em(x, y, estimate, fix=("experts",))
    return moe.fit_em(x, y, gated).params


def papers_setting(num_seeds, out):
    jax, moe = _setup()
    from numpyro_moe.metrics import expert_error, gating_error
    from numpyro_moe.simulation import sample_data, simulate
    expert_ratios, gate_ratios = [], []
    start = time.perf_counter()
    for seed in range(num_seeds):
        x, y, truth = simulate(key=jax.random.key(seed), num_samples=20_000, dim=10, num_experts=3)
        x_test, _ = sample_data(truth, key=jax.random.key(10_000 + seed), num_samples=20_000)
        estimate = moe.estimate_experts(x, y, num_experts=3, key=jax.random.key(seed))
        fitted = _tensor_then_em(moe, x, y, estimate)
        oracle = moe.fit_em(x, y, truth).params
        expert_ratios.append(expert_error(fitted, truth) / expert_error(oracle, truth))
        gate_ratios.append(gating_error(fitted, truth, x_test) / gating_error(oracle, truth, x_test))
    expert_ratios, gate_ratios = np.array(expert_ratios), np.array(gate_ratios)
    print(
        f"  expert error / oracle: within 1.1x on {(expert_ratios <= 1.1).sum()}/{num_seeds} seeds "
        f"(target >= 48/50), median {np.median(expert_ratios):.4f}, max {expert_ratios.max():.4f}\n"
        f"  gating error / oracle: within 1.2x on {(gate_ratios <= 1.2).sum()}/{num_seeds} seeds, "
        f"median {np.median(gate_ratios):.4f}, max {gate_ratios.max():.4f}  "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    setting = "papers' setting, d=10, k=3, noise 0.1, tensor -> gating EM -> joint EM / oracle"
    for name, ratios, bound in (("expert", expert_ratios, 1.1), ("gating", gate_ratios, 1.2)):
        out.record("A", setting, f"{name}_ratio_within_{bound}", int((ratios <= bound).sum()), n=20_000, seeds=num_seeds)
        out.record("A", setting, f"{name}_ratio_median", float(np.median(ratios)), n=20_000, seeds=num_seeds)
        out.record("A", setting, f"{name}_ratio_max", float(ratios.max()), n=20_000, seeds=num_seeds)
    out.record("A", setting, "seconds", round(time.perf_counter() - start, 1), n=20_000, seeds=num_seeds)


REGIMES = {
    "k=8, n=4000, gate scale 3": dict(num_experts=8, num_samples=4000, gate_scale=3.0),
    "relu, k=5, n=2000": dict(num_experts=5, num_samples=2000, link="relu"),
    "k=5, n=1500 (few samples per parameter)": dict(num_experts=5, num_samples=1500),
    "correlated gates, k=4, n=10000": dict(num_experts=4, num_samples=10_000, gating="correlated"),
}

RARE_EXPERT = {
    "k=8, n=4000, gate scale 8 (one expert ~1% of the data)": dict(num_experts=8, num_samples=4000, gate_scale=8.0),
}


def hard_regimes(num_seeds, gd_steps, out, regimes=REGIMES, section="B", split_merge=False):
    jax, moe = _setup()
    from numpyro_moe.metrics import expert_error
    from numpyro_moe.simulation import simulate
    for name, setting in regimes.items():
        setting = dict(setting)
        link = setting.pop("link", "linear")
        k = setting["num_experts"]
        methods = {}

        def record(method, params, truth):
            methods.setdefault(method, []).append(expert_error(params, truth))

        def starts(x, y, key, count):
            return moe.random_starts(x, y, num_experts=k, num_starts=count, key=key, link=link)

        start = time.perf_counter()
        for seed in range(num_seeds):
            x, y, truth = simulate(key=jax.random.key(seed), dim=10, link=link, **setting)
            key = jax.random.key(1000 + seed)
            estimate = moe.estimate_experts(x, y, num_experts=k, link=link, key=key)
            record("tensor -> EM (1 start)", _tensor_then_em(moe, x, y, estimate), truth)
            record("fit_moe: tensor + 4 random starts",
                   moe.fit_moe(x, y, num_experts=k, key=key, link=link, num_starts=5).params, truth)
            if split_merge:
                record("fit_moe + split-merge (2 rounds)",
                       moe.fit_moe(x, y, num_experts=k, key=key, link=link, num_starts=5, split_merge=2).params, truth)
            record("EM, 1 random start", moe.fit_em(x, y, starts(x, y, key, 1)).params, truth)
            record("EM, best of 5 random starts", moe.fit_em(x, y, starts(x, y, key, 5)).params, truth)
            squared = moe.baselines.fit_squared_loss_gd(x, y, starts(x, y, key, 1), num_steps=gd_steps)
            record("GD squared loss, 1 random start", squared.params, truth)
            likelihood = moe.baselines.fit_likelihood_gd(x, y, starts(x, y, key, 1), num_steps=gd_steps)
            record("GD likelihood, 1 random start", likelihood.params, truth)
            record("oracle (EM from truth)", moe.fit_em(x, y, truth).params, truth)
        print(f"  regime: {name} (d=10), {num_seeds} seeds, {time.perf_counter() - start:.0f} s", flush=True)
        for method, errors in methods.items():
            errors = np.array(errors)
            print(f"    {method:36s} success {np.mean(errors < 0.1):5.0%}  median error {np.median(errors):.3f}")
            n = setting["num_samples"]
            out.record(section, f"{name} | {method}", "successes", int((errors < 0.1).sum()), n=n, seeds=num_seeds)
            out.record(section, f"{name} | {method}", "median_expert_error", float(np.median(errors)), n=n,
                       seeds=num_seeds)


GROWING = {
    "relu, k=5": ({"num_experts": 5, "link": "relu"}, (2_000, 20_000, 100_000)),
    "k=8, gate scale 8 (one expert ~1% of the data)": ({"num_experts": 8, "gate_scale": 8.0}, (4_000, 40_000)),
}


def moment_start_against_n(num_seeds, out, regimes=GROWING):
    """Part E: does the moment start overtake random starts as n grows, where one start fails?"""
    jax, moe = _setup()
    from numpyro_moe.metrics import expert_error
    from numpyro_moe.simulation import simulate
    for name, (setting, sizes) in regimes.items():
        setting = dict(setting)
        link = setting.pop("link", "linear")
        k = setting["num_experts"]
        for n in sizes:
            errors = {}
            start = time.perf_counter()
            for seed in range(num_seeds):
                x, y, truth = simulate(key=jax.random.key(seed), dim=10, link=link, num_samples=n, **setting)
                key = jax.random.key(1000 + seed)
                estimate = moe.estimate_experts(x, y, num_experts=k, link=link, key=key)
                fits = {
                    "tensor estimate alone": estimate.experts,
                    "tensor -> EM (1 start)": _tensor_then_em(moe, x, y, estimate),
                    "EM, 1 random start": moe.fit_em(
                        x, y, moe.random_starts(x, y, num_experts=k, num_starts=1, key=key, link=link)
                    ).params,
                    "oracle (EM from truth)": moe.fit_em(x, y, truth).params,
                }
                for method, fitted in fits.items():
                    errors.setdefault(method, []).append(expert_error(fitted, truth))
            print(f"  {name}, n={n} (d=10), {num_seeds} seeds, {time.perf_counter() - start:.0f} s", flush=True)
            for method, values in errors.items():
                values = np.array(values)
                print(f"    {method:28s} success {np.mean(values < 0.1):5.0%}  median error {np.median(values):.3f}")
                setting_name = f"{name}, n={n} | {method}"
                out.record("E", setting_name, "successes", int((values < 0.1).sum()), n=n, seeds=num_seeds)
                out.record("E", setting_name, "median_expert_error", float(np.median(values)), n=n, seeds=num_seeds)


_FLEXMIX = r"""
suppressMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(args[1])
y <- data$y
x <- as.matrix(data[, -1])
set.seed(1)
elapsed <- system.time(fit <- flexmix(y ~ x, k = as.integer(args[2]), concomitant = FLXPmultinom(~ x)))[["elapsed"]]
experts <- parameters(fit)
gates <- parameters(fit, which = "concomitant")
write.csv(experts, args[3], row.names = TRUE)
write.csv(gates, args[4], row.names = TRUE)
cat(elapsed, "\n")
"""


def flexmix_comparison(num_samples, out):
    jax, moe = _setup()
    from numpyro_moe.metrics import expert_error, gating_error
    from numpyro_moe.simulation import sample_data, simulate
    k, d = 3, 10
    x, y, truth = simulate(key=jax.random.key(0), num_samples=num_samples, dim=d, num_experts=k)
    x_test, _ = sample_data(truth, key=jax.random.key(1), num_samples=20_000)

    def ours():
        estimate = moe.estimate_experts(x, y, num_experts=k, key=jax.random.key(0))
        return jax.block_until_ready(_tensor_then_em(moe, x, y, estimate))

    start = time.perf_counter()
    ours()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    params = ours()
    warm = time.perf_counter() - start
    print(
        f"  numpyro-moe tensor + EM: {warm:.2f} s warm ({cold:.2f} s with compilation), expert error "
        f"{expert_error(params, truth):.4f}, gating error {gating_error(params, truth, x_test):.4f}",
        flush=True,
    )
    ours_setting = "papers' setting, d=10, k=3 | numpyro-moe tensor + EM"
    out.record("C", ours_setting, "warm_seconds", round(warm, 3), n=num_samples)
    out.record("C", ours_setting, "cold_seconds", round(cold, 3), n=num_samples)
    out.record("C", ours_setting, "expert_error", float(expert_error(params, truth)), n=num_samples)
    out.record("C", ours_setting, "gating_error", float(gating_error(params, truth, x_test)), n=num_samples)
    if shutil.which("Rscript") is None:
        print("  flexmix: R is not installed here (Debian: r-base-core, r-cran-flexmix); comparison skipped")
        return
    check = subprocess.run(["Rscript", "-e", "library(flexmix)"], capture_output=True)
    if check.returncode != 0:
        print("  flexmix: the R package flexmix is missing (Debian: r-cran-flexmix); comparison skipped")
        return
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = np.column_stack([np.asarray(y), np.asarray(x)])
        header = "y," + ",".join(f"x{j}" for j in range(d))
        np.savetxt(folder / "data.csv", data, delimiter=",", header=header, comments="")
        (folder / "fit.R").write_text(_FLEXMIX)
        start = time.perf_counter()
        result = subprocess.run(
            ["Rscript", str(folder / "fit.R"), str(folder / "data.csv"), str(k), str(folder / "experts.csv"),
             str(folder / "gates.csv")],
            capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            print(f"  flexmix failed: {result.stderr.strip()[-500:]}")
            return
        fit_seconds = float(result.stdout.split()[-1])
        experts_table = np.genfromtxt(folder / "experts.csv", delimiter=",", skip_header=1)[:, 1:]
        gates_table = np.genfromtxt(folder / "gates.csv", delimiter=",", skip_header=1)[:, 1:]
    # Rows of experts_table: intercept, x0..x9 slopes, sigma; columns: components.
    flex_experts = experts_table[1 : d + 1].T
    flex_noise = experts_table[d + 1]  # one sigma per component, as MoEParams holds it
    gate_matrix = gates_table[1 : d + 1].T  # (k, d), first component's row is 0
    flex = moe.MoEParams(flex_experts, gate_matrix - gate_matrix[-1], flex_noise)
    print(
        f"  flexmix: {fit_seconds:.1f} s fit ({wall:.1f} s with R start-up and CSV), expert error "
        f"{expert_error(flex, truth):.4f}, gating error {gating_error(flex, truth, x_test):.4f} "
        "(flexmix also fits intercepts, which the truth has at zero)"
    )
    print(f"  speed-up of numpyro-moe over flexmix: {fit_seconds / warm:.0f}x warm, {fit_seconds / cold:.0f}x cold (target >= 50x)")
    flex_setting = "papers' setting, d=10, k=3 | flexmix"
    out.record("C", flex_setting, "fit_seconds", round(fit_seconds, 3), n=num_samples)
    out.record("C", flex_setting, "wall_seconds", round(wall, 3), n=num_samples)
    out.record("C", flex_setting, "expert_error", float(expert_error(flex, truth)), n=num_samples)
    out.record("C", flex_setting, "gating_error", float(gating_error(flex, truth, x_test)), n=num_samples)
    out.record("C", "papers' setting, d=10, k=3 | flexmix / numpyro-moe", "speedup_warm", round(fit_seconds / warm, 2),
               n=num_samples)
    out.record("C", "papers' setting, d=10, k=3 | flexmix / numpyro-moe", "speedup_cold", round(fit_seconds / cold, 2),
               n=num_samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per hard regime (default 10)")
    parser.add_argument("--papers-seeds", type=int, default=None, help="seeds of part A (default 50)")
    parser.add_argument("--skip-flexmix", action="store_true")
    parser.add_argument("--only", choices=["A", "B", "C", "D", "E"], default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    out = ResultsCSV("em_pipeline", args.quick)
    if args.only in (None, "A"):
        print("A. Papers' setting: d=10, k=3, noise 0.1, n=20k, pipeline vs oracle")
        papers_setting(args.papers_seeds or (5 if args.quick else 50), out)
    if args.only in (None, "B"):
        print("B. Harder regimes: success = expert error < 0.1, same seeds for every method")
        hard_regimes(args.seeds or (2 if args.quick else 10), gd_steps=500 if args.quick else 3000, out=out)
    if args.only in (None, "C") and not args.skip_flexmix:
        print("C. Speed against R's flexmix, same data, same run")
        flexmix_comparison(20_000 if args.quick else 200_000, out)
    if args.only in (None, "D"):
        print("D. The rare-expert regime: success = expert error < 0.1, same seeds for every method")
        hard_regimes(args.seeds or (2 if args.quick else 10), gd_steps=500 if args.quick else 3000, out=out,
                     regimes=RARE_EXPERT, section="D", split_merge=True)
    if args.only in (None, "E"):
        print("E. The moment start against random starts as n grows: success = expert error < 0.1")
        regimes = GROWING
        if args.quick:  # the regimes' own sizes and one 10x larger
            regimes = {name: (setting, sizes[:2]) for name, (setting, sizes) in GROWING.items()}
        moment_start_against_n(args.seeds or (2 if args.quick else 10), out, regimes)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s; figures in {out.path}")


if __name__ == "__main__":
    main()
