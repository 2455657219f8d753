"""A branched sweep (a sweep file's `branch:` section) as plain data: its trials in order, the
config of each, where its points fall, and how the branches' losses become the local critical
batch sizes and a planned batch schedule. No Ray and no torch: the searcher that runs the phases
(`lbs_tune.branch_searcher`) and the readers (`analysis.branches`) both ask this module.

The phases (Merrill et al. 2025, "Critical Batch Size Revisited", sections 3.1 and 4.1):

1. The reference: the sweep's base config, once, at its batch B. Its checkpoints stay.
2. The branches: at each point of `branch.points` (a fraction of the reference's budget, or an
   example count) the reference's newest checkpoint at or before it (the first, for a point
   before every checkpoint) is where the point really is. From it, per k of `branch.multiples`
   and seed of `branch.seeds`, a trial trains Δ = `branch.examples` more examples at k x B: the
   checkpoint's model and optimizer state, the data order of its own seed, its step count from
   0, no warmup, the reference's peak LR at B moved by the rule (`rule`); it reports
   `branch.reports` times, evenly over Δ. Its loss is the exponential average (`smoothing`) of
   its reported `branch.metric`; at each point `branching.local_cbs` of those losses (seed i of
   every k paired) is the local critical batch size.
3. The comparison: `branching.plan_schedule` of the local critical batch sizes (at the points'
   examples, capped at `branch.max_batch`) is a batch schedule; per seed of `compare_seeds` the
   schedule, the constant reference batch ("small") and the constant largest batch of the
   schedule ("large") train the reference's budget of examples from scratch, the LR moved by the
   same rule as the branches at every batch.

A trial's config carries its place under `BRANCH_KEY` ({phase, point, k, seed, examples_at,
step_at} for a branch, {phase, arm, seed} in the comparison, and a `label` for its folder's
name), which `config.trial_config` leaves out and the readers find as `branch.*` columns.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from pydantic import ValidationError

from lbs_tune.branching import (
    SMOOTHING,
    TOLERANCE,
    WINDOW_FRACTION,
    LocalCBS,
    Schedule,
    local_cbs,
    plan_schedule,
    smoothed,
)
from lbs_tune.config import BRANCH_KEY, KeyedError, TrialConfig, total_steps
from lbs_tune.names import set_dotted
from lbs_tune.rules import moved_optimizer, peak_lr
from lbs_tune.sweep import ARMS, BranchSpec

PHASES = ("reference", "branch", "compare")
# The LR rule of each optimizer's branches when `branch.scaling` leaves it to the optimizer.
RULES = {"sgd": "linear", "lars": "linear", "adamw": "sqrt", "lamb": "sqrt"}


class Slot(NamedTuple):
    """One trial of a branched sweep, in the order they are asked."""

    index: int
    phase: str  # one of PHASES
    point: int | None = None  # a branch's point (index into branch.points)
    k: int | None = None  # a branch's multiple of the reference batch
    seed: int | None = None  # a branch's or a comparison run's seed
    arm: str | None = None  # a comparison run's: one of config.ARMS


class Point(NamedTuple):
    """Where a point of `branch.points` is: the reference's checkpoint file, its step and the
    examples seen there."""

    checkpoint: str
    step: int
    examples: int


def slots(spec: BranchSpec) -> list[Slot]:
    """Every trial of the sweep in order: the reference, the branches by point, k and seed, then
    the comparison by seed and arm. `len(slots(spec)) == spec.trial_count`."""
    found = [Slot(0, "reference")]
    for point in range(len(spec.points)):
        for k in spec.multiples:
            for seed in spec.seeds:
                found.append(Slot(len(found), "branch", point, k, seed))
    for seed in spec.compared_seeds:
        for arm in ARMS:
            found.append(Slot(len(found), "compare", seed=seed, arm=arm))
    return found


# ============================================================================ Settings


def rule(spec: BranchSpec, reference: TrialConfig) -> str:
    """The LR rule of the branches and the comparison: `branch.scaling`, else the optimizer's
    (RULES)."""
    return spec.scaling or RULES[reference.optimizer.name]


def tolerance(spec: BranchSpec) -> float:
    return TOLERANCE if spec.tolerance is None else spec.tolerance


def smoothing(spec: BranchSpec) -> float:
    return SMOOTHING if spec.smoothing is None else spec.smoothing


def budget_examples(reference: TrialConfig, train_size: int) -> int:
    """The examples of the reference's budget (its steps times its batch, as the loop counts
    them; `config.total_steps`)."""
    return total_steps(reference, train_size) * reference.batch_size


def window_unit(spec: BranchSpec, batch: int) -> int:
    """What Δ must be a multiple of: every branch reports `reports` times at the same example
    counts, R x k x B for every k."""
    return spec.reports * batch * math.lcm(*spec.multiples)


def window(spec: BranchSpec, reference: TrialConfig, train_size: int) -> int:
    """Δ: `branch.examples`, else Merrill et al.'s fraction of the run (2B tokens of 600B)
    rounded up to a multiple of `window_unit`."""
    if spec.examples is not None:
        return spec.examples
    unit = window_unit(spec, reference.batch_size)
    return unit * max(1, math.ceil(WINDOW_FRACTION * budget_examples(reference, train_size) / unit))


def largest_batch(spec: BranchSpec, batch: int) -> int:
    """The schedule's cap: `branch.max_batch`, else the largest branch, max(k) x B."""
    return spec.max_batch or spec.multiples[-1] * batch


