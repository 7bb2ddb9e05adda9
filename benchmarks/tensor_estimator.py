"""Benchmark of the tensor method of moments (Makkuva et al., ICML 2019): accuracy, bias, speed.

Prints, in one run:
1. Papers' setting (orthogonal gates, d=10, k=3, noise 0.1, linear link): median expert error over
   seeds at n = 20k, 63k, 200k, and the fitted slope of log(error) on log(n) (theory: -1/2).
2. Non-linear links: median error by n, and the smallest n tried with median error < 0.1.
3. Correlated gates (assumption w ⟂ a dropped): median error by n; a plateau is the bias.
4. Speed and memory at n=1e6, d=100, k=5: `estimate_experts` (the defaults; float64 products;
   the dense and randomised T2 eigensolvers) against one jitted `x.T @ x` on the same array (best
   of repeats), and the peak resident memory of a fresh process that loads the data and calls
   the estimator once, relative to the data's size, in float64 and float32.

Writes every printed figure to benchmarks/results/tensor_estimator.csv (tensor_estimator-quick.csv
with --quick; benchmarks/results_csv.py describes the columns; --speed-only replaces section 4's
rows, --skip-speed keeps them).

Usage: python benchmarks/tensor_estimator.py [--quick] [--seeds N] [--skip-speed | --speed-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np
from results_csv import ResultsCSV


def _setup():
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpyro_moe

    return jax, numpyro_moe


def accuracy(link, gating, sizes, seeds, *, dim=10, num_experts=3, noise=0.1, out=None, section=""):
    jax, nm = _setup()
    table = {}
    for n in sizes:
        errors = []
        for seed in range(seeds):
            x, y, truth = nm.simulation.simulate(
                key=jax.random.key(seed), num_samples=n, dim=dim, num_experts=num_experts, link=link,
                noise=noise, gating=gating,
            )
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", nm.ReliabilityWarning)
                estimate = nm.estimate_experts(x, y, num_experts=num_experts, link=link, key=jax.random.key(seed))
            errors.append(nm.metrics.expert_error(estimate, truth))
        table[n] = errors
        print(
            f"  {link:8s} {gating:10s} n={n:>9,d}  median error {np.median(errors):.4f}  "
            f"(quartiles {np.quantile(errors, 0.25):.4f}-{np.quantile(errors, 0.75):.4f}, {seeds} seeds)",
            flush=True,
        )
        if out is not None:
            setting = f"{link} link, {gating} gates, d={dim}, k={num_experts}, noise {noise:g}"
            for measure, value in (
                ("median_expert_error", np.median(errors)), ("q25_expert_error", np.quantile(errors, 0.25)),
                ("q75_expert_error", np.quantile(errors, 0.75)),
            ):
                out.record(section, setting, measure, float(value), n=n, seeds=seeds)
    return table


_SPEED_CHILD = r"""
import json, os, sys, time, warnings
import jax
mode, dtype, folder = sys.argv[1], sys.argv[2], sys.argv[3]
if dtype == "float64":
    jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import numpyro_moe as nm

warnings.simplefilter("ignore", nm.ReliabilityWarning)


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:  # the peak-RSS counter restarts from now
        handle.write("5")


n, d, k = 1_000_000, 100, 5
paths = os.path.join(folder, "x.npy"), os.path.join(folder, "y.npy")
record = {"dtype": dtype}
if mode == "write":  # simulate once, in blocks, straight into the files the other runs load
    truth = nm.simulation.true_params(key=jax.random.key(0), dim=d, num_experts=k)
    x = np.lib.format.open_memmap(paths[0], mode="w+", dtype=dtype, shape=(n, d))
    y = np.lib.format.open_memmap(paths[1], mode="w+", dtype=dtype, shape=(n,))
    block = 20_000
    for i, start in enumerate(range(0, n, block)):
        xc, yc = nm.simulation.sample_data(truth, key=jax.random.key(i + 1), num_samples=block)
        x[start:start + block], y[start:start + block] = np.asarray(xc), np.asarray(yc)
    x.flush(), y.flush()
