"""Real-data benchmark (issue 13): held-out prediction of numpyro-moe against least squares and R's flexmix.

For each data set in ``benchmarks/data/`` and one fixed 75/25 split of its rows (the test rows are
listed in ``benchmarks/data/splits.json``; every tool reads the same ``train.csv`` and
``test.csv``), it measures in one run, side by side:

1. least squares with an intercept and the ML residual variance (NumPy);
2. R's flexmix: ``stepFlexmix(y ~ <features>, k = 1:5, nrep = 3,
   concomitant = FLXPmultinom(~ <features>))`` (Gaussian experts, a variance each), k chosen by
   ``getModel(m, "BIC")``; its held-out log density is computed in R from the fitted parameters
   (multinomial gate on the test features, component means and sigmas, logsumexp), and the k in
   1..5 with the best held-out log-likelihood is reported too ("best k in hindsight", a
   comparison that favours flexmix). The time is the whole ``stepFlexmix`` call;
3. numpyro-moe as a user runs it, each command a fresh process: ``numpyro-moe fit train.csv
   --target Y --experts auto --out DIR --quiet`` then ``numpyro-moe predict DIR test.csv --out
   pred.csv --point --quiet`` (the point fit; k chosen by the package), and the posterior:
   ``numpyro-moe fit ... --experts auto --nuts`` (the same selection, hence the same point fit,
   then NUTS from it; its time includes the selection), then ``predict`` without ``--point``,
   with the max r_hat from the fit's ``summary.csv``.

Figures: held-out log-likelihood per point (predictive log density of the test y in the
ORIGINAL units of y, averaged over the test rows), held-out MSE (of the predictive mean), and the
wall time of each fit (fresh processes, so it includes start-up and compilation). The table is
written to ``benchmarks/results/real_data.csv`` (``real_data_quick.csv`` with ``--quick``) and
what the run printed beside it (``real_data.txt``); flexmix's figures also to
``benchmarks/results/real_data_flexmix.csv`` whenever flexmix runs, and are printed from there,
labelled as saved figures, when R or flexmix is missing here. A run over some of the data sets
(``--datasets``) writes these files into its own folder (``--keep`` or a new temporary one,
which it keeps), never over the complete runs' files.

Targets (issue 13), per data set: the package's held-out log-likelihood >= flexmix's (k by BIC)
and >= least squares', its MSE <= least squares'; also reported: >= flexmix's best k in hindsight.

A second suite, ``--r-datasets``: ten regression data sets of R's MASS and datasets packages
that the package was not developed on (`R_DATASETS`: whiteside, LifeCycleSavings, hills,
airquality, birthwt, cpus, geyser, GAGurine, ChickWeight, quakes), exported from the local R at run
time, split by the same rule, measured the same way, written to ``real_data_r.csv`` (and
``real_data_r_flexmix.csv``): a check of the defaults on data they were not tuned to.

Usage: python benchmarks/real_data.py [--quick] [--skip-flexmix] [--skip-nuts] [--r-datasets]
                                      [--datasets motorcycle,faithful] [--keep DIR]
                                      [--compilation-cache fresh|user]
``--quick``: only the two smallest data sets and no NUTS (a few minutes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
SPLITS = DATA / "splits.json"
SPLIT_SEED = 13  # the number; the split is made once and shipped in splits.json
TEST_FRACTION = 0.25
FLEXMIX_KS = "1:5"
FLEXMIX_REPLICATES = 3
FLEXMIX_SEED = 1
PROCESS_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Dataset:
    name: str
    file: str
    target: str
    about: str


# Smallest first: --quick takes the first two.
DATASETS = [
    Dataset("motorcycle", "motorcycle.csv", "accel", "mcycle: head acceleration on a cubic basis of time"),
    Dataset("faithful", "faithful.csv", "eruptions", "Old Faithful: eruption length on the waiting time"),
    Dataset("diabetes", "diabetes.csv", "progression", "diabetes progression on 10 baseline variables"),
    Dataset("boston", "boston.csv", "medv", "Boston housing: median value on 13 tract features"),
    Dataset("mathachieve", "mathachieve.csv", "mathach", "High School and Beyond: maths score, 4 features"),
]
BY_NAME = {dataset.name: dataset for dataset in DATASETS}

# --r-datasets: ten regression data sets of R's own packages (MASS, datasets), which the package
# was not developed on, exported from the local R at run time (nothing is downloaded); the same
# split rule, their own results files. Categorical columns enter as their integer codes.
R_DATASETS = [
    Dataset("whiteside", "whiteside.csv", "Gas", "MASS whiteside: gas use on temperature, insulation before/after"),
    Dataset("lifecycle", "lifecycle.csv", "sr", "datasets LifeCycleSavings: savings ratio on 4 country figures"),
    Dataset("hills", "hills.csv", "time", "MASS hills: record time on distance and climb (outliers)"),
    Dataset("airquality", "airquality.csv", "Ozone", "datasets airquality (complete rows): ozone on 3 readings"),
    Dataset("birthwt", "birthwt.csv", "bwt", "MASS birthwt: birth weight on 8 risk factors"),
    Dataset("cpus", "cpus.csv", "perf", "MASS cpus: CPU performance on 6 hardware figures"),
    Dataset("geyser", "geyser.csv", "waiting", "MASS geyser: Old Faithful's waiting time on the eruption's length"),
    Dataset("gagurine", "gagurine.csv", "GAG", "MASS GAGurine: urine GAG concentration on age"),
    Dataset("chickweight", "chickweight.csv", "weight", "datasets ChickWeight: weight on age and diet"),
    Dataset("quakes", "quakes.csv", "mag", "datasets quakes: magnitude on position, depth and stations"),
]
R_EXPORT = r"""
suppressMessages(library(MASS))
out <- commandArgs(trailingOnly = TRUE)[1]
w <- function(d, f) write.csv(d, file.path(out, f), row.names = FALSE)
w(data.frame(Insul = as.numeric(whiteside$Insul == "After"), Temp = whiteside$Temp, Gas = whiteside$Gas),
  "whiteside.csv")
