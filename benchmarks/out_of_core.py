"""Out of core: the whole fit streamed from NumPy memmaps, time and peak memory against the data's size.

Writes x (n, d) and y (n,) as .npy memmaps (papers' setting: x ~ N(0, I_d), k linear experts,
orthogonal gates, noise 0.1), then fits them in a fresh process, reading the files chunk by chunk:
the moments (`estimate_experts`), EM over the gate with the experts fixed, and joint EM
(`fit_em`), which is `fit_moe(..., num_starts=1)` split into its phases so each is timed. The
fitting process reports its peak resident memory (``ru_maxrss``; pages of the memmapped files
that the passes have read count in it), the device JAX ran on, and the expert error against the
truth. With ``--in-memory`` the same fit also runs on the arrays loaded into memory, and with
``--on-device`` on the arrays placed whole on JAX's default device (a GPU's memory, where there is
one), each in another fresh process. ``--limit S`` stops a run that takes longer than S seconds
(its row says so); the report is rewritten after every run.

Usage: python benchmarks/out_of_core.py [--quick] [--n N] [--dim D] [--dir DIR] [--in-memory]
    [--on-device] [--limit S] [--tag NAME]
Default n = 10,000,000, d = 20, k = 3 (a 1.6 GB x); --quick: n = 1,000,000.
Writes benchmarks/results/out_of_core{,-quick}{,-NAME}.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WRITE_ROWS = 500_000


def write_data(folder: Path, n: int, dim: int, experts: int, seed: int) -> dict:
    """Simulate in blocks straight into .npy memmaps; returns the truth's experts."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from numpyro_moe.simulation import sample_response, simulate

    truth = simulate(key=jax.random.key(seed), num_samples=16, dim=dim, num_experts=experts).truth
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float64, shape=(n, dim))
    y = np.lib.format.open_memmap(folder / "y.npy", mode="w+", dtype=np.float64, shape=(n,))
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed + 1)
    for index, start in enumerate(range(0, n, WRITE_ROWS)):
        stop = min(start + WRITE_ROWS, n)
        block = rng.standard_normal((stop - start, dim))
        x[start:stop] = block
        y[start:stop] = np.asarray(sample_response(truth, block, key=jax.random.fold_in(key, index)))
    x.flush(), y.flush()
    del x, y
    return {"experts": np.asarray(truth.experts).tolist()}


def fit(folder: Path, experts: int, where: str) -> dict:
    """The fit, in this (fresh) process; returns its phases' times, error and peak memory.

    ``where``: "streamed" (memmaps), "in memory" (NumPy arrays) or "on device" (JAX arrays on
    the default device).
    """
    started = time.perf_counter()
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpyro_moe as moe
    from numpyro_moe.metrics import expert_error

    truth = np.asarray(json.loads((folder / "truth.json").read_text())["experts"])
    mode = "r" if where == "streamed" else None
    x, y = np.load(folder / "x.npy", mmap_mode=mode), np.load(folder / "y.npy", mmap_mode=mode)
    if where == "on device":
        x, y = jax.device_put(x), jax.device_put(y)
        jax.block_until_ready((x, y))
    times = {"start-up and reading": time.perf_counter() - started}
    clock = time.perf_counter()
    estimate = moe.estimate_experts(x, y, num_experts=experts, key=jax.random.key(0))
    times["moments"] = time.perf_counter() - clock
    clock = time.perf_counter()
    gated = moe.fit_em(x, y, estimate.to_params(), fix=("experts",))
    times["gate EM"] = time.perf_counter() - clock
    clock = time.perf_counter()
    joint = moe.fit_em(x, y, gated.params)
    times["joint EM"] = time.perf_counter() - clock
    times["whole process"] = time.perf_counter() - started
    return {
        "times": times,
        "iterations": {"gate EM": gated.iterations, "joint EM": joint.iterations},
        "error": {
            "tensor estimate": float(expert_error(estimate.experts, truth)),
            "after joint EM": float(expert_error(joint.params.experts, truth)),
        },
        "log_likelihood": joint.log_likelihood,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
    }


