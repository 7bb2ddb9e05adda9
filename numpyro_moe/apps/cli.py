"""The ``numpyro-moe`` command line."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


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
    )
    return 0


def _fit(args: argparse.Namespace) -> int:
    import numpyro

    numpyro.set_host_device_count(max(args.chains, 1))
    numpyro.enable_x64()
    from pathlib import Path

    from numpyro_moe.apps.csv_workflow import fit_csv

    out = args.out or f"{Path(args.data).stem}-moe-k{args.experts}"
    fit_csv(
        args.data,
        target=args.target,
        num_experts=args.experts,
        out=out,
        link=args.link,
        features=args.features.split(",") if args.features else None,
        nuts=args.nuts,
        seed=args.seed,
        num_starts=args.starts,
        num_chains=args.chains,
        num_warmup=args.num_warmup,
        num_samples=args.num_draws,
        overwrite=args.overwrite,
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
    demo.set_defaults(run=_demo)

    fit = commands.add_parser(
        "fit", help="fit a CSV file: standardise, estimate, EM (and NUTS); write results"
    )
    fit.add_argument("data", metavar="DATA.csv", help="numeric CSV with a header row")
    fit.add_argument("--target", required=True, help="name of the response column")
    fit.add_argument("--experts", type=int, required=True, help="number of experts k")
    fit.add_argument("--link", default="linear", help="expert link: linear, sigmoid, relu or tanh")
    fit.add_argument("--features", help="comma-separated feature columns (default: all but the target)")
    fit.add_argument("--nuts", action="store_true", help="also run NUTS from the fit and write a DataTree")
    fit.add_argument("--out", help="output folder (default: <DATA>-moe-k<K>)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--starts", type=int, default=5, help="EM starts: the tensor estimate and random ones")
    fit.add_argument("--chains", type=int, default=4)
    fit.add_argument("--num-warmup", type=int, default=500)
    fit.add_argument("--num-draws", type=int, default=500)
    fit.set_defaults(run=_fit)

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
        return args.run(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as error:
        print(f"numpyro-moe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