w(LifeCycleSavings, "lifecycle.csv")
w(hills[, c("dist", "climb", "time")], "hills.csv")
w(na.omit(airquality[, c("Solar.R", "Wind", "Temp", "Ozone")]), "airquality.csv")
w(birthwt[, c("age", "lwt", "race", "smoke", "ptl", "ht", "ui", "ftv", "bwt")], "birthwt.csv")
w(cpus[, c("syct", "mmin", "mmax", "cach", "chmin", "chmax", "perf")], "cpus.csv")
w(geyser[, c("duration", "waiting")], "geyser.csv")
w(GAGurine, "gagurine.csv")
w(data.frame(Time = ChickWeight$Time, Diet = as.numeric(ChickWeight$Diet), weight = ChickWeight$weight),
  "chickweight.csv")
w(quakes[, c("lat", "long", "depth", "stations", "mag")], "quakes.csv")
"""


def export_r_datasets(folder: Path) -> list[Dataset]:
    """Write `R_DATASETS` as CSV files into ``folder`` with the local R; a RuntimeError when R
    (with MASS, one of its recommended packages) cannot."""
    if shutil.which("Rscript") is None:
        raise RuntimeError("--r-datasets: R is not installed here (Debian: r-base-core); the data come from R")
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "export.R"
    script.write_text(R_EXPORT)
    result = subprocess.run(["Rscript", str(script), str(folder)], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"--r-datasets: R could not export the data sets: {result.stderr.strip()[-400:]}")
    return [Dataset(d.name, str(folder / d.file), d.target, d.about) for d in R_DATASETS]


def split_rows(n: int) -> list[int]:
    """The test rows (0-based) of a data set of n rows: a quarter, drawn with SPLIT_SEED."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return sorted(int(i) for i in order[n - round(TEST_FRACTION * n) :])

COLUMNS = [
    "dataset",
    "n_train",
    "n_test",
    "d",
    "method",
    "k",
    "heldout_loglik_per_point",
    "heldout_mse",
    "fit_seconds",
    "predict_seconds",
    "max_r_hat",
    "figures",
]

LEAST_SQUARES = "least squares"
FLEXMIX_BIC = "flexmix (k by BIC)"
FLEXMIX_HINDSIGHT = "flexmix (best k in hindsight)"
PACKAGE_POINT = "numpyro-moe (auto k, point fit)"
PACKAGE_NUTS = "numpyro-moe (NUTS posterior)"


# ----------------------------------------------------------------------------------------- data


def read_table(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return [name.strip() for name in rows[0]], np.array(rows[1:], dtype=float)


def write_table(path: Path, header: list[str], values: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[repr(float(v)) for v in row] for row in values])


