"""Names shared by the core and the readers, with no dependency: the metric names of every
report, which way each is better, and dotted keys of nested configs."""

from __future__ import annotations

import math
from typing import Any, Literal

# The metric names of every report: the same in the loop, in Ray's files, in the tables and plots.
METRICS = (
    "step",
    "epoch",
    "examples",
    "lr",
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "test/loss",
    "test/accuracy",
    "val/perplexity",
    "test/perplexity",
    "val/miou",
    "test/miou",
    "val/pixel_accuracy",
    "test/pixel_accuracy",
    "images_per_s",
    "diverged",
    "total_steps",
    "peak_lr",
    "bn_batch",
    "target/step",
    "train/smoothed_loss",
    "noise/grad_sq",
    "noise/trace_cov",
    "noise/b_simple",
    "sharpness/top_eig",
    "micro_batch",
    "optimizer/beta1",
    "optimizer/beta2",
    "optimizer/eps",
    "noise/grad_hgrad",
    "noise/trace_hcov",
    "noise/b_noise",
    "sharpness/precond_top_eig",
    # The batch of the step just made, reported by a trial with a batch schedule (not
    # `batch_size`, which names the config's, the schedule's first).
    "batch",
)


# The reported numbers that are drawn and logged against the step (step itself is the x axis).
SCALARS = tuple(m for m in METRICS if m not in ("step", "diverged"))

Mode = Literal["max", "min"]


def direction(metric: str) -> Mode | None:
    """'max' for an accuracy or a mean IoU, 'min' for a loss or a perplexity, None for a metric
    without a better direction. The one home of this rule: every caller imports it."""
    if metric.endswith("accuracy") or metric.endswith("miou"):
        return "max"
    if metric.endswith("loss") or metric.endswith("perplexity"):
        return "min"
    return None


def meets(value, target: float, mode: Mode):
    """Whether `value` reaches `target` in direction `mode` (>= for 'max', <= for 'min'). Works
    elementwise on numpy arrays too. The one home of "the target is reached"."""
    return value >= target if mode == "max" else value <= target


def first_reached(values: dict[int, float], target: float, mode: Mode) -> int | None:
    """The first step of `values` ({step: reported value}) whose value meets `target`, or None."""
    hits = [
        step for step, value in values.items() if value is not None and meets(value, target, mode)
    ]
    return min(hits) if hits else None


def comparison(metric: str, ascii: bool = False) -> str:
    """'≥' (or '>=') for a metric whose target is reached from below, '≤' ('<=') for one reached
    from above (a loss, a perplexity)."""
    below = direction(metric) == "min"
    if ascii:
        return "<=" if below else ">="
    return "≤" if below else "≥"


def target_label(metric: str, value: float) -> str:
    """A target as the report writes it: 'val/accuracy ≥ 0.5'."""
    return f"{metric} {comparison(metric)} {value:g}"


def own_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trial's own finite numbers of a report (names in METRICS; no Ray keys, no flags such
    as `diverged` or `replayed`): what the TensorBoard, MLflow and W&B loggers write."""
    found = {}
    for key in SCALARS:
        value = result.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            found[key] = value
    return found


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lr': {'base': 0.1}} -> {'lr.base': 0.1}; lists and tuples stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


BUDGET_KEYS = ("epochs", "steps", "examples")

# The key of a searched trial's params that names its study and Optuna trial
# ({study, point, number, confirm}); it is no knob of the run, so `config.trial_config` leaves
# it out.
SEARCH_KEY = "search"
# The same for a trial of a branched sweep: its phase and place (lbs_tune.probes).
BRANCH_KEY = "branch"


def is_bookkeeping(key: str) -> bool:
    """Whether the dotted config key is one the searcher or the branch planner sets (a trial's
    study, number, confirmation, branch label): the trial's place in the sweep, not a setting
    of its training. Trials that differ only in these are one configuration."""
    return key.split(".", 1)[0] in (SEARCH_KEY, BRANCH_KEY)


def get_dotted(tree: Any, key: str) -> Any:
    """`tree['a']['b']` for key 'a.b'; None where a part is missing."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def hashable(value: Any) -> Any:
    """A config value as a dict key or set member: lists (a shape, milestones) as tuples."""
    return tuple(value) if isinstance(value, list) else value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `tree['a']['b'] = value` for key 'a.b', making the inner dicts as needed.

    Setting one budget key (epochs, steps, examples) removes the others: it replaces the budget.
    """
    if key in BUDGET_KEYS:
        for other in BUDGET_KEYS:
            tree.pop(other, None)
    *parents, leaf = key.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"'{part}' of '{key}' is a value, not a section")
        tree = child
    tree[leaf] = value
