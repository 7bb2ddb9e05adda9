"""The ``numpyro-moe`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "main", "parse_experts"]

# The choices of csv_workflow.CRITERIA and tables.MISSING_POLICIES, spelt here so that parsing
# the command line (and --help) does not import JAX.
CRITERIA = ("auto", "bic", "icl", "cv")
MISSING_POLICIES = ("error", "drop")


def _demo(args: argparse.Namespace) -> int:
    import numpyro

    # Before JAX starts: one host device per chain, so that NUTS chains run in parallel.
    numpyro.set_host_device_count(max(args.chains, 1))
    numpyro.enable_x64()
    from numpyro_moe.apps.demo import run_demo

    out = args.out or time.strftime("numpyro-moe-demo-%Y%m%d-%H%M%S")
    run_demo(
        out,
        seed=args.seed,
        num_samples=args.num_samples,
        dim=args.dim,
        num_experts=args.experts,
        noise=args.noise,
        link=args.link,
        num_starts=args.starts,
        nuts=args.nuts,
        nuts_samples=args.nuts_samples,
        num_chains=args.chains,
        num_warmup=args.num_warmup,
        num_draws=args.num_draws,
        overwrite=args.overwrite,
        verbose=not args.quiet,
    )
    return 0


def parse_experts(text: str):
    """``--experts``: ``auto``, ``K``, ``A-B`` (every k from A to B) or ``K1,K2,...``."""
    text = text.strip()
    expected = f"--experts: expected auto, K, A-B or K1,K2,... (integers >= 1), got {text!r}"
    if text == "auto":
        return "auto"
    try:
        if "," in text:
            return tuple(int(part) for part in text.split(","))
        first, dash, last = text.partition("-")
        if dash and first:  # "A-B"; a lone "-2" is a (bad) integer, refused by fit_csv
            first, last = int(first), int(last)
            if not 1 <= first <= last:
                raise ValueError(expected + ": A-B needs 1 <= A <= B")
            return tuple(range(first, last + 1))
        return int(text)
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith("--experts") else expected) from None


def _one_hot(text: str | None):
    if text is None:
        return ()
    return "all" if text.strip() == "all" else [name.strip() for name in text.split(",") if name.strip()]


def _prior_scale(text: str | None) -> float | str | None:
    """``--expert-prior-scale``: ``auto``, a positive number (checked by `fit_csv`), or None (the
    default: 1, widened while it binds)."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--expert-prior-scale: expected a positive number or 'auto', got {text!r}") from None


