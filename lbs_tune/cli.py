"""Command line: argument parsing only; each subcommand calls one function elsewhere."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lbs_tune import __version__
from lbs_tune.errors import UserError, cut


def _train(args: argparse.Namespace) -> int:
    from lbs_tune.local import run_local
    from lbs_tune.spec import trial_from_spec

    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"device={args.device}")
    spec, config = trial_from_spec(args.spec, overrides)
    out = args.out or Path("runs") / spec.name
    run_local(config, Path(out))
    return 0


def _ray_args(args: argparse.Namespace) -> dict:
    return {"address": args.address, "cpus": args.cpus, "gpus": args.gpus}


def _run(args: argparse.Namespace) -> int:
    from analysis.status import status
    from lbs_tune.runner import run

    return run(
        args.spec,
        overrides=args.set or [],
        storage=args.storage,
        name=args.name,
        fresh=args.fresh,
        dry_run=args.dry_run,
        force_unlock=args.force_unlock,
        verbose=args.verbose,
        table=status,
        **_ray_args(args),
    )


def _resume(args: argparse.Namespace) -> int:
    from analysis.status import status
    from lbs_tune.runner import resume

    return resume(
        args.experiment,
        force_unlock=args.force_unlock,
        verbose=args.verbose,
        table=status,
        **_ray_args(args),
    )


def _status(args: argparse.Namespace) -> int:
    from analysis.status import status

    print(status(args.experiment, wide=args.wide))
    return 0


def _where(args: argparse.Namespace) -> int:
    from analysis.status import where

    for folder in where(args.experiment, args.filters):
        print(folder)
    return 0


def _report(args: argparse.Namespace) -> int:
    from analysis.report import parse_target, write_report

    target = parse_target(args.target) if args.target else None
    with _output("-o", args.o):
        path = write_report(args.experiment, args.o, target, args.x, args.static, args.compare)
    print(f"report written to {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from analysis import export

    with _output("-o", args.o):
        written = export(args.experiment, args.o)
    for path in written:
        print(path)
    return 0


@contextlib.contextmanager
def _output(flag: str, path) -> Iterator[None]:
    """An output path the user chose that cannot be written (under a file, read-only, a full
    disk) is their mistake to fix: one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc).splitlines()[0]
        where = f"{flag} {path}" if path else "the experiment folder"
        raise UserError(f"{where}: cannot write there ({reason}); choose another path") from None


def _evaluate(args: argparse.Namespace) -> int:
    from lbs_tune.evaluate import evaluate_experiment, parse_splits

    evaluate_experiment(args.experiment, parse_splits(args.splits), args.device)
    return 0


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", type=int, metavar="N", help="GPUs of the local Ray (default: all)"
    )
    parser.add_argument(
        "--cpus", type=int, metavar="N", help="CPUs of the local Ray (default: all)"
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join this Ray cluster instead of starting one (auto, ray://host:port)",
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over the sweep's lock held by a run on another host that is gone",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print Ray's own output (its tables, every trial's stdout and stderr) instead of "
        "one line per trial event and a status every 30 s",
    )


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
    train.add_argument("spec", type=Path, metavar="SPEC", help="sweep file (YAML)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the trial config (not of the sweep file: no base. or grid. "
        "prefix), e.g. --set batch_size=64 --set lr.scaling=linear",
    )
    train.add_argument(
        "--out", type=Path, metavar="DIR", help="run folder (default: runs/<sweep name>)"
    )
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device")
    train.set_defaults(func=_train)

    run = commands.add_parser(
        "run",
        help="run a sweep on Ray Tune (resumes it if it is unfinished)",
        description="Run every grid point of a sweep file as a Ray Tune trial. Running the same "
        "spec again resumes the sweep where it stopped.",
    )
    run.add_argument("spec", type=Path, metavar="SPEC", help="sweep file (YAML)")
    _add_ray_options(run)
    run.add_argument(
        "--storage",
        default="results",
        metavar="PATH",
        help="folder or URI (s3://, gs://, file://) that holds experiments (default: ./results)",
    )
    run.add_argument("--name", metavar="NAME", help="experiment name (default: the spec's name)")
    run.add_argument(
        "--fresh", action="store_true", help="move an old sweep of this name aside and start over"
    )
    run.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the sweep file (trial keys under base.), e.g. --set "
        "base.epochs=2 --set grid.seed=[0,1]",
    )
    run.set_defaults(func=_run)

    resume = commands.add_parser(
        "resume",
        help="resume the sweep in an experiment folder",
        description="Resume a sweep "
        "from its experiment folder alone (its lbs_sweep.json holds the spec).",
    )
    resume.add_argument("experiment", metavar="EXPERIMENT", help="experiment folder or URI")
    _add_ray_options(resume)
    resume.set_defaults(func=_resume)

    status = commands.add_parser(
        "status", help="table of the trials of a sweep (while it runs or after)"
    )
    status.add_argument("experiment", metavar="EXPERIMENT", help="experiment folder or URI")
    status.add_argument(
        "--wide",
        action="store_true",
        help="every column (host, checkpoint, start time ...), not only those that fit 120",
    )
    status.set_defaults(func=_status)

    where = commands.add_parser(
        "where", help="folders of the trials whose config matches KEY=VALUE ..."
    )
    where.add_argument("experiment", metavar="EXPERIMENT", help="experiment folder or URI")
    where.add_argument("filters", nargs="*", metavar="KEY=VALUE", help="e.g. batch_size=32")
    where.set_defaults(func=_where)

    report = commands.add_parser("report", help="write the sweep's HTML report")
    report.add_argument("experiment", metavar="EXPERIMENT", help="experiment folder or URI")
    report.add_argument(
        "-o",
        type=Path,
        metavar="FILE",
        help="default: <experiment>/report.html (./<name>-report.html for s3://, gs:// ...)",
    )
    report.add_argument("--target", metavar="METRIC=VALUE", help="default: the spec's target")
    report.add_argument(
        "--x",
        choices=["step", "examples", "epoch"],
        help="axis of the curves over training (default: examples when batch sizes differ)",
    )
    report.add_argument(
        "--static", type=Path, metavar="DIR", help="also write each figure as PNG, PDF and SVG"
    )
    report.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="EXPERIMENT",
        help="a fixed-rule sweep whose steps to target are drawn beside this tuned one "
        "(repeatable)",
    )
    report.set_defaults(func=_report)

    export = commands.add_parser("export", help="write the trials and history tables as Parquet")
    export.add_argument("experiment", metavar="EXPERIMENT", help="experiment folder or URI")
    export.add_argument("-o", required=True, metavar="DIR", help="output folder or URI")
    export.set_defaults(func=_export)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate every checkpoint of every trial into evaluation.parquet"
    )
    evaluate.add_argument("experiment", metavar="EXPERIMENT", help="experiment folder or URI")
    evaluate.add_argument(
        "--splits",
        default="train,val,test",
        metavar="SPLITS",
        help="comma-separated splits (default: train,val,test)",
    )
    evaluate.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: auto"
    )
    evaluate.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lbs-tune` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        # One line, whatever a file or a value put in it (and never a screenful).
        print(f"lbs-tune: error: {cut(' '.join(str(exc).split()), 1000)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lbs-tune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lbs-tune run ... --dry-run | head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