def wanted_examples(spec: BranchSpec, index: int, budget: int) -> float:
    """The examples at which point `index` is asked for (`budget`: the reference's examples)."""
    value = spec.points[index]
    return value * budget if spec.points_in == "fraction" else value


def place(checkpoints: Sequence[tuple[int, int, str]], wanted: float, final: bool) -> Point | None:
    """The reference's checkpoint of a point wanted at `wanted` examples, from `checkpoints`
    (step, examples, file) in order: the newest at or before it, else the first; None while it
    may still change (no checkpoint at or past it yet, and the reference not `final`)."""
    if not checkpoints or not (final or checkpoints[-1][1] >= wanted):
        return None
    before = [c for c in checkpoints if c[1] <= wanted]
    step, examples, path = before[-1] if before else checkpoints[0]
    return Point(path, step, examples)


# ============================================================================ Configs


def _moved(reference: TrialConfig, spec: BranchSpec) -> dict[str, Any]:
    """The reference's config with its LR rule re-anchored at its own batch B: lr.base the peak
    LR it trains with, lr.base_batch_size B, lr.scaling the branches' rule; under sde the
    optimizer's betas and eps those it trains with at B, so the rule moves them from there."""
    tree = reference.model_dump(mode="json")
    batch = reference.batch_size
    optimizer = moved_optimizer(reference.optimizer, reference.lr, batch)
    tree["optimizer"] = optimizer.model_dump(mode="json")
    tree["lr"].update(
        base=peak_lr(reference.lr, batch), base_batch_size=batch, scaling=rule(spec, reference)
    )
    if tree.get("target"):
        tree["target"]["stop"] = False  # every run trains its whole budget
    tree.update(noise_scale=None, sharpness=None, start_from=None, batch_schedule=None)
    return tree


def reference_config(reference: TrialConfig) -> dict[str, Any]:
    """The reference's trial config as Ray gets it: the base config with its place."""
    return {
        **reference.model_dump(mode="json"),
        BRANCH_KEY: {"phase": "reference", "label": "reference"},
    }


def branch_config(
    reference: TrialConfig,
    spec: BranchSpec,
    slot: Slot,
    point: Point,
    train_size: int,
) -> dict[str, Any]:
    """The config of branch `slot` from `point`: Δ examples at k x B from the checkpoint."""
    delta = window(spec, reference, train_size)
    tree = _moved(reference, spec)
    tree["lr"].update(warmup_epochs=0.0)
    set_dotted(tree, "examples", delta)
    tree.update(
        batch_size=slot.k * reference.batch_size,
        seed=slot.seed,
        start_from=point.checkpoint,
        eval_every=delta / spec.reports / train_size,
        checkpoint_every=delta / train_size,  # the last report's only
        keep_checkpoints=None,
    )
    tree[BRANCH_KEY] = {
        "phase": "branch",
        "point": slot.point,
        "k": slot.k,
        "seed": slot.seed,
        "examples_at": point.examples,
        "step_at": point.step,
        "label": f"point{slot.point}_k{slot.k}_seed{slot.seed}",
    }
    return tree


def arm_config(
    reference: TrialConfig, spec: BranchSpec, slot: Slot, schedule: Schedule, train_size: int
) -> dict[str, Any]:
    """The config of comparison run `slot`: the reference's budget of examples from scratch, on
    the planned `schedule`, at the constant reference batch, or at the schedule's largest."""
    tree = _moved(reference, spec)
    set_dotted(tree, "examples", budget_examples(reference, train_size))
    tree["seed"] = slot.seed
    if slot.arm == "schedule":
        tree["batch_schedule"] = [list(entry) for entry in schedule]
    elif slot.arm == "large":
        tree["batch_size"] = max(batch for _, batch in schedule)
    tree[BRANCH_KEY] = {
        "phase": "compare",
        "arm": slot.arm,
        "seed": slot.seed,
        "label": f"{slot.arm}_seed{slot.seed}",
    }
    return tree