def make_splits() -> dict[str, list[int]]:
    """The test rows of every data set (0-based data rows), drawn once with SPLIT_SEED."""
    return {dataset.name: split_rows(read_table(DATA / dataset.file)[1].shape[0]) for dataset in DATASETS}


def load_splits() -> dict[str, list[int]]:
    if not SPLITS.exists():
        SPLITS.write_text(json.dumps(make_splits()) + "\n")
        print(f"wrote the fixed split to {SPLITS}")
    return json.loads(SPLITS.read_text())


@dataclass
class Split:
    dataset: Dataset
    features: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_csv: Path
    test_csv: Path


def prepare(dataset: Dataset, test_rows: list[int], folder: Path) -> Split:
    header, values = read_table(DATA / dataset.file)
    test = np.zeros(values.shape[0], bool)
    test[test_rows] = True
    folder.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = folder / "train.csv", folder / "test.csv"
    write_table(train_csv, header, values[~test])
    write_table(test_csv, header, values[test])
    target = header.index(dataset.target)
    features = [name for name in header if name != dataset.target]
    columns = [header.index(name) for name in features]
    return Split(
        dataset,
        features,
        values[~test][:, columns],
        values[~test][:, target],
        values[test][:, columns],
        values[test][:, target],
        train_csv,
        test_csv,
    )


def row(split: Split, method: str, **figures) -> dict:
    base = {
        "dataset": split.dataset.name,
        "n_train": len(split.y_train),
        "n_test": len(split.y_test),
        "d": len(split.features),
        "method": method,
        "k": "",
        "heldout_loglik_per_point": math.nan,
        "heldout_mse": math.nan,
        "fit_seconds": math.nan,
        "predict_seconds": math.nan,
        "max_r_hat": math.nan,
        "figures": "measured",
    }
    base.update(figures)
    return base


# -------------------------------------------------------------------------------- least squares


def least_squares(split: Split) -> dict:
    start = time.perf_counter()
    design = np.column_stack([np.ones(len(split.y_train)), split.x_train])
    coefficients, *_ = np.linalg.lstsq(design, split.y_train, rcond=None)
    variance = np.mean((split.y_train - design @ coefficients) ** 2)  # ML, divides by n
    seconds = time.perf_counter() - start
    mean = np.column_stack([np.ones(len(split.y_test)), split.x_test]) @ coefficients
    log_density = -0.5 * (np.log(2 * np.pi * variance) + (split.y_test - mean) ** 2 / variance)
    return row(
        split,
        LEAST_SQUARES,
        k=1,
        heldout_loglik_per_point=float(np.mean(log_density)),
        heldout_mse=float(np.mean((split.y_test - mean) ** 2)),
        fit_seconds=seconds,
        log_densities=log_density,
    )


# -------------------------------------------------------------------------------------- flexmix

