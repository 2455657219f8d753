"""The critical batch size over training and batch-size schedules: pure functions, no I/O.

Local critical batch size. Merrill, Arora, Groeneveld & Hajishirzi 2025 ("Critical Batch Size
Revisited: A Simple Empirical Approach to Large-Batch Language Model Training", arXiv 2505.23971,
section 3.1) branch a run's checkpoint at batch B into continuations at k x B, the learning rate
moved by the optimizer's rule (k for SGD, sqrt(k) for Adam), each trained for the same Δ tokens to
a smoothed loss L_k. In their words: "We then define k* as the maximum k such that, for all
k < k*, L_k* <= L_k + ε", and the local critical batch size is B* = k* x B. Their settings: Δ = 2B
tokens of a 600B-token run, ε = 0.01, the loss smoothed by an exponential moving average with
α = 0.5; they plot B* inside [k* B, the least tried k above k* times B]. The rule compares each k
with every smaller k, not only with the smallest; `critical_multiple` takes it literally: the
largest k that passes, whether or not every k below it passed.

Seeds (the paper has one branch per k): `local_cbs` applies the rule to the mean over seeds of
each k's smoothed losses, and to each seed alone (seed i of every k, paired) for the spread. A
branch whose loss is NaN or infinite (diverged, or failed) counts as infinitely bad: it fails the
rule and holds no larger k back; but when the smallest k's (the reference's) is, nothing can be
measured against it, and k* is the smallest k (no larger batch is certified).

Batch-size schedules. A schedule is the batch size as a step function of examples seen, in the
list form ((0, 64), (200_000, 128), (600_000, 256)): from each example count on, its batch size.
Step n starts with e_n examples seen (e_0 = 0, e_{n+1} = e_n + per_row x b_n) and trains on
b_n = `batch_at(schedule, e_n)`. A switch at t thus applies from the first step that starts at or
past t; the step before it may carry the run past t by less than one batch (steps are never split).
`per_row` is how many examples one row of a batch counts: 1, or bptt for a language model, whose
examples are tokens and whose batch size counts rows of bptt tokens. The learning rate (and Adam's
betas and eps under `sde`) at each batch size follow `lbs_tune.rules`, as for a constant batch.

Batch-size warmup (Merrill et al. section 4.1): start at the reference batch and double the batch
"whenever we determine the CBS has doubled" (`plan_schedule`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

# Merrill et al.'s settings (section 3.1): ε, the loss tolerance "set to 0.01 arbitrarily" (in
# nats of their loss); α of their exponential moving average; Δ, 2B tokens of a 600B-token run.
TOLERANCE = 0.01
SMOOTHING = 0.5
WINDOW_FRACTION = 2 / 600

Schedule = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------- Local CBS


def smoothed(losses: Sequence[float], alpha: float = SMOOTHING) -> float:
    """The exponential moving average of `losses` (in order) after the last:
    s = losses[0], then s = alpha x loss + (1 - alpha) x s for each next one. ValueError if empty
    or alpha is outside (0, 1]. (At Merrill et al.'s alpha = 0.5 both conventions of alpha agree.)
    """
    if not losses:
        raise ValueError("no losses to smooth")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    value = losses[0]
    for loss in losses[1:]:
        value = alpha * loss + (1 - alpha) * value
    return value


def _bad_as_inf(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def critical_multiple(losses: Mapping[float, float], tolerance: float = TOLERANCE) -> float:
    """Merrill et al.'s k*: the largest multiple k of `losses` (k -> smoothed loss L_k) with
    L_k <= L_j + tolerance for every smaller j in the table. The smallest k always passes, so
    there is always an answer; NaN and inf losses count as inf. A smallest k that failed (inf)
    is no reference to keep up with: k* is then the smallest k, not whatever beats inf.
    ValueError for an empty table."""
    if not losses:
        raise ValueError("no branches: the table of losses is empty")
    ks = sorted(losses)
    loss = {k: _bad_as_inf(losses[k]) for k in ks}
    if loss[ks[0]] == math.inf:
        return ks[0]
    passing = [k for i, k in enumerate(ks) if all(loss[k] <= loss[j] + tolerance for j in ks[:i])]
    return passing[-1]


class LocalCBS(NamedTuple):
    """The local critical batch size at one checkpoint, in examples per step (k x B).

    batch: from the mean over seeds of each branch's smoothed loss; upper: the next batch tried
    above it (the CBS lies in [batch, upper)), None if `batch` is the largest tried; per_seed: the
    rule applied to each seed alone, in seed order."""

    batch: int
    upper: int | None
    per_seed: tuple[int, ...]


def local_cbs(
    losses: Mapping[float, Sequence[float]], batch_size: int, tolerance: float = TOLERANCE
) -> LocalCBS:
    """The local critical batch size from branches at k x `batch_size`: `losses` maps each k to
    its seeds' smoothed losses (seed i at the same index under every k; see `smoothed`).

    ValueError if the table is empty or the k have different numbers of seeds."""
    if not losses:
        raise ValueError("no branches: the table of losses is empty")
    seeds = {len(values) for values in losses.values()}
    if len(seeds) != 1 or 0 in seeds:
        raise ValueError(f"every k needs the same number of seeds, at least one; got {seeds}")
    (count,) = seeds
    means = {k: sum(map(_bad_as_inf, values)) / count for k, values in losses.items()}
    k_star = critical_multiple(means, tolerance)
    above = [k for k in sorted(losses) if k > k_star]
    per_seed = tuple(
        critical_multiple({k: values[i] for k, values in losses.items()}, tolerance)
        for i in range(count)
    )
    return LocalCBS(
        batch=round(k_star * batch_size),
        upper=round(above[0] * batch_size) if above else None,
        per_seed=tuple(round(k * batch_size) for k in per_seed),
    )


# --------------------------------------------------------------------------- Schedules


def parse_schedule(entries: Sequence[Sequence[float]]) -> Schedule:
    """[[0, 64], [2e5, 128]] -> ((0, 64), (200000, 128)): pairs [examples, batch size] whose
    example counts start at 0 and increase, both whole numbers (2e5 from YAML is one), batch
    sizes positive. ValueError naming the entry otherwise."""
    if not entries:
        raise ValueError("a batch schedule needs at least one [examples, batch_size] entry")
    schedule = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(f"entry {i} is {entry!r}: each entry is [examples, batch_size]")
        start, batch = entry
        for name, value in (("examples", start), ("batch size", batch)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"entry {i}: {name} {value!r} is not a number")
            if not math.isfinite(value) or value != int(value):
                raise ValueError(f"entry {i}: {name} {value!r} is not a whole number")
        start, batch = int(start), int(batch)
        if batch < 1:
            raise ValueError(f"entry {i}: batch size {batch} must be positive")
        if i == 0 and start != 0:
            raise ValueError(f"the first entry starts at {start} examples; it must start at 0")
        if i > 0 and start <= schedule[-1][0]:
            raise ValueError(
                f"entry {i} starts at {start} examples, not after entry {i - 1}'s "
                f"{schedule[-1][0]}: example counts must increase"
            )
        schedule.append((start, batch))
    return tuple(schedule)


def batch_at(schedule: Schedule, examples: int) -> int:
    """The batch size of a step that starts with `examples` seen: that of the last entry whose
    example count is at or below it."""
    starts = [start for start, _ in schedule]
    return schedule[bisect.bisect_right(starts, examples) - 1][1]


class Segment(NamedTuple):
    """The steps of one schedule entry: from `step` (0-based), which starts with `examples`
    seen, `steps` steps (None for the last entry: unbounded) of `batch_size` rows."""

    step: int
    examples: int
    batch_size: int
    steps: int | None


def segments(schedule: Schedule, per_row: int = 1) -> Iterator[Segment]:
    """Each entry's steps in order; an entry that the step before it jumps over has 0 steps."""
    step, seen = 0, 0
    for i, (_, batch) in enumerate(schedule):
        per_step = batch * per_row
        if i + 1 == len(schedule):
            yield Segment(step, seen, batch, None)
            return
        # The steps that start before the next switch: ceil((next - seen) / per_step).
        count = max(0, -((seen - schedule[i + 1][0]) // per_step))
        yield Segment(step, seen, batch, count)
        step, seen = step + count, seen + count * per_step


def switch_steps(schedule: Schedule, per_row: int = 1) -> tuple[int, ...]:
    """The 0-based step from which each entry's batch size applies (0 for the first)."""
    return tuple(segment.step for segment in segments(schedule, per_row))


def examples_after(schedule: Schedule, steps: int, per_row: int = 1) -> int:
    """Examples seen after the first `steps` steps (each step adds its batch x per_row)."""
    # The last segment is unbounded: some segment holds every step count.
    segment = next(
        s for s in segments(schedule, per_row) if s.steps is None or steps <= s.step + s.steps
    )
    return segment.examples + (steps - segment.step) * segment.batch_size * per_row


def steps_to(schedule: Schedule, examples: int, per_row: int = 1) -> int:
    """The fewest steps after which at least `examples` have been seen."""
    segment = next(
        s
        for s in segments(schedule, per_row)
        if s.steps is None or examples <= s.examples + s.steps * s.batch_size * per_row
    )
    per_step = segment.batch_size * per_row
    return segment.step + max(0, -((segment.examples - examples) // per_step))


def steps_saved(schedule: Schedule, baseline: Schedule, examples: int, per_row: int = 1) -> float:
    """The fraction of the `baseline`'s gradient steps that `schedule` does without to see
    `examples`: 1 - steps_to(schedule) / steps_to(baseline)."""
    return 1 - steps_to(schedule, examples, per_row) / steps_to(baseline, examples, per_row)


# --------------------------------------------------------------------------- Planner


def plan_schedule(
    probes: Sequence[tuple[int, int]], batch_size: int, max_batch: int | None = None
) -> list[list[int]]:
    """Merrill et al.'s batch-size warmup from a probe's local critical batch sizes: start at
    `batch_size`; at each probe (examples seen, local CBS), in order of examples, double the batch
    while the CBS is at least twice it (and the doubled batch is at most `max_batch`), from that
    example count on. Returns the schedule in list form, [[0, batch_size], [t1, 2 x batch_size],
    ...]; the batch never exceeds a CBS measured at or before the point it applies from.

    The paper writes the test as B*_t > 2 B_t but applies it as "reaches": at batch 1024 it
    doubles where "the CBS reaches 2048" (section 4.2); so does this. Several doublings at one
    probe follow a CBS that grew more than twofold between probes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    schedule = [[0, batch_size]]
    for examples, cbs in sorted(probes, key=lambda probe: probe[0]):
        batch = schedule[-1][1]
        while cbs >= 2 * batch and (max_batch is None or 2 * batch <= max_batch):
            batch *= 2
        if batch == schedule[-1][1]:
            continue
        if schedule[-1][0] == examples:
            schedule[-1][1] = batch
        else:
            schedule.append([int(examples), batch])
    return schedule