elif mode == "memory":
    # A user's script: import, load the data, call the estimator (the first call compiles).
    record["runtime_rss"] = status("VmRSS")  # Python, NumPy, JAX and the package, before any data
    x, y = np.load(paths[0]), np.load(paths[1])
    record["data_bytes"] = x.nbytes + y.nbytes
    record["loaded_rss"] = status("VmRSS")
    config = dict(zip(("eigensolver", "precision"), sys.argv[4].split(":")))
    key = jax.random.key(0)  # the power method's restarts; made here so the call's share counts JAX's start
    reset_peak()
    nm.estimate_experts(x, y, num_experts=k, key=key, **config)
    record["peak_rss"] = status("VmHWM")
    record["after_rss"] = status("VmRSS")
    reset_peak()
    nm.estimate_experts(x, y, num_experts=k, key=key, **config)
    record["second_peak_rss"] = status("VmHWM")
else:
    truth = nm.simulation.true_params(key=jax.random.key(0), dim=d, num_experts=k)
    x, y = np.load(paths[0]), np.load(paths[1])
    key = jax.random.key(0)  # the power method's restarts
    gram = jax.jit(lambda a: a.T @ a)
    x_device = jnp.asarray(x)
    gram(x_device).block_until_ready()
    names = sys.argv[4].split(",")
    configs = [dict(zip(("eigensolver", "precision"), name.split(":"))) for name in names]
    for config in configs:
        nm.estimate_experts(x[:300_000], y[:300_000], num_experts=k, key=key, **config)  # compile
    # The gram alone 5 times, then 5 rounds that time the gram and every configuration in turn
    # (a slow spell of the machine hits all of them alike). Each one's best time is kept: the
    # gram's over all 10 runs, the conservative choice (right after an estimator run the gram
    # measured up to 10% slower).
    gram_times, times, estimates = [], {name: [] for name in names}, {}
    for index in range(10):
        start = time.perf_counter(); gram(x_device).block_until_ready(); gram_times.append(time.perf_counter() - start)
        if index < 5:
            continue
        for name, config in zip(names, configs):
            start = time.perf_counter()
            estimates[name] = nm.estimate_experts(x, y, num_experts=k, key=key, **config)
            times[name].append(time.perf_counter() - start)
    record["gram_seconds"], record["gram_median"] = min(gram_times), float(np.median(gram_times))
    for name in names:
        record[name] = {
            "seconds": min(times[name]), "median": float(np.median(times[name])),
            "expert_error": nm.metrics.expert_error(estimates[name], truth),
            "precision": estimates[name].diagnostics.precision,
        }