_FLEXMIX = r"""
suppressMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
train <- read.csv(args[1])
test <- read.csv(args[2])
target <- args[3]
features <- setdiff(names(train), target)
rhs <- paste(features, collapse = " + ")
experts <- as.formula(paste(target, "~", rhs))
gate <- as.formula(paste("~", rhs))
ks <- eval(parse(text = args[5]))
set.seed(as.integer(args[7]))
elapsed <- system.time(
  steps <- stepFlexmix(experts, data = train, k = ks, nrep = as.integer(args[6]),
                       concomitant = FLXPmultinom(gate), verbose = FALSE)
)[["elapsed"]]

# Log predictive density of each row of `data` under a fitted model, from its parameters.
log_density <- function(model, data) {
  X <- model.matrix(gate, data)
  y <- data[[target]]
  k <- model@k
  coefficients <- parameters(model)
  beta <- coefficients[paste0("coef.", colnames(X)), , drop = FALSE]
  sigma <- coefficients["sigma", ]
  means <- X %*% beta                                         # n x k
  if (k > 1) {
    eta <- X %*% parameters(model, which = "concomitant")[colnames(X), , drop = FALSE]
    log_gate <- eta - apply(eta, 1, max)
    log_gate <- log_gate - log(rowSums(exp(log_gate)))        # log softmax
  } else {
    log_gate <- matrix(0, nrow(X), 1)
  }
  terms <- log_gate + dnorm(y, means, matrix(sigma, nrow(X), k, byrow = TRUE), log = TRUE)
  top <- apply(terms, 1, max)
  list(log_density = top + log(rowSums(exp(terms - top))),
       mean = rowSums(exp(log_gate) * means), gate = exp(log_gate), means = means)
}

# Check of the hand-written density against flexmix's own prior() and predict() on the test rows.
# prior() exponentiates the gate's linear predictors without subtracting their maximum: where an
# unpenalised gate is near separation it overflows to NaN on some rows (the log-softmax above does
# not), so the check compares the rows where flexmix's own figures are finite.
check <- function(model, held) {
  gate <- prior(model, newdata = test)
  if (!any(is.finite(gate))) return(NA)
  gate_error <- max(abs(gate - held$gate), na.rm = TRUE)
  mean_error <- max(abs(do.call(cbind, predict(model, newdata = test)) - held$means), na.rm = TRUE)
  max(gate_error, mean_error / max(1, max(abs(held$means))))
}

chosen <- getModel(steps, "BIC")
rows <- list()
for (label in c("BIC", names(steps@models))) {
  model <- if (label == "BIC") chosen else steps@models[[label]]
  held <- log_density(model, test)
  rows[[length(rows) + 1]] <- data.frame(
    model = if (label == "BIC") "BIC" else paste0("k=", label),
    k_requested = if (label == "BIC") NA else as.integer(label),
    k = model@k,
    heldout_loglik_per_point = mean(held$log_density),
    heldout_mse = mean((test[[target]] - held$mean)^2),
    bic = BIC(model),
    train_loglik_per_point = as.numeric(logLik(model)) / nrow(train),
    check_against_flexmix = check(model, held),
    converged = model@converged
  )
}
write.csv(do.call(rbind, rows), args[4], row.names = FALSE)
cat(elapsed, "\n")
"""


def flexmix_status() -> str | None:
    """None when Rscript and flexmix are usable here, else what is missing."""
    if shutil.which("Rscript") is None:
        return "R is not installed here (Debian: r-base-core, r-cran-flexmix)"
    check = subprocess.run(["Rscript", "-e", "library(flexmix)"], check=False, capture_output=True, text=True)
    if check.returncode != 0:
        return "the R package flexmix is missing (Debian: r-cran-flexmix)"
    return None


def flexmix(split: Split, folder: Path) -> tuple[list[dict], list[dict]]:
    """Rows for the table (k by BIC, best k in hindsight) and every model's figures."""
    script, out = folder / "flexmix.R", folder / "flexmix_models.csv"
    script.write_text(_FLEXMIX)
    command = [
        "Rscript",
        str(script),
        str(split.train_csv),
        str(split.test_csv),
        split.dataset.target,
        str(out),
        FLEXMIX_KS,
        str(FLEXMIX_REPLICATES),
        str(FLEXMIX_SEED),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"flexmix failed: {result.stderr.strip()[-800:]}")
    seconds = float(result.stdout.split()[-1])
    with open(out, newline="") as handle:
        models = list(csv.DictReader(handle))
    for model in models:
        if not float(model["check_against_flexmix"]) < 1e-8:
            raise RuntimeError(
                f"flexmix: the held-out gate or means disagree with flexmix's prior()/predict() "
                f"({model['model']}: off by {model['check_against_flexmix']})"
            )
    chosen = next(model for model in models if model["model"] == "BIC")
    per_k = [model for model in models if model["model"] != "BIC"]
    best = max(per_k, key=lambda model: float(model["heldout_loglik_per_point"]))
    table = [
        row(
            split,
            FLEXMIX_BIC,
            k=int(chosen["k"]),
            heldout_loglik_per_point=float(chosen["heldout_loglik_per_point"]),
            heldout_mse=float(chosen["heldout_mse"]),
            fit_seconds=seconds,
        ),
        row(
            split,
            FLEXMIX_HINDSIGHT,
            k=int(best["k"]),
            heldout_loglik_per_point=float(best["heldout_loglik_per_point"]),
            heldout_mse=float(best["heldout_mse"]),
            fit_seconds=seconds,
        ),
    ]
    detail = [
        {
            "dataset": split.dataset.name,
            "n_train": len(split.y_train),
            "n_test": len(split.y_test),
            "d": len(split.features),
            **model,
            "stepflexmix_seconds": seconds,
            "rscript_wall_seconds": wall,
        }
        for model in models
    ]
    return table, detail


