"""Benchmark: the tensor method on non-Gaussian input designs, Gaussian scores against the
design's own (`estimate_experts(design="mixture")`, score functions of a fitted density:
Janzamin, Sedghi and Anandkumar 2014), alone and as a start for EM.

Data: mixtures of experts with known truth (k = 3 linear experts, noise 0.1, gate scale 2, every
gate row orthogonal to every expert in the standardised coordinates, a_i^T Sigma w_j = 0) whose
inputs x come from non-Gaussian designs:

- ``bimodal``: independent columns +-0.8 + 0.6 N(0, 1) (d = 8);
- ``skewed``: independent standardised lognormal(0, 0.3) columns, skewness 0.95 (d = 8);
- ``heavy-tailed``: independent standardised Laplace columns, excess kurtosis 3 (d = 8);
- ``correlated``: the skewed columns mixed by the Cholesky factor of an equicorrelation-0.5
  matrix (d = 8), so only a rotation of the standardised x has independent coordinates;
- ``boston``, ``diabetes``: rows of the real data sets' inputs (benchmarks/data, standardised
  columns, d = 13 and 10) resampled with replacement plus N(0, 0.2^2) jitter per column (a smoothed
  bootstrap: the design must have a density for Stein's identity to hold).

For each design and n, per seed: expert error (`numpyro_moe.metrics.expert_error`; success: < 0.1)
of the Gaussian tensor estimate and of the design-aware one (and, for ``bimodal``, whose density
is in the fitted family, of the estimate with the true density's scores: what remains there is
the gate's cross terms and sampling error alone); and maximum-likelihood EM
(`fit_em(..., penalized=False)`) from each estimate (gate fitted first with the experts fixed,
then joint EM, as `fit_moe` builds its tensor start), from one random start, the best of five
random starts, and from the truth (the oracle). "optimum" counts the fits whose log-likelihood
is within 1e-4 per point of the oracle's (or above it).

Usage: python benchmarks/real_designs.py [--quick] [--seeds N] [--sizes 2000 20000 200000]
[--em-max-n 20000] [--no-random-starts] [--designs ...] [--tag NAME]; or --bias [--bias-seeds 3]
for the cross-term table alone; or --start-wins [--seeds 5] [--win-sets ...] for how often each
start reaches the best fit on the real data sets.
Writes benchmarks/results/real_designs.csv and .txt (``_quick`` with --quick;
real_designs_bias.txt with --bias, real_designs_wins.csv/.txt with --start-wins).
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DESIGNS = ("bimodal", "skewed", "heavy-tailed", "correlated", "boston", "diabetes")
REAL = {"boston": ("boston.csv", "medv"), "diabetes": ("diabetes.csv", "progression")}
JITTER = 0.2
NUM_EXPERTS = 3
OPTIMUM_TOLERANCE = 1e-4
EM_ITERATIONS = 300


def _setup():
    import jax

    jax.config.update("jax_enable_x64", True)
    warnings.simplefilter("ignore")  # benchmarks report errors; warnings are tested elsewhere
    return jax


def _real_inputs(name: str) -> np.ndarray:
    file, target = REAL[name]
    table = np.genfromtxt(HERE / "data" / file, delimiter=",", names=True)
    columns = [column for column in table.dtype.names if column != target]
    x = np.column_stack([table[column] for column in columns]).astype(float)
    return (x - x.mean(0)) / x.std(0)


def draw_design(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x (n, d) and the population's covariance (d, d); every design has mean 0."""
    d = 8
    if name == "bimodal":
        x = rng.choice([-0.8, 0.8], size=(n, d)) + 0.6 * rng.standard_normal((n, d))
        return x, np.eye(d)
    if name in ("skewed", "correlated"):
        x = np.exp(0.3 * rng.standard_normal((n, d)))
        x = (x - np.exp(0.045)) / np.sqrt((np.exp(0.09) - 1) * np.exp(0.09))
        if name == "skewed":
            return x, np.eye(d)
        correlation = 0.5 * np.ones((d, d)) + 0.5 * np.eye(d)
        factor = np.linalg.cholesky(correlation)
        return x @ factor.T, correlation
    if name == "heavy-tailed":
        return rng.laplace(size=(n, d)) / np.sqrt(2), np.eye(d)
    rows = _real_inputs(name)
    x = rows[rng.integers(0, len(rows), n)] + JITTER * rng.standard_normal((n, rows.shape[1]))
    return x, np.cov(rows, rowvar=False, bias=True) + JITTER**2 * np.eye(rows.shape[1])


