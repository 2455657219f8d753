"""Sweeps ordered to finish soonest: trial costs and the longest-first order.

A trial's cost is its seconds on a whole GPU: total steps x the seconds of one step, where a step
of batch B run as micro-batches of m takes B / images_per_s(model, m) from a throughput table
(model, batch size) -> images/s. Starting the longest trials first (LPT, Graham 1969) keeps the
slow small-batch trials from starting last and setting the sweep's length. Pure: no torch, no Ray.
The simulator that measures the gain (makespans of both orders) is benchmarks/makespan.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from lbs_tune.config import TrialConfig, total_steps
from lbs_tune.errors import UserError
from lbs_tune.sweep import SweepSpec

# (model, batch size) -> images/s of full training steps.
Table = Mapping[tuple[str, int], float]

# Measured on an NVIDIA H200 (torch 2.11, synthetic CIFAR-10-shaped data), the project's
# performance anchors, column "device-resident, bf16, channels_last" (eager PyTorch).
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