def run_child(folder: Path, experts: int, where: str, limit: float | None) -> dict:
    """One fit in a fresh process; ``{"failed": why}`` when it fails or outlasts ``limit`` seconds."""
    command = [sys.executable, __file__, "--child", str(folder), "--experts", str(experts), "--where", where]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"failed": f"stopped after {limit:.0f} s (--limit)"}
    if result.returncode != 0:
        print(f"the {where} fit failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return {"failed": f"failed (exit {result.returncode}; its error is printed above)"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(n: int, dim: int, experts: int, data_bytes: int, write_time: float, runs: dict) -> str:
    devices = sorted({f"{run['device']} (JAX {run['jax']})" for run in runs.values() if "device" in run})
    lines = [
        f"Out-of-core fit: n = {n:,}, d = {dim}, k = {experts} (linear experts, noise 0.1), float64 data "
        f"{data_bytes / 2**30:.2f} GiB (x and y as .npy memmaps), written in {write_time:.0f} s; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; JAX ran on {', '.join(devices) or '-'}.",
        "The fit: moments, EM over the gate (experts fixed), joint EM; each in a fresh process.",
        "",
        f"{'run':<12} {'start-up':>9} {'moments':>9} {'gate EM':>13} {'joint EM':>13} {'whole':>9} "
        f"{'peak RSS':>10} {'RSS/data':>9} {'error: tensor':>14} {'EM':>8}",
    ]
    for name, run in runs.items():
        if "failed" in run:
            lines.append(f"{name:<12} {run['failed']}")
            continue
        times, iterations = run["times"], run["iterations"]
        lines.append(
            f"{name:<12} {times['start-up and reading']:>8.1f}s {times['moments']:>8.1f}s "
            f"{times['gate EM']:>6.1f}s ({iterations['gate EM']:>3}) {times['joint EM']:>6.1f}s "
            f"({iterations['joint EM']:>3}) {times['whole process']:>8.1f}s "
            f"{run['peak_rss_bytes'] / 2**30:>8.2f}GiB {run['peak_rss_bytes'] / data_bytes:>9.2f} "
            f"{run['error']['tensor estimate']:>14.4f} {run['error']['after joint EM']:>8.4f}"
        )
    lines.append("(EM iterations in parentheses; streamed EM reads the data twice per iteration.)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 1,000,000")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the memmaps (default: a temporary folder)")
    parser.add_argument("--in-memory", action="store_true", help="also fit the arrays loaded into memory")
    parser.add_argument(
        "--on-device", action="store_true", help="also fit the arrays placed whole on JAX's default device"
    )
    parser.add_argument("--limit", type=float, default=None, help="stop a run after this many seconds")
    parser.add_argument("--tag", default=None, help="results file out_of_core[-quick]-TAG.txt")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--where", default="streamed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(fit(args.child, args.experts, args.where)))
        return
    n = args.n or (1_000_000 if args.quick else 10_000_000)
    name = "out_of_core" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="moe-out-of-core-", dir=args.dir))
    try:
        clock = time.perf_counter()
        truth = write_data(folder, n, args.dim, args.experts, seed=11)
        write_time = time.perf_counter() - clock
        (folder / "truth.json").write_text(json.dumps(truth))
        data_bytes = (folder / "x.npy").stat().st_size + (folder / "y.npy").stat().st_size
        wanted = ["streamed"] + ["in memory"] * args.in_memory + ["on device"] * args.on_device
        runs = {}
        for where in wanted:
            runs[where] = run_child(folder, args.experts, where, args.limit)
            text = report(n, args.dim, args.experts, data_bytes, write_time, runs)
            (RESULTS / f"{name}.txt").write_text(text + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(text)
    if any("failed" in run for run in runs.values()):
        sys.exit("out_of_core.py: a fit failed or was stopped (its row above says which)")


if __name__ == "__main__":
    main()