def bimodal_density(d: int):
    """The ``bimodal`` design's true density as a `MixtureDesign` (it is in the fitted family)."""
    from numpyro_moe._design import MAX_COMPONENTS, MixtureDesign

    log_weights = np.full((d, MAX_COMPONENTS), -np.inf)
    log_weights[:, :2] = np.log(0.5)
    means = np.zeros((d, MAX_COMPONENTS))
    means[:, :2] = [-0.8, 0.8]
    scales = np.ones((d, MAX_COMPONENTS))
    scales[:, :2] = 0.6
    return MixtureDesign(np.zeros(d), np.eye(d), log_weights, means, scales, np.full(d, 2))


def make_data(jax, name: str, n: int, seed: int, gate_scale: float = 2.0):
    from numpyro_moe import MoEParams
    from numpyro_moe.simulation import sample_response, true_params

    rng = np.random.default_rng(seed)
    x, covariance = draw_design(name, n, rng)
    values, vectors = np.linalg.eigh(covariance)
    whitening = (vectors / np.sqrt(values)) @ vectors.T  # z = x W: a . z = (W a) . x
    standard = true_params(
        key=jax.random.key(seed), dim=x.shape[1], num_experts=NUM_EXPERTS, noise=0.1, gate_scale=gate_scale
    )
    truth = MoEParams(
        np.asarray(standard.experts) @ whitening, np.asarray(standard.gates) @ whitening,
        np.asarray(standard.noise), link="linear",
    )
    y = np.asarray(sample_response(truth, x, key=jax.random.key(10_000 + seed)))
    return x, y, truth


def run_case(jax, name: str, n: int, seed: int, with_em: bool = True, random_starts: bool = True) -> list[dict]:
    import numpyro_moe as moe
    from numpyro_moe.metrics import expert_error

    x, y, truth = make_data(jax, name, n, seed)
    key = jax.random.key(20_000 + seed)
    rows = []

    def record(method, experts, seconds, log_likelihood=float("nan")):
        rows.append({
            "design": name, "n": n, "seed": seed, "method": method,
            "expert_error": expert_error(experts, truth.experts), "log_likelihood": log_likelihood,
            "seconds": seconds,
        })

    em = {"penalized": False, "max_iterations": EM_ITERATIONS}
    designs = {"gaussian": "gaussian", "mixture": "mixture"}
    if name == "bimodal":
        designs["oracle design"] = bimodal_density(x.shape[1])
    for label, design in designs.items():
        start = time.perf_counter()
        estimate = moe.estimate_experts(x, y, num_experts=NUM_EXPERTS, key=key, design=design)
        record(f"tensor ({label})", estimate.experts, time.perf_counter() - start)
        if label == "oracle design" or not with_em:
            continue
        start = time.perf_counter()
        gated = moe.fit_em(x, y, estimate.to_params(), fix=("experts",), **em)
        fit = moe.fit_em(x, y, gated.params, **em)
        record(f"EM from tensor ({label})", fit.params.experts, time.perf_counter() - start, fit.log_likelihood)
    if not with_em:
        return rows
    for label, count in (("EM, 1 random start", 1), ("EM, best of 5 random", 5)) if random_starts else ():
        start = time.perf_counter()
        starts = moe.random_starts(x, y, num_experts=NUM_EXPERTS, num_starts=count, key=jax.random.fold_in(key, count))
        fit = moe.fit_em(x, y, starts, **em)
        record(label, fit.params.experts, time.perf_counter() - start, fit.log_likelihood)
    start = time.perf_counter()
    fit = moe.fit_em(x, y, truth, **em)
    record("EM from truth (oracle)", fit.params.experts, time.perf_counter() - start, fit.log_likelihood)
    return rows