def saved_flexmix(names: list[str]) -> tuple[list[dict], str]:
    """The last run's flexmix rows for these data sets, labelled as saved figures."""
    path = RESULTS / "real_data_flexmix.csv"
    if not path.exists():
        return [], f"no saved flexmix figures either ({path} is absent)"
    with open(path, newline="") as handle:
        saved = [line for line in csv.DictReader(handle) if line["dataset"] in names]
    if not saved:
        return [], f"{path} holds no flexmix figures for these data sets"
    rows = []
    for name in names:
        models = [line for line in saved if line["dataset"] == name]
        if not models:
            continue
        when = models[0].get("run_date", "an earlier run")
        chosen = next(model for model in models if model["model"] == "BIC")
        per_k = [model for model in models if model["model"] != "BIC"]
        best = max(per_k, key=lambda model: float(model["heldout_loglik_per_point"]))
        for method, model in ((FLEXMIX_BIC, chosen), (FLEXMIX_HINDSIGHT, best)):
            rows.append(
                {
                    "dataset": name,
                    "n_train": int(model["n_train"]),
                    "n_test": model.get("n_test", ""),
                    "d": int(model["d"]),
                    "method": method,
                    "k": int(model["k"]),
                    "heldout_loglik_per_point": float(model["heldout_loglik_per_point"]),
                    "heldout_mse": float(model["heldout_mse"]),
                    "fit_seconds": float(model["stepflexmix_seconds"]),
                    "predict_seconds": math.nan,
                    "max_r_hat": math.nan,
                    "figures": f"SAVED ({when})",
                }
            )
    return rows, f"printing flexmix's figures saved by an earlier run (its date in the notes) from {path}"


# ---------------------------------------------------------------------------------- numpyro-moe


def cli_path() -> Path:
    local = Path(sys.executable).parent / "numpyro-moe"
    if local.exists():
        return local
    found = shutil.which("numpyro-moe")
    return Path(found) if found else local


def cli_status(cli: Path) -> str | None:
    """None when the CLI has what the benchmark runs, else what is missing."""
    if not cli.exists():
        return f"the numpyro-moe command is not installed ({cli})"
    missing = []
    fit_help = subprocess.run([str(cli), "fit", "--help"], check=False, capture_output=True, text=True)
    predict_help = subprocess.run(
        [str(cli), "predict", "--help"], check=False, capture_output=True, text=True
    )
    if fit_help.returncode != 0:
        return "`numpyro-moe fit --help` fails"
    if "auto" not in fit_help.stdout:
        missing.append("`fit --experts auto`")
    if "--quiet" not in fit_help.stdout:
        missing.append("`fit --quiet`")
    if predict_help.returncode != 0:
        missing.append("the `predict` command")
    else:
        for flag in ("--out", "--point", "--quiet"):
            if flag not in predict_help.stdout:
                missing.append(f"`predict {flag}`")
    if missing:
        return "the numpyro-moe command line here lacks " + ", ".join(missing)
    return None


def timed(command: list[str], environment: dict[str, str] | None) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, env=environment
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        shown = " ".join(command[1:3])
        raise RuntimeError(
            f"`numpyro-moe {shown} ...` failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-800:]}"
        )
    return seconds


def fitted_num_experts(folder: Path) -> int:
    """The k of a fit folder: model.json's ``num_experts``, else the experts in parameters.csv."""
    model = folder / "model.json"
    if model.exists():
        return int(json.loads(model.read_text())["num_experts"])
    lines = (folder / "parameters.csv").read_text().splitlines()
    return sum(1 for line in lines if line.startswith("expert "))


def read_prediction(path: Path, y_test: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Held-out log-likelihood per point, MSE, and each test row's log density, from a prediction CSV."""
    with open(path, newline="") as handle:
        lines = list(csv.DictReader(handle))
    if len(lines) != len(y_test):
        raise RuntimeError(f"{path.name} has {len(lines)} rows for {len(y_test)} test rows")
    mean = np.array([float(line["mean"]) for line in lines])
    log_density = np.array([float(line["log_density"]) for line in lines])
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(log_density))):
        raise RuntimeError(f"{path.name} holds non-finite predictions")
    return float(np.mean(log_density)), float(np.mean((y_test - mean) ** 2)), log_density


def max_r_hat(folder: Path) -> float:
    with open(folder / "summary.csv", newline="") as handle:
        values = [float(line["r_hat"]) for line in csv.DictReader(handle) if line.get("r_hat")]
    return max(values) if values else math.nan


