"""Benchmark of the tensor method of moments (Makkuva et al., ICML 2019): accuracy, bias, speed.

Prints, in one run:
1. Papers' setting (orthogonal gates, d=10, k=3, noise 0.1, linear link): median expert error over
   seeds at n = 20k, 63k, 200k, and the fitted slope of log(error) on log(n) (theory: -1/2).
2. Non-linear links: median error by n, and the smallest n tried with median error < 0.1.
3. Correlated gates (assumption w ⟂ a dropped): median error by n; a plateau is the bias.
4. Speed and memory at n=1e6, d=100, k=5: `estimate_experts` (the defaults; float64 products;
   the dense and randomised T2 eigensolvers) against one jitted `x.T @ x` on the same array (best
   of repeats), and the process's peak resident memory during one call relative to the data's
   size, measured in a fresh process, in float64 and float32.

Usage: python benchmarks/tensor_estimator.py [--quick] [--seeds N] [--skip-speed | --speed-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def _setup():
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpyro_moe

    return jax, numpyro_moe


def accuracy(link, gating, sizes, seeds, *, dim=10, num_experts=3, noise=0.1):
    jax, nm = _setup()
    table = {}
    for n in sizes:
        errors = []
        for seed in range(seeds):
            x, y, truth = nm.simulate(
                jax.random.key(seed), num_samples=n, dim=dim, num_experts=num_experts, link=link,
                noise=noise, gating=gating,
            )
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", nm.ReliabilityWarning)
                estimate = nm.estimate_experts(x, y, num_experts=num_experts, link=link, key=jax.random.key(seed))
            errors.append(nm.expert_error(estimate, truth))
        table[n] = errors
        print(
            f"  {link:8s} {gating:10s} n={n:>9,d}  median error {np.median(errors):.4f}  "
            f"(quartiles {np.quantile(errors, 0.25):.4f}-{np.quantile(errors, 0.75):.4f}, {seeds} seeds)",
            flush=True,
        )
    return table


_SPEED_CHILD = r"""
import json, sys, time, warnings
import jax
mode, dtype = sys.argv[1], sys.argv[2]
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


n, d, k = 1_000_000, 100, 5
truth = nm.true_params(jax.random.key(0), dim=d, num_experts=k)
runtime = status("VmRSS")  # Python, NumPy and the JAX runtime, before any data
x = np.empty((n, d), dtype=dtype)
y = np.empty(n, dtype=dtype)
block = 20_000  # small simulation blocks: their freed buffers do not count against the call
for i, start in enumerate(range(0, n, block)):
    xc, yc = nm.sample_data(jax.random.key(i + 1), truth, num_samples=block)
    x[start:start + block], y[start:start + block] = np.asarray(xc), np.asarray(yc)
    del xc, yc
data_bytes = x.nbytes + y.nbytes
record = {"dtype": dtype, "data_bytes": data_bytes, "runtime_rss": runtime}
configs = [dict(zip(("eigensolver", "precision"), c.split(":"))) for c in sys.argv[3].split(",")]

if mode == "memory":
    # Compile on a slice of the same shape per chunk, then measure the peak of one call.
    nm.estimate_experts(x[:300_000], y[:300_000], num_experts=k, **configs[0])
    record["rss_before"] = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak-RSS counter
        handle.write("5")
    nm.estimate_experts(x, y, num_experts=k, **configs[0])
    record["peak_rss"] = status("VmHWM")
else:
    gram = jax.jit(lambda a: a.T @ a)
    x_device = jnp.asarray(x)
    gram(x_device).block_until_ready()
    gram_times = []
    for _ in range(5):
        start = time.perf_counter(); gram(x_device).block_until_ready(); gram_times.append(time.perf_counter() - start)
    del x_device
    record["gram_seconds"] = min(gram_times)
    for name, config in zip(sys.argv[3].split(","), configs):
        nm.estimate_experts(x[:300_000], y[:300_000], num_experts=k, **config)  # compile
        times = []
        for _ in range(3):
            start = time.perf_counter()
            estimate = nm.estimate_experts(x, y, num_experts=k, **config)
            times.append(time.perf_counter() - start)
        record[name] = {
            "seconds": min(times), "expert_error": nm.expert_error(estimate, truth),
            "precision": estimate.diagnostics.precision,
        }
