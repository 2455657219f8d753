"""Sweeps ordered to finish soonest: trial costs, longest-first order and a makespan simulator.

A trial's cost is its seconds on a whole GPU: total steps x the seconds of one step, where a step
of batch B run as micro-batches of m takes B / images_per_s(model, m) from a throughput table
(model, batch size) -> images/s. Starting the longest trials first (LPT, Graham 1969) keeps the
slow small-batch trials from starting last and setting the sweep's length. Pure: no torch, no Ray.

The simulator assumes a trial given a fraction f of a GPU occupies f of one GPU (whole GPUs for
f > 1) and runs at the speed it has alone on the card. Trials that share a card really do better
than that (ANCHORS.md: 8 ResNet-20 processes at batch 32 give 4.5x one process's images/s), so
the simulated makespans are upper estimates for shared cards.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from lbs_tune.config import SweepSpec, TrialConfig, total_steps
from lbs_tune.errors import UserError

# (model, batch size) -> images/s of full training steps.
Table = Mapping[tuple[str, int], float]

# ../shared/ANCHORS.md, "Training throughput on one GPU" (NVIDIA H200, torch 2.11, synthetic
# CIFAR-10-shaped data), column "device-resident, bf16, channels_last" (eager PyTorch).
H200_DEVICE_RESIDENT: dict[tuple[str, int], float] = {
    ("resnet20", 32): 3_480,
    ("resnet20", 128): 10_930,
    ("resnet20", 512): 41_890,
    ("resnet20", 2048): 113_590,
    ("resnet20", 8192): 123_695,
    ("wrn28_10", 128): 8_974,
    ("wrn28_10", 512): 10_187,
    ("wrn28_10", 2048): 10_693,
}
# The same table's column "+ whole step in one CUDA graph", where it has figures.
H200_CUDA_GRAPH: dict[tuple[str, int], float] = {
    ("resnet20", 32): 18_638,
    ("resnet20", 128): 51_063,
    ("resnet20", 512): 104_048,
    ("resnet20", 2048): 117_576,
    ("wrn28_10", 128): 9_560,
    ("wrn28_10", 512): 10_354,
}
TABLES = {"device_resident": H200_DEVICE_RESIDENT, "cuda_graph": H200_CUDA_GRAPH}

# Free GPU fractions are sums of floats such as 0.1: compare with a little slack.
_SLACK = 1e-9


# ============================================================================ Throughput


def read_throughput(text: str, source: str, field: str = "loop_images_per_s") -> dict:
    """The table of a `benchmarks/throughput.py` output: {(model, batch_size): images/s}.

    `text` holds one JSON object a line; lines with `model` and `batch_size` are cases and give
    `field` (lbs-tune's own loop by default), other lines (the summary, log noise) are skipped.
    `source` names the file in errors. Raises UserError for a malformed case or a repeated one.
    """
    table: dict[tuple[str, int], float] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            case = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{source}:{number}: not a JSON line ({exc.msg}); fix or remove it"
            ) from None
        if "model" not in case or "batch_size" not in case:
            continue
        key = (case["model"], int(case["batch_size"]))
        value = case.get(field)
        if not isinstance(value, int | float) or value <= 0:
            raise UserError(
                f"{source}:{number}: {key[0]} at batch {key[1]} has no positive '{field}'; "
                "give the images/s field of the lines"
            )
        if key in table:
            raise UserError(
                f"{source}:{number}: a second figure for {key[0]} at batch {key[1]}; "
                "keep one line per model and batch size"
            )
        table[key] = float(value)
    if not table:
        raise UserError(
            f"{source}: no throughput cases; give the JSON lines of benchmarks/throughput.py"
        )
    return table


def images_per_s(table: Table, model: str, batch_size: int, stand_in: str | None = None) -> float:
    """Images/s of `model` at `batch_size`: the table's figure, interpolated linearly in
    log(images/s) over log(batch size) between measured sizes, and flat beyond the ends.

    A model the table lacks takes the curve of `stand_in` (a ranking within one model only needs
    the curve's shape); without one it is a UserError.
    """
    curve = _curve(table, model) or (_curve(table, stand_in) if stand_in else {})
    if not curve:
        models = ", ".join(sorted({m for m, _ in table}))
        raise UserError(
            f"no throughput figures for model '{model}' (the table has {models}); "
            f"measure it with benchmarks/throughput.py --models {model}"
        )
    return _loglog(curve, batch_size)


def _curve(table: Table, model: str) -> dict[int, float]:
    return {batch: value for (name, batch), value in table.items() if name == model}


def _loglog(points: Mapping[int, float], x: float) -> float:
    """The piecewise power law through `points` at x, flat outside them."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    right = next(i for i, size in enumerate(xs) if size >= x)
    a, b = xs[right - 1], xs[right]
    t = math.log(x / a) / math.log(b / a)
    return points[a] * (points[b] / points[a]) ** t


def refine(table: Table, measured: Mapping[tuple[str, int], float]) -> dict:
    """The table corrected by what a running sweep measured: {(model, micro-batch): images/s}.

    Each measured model's curve is multiplied by the ratio measured / predicted, interpolated in
    log-log between the measured batch sizes and flat beyond them (one measurement scales the
    whole curve). A model the table lacks takes the measured figures as its curve.
    """
    refined = dict(table)
    for model in {m for m, _ in measured}:
        mine = {batch: value for (name, batch), value in measured.items() if name == model}
        curve = _curve(table, model)
        if not curve:
            refined.update({(model, batch): value for batch, value in mine.items()})
            continue
        ratio = {batch: value / _loglog(curve, batch) for batch, value in mine.items()}
        # Both factors are piecewise power laws: their product is one with both sets of knots.
        for batch in set(curve) | set(mine):
            refined[(model, batch)] = _loglog(curve, batch) * _loglog(ratio, batch)
    return refined


# ============================================================================ Costs


class Job(NamedTuple):
    """One trial to place: seconds it runs and the GPUs it holds (a fraction, or whole GPUs)."""

    seconds: float
    gpu: float


def trial_seconds(
    config: TrialConfig, train_size: int, table: Table, stand_in: str | None = None
) -> float:
    """Seconds of one trial on a GPU by itself: total steps x batch / images/s at its micro-batch
    (a batch run as micro-batches goes at the micro-batch's speed). Evaluation is left out."""
    speed = images_per_s(table, config.model, config.micro_batch_size, stand_in)
    return total_steps(config, train_size) * config.batch_size / speed


def sweep_jobs(
    spec: SweepSpec,
    train_size: Callable[[TrialConfig], int],
    table: Table,
    stand_in: str | None = None,
) -> list[Job]:
    """Every trial of the sweep as a Job, in `spec.trials` order: its seconds from `table`, its GPU
    fraction from `spec.resources` by batch size. `train_size(config)` is the size of the trial's
    training split (lbs_tune.datasets.DATASETS[dataset].train_size(config.data))."""
    return [
        Job(
            trial_seconds(config, train_size(config), table, stand_in),
            spec.resources.for_batch(config.batch_size)[1],
        )
        for config in spec.trials
    ]


# ============================================================================ Orders


def longest_first(costs: Sequence[float]) -> list[int]:
    """Indices of `costs`, the largest first; equal costs keep their given order."""
    return sorted(range(len(costs)), key=lambda i: -costs[i])


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


# ============================================================================ Simulation


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