def numpyro_moe(
    split: Split, folder: Path, cli: Path, *, nuts: bool, environment: dict[str, str] | None
) -> tuple[list[dict], list[str]]:
    """The package's rows: the point fit at its own k, and (with ``nuts``) the posterior from that
    fit (``--experts auto --nuts``: the chains start at the point fit, as a user's one command runs
    them; a separate ``--experts K`` run would be another EM run at K, from other starts)."""
    train, test, target = str(split.train_csv), str(split.test_csv), split.dataset.target
    rows, notes = [], []
    point_dir, point_csv = folder / "moe_point", folder / "pred_point.csv"
    try:
        fit_command = [str(cli), "fit", train, "--target", target, "--experts", "auto"]
        fit_s = timed([*fit_command, "--out", str(point_dir), "--quiet"], environment)
        predict_command = [str(cli), "predict", str(point_dir), test, "--out", str(point_csv), "--point"]
        predict_s = timed([*predict_command, "--quiet"], environment)
        k = fitted_num_experts(point_dir)
        loglik, mse, densities = read_prediction(point_csv, split.y_test)
        figures = {"heldout_loglik_per_point": loglik, "heldout_mse": mse, "log_densities": densities}
        rows.append(row(split, PACKAGE_POINT, k=k, fit_seconds=fit_s, predict_seconds=predict_s, **figures))
    except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as error:
        notes.append(f"{split.dataset.name}: numpyro-moe point fit: {error}")
        return rows, notes
    if not nuts:
        return rows, notes
    nuts_dir, nuts_csv = folder / "moe_nuts", folder / "pred_nuts.csv"
    try:
        fit_command = [str(cli), "fit", train, "--target", target, "--experts", "auto", "--nuts"]
        fit_s = timed([*fit_command, "--out", str(nuts_dir), "--quiet"], environment)
        predict_command = [str(cli), "predict", str(nuts_dir), test, "--out", str(nuts_csv)]
        predict_s = timed([*predict_command, "--quiet"], environment)
        loglik, mse, densities = read_prediction(nuts_csv, split.y_test)
        figures = {
            "heldout_loglik_per_point": loglik, "heldout_mse": mse, "max_r_hat": max_r_hat(nuts_dir),
            "log_densities": densities,
        }
        k = fitted_num_experts(nuts_dir)
        rows.append(row(split, PACKAGE_NUTS, k=k, fit_seconds=fit_s, predict_seconds=predict_s, **figures))
    except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as error:
        notes.append(f"{split.dataset.name}: numpyro-moe NUTS: {error}")
    return rows, notes


# ------------------------------------------------------------------------------------ reporting


def _number(value, spec: str) -> str:
    if value == "" or value is None:
        return "-"
    value = float(value)
    return "-" if math.isnan(value) else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'data set':12s} {'n_train':>7s} {'d':>3s}  {'method':34s} {'k':>2s} {'loglik/pt':>10s} "
        f"{'MSE':>11s} {'time s':>8s}  notes"
    )
    print(header)
    print("-" * len(header))
    for line in rows:
        notes = []
        if not math.isnan(float(line["predict_seconds"])):
            notes.append(f"predict {float(line['predict_seconds']):.1f} s")
        if not math.isnan(float(line["max_r_hat"])):
            notes.append(f"max r_hat {float(line['max_r_hat']):.3f}")
        if line["figures"] != "measured":
            notes.append(line["figures"])
        loglik = _number(line["heldout_loglik_per_point"], ".4f")
        mse = _number(line["heldout_mse"], ".5g")
        seconds = _number(line["fit_seconds"], ".2f")
        print(
            f"{line['dataset']:12s} {line['n_train']:>7} {line['d']:>3}  {line['method']:34s} "
            f"{line['k']!s:>2s} {loglik:>10s} {mse:>11s} {seconds:>8s}  {', '.join(notes)}"
        )


def _compare(label: str, other: dict | None, value: float, key: str, higher_is_better: bool) -> str:
    if other is None:
        return f"{label}: not measured"
    theirs = float(other[key])
    ok = value >= theirs if higher_is_better else value <= theirs
    saved = "" if other["figures"] == "measured" else " [saved figure]"
    return f"{label} {'PASS' if ok else 'FAIL'} ({theirs:.4g}{saved})"


