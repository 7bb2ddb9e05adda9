"""The README's results section, generated from the benchmarks' CSV outputs.

At the top, the main table: one row per claim (accuracy against the oracle and baselines, success
in hard regimes, speed against flexmix and one ``x.T @ x``, NUTS against NumPyro's default init,
real data against flexmix and least squares), each figure read from the CSV that its benchmark
writes (``SOURCES`` below names each file and the command that writes it). A missing file or
figure is an error naming the file and that command: no row is dropped silently.

Below it, the real-data tables and figure, from ``benchmarks/results/real_data.csv``
(``benchmarks/real_data.py``: held-out prediction of numpyro-moe against least squares and R's
flexmix), ``benchmarks/results/real_data_flexmix.csv`` (flexmix's figures for every k) and
``benchmarks/results/speed-A.csv`` (``benchmarks/speed.py`` part A: whole processes against
Rscript + flexmix). Writes

- the section between the ``<!-- results:start -->`` and ``<!-- results:end -->`` markers of
  README.md (the documentation's results page is the same text, made by docs/hooks.py at build),
- the figure ``benchmarks/results/real_data.png`` (with ``--figure``; needs matplotlib).

Every number is the CSV's, rounded for print only (log-likelihoods to 3 decimals, MSEs to 4
significant digits, times to 1 decimal). ``--check`` writes nothing and exits 1 when a file is not
what the CSVs give (tests/test_docs.py checks the README this way). ``--quick`` builds the section
from the smoke runs' files (``*-quick.csv``, written by each benchmark's ``--quick``) and prints it
(or writes it to ``--out FILE``); it never touches README.md.

Usage: python benchmarks/make_results.py [--check] [--figure] [--quick [--out FILE]]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
FIGURE = RESULTS / "real_data.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# The rows of real_data.csv, by their `method` column, in the order printed.
METHODS = [
    "least squares",
    "flexmix (k by BIC)",
    "flexmix (best k in hindsight)",
    "numpyro-moe (auto k, point fit)",
    "numpyro-moe (NUTS posterior)",
]


# Every CSV the section reads: the full run's file, the smoke run's file, and the command that
# writes them (the smoke run's with --quick added).
SOURCES = {
    "tensor_estimator": ("tensor_estimator.csv", "tensor_estimator-quick.csv", "benchmarks/tensor_estimator.py"),
    "em_pipeline": ("em_pipeline.csv", "em_pipeline-quick.csv", "benchmarks/em_pipeline.py"),
    "speed-A": ("speed-A.csv", "speed-quick-A.csv", "benchmarks/speed.py --only A"),
    "speed-C": ("speed-C.csv", "speed-quick-C.csv", "benchmarks/speed.py --only C"),
    "nuts_workflow": ("nuts_workflow.csv", "nuts_workflow-quick.csv", "benchmarks/nuts_workflow.py --part A"),
    "landscape": ("landscape.csv", "landscape-quick.csv", "benchmarks/landscape.py"),
    "real_data": ("real_data.csv", "real_data_quick.csv", "benchmarks/real_data.py"),
    "real_data_flexmix": ("real_data_flexmix.csv", "real_data_flexmix.csv", "benchmarks/real_data.py"),
    "real_data_r": ("real_data_r.csv", "real_data_r_quick.csv", "benchmarks/real_data.py --r-datasets"),
}


def source(name: str, quick: bool = False) -> tuple[Path, str]:
    """The path of one of ``SOURCES`` and the command that writes it."""
    full, smoke, command = SOURCES[name]
    if quick:
        command = command.replace(".py", ".py --quick", 1)
        if name == "real_data_flexmix":
            command = "benchmarks/real_data.py (without --quick)"
    return RESULTS / (smoke if quick else full), f"python {command}"


def shown(path: Path) -> str:
    """A path as the messages print it: from the repository's root when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load(name: str, quick: bool = False) -> list[dict]:
    """The rows of one of ``SOURCES``; a missing file is an error that says how to make it."""
    path, command = source(name, quick)
    if not path.exists():
        raise SystemExit(
            f"make_results: {shown(path)} is missing; `{command}` writes it "
            f"(`make bench{' QUICK=1' if quick else ''}` runs every benchmark)"
        )
    return read_csv(path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class Figures:
    """The figures of one benchmark CSV (columns section, setting, measure, value; ``n`` and
    ``seeds`` where the benchmark writes them), looked up by section, part of the setting and measure."""

    def __init__(self, name: str, quick: bool):
        self.rows = load(name, quick)
        self.path, self.command = source(name, quick)

    def row(self, section: str, measure: str, setting: str = "", n: int | None = None) -> dict:
        """The one row of ``section`` and ``measure`` whose setting contains ``setting`` (and of
        sample size ``n``, if given); an error naming the file if there is none or several."""
        found = [
            row for row in self.rows
            if row["section"] == section and row["measure"] == measure and setting in row["setting"]
            and (n is None or row.get("n") == str(n))
        ]
        if len(found) != 1:
            what = f"section {section}, measure {measure!r}" + (f", setting containing {setting!r}" if setting else "")
            what += f", n={n}" if n is not None else ""
            problem = "has no row" if not found else f"has {len(found)} rows"
            raise SystemExit(
                f"make_results: {shown(self.path)} {problem} for {what}; `{self.command}` writes it"
            )
        return found[0]

    def value(self, section: str, measure: str, setting: str = "", n: int | None = None) -> float:
        return float(self.row(section, measure, setting, n)["value"])

    def count(self, section: str, measure: str, setting: str = "", n: int | None = None) -> str:
        """``successes/seeds`` of a count row that has a seeds column."""
        row = self.row(section, measure, setting, n)
        return f"{int(float(row['value']))}/{row['seeds']}"


def significant(value: str, digits: int = 4) -> str:
    """``digits`` significant digits, trailing zeros kept (23.995 -> 24.00), no exponent."""
    number = float(value)
    text = f"{number:#.{digits}g}"
    if "e" in text:
        return f"{number:.0f}"
    return text.rstrip(".")


def seconds(value: str) -> str:
    return "" if value in ("", "nan") else f"{float(value):.1f}"


def words(count: int) -> str:
    return ("zero", "one", "two", "three", "four", "five", "six")[count] if count <= 6 else str(count)


def csv_name(name: str, quick: bool = False) -> str:
    return f"benchmarks/results/{source(name, quick)[0].name}"


def thousands(n: str | int) -> str:
    """20000 -> 20k, 63246 -> 63k, 1000000 -> 1e6 (sizes in the table's words, rounded for print)."""
    n = int(n)
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}e6"
    return f"{round(n / 1000)}k" if n >= 1000 else str(n)


