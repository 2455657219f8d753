"""Names shared by the core and the readers, with no dependency: the metric names of every
report, which way each is better, and dotted keys of nested configs."""

from __future__ import annotations

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
    "noise/grad_hgrad",
    "noise/trace_hcov",
    "noise/b_noise",
    "sharpness/precond_top_eig",
)


def direction(metric: str) -> Literal["max", "min"] | None:
    """'max' for an accuracy, 'min' for a loss or a perplexity, None for a metric without one."""
    if metric.endswith("accuracy") or metric.endswith("miou"):
        return "max"
    if metric.endswith("loss") or metric.endswith("perplexity"):
        return "min"
    return None


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