def _paired_difference(package: dict, least: dict | None) -> str | None:
    """The package's held-out log density minus least squares', row by row: its mean and standard
    error over the test rows (as ``arviz.compare``'s dse), to tell a loss from a tie on a small
    test set."""
    if least is None or "log_densities" not in package or "log_densities" not in least:
        return None
    difference = np.asarray(package["log_densities"]) - np.asarray(least["log_densities"])
    mean, se = float(np.mean(difference)), float(np.std(difference, ddof=1) / np.sqrt(len(difference)))
    ratio = f" ({mean / se:+.1f} SE)" if se > 0 else ""
    return f"loglik minus least squares' row by row: {mean:+.4f} per point, standard error {se:.4f}{ratio}"


def verdicts(rows: list[dict], names: list[str]) -> None:
    print(
        "\nVerdict against issue 13's targets (package >= flexmix(BIC) and >= least squares in "
        "held-out loglik, MSE <= least squares):"
    )
    for name in names:
        mine = {line["method"]: line for line in rows if line["dataset"] == name}
        least = mine.get(LEAST_SQUARES)
        for method in (PACKAGE_POINT, PACKAGE_NUTS):
            package = mine.get(method)
            if package is None:
                continue
            loglik, mse = float(package["heldout_loglik_per_point"]), float(package["heldout_mse"])
            loglik_key = "heldout_loglik_per_point"
            checks = [
                _compare("loglik >= flexmix(BIC)", mine.get(FLEXMIX_BIC), loglik, loglik_key, True),
                _compare("loglik >= least squares", least, loglik, loglik_key, True),
                _compare("MSE <= least squares", least, mse, "heldout_mse", False),
                _compare(
                    "loglik >= flexmix best k in hindsight",
                    mine.get(FLEXMIX_HINDSIGHT),
                    loglik,
                    loglik_key,
                    True,
                ),
            ]
            print(f"  {name:12s} {method} (loglik {loglik:.4f}, MSE {mse:.5g}):\n      " + "; ".join(checks))
            paired = _paired_difference(package, least)
            if paired is not None:
                print(f"      {paired}")
        if not any(method in mine for method in (PACKAGE_POINT, PACKAGE_NUTS)):
            print(f"  {name:12s} no numpyro-moe figures, no verdict")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for line in rows:
            writer.writerow(
                {
                    key: ("" if isinstance(value, float) and math.isnan(value) else value)
                    for key, value in line.items()
                }
            )


# ----------------------------------------------------------------------------------------- main


