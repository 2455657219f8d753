"""Command line: argument parsing only; each subcommand calls one function elsewhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lbs_tune import __version__
from lbs_tune.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from lbs_tune.local import run_local
    from lbs_tune.spec import load_spec, trial_from_spec

    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"device={args.device}")
    config = trial_from_spec(args.spec, overrides)
    out = args.out or Path("runs") / load_spec(args.spec).name
    run_local(config, Path(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbs-tune",
        description="Ray Tune sweeps for the science of large batch sizes.",
    )
    parser.add_argument("--version", action="version", version=f"lbs-tune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="run one trial of a sweep file in this process, without Ray",
        description="Run the sweep file's base config plus its first grid point, with --set "
        "overrides, in this process. Running it again with the same --out resumes.",
    )
    train.add_argument("spec", type=Path, help="sweep file (YAML)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set batch_size=64 --set lr.scaling=linear",
    )
    train.add_argument("--out", type=Path, help="run folder (default: runs/<sweep name>)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lbs-tune` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"lbs-tune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lbs-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
