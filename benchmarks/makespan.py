"""Simulated makespan of real sweeps: Ray Tune's grid order beside longest-first, per sweep.

Each trial costs its steps x batch / images/s from a throughput table (ANCHORS.md's H200 figures by
default, or the JSON lines that benchmarks/throughput.py printed), and holds the GPU fraction its
sweep's `resources.gpu` gives its batch size. `lbs_tune.schedule.makespan` places the trials on
--gpus GPUs in the order Ray Tune makes them today (grid order) and longest-first, beside the lower
bound max(longest trial, GPU-hours / GPUs). One JSON line per sweep, then a summary line.

    python benchmarks/makespan.py [--gpus 8] [--throughput FILE] [--column cuda_graph] [SWEEP ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lbs_tune import schedule
from lbs_tune.datasets import DATASETS
from lbs_tune.errors import UserError
from lbs_tune.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = [ROOT / "sweeps" / "cifar10.yaml", ROOT / "sweeps" / "cifar10_wrn.yaml"]
# Target: longest-first within this factor of the lower bound.
TARGET_RATIO = 1.15
HOUR = 3600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="*", type=Path, default=SWEEPS, help="sweep files")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--throughput", type=Path, help="JSON lines of benchmarks/throughput.py")
    parser.add_argument(
        "--field", default="loop_images_per_s", help="the images/s field of --throughput's lines"
    )
    parser.add_argument(
        "--column",
        choices=sorted(schedule.TABLES),
        default="device_resident",
        help="ANCHORS.md's H200 column, when no --throughput is given",
    )
    parser.add_argument(
        "--in-order",
        action="store_true",
        help="a trial that does not fit holds back the ones after it (default: later ones that "
        "fit start, as Ray places placement groups)",
    )
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be at least 1")
    return args


def load_table(args: argparse.Namespace) -> tuple[schedule.Table, str]:
    """The throughput table and a line that says where it came from."""
    if args.throughput is None:
        return schedule.TABLES[args.column], f"ANCHORS.md H200 {args.column}"
    try:
        text = args.throughput.read_text()
    except OSError as exc:
        raise UserError(
            f"{args.throughput}: cannot read the throughput file ({exc.strerror})"
        ) from None
    return schedule.read_throughput(text, str(args.throughput), args.field), str(args.throughput)


def simulate(path: Path, table: schedule.Table, gpus: int, backfill: bool) -> dict[str, Any]:
    """One sweep's line: the makespans of both orders, the lower bound, their ratios."""
    spec = load_spec(path)
    jobs = schedule.sweep_jobs(spec, lambda c: DATASETS[c.dataset].train_size(c.data), table)
    grid = schedule.makespan(jobs, gpus, schedule.tune_grid_order(spec), backfill)
    longest = schedule.makespan(
        jobs, gpus, schedule.longest_first([j.seconds for j in jobs]), backfill
    )
    bound = schedule.lower_bound(jobs, gpus)
    return {
        "sweep": spec.name,
        "trials": len(jobs),
        "gpus": gpus,
        "grid_h": round(grid / HOUR, 4),
        "longest_first_h": round(longest / HOUR, 4),
        "lower_bound_h": round(bound / HOUR, 4),
        "grid_ratio": round(grid / bound, 4),
        "longest_first_ratio": round(longest / bound, 4),
        "within_target": longest <= TARGET_RATIO * bound,
        "longest_trial_h": round(max(j.seconds for j in jobs) / HOUR, 4),
        "gpu_h": round(sum(j.seconds * j.gpu for j in jobs) / HOUR, 4),
        "placement": "in order" if not backfill else "backfill",
    }


def main(argv: list[str] | None = None) -> int:
    """Simulate every sweep; print one JSON line each, then the summary line."""
    args = parse_args(argv)
    table, source = load_table(args)
    lines = []
    for path in args.sweeps:
        line = simulate(path, table, args.gpus, backfill=not args.in_order) | {"table": source}
        print(json.dumps(line), flush=True)
        lines.append(line)
    summary = {
        "summary": f"longest-first within {TARGET_RATIO:g}x of the lower bound",
        "all_within_target": all(line["within_target"] for line in lines),
        "sweeps": {line["sweep"]: line["longest_first_ratio"] for line in lines},
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        sys.exit(f"error: {error}")