class _Tee(io.TextIOBase):
    """Standard output that also keeps what it printed (the run's log, written beside its table)."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        return self.kept.write(text)

    def flush(self) -> None:
        self.stream.flush()


def main() -> int:
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        return _run(tee)
    finally:
        sys.stdout = tee.stream


def _run(tee: _Tee) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the two smallest data sets, no NUTS")
    parser.add_argument("--skip-flexmix", action="store_true")
    parser.add_argument("--skip-nuts", action="store_true")
    parser.add_argument("--datasets", help=f"comma-separated, from {', '.join(BY_NAME)} (or, with --r-datasets, "
                        f"{', '.join(d.name for d in R_DATASETS)})")
    parser.add_argument(
        "--r-datasets",
        action="store_true",
        help="the ten R data sets of R_DATASETS (MASS, datasets; exported by the local R) instead of benchmarks/data; "
        "results in real_data_r.csv",
    )
    parser.add_argument("--keep", metavar="DIR", help="keep the splits, fits and predictions in DIR (new)")
    parser.add_argument(
        "--compilation-cache",
        choices=["fresh", "user"],
        default="fresh",
        help="numpyro-moe's JAX compilation cache: a new empty one for this run (default: the times of a "
        "user's first run on these data), or the user's own (~/.cache/numpyro-moe/jax, warm after a run)",
    )
    args = parser.parse_args()

    catalogue = R_DATASETS if args.r_datasets else DATASETS
    by_name = {dataset.name: dataset for dataset in catalogue}
    if args.datasets:
        names = [name.strip() for name in args.datasets.split(",") if name.strip()]
        unknown = [name for name in names if name not in by_name]
        if unknown:
            parser.error(f"--datasets: unknown {unknown}; choose from {list(by_name)}")
    else:
        names = [dataset.name for dataset in catalogue[: 2 if args.quick else None]]
    nuts = not (args.quick or args.skip_nuts)
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=False)
    else:
        work = Path(tempfile.mkdtemp(prefix="real_data-"))
    if args.r_datasets:
        try:
            by_name = {dataset.name: dataset for dataset in export_r_datasets(work / "r-data")}
        except RuntimeError as error:
            print(error)
            return 1
        splits = {name: split_rows(read_table(DATA / by_name[name].file)[1].shape[0]) for name in names}
        print(f"exported {len(by_name)} R data sets to {work / 'r-data'} (the split: {TEST_FRACTION:.0%} test rows drawn "
              f"with seed {SPLIT_SEED})")
    else:
        splits = load_splits()

    missing = []
    flexmix_missing = "skipped (--skip-flexmix)" if args.skip_flexmix else flexmix_status()
    cli = cli_path()
    cli_missing = cli_status(cli)
    if flexmix_missing:
        missing.append(f"flexmix: {flexmix_missing}")
    if cli_missing:
        missing.append(f"numpyro-moe: {cli_missing}; its rows are left out")
    if not nuts:
        missing.append("numpyro-moe NUTS: skipped (" + ("--quick" if args.quick else "--skip-nuts") + ")")

    if args.compilation_cache == "fresh":
        environment = {**os.environ, "NUMPYRO_MOE_CACHE": str(work / "jax-cache")}
        print("numpyro-moe runs with a new, empty compilation cache: its times are a first run's")
    else:
        environment = None
        print("numpyro-moe runs with the user's compilation cache: its times may be a repeated run's")

    started = time.perf_counter()
    rows, flexmix_detail, notes = [], [], []
    for name in names:
        dataset = by_name[name]
        split = prepare(dataset, splits[name], work / name)
        print(
            f"{name}: {dataset.about}; {len(split.y_train)} train / {len(split.y_test)} test rows, "
            f"d={len(split.features)}",
            flush=True,
        )
        rows.append(least_squares(split))
        if not flexmix_missing:
            try:
                table, detail = flexmix(split, work / name)
                rows.extend(table)
                flexmix_detail.extend(detail)
                print(f"  flexmix: {table[0]['fit_seconds']:.1f} s", flush=True)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                notes.append(f"{name}: {error}")
        if not cli_missing:
            package_rows, package_notes = numpyro_moe(
                split, work / name, cli, nuts=nuts, environment=environment
            )
            rows.extend(package_rows)
            notes.extend(package_notes)
            for line in package_rows:
                print(f"  {line['method']}: k={line['k']}, fit {line['fit_seconds']:.1f} s", flush=True)
    if flexmix_missing and not args.skip_flexmix and not args.r_datasets:
        saved, message = saved_flexmix(names)
        missing.append(f"flexmix: {message}")
        rows.extend(saved)
    order = [LEAST_SQUARES, FLEXMIX_BIC, FLEXMIX_HINDSIGHT, PACKAGE_POINT, PACKAGE_NUTS]
    rows.sort(key=lambda line: (names.index(line["dataset"]), order.index(line["method"])))

    print()
    print_table(rows)
    verdicts(rows, names)
    if missing or notes:
        print("\nMissing or failed:")
        for line in missing + notes:
            print(f"  {line}")
    stem = "real_data_r" if args.r_datasets else "real_data"
    # A run over some of the data sets (--datasets) writes into its own folder: the files in
    # benchmarks/results each come from one complete run, with its log.
    folder = work if args.datasets else RESULTS
    table_path = folder / (f"{stem}_quick.csv" if args.quick else f"{stem}.csv")
    write_csv(table_path, rows, COLUMNS)
    if flexmix_detail:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        for line in flexmix_detail:
            line["run_date"] = stamp
        kept = []
        previous = folder / f"{stem}_flexmix.csv"
        if previous.exists():  # keep the saved figures of data sets not run this time
            with open(previous, newline="") as handle:
                ran = {line["dataset"] for line in flexmix_detail}
                kept = [line for line in csv.DictReader(handle) if line["dataset"] not in ran]
        write_csv(previous, kept + flexmix_detail, list(flexmix_detail[0]))
    print(
        f"\ntable written to {table_path}"
        + (f"; flexmix's figures to {previous}" if flexmix_detail else "")
    )
    if args.keep or args.datasets:
        print(f"splits, fits and predictions kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    log_path = table_path.with_suffix(".txt")
    log_path.write_text(tee.kept.getvalue())
    print(f"log written to {log_path}", file=tee.stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