print(json.dumps(record))
"""


def _child(mode, dtype, folder, configs=()):
    result = subprocess.run(
        [sys.executable, "-c", _SPEED_CHILD, mode, dtype, folder, ",".join(configs)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed(dtype, out):
    """Time (one process: the gram and every configuration on the same array) and memory (a
    fresh process that loads the data and calls the estimator, as a user's script would). The
    data are simulated once and saved, so no run counts the simulation's memory."""
    # eigensolver:precision; "auto:auto" is estimate_experts's default.
    configs = ("auto:auto", "auto:float64", "randomized:auto")
    with tempfile.TemporaryDirectory() as folder:
        _child("write", dtype, folder)
        record = _child("time", dtype, folder, configs)
        memory = _child("memory", dtype, folder, ("auto:auto",))
    gram = record["gram_seconds"]
    print(
        f"  {dtype}{' (JAX without x64: every product float32)' if dtype == 'float32' else ''}: one "
        f"jitted x.T @ x on the same array: {gram:.3f} s (best of 10; median "
        f"{record['gram_median']:.3f} s)",
        flush=True,
    )
    for config in configs:
        entry = record[config]
        solver, precision = config.split(":")
        print(
            f"    estimate_experts(eigensolver={solver!r}, precision={precision!r}) -> products "
            f"{entry['precision']}: {entry['seconds']:.3f} s (best of 5), ratio {entry['seconds'] / gram:.2f}x "
            f"(target <= 3; medians {entry['median'] / record['gram_median']:.2f}x), expert error "
            f"{entry['expert_error']:.4f}",
            flush=True,
        )
    setting = f"n=1e6, d=100, k=5, {dtype}"
    out.record("4", setting, "gram_seconds", round(gram, 4), n=1_000_000)
    out.record("4", setting, "gram_median_seconds", round(record["gram_median"], 4), n=1_000_000)
    for config in configs:
        entry = record[config]
        named = f"{setting} | estimate_experts {config}"
        out.record("4", named, "seconds", round(entry["seconds"], 4), n=1_000_000)
        out.record("4", named, "ratio_to_gram", round(entry["seconds"] / gram, 3), n=1_000_000)
        out.record("4", named, "median_ratio_to_gram", round(entry["median"] / record["gram_median"], 3), n=1_000_000)
        out.record("4", named, "expert_error", float(entry["expert_error"]), n=1_000_000)
    data = memory["data_bytes"]
    print(
        f"    memory (fresh process: import, load the data, call with the defaults): data "
        f"{data / 1e6:.0f} MB; the process's peak RSS during the first call (it compiles) "
        f"{memory['peak_rss'] / data:.2f}x the data (target <= 1.5x), of which the runtime before "
        f"any data (Python, JAX, the package) is {memory['runtime_rss'] / 1e6:.0f} MB = "
        f"{memory['runtime_rss'] / data:.2f}x; the call added "
        f"{(memory['peak_rss'] - memory['loaded_rss']) / data:.2f}x the data, and a second call "
        f"{(memory['second_peak_rss'] - memory['after_rss']) / data:.2f}x",
        flush=True,
    )
    out.record("4", setting, "peak_rss_over_data", round(memory["peak_rss"] / data, 3), n=1_000_000)
    out.record("4", setting, "call_rss_over_data", round((memory["peak_rss"] - memory["loaded_rss"]) / data, 3),
               n=1_000_000)
    return record, memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer seeds and sizes (a smoke run)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only section 4")
    args = parser.parse_args()
    seeds = args.seeds or (3 if args.quick else 10)
    started = time.perf_counter()
    out = ResultsCSV("tensor_estimator", args.quick)

    if args.speed_only:
        print("4. Speed and memory: n=1e6, d=100, k=5, same array, fresh process")
        for dtype in ("float64", "float32"):
            speed(dtype, out)
        print(f"total benchmark time {time.perf_counter() - started:.0f} s; figures in {out.path}")
        return
    print("1. Papers' setting: orthogonal gates, d=10, k=3, noise 0.1, linear link")
    sizes = [20_000, 63_246, 200_000]
    table = accuracy("linear", "orthogonal", sizes, seeds, out=out, section="1")
    medians = np.array([np.median(table[n]) for n in sizes])
    slope = np.polyfit(np.log(sizes), np.log(medians), 1)[0]
    print(
        f"  median error at n=200k: {medians[-1]:.4f} (target <= 0.05); log-log slope {slope:.2f} "
        f"(1/sqrt(n) gives -0.50); error ratio 20k/200k {medians[0] / medians[-1]:.2f} (sqrt(10) = 3.16)"
    )
    setting = "linear link, orthogonal gates, d=10, k=3, noise 0.1"
    out.record("1", setting, "loglog_slope", round(float(slope), 4), n=sizes[-1], seeds=seeds)
    out.record("1", setting, "ratio_20k_over_200k", round(float(medians[0] / medians[-1]), 4), n=sizes[-1], seeds=seeds)

    print("2. Non-linear links (orthogonal gates, d=10, k=3, noise 0.1)")
    link_sizes = {
        "tanh": [20_000, 200_000],
        "relu": [20_000, 200_000],
        "sigmoid": [200_000, 1_000_000, 4_000_000],
    }
    if args.quick:
        link_sizes = {"tanh": [20_000], "relu": [20_000], "sigmoid": [200_000]}
    for link, link_ns in link_sizes.items():
        link_table = accuracy(link, "orthogonal", link_ns, max(seeds // 2, 3), out=out, section="2")
        enough = [n for n in link_ns if np.median(link_table[n]) < 0.1]
        print(f"  {link}: smallest n tried with median error < 0.1: {enough[0] if enough else 'none tried'}")

    print("3. Correlated gates (gate rows not orthogonal to the experts), linear link")
    corr_sizes = [20_000, 200_000] if args.quick else [20_000, 200_000, 1_000_000]
    corr = accuracy("linear", "correlated", corr_sizes, seeds, out=out, section="3")
    print(
        f"  median error {' -> '.join(f'{np.median(corr[n]):.3f}' for n in corr_sizes)} as n grows: "
        "the part that does not shrink with n is the bias (EM refinement removes it)"
    )

    if not args.skip_speed:
        print("4. Speed and memory: n=1e6, d=100, k=5, same array, fresh process")
        for dtype in ("float64", "float32"):
            speed(dtype, out)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s; figures in {out.path}")


if __name__ == "__main__":
    main()