# ============================================================================ Results


def branch_loss(values: Sequence[float | None], alpha: float, errored: bool = False) -> float:
    """A branch's loss: the exponential average (`branching.smoothed`) of its reported values in
    step order; a value that is missing (not finite: diverged) is inf, so is a branch without
    reports or that `errored` (it failed: what it reported before is no loss after Δ)."""
    if errored or not values:
        return math.inf
    return smoothed([math.inf if v is None or not math.isfinite(v) else v for v in values], alpha)


def point_sizes(
    losses: Mapping[int, Mapping[int, Sequence[float]]], batch: int, tol: float
) -> dict[int, LocalCBS]:
    """{point: its local critical batch size} from {point: {k: losses of the seeds in order}}
    (`branching.local_cbs` at the reference batch `batch`)."""
    return {point: local_cbs(table, batch, tol) for point, table in sorted(losses.items())}


def plan(points: Sequence[Point], sizes: Mapping[int, LocalCBS], batch: int, cap: int) -> Schedule:
    """The batch schedule of the comparison: `branching.plan_schedule` of each point's local
    critical batch size at its examples, from `batch`, capped at `cap`."""
    probes = [(points[i].examples, sizes[i].batch) for i in sorted(sizes)]
    return tuple(tuple(entry) for entry in plan_schedule(probes, batch, cap))


# ============================================================================ Checks


def check_branch(spec: BranchSpec, reference: TrialConfig) -> list[tuple[str, str]]:
    """The branch section against the reference (the base config, checked): (key in the sweep
    file, message) for every problem, [] for none. Needs the zoos (imported here): the largest
    branch and comparison run are checked as trial configs."""
    from lbs_tune.checks import check_trial  # the zoos import torch: only when checking
    from lbs_tune.data import dataset_info
    from lbs_tune.models import model_task

    problems = []
    if model_task(reference.model) == "language_model":
        problems.append(
            ("branch", f"{reference.model} is a language model: its batches cannot change size")
        )
        return problems
    if reference.lr.decay != "constant":
        problems.append(
            (
                "base.lr.decay",
                f"{reference.lr.decay}: branches restart the step count, so the reference's LR "
                "must be constant after warmup (Merrill et al. branch a constant-LR phase); use "
                "decay: constant",
            )
        )
    if reference.keep_checkpoints is not None:
        problems.append(
            ("base.keep_checkpoints", "the branches need every checkpoint: leave it out")
        )
    if reference.optimizer.name not in RULES:
        problems.append(("base.optimizer.name", f"no branch rule for {reference.optimizer.name}"))
        return problems
    if spec.scaling == "sde" and reference.optimizer.name != "adamw":
        problems.append(
            (
                "branch.scaling",
                f"sde is AdamW's rule (Malladi et al. 2022), not {reference.optimizer.name}'s; "
                f"use {RULES[reference.optimizer.name]} or leave it out",
            )
        )
        return problems
    batch = reference.batch_size
    train_size = dataset_info(reference).train_size(reference.data)
    budget = budget_examples(reference, train_size)
    unit = window_unit(spec, batch)
    if spec.examples is not None and spec.examples % unit:
        problems.append(
            (
                "branch.examples",
                f"{spec.examples} is not a multiple of reports x B x every k = {unit}; use "
                f"{unit * max(1, round(spec.examples / unit))}",
            )
        )
    if spec.points_in == "examples" and spec.points[-1] >= budget:
        problems.append(
            (
                "branch.points",
                f"{spec.points[-1]:g} examples is past the reference's budget of {budget}",
            )
        )
    if problems:
        return problems
    largest = Slot(0, "branch", 0, spec.multiples[-1], spec.seeds[0])
    point = Point("/checkpoint/of/the/reference/state.pt", 0, 0)
    cap = largest_batch(spec, batch)
    runs = [
        ("branch.multiples", branch_config(reference, spec, largest, point, train_size)),
        ("branch.max_batch", arm_config(reference, spec, Slot(0, "compare", seed=0, arm="large"),
                                        ((0, cap),), train_size)),
    ]  # fmt: skip
    for key, tree in runs:
        tree = {k: v for k, v in copy.deepcopy(tree).items() if k != BRANCH_KEY}
        try:
            check_trial(TrialConfig.model_validate(tree))
        except KeyedError as exc:
            problems.append((key, f"at batch {tree['batch_size']}: {exc}"))
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            problems.append((key, f"at batch {tree['batch_size']}: {message}"))
    return problems
