"""The ``numpyro-moe`` command line."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import numpyro

    numpyro.enable_x64()
    from numpyro_moe._demo import run_demo

    out = args.out or time.strftime("numpyro-moe-demo-%Y%m%d-%H%M%S")
    run_demo(
        out,
        seed=args.seed,
        num_samples=args.num_samples,
        dim=args.dim,
        num_experts=args.experts,
        noise=args.noise,
        link=args.link,
        num_restarts=args.restarts,
        overwrite=args.overwrite,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-moe", description="Mixture-of-experts regression in NumPyro."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="simulate the papers' setting, fit (tensor method -> EM), print recovery against the truth"
    )
    demo.add_argument("--out", help="output folder (default: numpyro-moe-demo-<timestamp>)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-samples", type=int, default=20_000)
    demo.add_argument("--dim", type=int, default=10)
    demo.add_argument("--experts", type=int, default=3)
    demo.add_argument("--noise", type=float, default=0.1)
    demo.add_argument("--link", default="linear")
    demo.add_argument("--restarts", type=int, default=10, help="random starts of the EM baseline")
    demo.set_defaults(run=_demo)
    return parser


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
