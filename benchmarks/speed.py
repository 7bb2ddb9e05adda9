"""Speed as users meet it: whole processes, new data sizes, the hard regime.

Prints, in one run, the package's figures beside R's flexmix on the same data:

A. The whole ``numpyro-moe fit data.csv --experts 3`` process (``python -m numpyro_moe.apps.cli``:
   start-up, reading, fitting, writing the fit folder) against the whole ``Rscript`` process that
   reads the same CSV and fits ``flexmix(y ~ x, k = 3, concomitant = FLXPmultinom(~ x))`` (one EM
   run, a noise variance per expert), at n = 1,000, d = 8; n = 20,000, d = 10; and n = 200,000,
   d = 10 (not with --quick). Papers' setting: k = 3 linear experts, orthogonal gates, noise 0.1.
   The CLI runs twice on one fresh compilation-cache folder (``NUMPYRO_MOE_CACHE``): cold, then
   warm. Expert error of both tools against the simulated truth, up to label permutation
   (`numpyro_moe.metrics.expert_error`; the CLI's fit is mapped back from standardised units).
B. One warm process (this one): `fit_moe` repeated at the same n, against `fit_moe` at a new n
   (one to three rows fewer: the same work, new array shapes); medians of three. Target: ratio <= 1.2.
C. The hard regime: d = 10, k = 8, n = 4,000, linear experts, noise 0.1, gate scale 3 and 8, seeds
   the package's tests do not use: how often the default `fit_moe` reaches the optimum that EM
   started at the true parameters reaches (its objective, the mean penalised log-likelihood per
   point, no lower than that optimum's by more than 1e-3), how often its expert error is below
   0.1 (and EM's from the truth), and its wall time; then the same for `fit_moe(split_merge=3)`
   (rounds of split-and-merge and birth moves after EM).

Timings are wall-clock on whatever else the machine runs; the load average is printed with them.

Usage: python benchmarks/speed.py [--quick] [--seeds N] [--only A|B|C]
Writes benchmarks/results/speed{,-quick}.csv and .txt.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HARD_SEEDS = range(7_000, 7_100)  # seeds no test or other benchmark of the package uses
SPLIT_MERGE = 3  # rounds of split-and-merge and birth moves in part C's second fit

_FLEXMIX = r"""
suppressMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(args[1])
y <- data$y
x <- as.matrix(data[, -1])
set.seed(1)
fit <- flexmix(y ~ x, k = as.integer(args[2]), concomitant = FLXPmultinom(~ x))
write.csv(parameters(fit), args[3], row.names = TRUE)
"""


class Report:
    """Prints lines and keeps them, with machine-readable rows, for the results files."""

    def __init__(self, stem: Path, *, parts: bool = False):
        self.stem = stem
        self.lines: list[str] = []
        self.rows: list[dict] = []
        # A full run also writes each part's files (stem-A.txt, ...), which the README's results
        # section reads, as a run with --only would.
        self.parts = parts
        self.part: str | None = None
        self.part_of: list[str | None] = []

    def begin(self, part: str, line: str) -> None:
        self.part = part
        self.say(line)

    def _write(self, stem: Path, lines: list[str], rows: list[dict]) -> None:
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        with open(stem.with_suffix(".csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["section", "setting", "measure", "value"])
            writer.writeheader()
            writer.writerows(rows)

    def save(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self._write(self.stem, self.lines, self.rows)
        if not self.parts:
            return
        head = [line for line, part in zip(self.lines, self.part_of, strict=True) if part is None]
        for part in sorted({part for part in self.part_of if part is not None}):
            lines = [line for line, own in zip(self.lines, self.part_of, strict=True) if own == part]
            note = f"part {part} of a full run of benchmarks/speed.py (all parts: {self.stem.name}.txt)"
            rows = [row for row in self.rows if row["section"] == part]
            self._write(self.stem.with_name(f"{self.stem.name}-{part}"), [note, *head[:2], *lines], rows)

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.part_of.append(self.part)
        self.save()  # at every line: a long run stopped early keeps what it measured

    def record(self, section: str, setting: str, measure: str, value) -> None:
        self.rows.append({"section": section, "setting": setting, "measure": measure, "value": value})


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def _setup():
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpyro_moe

    warnings.simplefilter("ignore")  # a benchmark reports errors; warnings are tested elsewhere
    return jax, numpyro_moe


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = "y," + ",".join(f"x{j}" for j in range(x.shape[1]))
    np.savetxt(path, np.column_stack([y, x]), delimiter=",", header=header, comments="", fmt="%.10g")


def _cli_experts(folder: Path) -> np.ndarray:
    """The fit folder's experts (k, d) in the data's units: the CLI fits standardised x and y."""
    model = json.loads((folder / "model.json").read_text())
    scale = model["standardization"]
    rows = [line.split(",") for line in (folder / "parameters.csv").read_text().splitlines()[1:]]
    experts = np.array([[float(v) for v in row[1:-1]] for row in rows if row[0].startswith("expert")])
    return experts * scale["target_scale"] / np.asarray(scale["feature_scale"])[None, :]


def _timed(command: list[str], environment: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, result


def _flexmix_available() -> str | None:
    """None when Rscript and flexmix are there, else why not."""
    if shutil.which("Rscript") is None:
        return "Rscript is not installed here (Debian: r-base-core, r-cran-flexmix)"
    check = subprocess.run(["Rscript", "-e", "library(flexmix)"], capture_output=True, check=False)
    if check.returncode != 0:
        return "the R package flexmix is missing (Debian: r-cran-flexmix)"
    return None


def whole_processes(report: Report, sizes) -> None:
    jax, _ = _setup()
    from numpyro_moe.metrics import expert_error
    from numpyro_moe.simulation import simulate

    missing = _flexmix_available()
    if missing:
        report.say(f"  flexmix: {missing}; its column is left empty")
    header = (
        f"  {'n':>8} {'d':>3} | {'CLI cold':>9} {'CLI warm':>9} {'error':>7} | {'flexmix':>9} {'error':>7} "
        f"| {'flexmix / CLI warm':>18}"
    )
    report.say(header)
    report.say("  " + "-" * (len(header) - 2))
    for n, d in sizes:
        x, y, truth = simulate(key=jax.random.key(n + d), num_samples=n, dim=d, num_experts=3)
        x, y = np.asarray(x), np.asarray(y)
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            _write_csv(work / "data.csv", x, y)
            environment = {**os.environ, "NUMPYRO_MOE_CACHE": str(work / "jax-cache"), "PYTHONPATH": str(ROOT)}
            command = [
                sys.executable, "-m", "numpyro_moe.apps.cli", "fit", str(work / "data.csv"), "--target", "y",
                "--experts", "3", "--quiet", "--overwrite", "--out", str(work / "fit"),
            ]
            times = {}
            for state in ("cold", "warm"):
                times[state], result = _timed(command, environment)
                if result.returncode != 0:
                    report.say(f"  n={n}: the CLI failed ({state}): {result.stderr.strip()[-500:]}")
                    return
                report.record("A", f"n={n} d={d}", f"cli_{state}_seconds", round(times[state], 2))
            cli_error = expert_error(_cli_experts(work / "fit"), truth)
            report.record("A", f"n={n} d={d}", "cli_expert_error", round(cli_error, 5))
            flex_text = f"{'-':>9} {'-':>7} | {'-':>18}"
            if missing is None:
                (work / "fit.R").write_text(_FLEXMIX)
                seconds, result = _timed(
                    ["Rscript", str(work / "fit.R"), str(work / "data.csv"), "3", str(work / "experts.csv")],
                    dict(os.environ),
                )
                if result.returncode != 0:
                    flex_text = f"failed: {result.stderr.strip()[-200:]}"
                else:
                    # Rows: intercept, x0..x{d-1} slopes, sigma; columns: the components flexmix kept.
                    table = np.atleast_2d(np.genfromtxt(work / "experts.csv", delimiter=",", skip_header=1))[:, 1:]
                    experts = table[1 : d + 1].T
                    error = expert_error(experts, truth) if experts.shape[0] == 3 else float("nan")
                    kept = "" if experts.shape[0] == 3 else f" (kept {experts.shape[0]} of 3 components)"
                    flex_text = f"{seconds:>8.1f}s {error:>7.4f} | {seconds / times['warm']:>17.1f}x{kept}"
                    report.record("A", f"n={n} d={d}", "flexmix_seconds", round(seconds, 2))
                    report.record("A", f"n={n} d={d}", "flexmix_expert_error", round(error, 5))
                    report.record("A", f"n={n} d={d}", "flexmix_over_cli_warm", round(seconds / times["warm"], 3))
            report.say(
                f"  {n:>8} {d:>3} | {times['cold']:>8.1f}s {times['warm']:>8.1f}s {cli_error:>7.4f} | {flex_text}"
            )


def new_size(report: Report, sizes) -> None:
    jax, moe = _setup()
    from numpyro_moe.simulation import simulate

    report.say(f"  {'n':>8} {'d':>3} | {'first fit':>9} {'repeat':>8} {'new n':>8} | {'new / repeat':>12}")
    for n, d in sizes:
        x, y, _ = simulate(key=jax.random.key(n + d), num_samples=n, dim=d, num_experts=3)
        # Host arrays, as data read from a file arrive (slicing a JAX array compiles a slice per shape).
        x, y = np.asarray(x), np.asarray(y)

        def fit(rows, x=x, y=y):
            start = time.perf_counter()
            result = moe.fit_moe(x[:rows], y[:rows], num_experts=3, key=jax.random.key(0))
            jax.block_until_ready(result.params)
            return time.perf_counter() - start, int(result.iterations)

        first, _ = fit(n)
        # Medians of three, alternating: a single timing of a 0.3 s fit moves by 30% on a shared
        # machine. New n: three sizes never fitted before (the same work on new array shapes).
        repeats, news = [], []
        for offset in (1, 2, 3):
            repeats.append(fit(n))
            news.append(fit(n - offset))
        repeat, iterations = float(np.median([t for t, _ in repeats])), repeats[0][1]
        new, new_iterations = float(np.median([t for t, _ in news])), news[0][1]
        report.say(
            f"  {n:>8} {d:>3} | {first:>8.2f}s {repeat:>7.2f}s {new:>7.2f}s | {new / repeat:>11.2f}x"
            f"  (medians of 3; EM iterations {iterations} and {new_iterations}; target <= 1.2x)"
        )
        for measure, value in (("first", first), ("repeat", repeat), ("new_n", new)):
            report.record("B", f"n={n} d={d}", f"{measure}_seconds", round(value, 3))
        report.record("B", f"n={n} d={d}", "new_over_repeat", round(new / repeat, 3))


def hard_regime(report: Report, num_seeds: int) -> None:
    jax, moe = _setup()
    from numpyro_moe.metrics import expert_error
    from numpyro_moe.simulation import simulate

    d, k, n = 10, 8, 4_000
    for gate_scale in (3.0, 8.0):
        reached = recovered = oracle_recovered = moved_reached = moved_recovered = 0
        seconds, gaps, errors, moved_seconds, moved_gaps = [], [], [], [], []
        for seed in HARD_SEEDS[:num_seeds]:
            x, y, truth = simulate(
                key=jax.random.key(seed), num_samples=n, dim=d, num_experts=k, gate_scale=gate_scale
            )
            start = time.perf_counter()
            fit = moe.fit_moe(x, y, num_experts=k, key=jax.random.key(seed + 1))
            jax.block_until_ready(fit.params)
            seconds.append(time.perf_counter() - start)
            oracle = moe.fit_em(x, y, truth)
            error, oracle_error = expert_error(fit, truth), expert_error(oracle, truth)
            recovered += error < 0.1
            oracle_recovered += oracle_error < 0.1
            reached += bool(fit.log_likelihood >= oracle.log_likelihood - 1e-3)
            gaps.append(float(fit.log_likelihood - oracle.log_likelihood))
            errors.append(error)
            # The same fit with SPLIT_MERGE rounds of split-and-merge and birth moves after EM.
            start = time.perf_counter()
            moved = moe.fit_moe(x, y, num_experts=k, key=jax.random.key(seed + 1), split_merge=SPLIT_MERGE)
            jax.block_until_ready(moved.params)
            moved_seconds.append(time.perf_counter() - start)
            moved_reached += bool(moved.log_likelihood >= oracle.log_likelihood - 1e-3)
            moved_recovered += expert_error(moved, truth) < 0.1
            moved_gaps.append(float(moved.log_likelihood - oracle.log_likelihood))
        setting = f"gate scale {gate_scale:g}"
        report.say(
            f"  {setting}: default fit reaches EM-from-truth's optimum on {reached}/{num_seeds} seeds "
            f"(expert error < 0.1: {recovered}/{num_seeds}; EM from the truth: {oracle_recovered}/{num_seeds}); "
            f"fit time median {np.median(seconds):.1f} s, max {np.max(seconds):.1f} s"
        )
        report.say(
            "    per seed, objective of the fit minus EM-from-truth's (per point) and expert error: "
            + ", ".join(f"{gap:+.1e}/{error:.3f}" for gap, error in zip(gaps, errors, strict=True))
        )
        report.say(
            f"  {setting}, fit_moe(split_merge={SPLIT_MERGE}): reaches the optimum on {moved_reached}/{num_seeds} "
            f"(expert error < 0.1: {moved_recovered}/{num_seeds}); fit time median {np.median(moved_seconds):.1f} s, "
            f"max {np.max(moved_seconds):.1f} s; per seed gap: " + ", ".join(f"{gap:+.1e}" for gap in moved_gaps)
        )
        for measure, value in (
            ("reached", reached), ("recovered", recovered), ("oracle_recovered", oracle_recovered),
            ("seeds", num_seeds), ("median_seconds", round(float(np.median(seconds)), 2)),
            ("max_seconds", round(float(np.max(seconds)), 2)),
        ):
            report.record("C", setting, measure, value)
        for measure, value in (
            ("reached", moved_reached), ("recovered", moved_recovered), ("seeds", num_seeds),
            ("median_seconds", round(float(np.median(moved_seconds)), 2)),
            ("max_seconds", round(float(np.max(moved_seconds)), 2)),
        ):
            report.record("C-split-merge", f"{setting}, split_merge={SPLIT_MERGE}", measure, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip n = 200,000; 3 seeds per hard setting")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per hard setting (default 10)")
    parser.add_argument("--only", choices=("A", "B", "C"), default=None)
    args = parser.parse_args()
    # B measures compilation inside one process: no persistent cache here (the CLI runs of A get
    # their own, through their environment).
    os.environ["NUMPYRO_MOE_CACHE"] = "0"
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    num_seeds = args.seeds or (3 if args.quick else 10)
    sizes = [(1_000, 8), (20_000, 10)] + ([] if args.quick else [(200_000, 10)])
    stem = "speed-quick" if args.quick else "speed"
    report = Report(RESULTS / (stem + (f"-{args.only}" if args.only else "")), parts=args.only is None)
    report.say(f"benchmarks/speed.py{' --quick' if args.quick else ''}: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    report.say(f"start: {_load()} (timings are wall-clock on a shared machine)")
    if args.only in (None, "A"):
        report.begin("A", "A. Whole processes: numpyro-moe fit (compilation cache cold, then warm) vs Rscript + flexmix")
        whole_processes(report, sizes)
        report.say(f"   {_load()}")
    if args.only in (None, "B"):
        report.begin("B", "B. One warm process: fit_moe repeated at the same n vs at a new n")
        new_size(report, [(1_000, 8), (20_000, 10)])
        report.say(f"   {_load()}")
    if args.only in (None, "C"):
        report.begin("C", f"C. Hard regime: d = 10, k = 8, n = 4,000, linear, noise 0.1, {num_seeds} seeds per gate scale")
        hard_regime(report, num_seeds)
        report.say(f"   {_load()}")
    print(f"written: {report.stem}.txt and .csv")


if __name__ == "__main__":
    main()