def _df(text: str) -> float | None:
    """``--df``: ``auto`` (estimate) or a positive number."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"--df: expected a positive number or auto, got {text!r}")
    return value


def _fit(args: argparse.Namespace) -> int:
    # What can be checked without JAX is checked first: a mistyped name or flag costs a moment,
    # not the seconds of importing JAX and NumPyro (fit_csv checks all of it again).
    from numpyro_moe.apps.folders import existing_file, refuse_existing

    num_experts = parse_experts(args.experts)
    prior_scale, df = _prior_scale(args.expert_prior_scale), _df(args.df)
    existing_file(args.data, "DATA")
    single = isinstance(num_experts, int) or (isinstance(num_experts, tuple) and len(set(num_experts)) == 1)
    if args.out:
        out = args.out
    elif single:
        out = f"{Path(args.data).stem}-moe-k{num_experts if isinstance(num_experts, int) else num_experts[0]}"
    else:
        out = f"{Path(args.data).stem}-moe"
    refuse_existing(out, overwrite=args.overwrite)

    import numpyro

    numpyro.set_host_device_count(max(args.chains, 1))
    numpyro.enable_x64()

    from numpyro_moe.apps.csv_workflow import fit_csv

    fit_csv(
        args.data,
        target=args.target,
        num_experts=num_experts,
        criterion=args.criterion,
        out=out,
        link=args.link,
        features=[name.strip() for name in args.features.split(",")] if args.features else None,
        gate_features=args.gate_features,
        missing=args.missing,
        one_hot=_one_hot(args.one_hot),
        shared_noise=args.shared_noise,
        expert_prior_scale=prior_scale,
        family=args.family,
        df=df,
        design=args.design,
        nuts=args.nuts,
        seed=args.seed,
        num_starts=args.starts,
        num_finalists=args.finalists,
        num_chains=args.chains,
        num_warmup=args.num_warmup,
        num_samples=args.num_draws,
        max_samples=args.max_draws,
        target_accept_prob=args.target_accept,
        max_iterations=args.max_iterations,
        overwrite=args.overwrite,
        verbose=not args.quiet,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    # As in _fit: missing inputs are reported before JAX is imported (predict_csv checks again).
    from numpyro_moe.apps.folders import existing_file, existing_fit_folder

    existing_fit_folder(args.fit_dir)
    existing_file(args.data, "DATA")

    import numpyro

    numpyro.enable_x64()  # the fits are float64
    from numpyro_moe.apps.predict import predict_csv

    predict_csv(
        args.fit_dir,
        args.data,
        out=args.out,
        point=args.point,
        interval=args.interval,
        seed=args.seed,
        missing=args.missing,
        overwrite=args.overwrite,
        verbose=not args.quiet,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-moe", description="Mixture-of-experts regression in NumPyro."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="simulate the papers' setting, fit (tensor method -> EM -> small NUTS), print recovery against "
        "the truth",
    )
    demo.add_argument("--out", help="output folder (default: numpyro-moe-demo-<timestamp>)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-samples", type=int, default=20_000)
    demo.add_argument("--dim", type=int, default=10)
    demo.add_argument("--experts", type=int, default=3)
    demo.add_argument("--noise", type=float, default=0.1)
    demo.add_argument("--link", default="linear")
    demo.add_argument("--starts", type=int, default=10, help="random starts of the best-of EM baseline")
    demo.add_argument("--no-nuts", dest="nuts", action="store_false", help="skip the NUTS stage")
    demo.add_argument(
        "--nuts-samples", type=int, default=2000, help="NUTS runs on the first this many training rows"
    )
    demo.add_argument("--chains", type=int, default=2, help="NUTS chains (run in parallel)")
    demo.add_argument("--num-warmup", type=int, default=1000, help="NUTS warmup iterations per chain")
    demo.add_argument("--num-draws", type=int, default=1000, help="NUTS draws per chain")
    demo.add_argument("--quiet", action="store_true", help="print only errors and warnings that matter")
    demo.set_defaults(run=_demo)

    fit = commands.add_parser(
        "fit",
        help="fit a CSV file: standardise, choose k, estimate, EM (and NUTS); write a fit folder",
        description="Fit a mixture of experts to a CSV file and write a fit folder that numpyro-moe predict "
        "reads: model.json (columns, encoding, standardisation, model, k-selection table), fit.npz, "
        "parameters.csv, summary.txt, plots (and posterior.nc with --nuts).",
    )
    fit.add_argument(
        "data", metavar="DATA.csv", help="CSV with a header row (row names are detected and dropped)"
    )
    fit.add_argument("--target", required=True, help="name of the response column (numeric)")
    fit.add_argument(
        "--experts",
        default="auto",
        metavar="auto|K|A-B|K1,K2,...",
        help="number of experts k; several are compared by --criterion and the best kept (default: auto = "
        "1-5, leaving out those the rows cannot support)",
    )
    fit.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="auto",
        help="how k is chosen among several, lowest wins: auto (the default: cv on at most 2,000 rows, bic on "
        "more), bic, icl, or cv (5-fold cross-validated log-likelihood as a deviance: 6 fits per k, for small "
        "data sets, where BIC and held-out fit disagree)",
    )
    fit.add_argument("--link", default="linear", help="expert link: linear, sigmoid, relu or tanh")
    fit.add_argument(
        "--features",
        help="comma-separated feature columns of the experts (default: all but the target and the gate features)",
    )
    fit.add_argument(
        "--gate-features",
        metavar="COL[,COL]",
        help="columns the gate reads instead of the experts' features (covariates of its own, as flexmix's "
        "concomitant variables; default: the gate reads the experts' features)",
    )
    fit.add_argument(
        "--missing",
        choices=MISSING_POLICIES,
        default="error",
        help="rows with missing values (empty, NA, NaN, N/A, NULL, None, ?, #N/A): refuse them, or drop them",
    )
    fit.add_argument(
        "--one-hot",
        metavar="COL[,COL]|all",
        help="encode these text columns (or all of them) as 0/1 indicator columns, the first level as reference",
    )
    fit.add_argument(
        "--shared-noise", action="store_true", help="one noise sd for all experts (default: one per expert)"
    )
    fit.add_argument(
        "--expert-prior-scale",
        default=None,
        metavar="S|auto",
        help="sd of the Normal prior on the experts' standardised coefficients and intercepts (default: 1, "
        "widened to 3, then 10, while a fitted coefficient lies beyond 2 sd of it, as strongly correlated "
        "columns such as a polynomial basis need, each step kept on data of at most 2,000 rows only when "
        "it predicts held-out rows better by 5-fold cross-validation; auto = chosen among 1, 3 and 10 by 5-fold cross-validation "
        "at the chosen k, on data of at most 2,000 rows, 1 beyond)",
    )
    fit.add_argument(
        "--family",
        choices=("normal", "student_t"),
        default="normal",
        help="the experts' noise: normal, or student_t (robust to outliers)",
    )
    fit.add_argument(
        "--df", default="auto", help="Student-t degrees of freedom: a number > 0, or auto to estimate them"
    )
    fit.add_argument(
        "--design",
        choices=("gaussian", "mixture", "auto"),  # numpyro_moe._design.DESIGNS, without importing JAX
        default="gaussian",
        help="the inputs the tensor start's moments assume: gaussian (default), mixture (score functions of "
        "a density fitted to the features, for skewed, heavy-tailed or multimodal columns) or auto (mixture "
        "when a normality test rejects and there are at least 20,000 rows)",
    )
    fit.add_argument("--nuts", action="store_true", help="also run NUTS from the fit and write a DataTree")
    fit.add_argument("--out", help="output folder (default: <DATA>-moe, or <DATA>-moe-k<K> for one k)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--starts", type=int, default=20, help="EM starts: the tensor estimate and random ones (default 20)"
    )
    fit.add_argument(
        "--finalists",
        type=int,
        default=5,
        help="starts that continue to convergence after a short EM of 10 iterations (default 5; "
        "--finalists equal to --starts runs every start to convergence)",
    )
    fit.add_argument(
        "--max-iterations",
        type=int,
        default=500,
        help="EM iterations per start before it stops unconverged (the chosen fit, if it stopped there, "
        "then continues to convergence by SQUAREM-accelerated EM)",
    )
    fit.add_argument("--chains", type=int, default=4)
    fit.add_argument("--num-warmup", type=int, default=500)
    fit.add_argument("--num-draws", type=int, default=500, help="NUTS draws per chain")
    fit.add_argument(
        "--max-draws",
        type=int,
        help="while the chains disagree (max r_hat > 1.01), draw --num-draws more per chain, up to this "
        "many (default: as many as 2,000,000 rows x draws allow, 4 to 20 x --num-draws: more on small data, "
        "where draws are cheap)",
    )
    fit.add_argument(
        "--target-accept",
        type=float,
        default=0.8,
        help="acceptance rate NUTS tunes its step size to (default 0.8); 0.9 or 0.95 takes smaller steps, "
        "the usual remedy for divergent transitions",
    )
    fit.add_argument("--quiet", action="store_true", help="print only errors and warnings that matter")
    fit.set_defaults(run=_fit)

    predict = commands.add_parser(
        "predict",
        help="predict the rows of a CSV file from a fit folder; write the predictions as CSV",
        description="Predict new data from a fit folder of numpyro-moe fit, in the target's units: mean, "
        "lower, upper, gate_<i>, outside_training and (when the file has the target) log_density. The "
        "posterior draws (posterior.nc) are used when the folder has them, else the point fit.",
    )
    predict.add_argument("fit_dir", metavar="FIT_DIR", help="folder written by numpyro-moe fit")
    predict.add_argument(
        "data",
        metavar="NEW.csv",
        help="CSV with the model's columns (others are ignored; the target is optional)",
    )
    predict.add_argument(
        "--out", metavar="PRED.csv", help="output file (default: <NEW>-predictions.csv beside it)"
    )
    predict.add_argument(
        "--point", action="store_true", help="use the point fit even when there are posterior draws"
    )
    predict.add_argument("--interval", type=float, default=0.9, help="probability of the predictive interval")
    predict.add_argument("--seed", type=int, default=0, help="seed of the predictive draws (the interval)")
    predict.add_argument(
        "--missing",
        choices=MISSING_POLICIES,
        default="error",
        help="rows missing a feature: refuse them, or leave their predictions empty",
    )
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    predict.add_argument("--quiet", action="store_true", help="print only errors and warnings that matter")
    predict.set_defaults(run=_predict)

    models = commands.add_parser("models", help="list or run the ready-made models by name")
    models.add_argument("models_args", nargs=argparse.REMAINDER, metavar="list | run NAME [--quick] [--nuts]")
    models.set_defaults(run=_models)
    return parser


def _models(args: argparse.Namespace) -> int:
    from numpyro_moe.models.__main__ import main as models_main

    return models_main(args.models_args, prog="numpyro-moe models")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``numpyro-moe`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            return args.run(args)
        from numpyro_moe.apps.messages import short_warnings

        with short_warnings(args.command, quiet=args.quiet):
            return args.run(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as error:
        print(f"numpyro-moe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
