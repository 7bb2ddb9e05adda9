"""``python -m numpyro_moe.models list`` / ``... run NAME [--quick] [--nuts] [--seed S]``."""

import argparse
import sys


def main(argv=None, prog: str = "python -m numpyro_moe.models") -> int:
    import numpyro

    numpyro.set_host_device_count(4)
    numpyro.enable_x64()
    from numpyro_moe.models import MODELS

    parser = argparse.ArgumentParser(prog=prog, description="Ready-made mixture-of-experts models")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the models")
    run = commands.add_parser("run", help="run a model by name")
    run.add_argument("name", help=f"one of {sorted(MODELS)}")
    run.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    run.add_argument("--nuts", action="store_true", help="also sample the posterior with NUTS")
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, module in MODELS.items():
            print(f"{name:22s} {module.DESCRIPTION}")
        return 0
    if args.name not in MODELS:
        print(
            f"{prog} run: error: name: unknown model {args.name!r}; expected one of {sorted(MODELS)}",
            file=sys.stderr,
        )
        return 2
    print(f"{args.name}: {MODELS[args.name].DESCRIPTION}")
    MODELS[args.name].run(quick=args.quick, nuts=args.nuts, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