print(json.dumps(record))
"""


def _child(mode, dtype, solvers):
    result = subprocess.run(
        [sys.executable, "-c", _SPEED_CHILD, mode, dtype, ",".join(solvers)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed(dtype):
    """Time (one process: the gram and every eigensolver on the same array) and memory (a fresh
    process per measurement, so nothing else the benchmark allocated is counted)."""
    # eigensolver:precision; "auto:auto" is estimate_experts's default.
    configs = ("auto:auto", "auto:float64", "randomized:auto")
    record = _child("time", dtype, configs)
    gram = record["gram_seconds"]
    print(f"  {dtype}: one jitted x.T @ x on the same array: {gram:.3f} s", flush=True)
    for config in configs:
        entry = record[config]
        solver, precision = config.split(":")
        print(
            f"    estimate_experts(eigensolver={solver!r}, precision={precision!r}) -> products "
            f"{entry['precision']}: {entry['seconds']:.3f} s, ratio {entry['seconds'] / gram:.2f}x "
            f"(target <= 3), expert error {entry['expert_error']:.4f}",
            flush=True,
        )
    memory = _child("memory", dtype, ("auto:auto",))
    data = memory["data_bytes"]
    print(
        f"    memory (fresh process, the defaults): data {data / 1e6:.0f} MB; the process's peak "
        f"RSS during the call {memory['peak_rss'] / data:.2f}x the data (target <= 1.5x), of which the "
        f"Python/JAX runtime before any data is {memory['runtime_rss'] / 1e6:.0f} MB and the call "
        f"added {(memory['peak_rss'] - memory['rss_before']) / data:.2f}x the data",
        flush=True,
    )
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

    if args.speed_only:
        print("4. Speed and memory: n=1e6, d=100, k=5, same array, fresh process")
        for dtype in ("float64", "float32"):
            speed(dtype)
        print(f"total benchmark time {time.perf_counter() - started:.0f} s")
        return
    print("1. Papers' setting: orthogonal gates, d=10, k=3, noise 0.1, linear link")
    sizes = [20_000, 63_246, 200_000]
    table = accuracy("linear", "orthogonal", sizes, seeds)
    medians = np.array([np.median(table[n]) for n in sizes])
    slope = np.polyfit(np.log(sizes), np.log(medians), 1)[0]
    print(
        f"  median error at n=200k: {medians[-1]:.4f} (target <= 0.05); log-log slope {slope:.2f} "
        f"(1/sqrt(n) gives -0.50); error ratio 20k/200k {medians[0] / medians[-1]:.2f} (sqrt(10) = 3.16)"
    )

    print("2. Non-linear links (orthogonal gates, d=10, k=3, noise 0.1)")
    link_sizes = {
        "tanh": [20_000, 200_000],
        "relu": [20_000, 200_000],
        "sigmoid": [200_000, 1_000_000, 4_000_000],
    }
    if args.quick:
        link_sizes = {"tanh": [20_000], "relu": [20_000], "sigmoid": [200_000]}
    for link, link_ns in link_sizes.items():
        link_table = accuracy(link, "orthogonal", link_ns, max(seeds // 2, 3))
        enough = [n for n in link_ns if np.median(link_table[n]) < 0.1]
        print(f"  {link}: smallest n tried with median error < 0.1: {enough[0] if enough else 'none tried'}")

    print("3. Correlated gates (gate rows not orthogonal to the experts), linear link")
    corr_sizes = [20_000, 200_000] if args.quick else [20_000, 200_000, 1_000_000]
    corr = accuracy("linear", "correlated", corr_sizes, seeds)
    print(
        f"  median error {' -> '.join(f'{np.median(corr[n]):.3f}' for n in corr_sizes)} as n grows: "
        "the part that does not shrink with n is the bias (EM refinement removes it)"
    )

    if not args.skip_speed:
        print("4. Speed and memory: n=1e6, d=100, k=5, same array, fresh process")
        for dtype in ("float64", "float32"):
            speed(dtype)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
