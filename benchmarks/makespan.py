"""Simulated makespan of real sweeps: Ray Tune's grid order beside longest-first, per sweep.

Each trial costs its steps x batch / images/s from a throughput table (ANCHORS.md's H200 figures by
default, or the JSON lines that benchmarks/throughput.py printed), and holds the GPU fraction its
sweep's `resources.gpu` gives its batch size. `makespan` (below) places the trials on --gpus GPUs in
the order Ray Tune's grid_search would make them (`tune_grid_order`) and longest-first (the order
`lbs-tune run` uses, lbs_tune.schedule.longest_first), beside the lower bound max(longest trial,
GPU-hours / GPUs). One JSON line per sweep, then a summary line.

    python benchmarks/makespan.py [--gpus 8] [--throughput FILE] [--column cuda_graph] [SWEEP ...]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbs_tune import schedule
from lbs_tune.datasets import DATASETS
from lbs_tune.errors import UserError
from lbs_tune.schedule import Job
from lbs_tune.spec import load_spec
from lbs_tune.sweep import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = [ROOT / "sweeps" / "cifar10.yaml", ROOT / "sweeps" / "cifar10_wrn.yaml"]
# Target: longest-first within this factor of the lower bound.
TARGET_RATIO = 1.15
HOUR = 3600.0
_SLACK = 1e-9  # GPU fractions that add up to a whole one within rounding fit it


def tune_grid_order(spec: SweepSpec) -> list[int]:
    """The order in which Ray Tune's BasicVariantGenerator makes the trials of a param_space with
    one grid_search per grid key, as indices into `spec.points()`.

    Ray sorts the grid keys by path and varies the first of them fastest
    (ray.tune.search.variant_generator: parse_spec_vars, _grid_search_generator), while
    `points()` varies the last key of the file fastest.
    """
    keys = list(spec.grid)
    sizes = [len(spec.grid[key]) for key in keys]
    # points() is itertools.product over the keys: key k steps by the product of later sizes.
    strides = [math.prod(sizes[k + 1 :]) for k in range(len(keys))]
    slowest_first = sorted(range(len(keys)), key=lambda k: keys[k].split("."), reverse=True)
    return [
        sum(value * strides[k] for value, k in zip(combo, slowest_first, strict=True))
        for combo in itertools.product(*(range(sizes[k]) for k in slowest_first))
    ]


def makespan(jobs: Sequence[Job], gpus: int, order: Sequence[int], backfill: bool = True) -> float:
    """Seconds until the last job ends when `jobs` start greedily in `order` on `gpus` GPUs.

    Whenever a job ends (and at time 0) the waiting jobs are taken in order; each starts if some
    GPU has its fraction free (the GPU with the least room that fits it, as Ray's raylet picks;
    whole free GPUs for a request above 1). With `backfill` a job that does not fit waits while
    later ones that fit start, as Ray does when every trial's placement group is requested up
    front; without it the first job that does not fit holds back all that follow it.
    """
    if sorted(order) != list(range(len(jobs))):
        raise ValueError(f"order must list each of the {len(jobs)} jobs once")
    for index, job in enumerate(jobs):
        whole = job.gpu <= 1 or job.gpu == int(job.gpu)
        if not (0 < job.gpu <= gpus and whole and job.seconds >= 0):
            raise ValueError(f"job {index} ({job}) cannot run on {gpus} GPUs")
    free = [1.0] * gpus
    waiting = list(order)
    running: list[tuple[float, int, list[tuple[int, float]]]] = []
    now = 0.0
    while waiting or running:
        held_back = []
        for position, index in enumerate(waiting):
            taken = _take(free, jobs[index].gpu)
            if taken is None:
                if not backfill:
                    held_back += waiting[position:]
                    break
                held_back.append(index)
                continue
            heapq.heappush(running, (now + jobs[index].seconds, index, taken))
        waiting = held_back
        # Every job fits an idle cluster, so something runs whenever something waits.
        now = running[0][0]
        while running and running[0][0] <= now:
            for gpu, amount in heapq.heappop(running)[2]:
                free[gpu] += amount
    return now


def _take(free: list[float], fraction: float) -> list[tuple[int, float]] | None:
    """Take `fraction` of one GPU (best fit) or whole GPUs from `free`; None if it does not fit."""
    if fraction <= 1:
        fits = [gpu for gpu, room in enumerate(free) if room >= fraction - _SLACK]
        if not fits:
            return None
        gpu = min(fits, key=lambda g: free[g])
        free[gpu] -= fraction
        return [(gpu, fraction)]
    idle = [gpu for gpu, room in enumerate(free) if room >= 1 - _SLACK][: int(fraction)]
    if len(idle) < fraction:
        return None
    for gpu in idle:
        free[gpu] -= 1.0
    return [(gpu, 1.0) for gpu in idle]


def lower_bound(jobs: Sequence[Job], gpus: int) -> float:
    """No order finishes sooner: max(longest job, total GPU-seconds / gpus), where a job's
    GPU-seconds are its seconds x its GPU fraction."""
    if not jobs:
        return 0.0
    return max(max(job.seconds for job in jobs), sum(j.seconds * j.gpu for j in jobs) / gpus)


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
    grid = makespan(jobs, gpus, tune_grid_order(spec), backfill)
    longest = makespan(jobs, gpus, schedule.longest_first([j.seconds for j in jobs]), backfill)
    bound = lower_bound(jobs, gpus)
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