def cross_term_bias(jax, seeds: int) -> str:
    """The bias that the true density's scores leave: the gate's cross terms. ``bimodal`` design
    (its density is in the fitted family), gate scales 1, 2, 4, n = 2.5e5 and 1e6: sampling
    error halves from one to the other, a bias does not."""
    import numpyro_moe as moe
    from numpyro_moe.metrics import expert_error

    lines = [f"{'gate scale':>10}{'n':>9}  {'gaussian':>9}{'mixture':>9}{'oracle design':>14}   (median over {seeds} seeds)"]
    for gate_scale in (1.0, 2.0, 4.0):
        for n in (250_000, 1_000_000):
            errors = {"gaussian": [], "mixture": [], "oracle": []}
            for seed in range(seeds):
                x, y, truth = make_data(jax, "bimodal", n, seed, gate_scale)
                for label, design in (("gaussian", "gaussian"), ("mixture", "mixture"), ("oracle", bimodal_density(8))):
                    estimate = moe.estimate_experts(
                        x, y, num_experts=NUM_EXPERTS, key=jax.random.key(20_000 + seed), design=design
                    )
                    errors[label].append(expert_error(estimate.experts, truth.experts))
            medians = {label: np.median(values) for label, values in errors.items()}
            lines.append(
                f"{gate_scale:>10.1f}{n:>9}  {medians['gaussian']:>9.4f}{medians['mixture']:>9.4f}{medians['oracle']:>14.4f}"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


WIN_SETS = {
    "motorcycle": ("motorcycle.csv", "accel"), "faithful": ("faithful.csv", "eruptions"),
    "diabetes": ("diabetes.csv", "progression"), "boston": ("boston.csv", "medv"),
    "mathachieve": ("mathachieve.csv", "mathach"),
}
WIN_RANDOM_STARTS = 10


def start_wins(jax, seeds: int, sets: list[str]) -> tuple[list[dict], str]:
    """How often each start wins on real data: `fit_moe` as the package fits (penalised EM,
    intercepts, an expert noise each, every start run to convergence), with the Gaussian tensor
    start, the mixture-design one and ``WIN_RANDOM_STARTS`` random starts (the same random starts
    for both designs: same key). A start "reaches the best" when its final objective (log
    posterior per point) is within ``OPTIMUM_TOLERANCE`` of the best of all starts of that data
    set, k and seed. Whole data sets, columns standardised."""
    import numpyro_moe as moe

    rows = []
    for name in sets:
        file, target = WIN_SETS[name]
        table = np.genfromtxt(HERE / "data" / file, delimiter=",", names=True)
        columns = [column for column in table.dtype.names if column != target]
        x = np.column_stack([table[column] for column in columns]).astype(float)
        x = (x - x.mean(0)) / x.std(0)
        y = (table[target] - table[target].mean()) / table[target].std()
        for k in (2, 3, 4):
            for seed in range(seeds):
                objectives = {}
                for design in ("gaussian", "mixture"):
                    if k > x.shape[1] and design == "mixture":
                        continue
                    fit = moe.fit_moe(
                        x, y, num_experts=k, key=jax.random.key(30_000 + seed), intercepts=True,
                        num_starts=WIN_RANDOM_STARTS + (k <= x.shape[1]), subsample_rows=None, design=design,
                    )
                    values = np.asarray(fit.start_objectives, dtype=float)
                    for index, label in enumerate(fit.start_labels):
                        key = f"tensor ({design})" if label == "tensor" else f"random {index}"
                        objectives[key] = float(values[index])
                best = max(objectives.values())
                reached = {key: value >= best - OPTIMUM_TOLERANCE for key, value in objectives.items()}
                randoms = [value for key, value in reached.items() if key.startswith("random")]
                rows.append({
                    "data": name, "n": len(y), "d": x.shape[1], "k": k, "seed": seed, "best": best,
                    "tensor_gaussian": objectives.get("tensor (gaussian)", float("nan")),
                    "tensor_mixture": objectives.get("tensor (mixture)", float("nan")),
                    "tensor_gaussian_best": None if k > x.shape[1] else bool(reached["tensor (gaussian)"]),
                    "tensor_mixture_best": None if k > x.shape[1] else bool(reached["tensor (mixture)"]),
                    "random_share_best": float(np.mean(randoms)),
                })
                print(rows[-1], flush=True)
    lines = [
        (
            f"start wins on real data: fit_moe (penalised EM, intercepts, every start to convergence), the tensor "
            f"start (Gaussian and mixture design) and {WIN_RANDOM_STARTS} random starts, seeds 0..{seeds - 1}; "
            f"'best' = final objective within {OPTIMUM_TOLERANCE} per point of the best start's"
        ),
        "",
        (
            f"{'data':<12}{'n':>6}{'d':>4}{'k':>3}  {'tensor (gaussian) best':>23}{'tensor (mixture) best':>22}"
            f"{'random starts best':>20}{'tensor gaps (gaussian, mixture)':>33}"
        ),
    ]
    for name in sets:
        for k in (2, 3, 4):
            case = [row for row in rows if row["data"] == name and row["k"] == k]

            def share(column, case=case):
                values = [row[column] for row in case if row[column] is not None]
                return f"{sum(values)}/{len(values)}" if values else "k > d"

            gap = "-"
            if case[0]["tensor_gaussian_best"] is not None:  # median shortfall per point below the best start
                gap = ", ".join(
                    f"{np.median([row['best'] - row[column] for row in case]):.1e}"
                    for column in ("tensor_gaussian", "tensor_mixture")
                )
            lines.append(
                f"{name:<12}{case[0]['n']:>6}{case[0]['d']:>4}{k:>3}  {share('tensor_gaussian_best'):>23}"
                f"{share('tensor_mixture_best'):>22}{np.mean([row['random_share_best'] for row in case]):>19.0%}"
                f"{gap:>33}"
            )
    return rows, "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    lines = []
    header = f"{'design':<13}{'n':>8}  {'method':<32}{'median err':>11}{'err<0.1':>9}{'optimum':>9}{'sec':>7}"
    keys = sorted({(row["design"], row["n"]) for row in rows}, key=lambda key: (DESIGNS.index(key[0]), key[1]))
    for design, n in keys:
        case = [row for row in rows if row["design"] == design and row["n"] == n]
        oracle = {row["seed"]: row["log_likelihood"] for row in case if row["method"] == "EM from truth (oracle)"}
        lines.append(header)
        for method in dict.fromkeys(row["method"] for row in case):
            chosen = [row for row in case if row["method"] == method]
            errors = np.array([row["expert_error"] for row in chosen])
            success = f"{(errors < 0.1).sum()}/{len(errors)}"
            if np.isnan(chosen[0]["log_likelihood"]):
                optimum = "-"
            else:
                reached = [row["log_likelihood"] >= oracle[row["seed"]] - OPTIMUM_TOLERANCE for row in chosen]
                optimum = f"{sum(reached)}/{len(reached)}"
            seconds = np.median([row["seconds"] for row in chosen])
            lines.append(
                f"{design:<13}{n:>8}  {method:<32}{np.median(errors):>11.4f}{success:>9}{optimum:>9}{seconds:>7.1f}"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in (2000, 20000), 2 seeds")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--tag", default="", help="appended to the output files' names")
    parser.add_argument("--em-max-n", type=int, default=20_000, help="run the EM fits only up to this n")
    parser.add_argument(
        "--no-random-starts", action="store_true",
        help="EM only from the moment estimates and the truth (the random-start rows skipped: the 200,000-row runs)",
    )
    parser.add_argument(
        "--start-wins", action="store_true",
        help="only the real-data table: how often the tensor start and random starts reach the best fit",
    )
    parser.add_argument("--win-sets", nargs="+", default=list(WIN_SETS), choices=list(WIN_SETS))
    parser.add_argument("--bias", action="store_true", help="only the cross-term bias table (bimodal, n up to 1e6)")
    parser.add_argument("--bias-seeds", type=int, default=3)
    args = parser.parse_args()
    if args.start_wins:
        jax = _setup()
        rows, text = start_wins(jax, args.seeds or 5, args.win_sets)
        print(text)
        with open(HERE / "results" / "real_designs_wins.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (HERE / "results" / "real_designs_wins.txt").write_text(text + "\n")
        return
    if args.bias:
        jax = _setup()
        text = "cross-term bias (bimodal design, k=3, d=8, linear, noise 0.1): expert error\n" + cross_term_bias(
            jax, args.bias_seeds
        )
        print(text)
        (HERE / "results" / "real_designs_bias.txt").write_text(text + "\n")
        return
    sizes = args.sizes or ((2000, 20_000) if args.quick else (2000, 20_000, 200_000))
    seeds = args.seeds or (2 if args.quick else 5)
    jax = _setup()
    suffix = ("_quick" if args.quick else "") + args.tag
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    rows = []
    begin = time.perf_counter()
    for n in sizes:
        for name in args.designs:
            for seed in range(seeds):
                rows += run_case(
                    jax, name, n, seed, with_em=n <= args.em_max_n, random_starts=not args.no_random_starts
                )
            print(f"done {name} n={n} ({time.perf_counter() - begin:.0f} s)", flush=True)
            with open(out / f"real_designs{suffix}.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    text = (
        f"real_designs: k={NUM_EXPERTS}, linear experts, noise 0.1, gate scale 2, seeds 0..{seeds - 1}, "
        f"sizes {sizes}; EM (n <= {args.em_max_n}) = fit_em(penalized=False, max_iterations={EM_ITERATIONS}); "
        f"optimum = log-likelihood within {OPTIMUM_TOLERANCE} per point of EM from the truth\n\n"
        + summarise(rows)
        + f"\ntotal {time.perf_counter() - begin:.0f} s\n"
    )
    print(text)
    (out / f"real_designs{suffix}.txt").write_text(text)


if __name__ == "__main__":
    main()