def share(fraction: float, seeds: str, stated: str) -> str:
    """A target stated as a count of seeds (``stated``, e.g. 48/50) for the seeds actually run:
    ``ceil(fraction * seeds)/seeds``, and the stated count beside it when the run had other seeds."""
    scaled = f"{math.ceil(fraction * int(seeds) - 1e-9)}/{seeds}"
    note = "" if scaled == stated else f" (stated: {stated} for {stated.split('/')[1]} seeds)"
    return f"{scaled} seeds{note}"


def main_table(quick: bool = False) -> list[str]:
    """One row per claim, every figure from a benchmark CSV (see ``SOURCES``)."""
    tensor, pipeline = Figures("tensor_estimator", quick), Figures("em_pipeline", quick)
    hard, nuts = Figures("speed-C", quick), Figures("nuts_workflow", quick)
    rows = []

    def add(what, setting, ours, baselines, target, name):
        rows.append(f"| {what} | {setting} | {ours} | {baselines} | {target} | `{csv_name(name, quick)}` |")

    # Tensor estimator: error against n, and its slope on log-log axes.
    linear = "linear link, orthogonal gates"
    sizes = sorted({int(row["n"]) for row in tensor.rows if row["section"] == "1" and row["measure"] == "median_expert_error"})
    slope = tensor.row("1", "loglog_slope", linear)
    add(
        "Tensor method: expert error against n",
        f"papers' setting (d=10, k=3, noise 0.1, linear), n = {', '.join(thousands(n) for n in sizes)}; "
        f"{slope['seeds']} seeds each",
        f"median {tensor.value('1', 'median_expert_error', linear, n=sizes[-1]):.4f} at n={thousands(sizes[-1])}; "
        f"log-log slope {float(slope['value']):.2f}",
        "1/sqrt(n): slope -0.50",
        "≤ 0.05 at n=200k; slope near -0.5",
        "tensor_estimator",
    )
    # Pipeline against the oracle (EM started at the truth), papers' setting.
    expert = pipeline.row("A", "expert_ratio_within_1.1")
    add(
        "Expert error / oracle's",
        f"papers' setting, n={thousands(expert['n'])}, d=10, k=3; {expert['seeds']} seeds",
        f"tensor → EM: median {pipeline.value('A', 'expert_ratio_median'):.4f}, ≤ 1.1 on "
        f"{pipeline.count('A', 'expert_ratio_within_1.1')} seeds (max {pipeline.value('A', 'expert_ratio_max'):.3f})",
        "oracle (EM from the truth): 1",
        f"≤ 1.1 on ≥ {share(0.96, expert['seeds'], '48/50')}",
        "em_pipeline",
    )
    add(
        "Gating error / oracle's",
        f"same fits; error on {thousands(expert['n'])} new points",
        f"median {pipeline.value('A', 'gating_ratio_median'):.4f}, ≤ 1.2 on "
        f"{pipeline.count('A', 'gating_ratio_within_1.2')} seeds (max {pipeline.value('A', 'gating_ratio_max'):.3f})",
        "oracle (EM from the truth): 1",
        "≤ 1.2",
        "em_pipeline",
    )
    # The AISTATS 2020 expert loss from random starts, against gradient descent on the squared loss
    # from the same starts.
    landscape = Figures("landscape", quick)
    loss = landscape.row("1", "recovered_starts", "| landscape loss")
    add(
        "Experts from the AISTATS 2020 loss (`method=\"landscape\"`), from random starts",
        f"{loss['setting'].split(' | ')[0]}, n={thousands(loss['n'])}; {loss['seeds']} random starts",
        f"recovered (expert error < 0.1) from {landscape.count('1', 'recovered_starts', '| landscape loss')} starts, "
        f"median error {landscape.value('1', 'median_expert_error', '| landscape loss'):.4f}, "
        f"{landscape.value('1', 'mean_seconds_per_start', '| landscape loss'):.1f} s a start",
        f"Adam on the squared loss from the same starts: "
        f"{landscape.count('1', 'recovered_starts', '| squared-loss GD')} "
        f"(median error {landscape.value('1', 'median_expert_error', '| squared-loss GD'):.4f}, "
        f"{landscape.value('1', 'mean_seconds_per_start', '| squared-loss GD'):.1f} s a start)",
        "≥ " + share(0.9, loss['seeds'], '9/10').replace(" seeds", " starts"),
        "landscape",
    )
    # Success (expert error < 0.1) in the harder regimes (part B) and the rare-expert one (part D),
    # every method on the same seeds.
    regimes = []
    for part in ("B", "D"):
        found = list(dict.fromkeys(row["setting"].split(" | ")[0] for row in pipeline.rows if row["section"] == part))
        if not found:
            raise SystemExit(
                f"make_results: {shown(pipeline.path)} has no part {part} rows; `{pipeline.command}` writes them"
            )
        regimes += [(part, regime) for regime in found]
    for part, regime in regimes:
        def hits(method, regime=regime, part=part):
            return pipeline.count(part, "successes", f"{regime} | {method}")

        seeds = pipeline.row(part, "successes", f"{regime} | tensor -> EM")["seeds"]
        moves = [row for row in pipeline.rows if row["section"] == part and row["measure"] == "successes"
                 and row["setting"] == f"{regime} | fit_moe + split-merge (2 rounds)"]
        add(
            "Success in a hard regime (expert error < 0.1)",
            f"{regime}, d=10; {seeds} seeds",
            f"tensor → EM {hits('tensor -> EM')}; `fit_moe` (tensor + 4 random starts) {hits('fit_moe:')}"
            + (f", with 2 rounds of split-and-merge moves {hits('fit_moe + split-merge')}" if moves else ""),
            f"best of 5 random-start EM {hits('EM, best of 5')}; 1 random-start EM {hits('EM, 1 random')}; "
            f"GD on the likelihood {hits('GD likelihood')}, on the squared loss {hits('GD squared')}; "
            f"oracle {hits('oracle')}",
            "≥ best of 5 random-start EM",
            "em_pipeline",
        )
    for scale in sorted({row["setting"] for row in hard.rows if row["section"] == "C"}):
        count = int(hard.value("C", "seeds", scale))

        def of(measure, scale=scale, count=count):
            return f"{int(hard.value('C', measure, scale))}/{count}"

        add(
            "Hard regime, default `fit_moe`",
            f"k=8, n=4k, d=10, {scale}; {count} seeds no test uses",
            f"expert error < 0.1 on {of('recovered')}; reaches EM-from-the-truth's optimum on {of('reached')}; "
            f"median {hard.value('C', 'median_seconds', scale):.1f} s",
            f"oracle (EM from the truth): expert error < 0.1 on {of('oracle_recovered')}",
            "as the oracle",
            "speed-C",
        )
    # Speed of the tensor method against one jitted x.T @ x on the same array.
    for dtype in ("float64", "float32"):
        setting = f"n=1e6, d=100, k=5, {dtype}"
        call = f"{setting} | estimate_experts auto:auto"
        add(
            "Speed: `estimate_experts` against one jitted `x.T @ x`",
            f"n=1e6, d=100, k=5, {dtype}, same array (defaults; best of 5, medians in brackets)",
            f"{tensor.value('4', 'seconds', call):.3f} s = {tensor.value('4', 'ratio_to_gram', call):.2f}x "
            f"`x.T @ x` ({tensor.value('4', 'median_ratio_to_gram', call):.2f}x)",
            f"`x.T @ x` {tensor.value('4', 'gram_seconds', setting):.3f} s "
            f"({tensor.value('4', 'gram_median_seconds', setting):.3f} s)",
            "≤ 3x `x.T @ x`",
            "tensor_estimator",
        )
    # Speed of the pipeline against flexmix, same data, same run.
    ours = pipeline.row("C", "warm_seconds", "| numpyro-moe tensor")
    add(
        "Speed: tensor + EM against flexmix",
        f"papers' setting, n={thousands(ours['n'])}, d=10, k=3, one data set",
        f"{float(ours['value']):.2f} s warm ({pipeline.value('C', 'cold_seconds', '| numpyro-moe tensor'):.2f} s "
        f"with compilation), expert error {pipeline.value('C', 'expert_error', '| numpyro-moe tensor'):.4f}; "
        f"flexmix takes {pipeline.value('C', 'speedup_warm'):.0f}x as long ({pipeline.value('C', 'speedup_cold'):.0f}x)",
        f"flexmix {pipeline.value('C', 'fit_seconds', '| flexmix'):.1f} s, expert error "
        f"{pipeline.value('C', 'expert_error', '| flexmix'):.4f}",
        "flexmix takes ≥ 50x as long",
        "em_pipeline",
    )
    whole = {}
    for row in load("speed-A", quick):
        whole.setdefault(row["setting"], {})[row["measure"]] = row["value"]
    largest = max(whole, key=lambda setting: int(setting.split()[0].split("=")[1]))
    measures = whole[largest]
    if "flexmix_seconds" not in measures:
        path, command = source("speed-A", quick)
        raise SystemExit(f"make_results: {shown(path)} has no flexmix time for {largest}; `{command}` writes it")
    n, d = (part.split("=")[1] for part in largest.split())
    add(
        "Speed: whole process against Rscript + flexmix",
        f"`numpyro-moe fit data.csv --experts 3`, n={thousands(n)}, d={d}, k=3",
        f"{float(measures['cli_warm_seconds']):.1f} s, compilation cache warm ({float(measures['cli_cold_seconds']):.1f} s "
        f"cold); flexmix takes {float(measures['flexmix_over_cli_warm']):.1f}x as long",
        f"Rscript + flexmix {float(measures['flexmix_seconds']):.1f} s",
        "faster than flexmix",
        "speed-A",
    )
    # NUTS from the estimate against NumPyro's default init.
    started = nuts.row("A", "successes_rhat_1.01_ess_400", "| from the estimate")
    add(
        "NUTS from the estimate against NumPyro's default init",
        f"{started['setting'].split(' | ')[0]}, n={thousands(started['n'])}; {started['seeds']} seeds",
        f"r_hat ≤ 1.01 and ESS ≥ 400 on {nuts.count('A', 'successes_rhat_1.01_ess_400', '| from the estimate')} "
        f"seeds (median max r_hat {nuts.value('A', 'median_max_rhat', '| from the estimate'):.3f})",
        f"NumPyro's default init: {nuts.count('A', 'successes_rhat_1.01_ess_400', '| NumPyro default init')} "
        f"(median max r_hat {nuts.value('A', 'median_max_rhat', '| NumPyro default init'):.2f})",
        f"r_hat ≤ 1.01 and ESS ≥ 400 on ≥ {share(0.95, started['seeds'], '19/20')}",
        "nuts_workflow",
    )
    # Real data: held-out log-likelihood against flexmix (k by BIC) and least squares.
    real = load("real_data", quick)
    by_key = {(row["dataset"], row["method"]): float(row["heldout_loglik_per_point"]) for row in real}
    # A run without flexmix (--skip-flexmix, as the quick mode runs it) is compared with flexmix's
    # saved figures (real_data_flexmix.csv: its k chosen by BIC).
    for row in load("real_data_flexmix", quick):
        if row["model"] == "BIC":
            by_key.setdefault((row["dataset"], "flexmix (k by BIC)"), float(row["heldout_loglik_per_point"]))
    datasets = list(dict.fromkeys(row["dataset"] for row in real))
    cells = []
    for method, label in (("numpyro-moe (auto k, point fit)", "point fit"), ("numpyro-moe (NUTS posterior)", "NUTS")):
        ran = [d for d in datasets if (d, method) in by_key]
        if not ran:
            cells.append(f"{label}: not in this run")
            continue
        flex = sum(by_key[(d, method)] >= by_key[(d, "flexmix (k by BIC)")] for d in ran)
        least = sum(by_key[(d, method)] >= by_key[(d, "least squares")] for d in ran)
        cells.append(f"{label}: ≥ flexmix on {flex}/{len(ran)}, ≥ least squares on {least}/{len(ran)}")
    add(
        "Real data: held-out log-likelihood per point",
        f"{words(len(datasets))} data sets ({', '.join(datasets)}), one fixed 75/25 split each",
        "; ".join(cells),
        "flexmix (k by BIC, `stepFlexmix` k = 1..5); least squares",
        "≥ both on every data set",
        "real_data",
    )
    return [
        (
            "The main table: one row per claim, each figure from the CSV its benchmark writes (last "
            "column; `make bench` reruns them all, `benchmarks/make_results.py` builds this section). "
            "Seed counts are those of the run that wrote the file. Success means expert error below 0.1; "
            "the oracle is EM started at the true parameters."
        ),
        "",
        "| what | setting | numpyro-moe | baseline(s) | target | source |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def section(quick: bool = False) -> str:
    rows = load("real_data", quick)
    flexmix = load("real_data_flexmix", quick)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    lines = main_table(quick) + [
        "",
        (
            f"Held-out prediction on {words(len(datasets))} real data sets, each on one fixed 75/25 split "
            "(`benchmarks/data/splits.json`), from `benchmarks/real_data.py` "
            f"(`{csv_name('real_data', quick)}`; flexmix's figures for every k in "
            f"`{csv_name('real_data_flexmix', quick)}`). loglik/pt is the mean log predictive density "
            "of the test responses in their own units (higher is better), MSE that of the predictive "
            "mean; the time is a whole fit in a fresh process (numpyro-moe: `numpyro-moe fit`, "
            "compilation included; flexmix: the `stepFlexmix` call over k = 1..5 with 3 replicates). "
            "This section is generated by `make bench-results` from those files; the numbers are "
            "theirs, rounded for print."
        ),
        "",
        "| data set | n train / test | d | method | k | loglik/pt | MSE | fit s | max r_hat |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += method_rows(rows)
    lines += [
        "",
        (
            "flexmix's held-out log-likelihood per point for each k (the k that BIC picks in bold; flexmix drops an expert that "
            "loses its points, so a run asked for k may end with fewer):"
        ),
        "",
        "| data set | " + " | ".join(f"k={k}" for k in range(1, 6)) + " |",
        "|---|" + "---|" * 5,
    ]
    for dataset in datasets:
        models = {row["model"]: row for row in flexmix if row["dataset"] == dataset}
        if "BIC" not in models:
            path, command = source("real_data_flexmix", quick)
            raise SystemExit(f"make_results: {shown(path)} has no rows for {dataset}; `{command}` writes them")
        chosen = models["BIC"]["k"]
        cells = []
        for k in range(1, 6):
            row = models.get(f"k={k}")
            if row is None:
                cells.append("")
                continue
            value = f"{float(row['heldout_loglik_per_point']):.3f}"
            note = "" if row["k"] == str(k) else f" (fitted k={row['k']})"
            cells.append((f"**{value}**" if row["k"] == chosen and row["k"] == str(k) else value) + note)
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    dates = sorted({row["run_date"] for row in flexmix if row["dataset"] in datasets})
    lines += ["", f"flexmix run: {', '.join(dates)}."]
    if FIGURE.exists():
        lines += [
            "",
            (
                "![Held-out log-likelihood per point of each method, relative to least squares]"
                "(benchmarks/results/real_data.png)"
            ),
        ]
    lines += r_datasets_lines(quick)
    lines += speed_lines(quick)
    return "\n".join(lines) + "\n"


def method_rows(rows: list[dict]) -> list[str]:
    """One table row per data set and method of a real_data CSV, in `METHODS`' order."""
    by_key = {(row["dataset"], row["method"]): row for row in rows}
    lines = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        for method in METHODS:
            row = by_key.get((dataset, method))
            if row is None:
                continue
            first = method == METHODS[0]
            lines.append(
                "| "
                + " | ".join(
                    [
                        dataset if first else "",
                        f"{row['n_train']} / {row['n_test']}" if first else "",
                        row["d"] if first else "",
                        method,
                        row["k"],
                        f"{float(row['heldout_loglik_per_point']):.3f}",
                        significant(row["heldout_mse"]),
                        seconds(row["fit_seconds"]),
                        "" if row["max_r_hat"] in ("", "nan") else f"{float(row['max_r_hat']):.3f}",
                    ]
                )
                + " |"
            )
    return lines


def r_datasets_lines(quick: bool = False) -> list[str]:
    """The table of ``real_data.py --r-datasets`` (``real_data_r.csv``), when that run was made."""
    path, command = source("real_data_r", quick)
    if quick or not path.exists():
        return []
    rows = read_csv(path)
    count = len(dict.fromkeys(row["dataset"] for row in rows))
    return [
        "",
        (
            f"The same measures on {words(count)} regression data sets of R's MASS and datasets packages that the "
            f"package was not developed on (`{command.removeprefix('python ')}`, `{shown(path)}`; exported by the "
            "local R, one 75/25 split each by the same rule): a check of the defaults on data they were not tuned to."
        ),
        "",
        "| data set | n train / test | d | method | k | loglik/pt | MSE | fit s | max r_hat |",
        "|---|---|---|---|---|---|---|---|---|",
        *method_rows(rows),
    ]


def speed_lines(quick: bool = False) -> list[str]:
    """The whole-process speed table of ``benchmarks/speed.py`` part A (``speed-A.csv``)."""
    values: dict[str, dict[str, str]] = {}
    for row in load("speed-A", quick):
        values.setdefault(row["setting"], {})[row["measure"]] = row["value"]
    lines = [
        "",
        (
            f"Speed as users meet it, from `benchmarks/speed.py` part A (`{csv_name('speed-A', quick)}`): the "
            "whole `numpyro-moe fit data.csv --experts 3` process (start-up, reading, fitting, writing the fit "
            "folder; JAX's compilation cache cold, then warm) against the whole `Rscript` process that reads the "
            "same CSV and fits flexmix (one EM run, a variance per expert), on simulated data in the papers' "
            "setting (k = 3 linear experts, noise 0.1); expert error against the truth."
        ),
        "",
        "| n | d | numpyro-moe cold s | warm s | expert error | flexmix s | expert error | flexmix / warm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, measures in values.items():
        n, d = (part.split("=")[1] for part in setting.split())
        lines.append(
            f"| {int(n):,} | {d} | {seconds(measures['cli_cold_seconds'])} | {seconds(measures['cli_warm_seconds'])} "
            f"| {significant(measures['cli_expert_error'], 3)} | {seconds(measures.get('flexmix_seconds', ''))} "
            f"| {significant(measures['flexmix_expert_error'], 3) if 'flexmix_expert_error' in measures else ''} "
            f"| {float(measures['flexmix_over_cli_warm']):.1f}x |"
            if "flexmix_over_cli_warm" in measures
            else f"| {int(n):,} | {d} | {seconds(measures['cli_cold_seconds'])} | "
            f"{seconds(measures['cli_warm_seconds'])} | {significant(measures['cli_expert_error'], 3)} | | | |"
        )
    return lines


def readme_with(text: str) -> str:
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md: expected the markers {START} and {END} around the results section")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{text}{END}{tail}"


def docs_page() -> str:
    """The documentation's results page: the same section, its figure beside it."""
    body = section().replace("(benchmarks/results/real_data.png)", "(real_data.png)")
    return "# Results\n\n" + body


def draw_figure(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(RESULTS / "real_data.csv")
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    by_key = {(row["dataset"], row["method"]): row for row in rows}
    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / (len(METHODS) - 1)
    for index, method in enumerate(METHODS[1:]):
        gains = [
            float(by_key[(d, method)]["heldout_loglik_per_point"])
            - float(by_key[(d, "least squares")]["heldout_loglik_per_point"])
            for d in datasets
        ]
        axis.bar([i + (index - 1.5) * width for i in range(len(datasets))], gains, width, label=method)
    axis.axhline(0, color="k", lw=0.8)
    axis.set_xticks(range(len(datasets)), datasets)
    axis.set_ylabel("held-out loglik/pt minus least squares'")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    parser.add_argument("--figure", action="store_true", help="also draw benchmarks/results/real_data.png")
    parser.add_argument(
        "--quick", action="store_true",
        help="the section from the smoke runs' *-quick.csv files, printed (README.md is left alone)",
    )
    parser.add_argument("--out", type=Path, help="with --quick: write the section to this file instead of printing it")
    args = parser.parse_args(argv)
    if args.out is not None and not args.quick:
        parser.error("--out goes with --quick (the full section goes into README.md)")
    if args.quick:
        if args.check or args.figure:
            parser.error("--quick builds a section to read; --check and --figure are for README.md's full figures")
        text = section(quick=True)
        if args.out is None:
            print(text, end="")
        else:
            args.out.write_text(text)
            print(f"wrote {args.out}")
        return 0
    if args.figure and not args.check:
        draw_figure(FIGURE)
    text = section()
    wanted = {README: readme_with(text)}
    stale = [path for path, content in wanted.items() if not path.exists() or path.read_text() != content]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} is not what the CSVs give: run `make bench-results`",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
