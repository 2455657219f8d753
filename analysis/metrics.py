"""The numbers of batch-size science, as pure functions of the loaded tables (no I/O, no plots).

Every function takes pyarrow Tables shaped like `analysis.load`'s (`history`: one row per report
with `trial_id` and the metric columns, ordered by step within each trial; per-trial tables: one
row per trial with config columns) and returns a Table or plain Python values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

Mode = Literal["max", "min"]


def mode_of(metric: str) -> Mode | None:
    """'max' for an accuracy, 'min' for a loss, None for a metric with no better direction."""
    if metric.endswith("accuracy"):
        return "max"
    if metric.endswith("loss"):
        return "min"
    return None


def _mode(metric: str, mode: Mode | None) -> Mode:
    mode = mode or mode_of(metric)
    if mode is None:
        raise ValueError(f"'{metric}' has no natural direction: pass mode='max' or 'min'")
    return mode


def final_and_best(history: pa.Table, fields: Sequence[str]) -> pa.Table:
    """Per trial, in order of first appearance: `trial_id`, `reports` (the number of rows),
    `final/<field>` (the value of the last report, a null stays null) for every field, and
    `best/<field>` (max for accuracies, min for losses, nulls skipped) for every field that
    has a direction. `history` must be ordered by step within each trial.
    """
    keep_nulls = pc.ScalarAggregateOptions(skip_nulls=False)
    directed = [f for f in fields if mode_of(f)]
    aggregations = [([], "count_all")]
    aggregations += [(f, "last", keep_nulls) for f in fields]
    aggregations += [(f, mode_of(f)) for f in directed]
    # Ordered aggregations ("last") need a single-threaded group-by.
    table = history.group_by("trial_id", use_threads=False).aggregate(aggregations)
    names = {"count_all": "reports", "trial_id": "trial_id"}
    names |= {f"{f}_last": f"final/{f}" for f in fields}
    names |= {f"{f}_{mode_of(f)}": f"best/{f}" for f in directed}
    order = [
        "trial_id",
        "reports",
        *(f"final/{f}" for f in fields),
        *(f"best/{f}" for f in directed),
    ]
    return table.rename_columns([names[n] for n in table.column_names]).select(order)


def to_target(
    history: pa.Table, metric: str, target: float, x: str = "step", mode: Mode | None = None
) -> pa.Table:
    """The `x` (step, examples, epoch, time_s) of the first report at which `metric` reaches
    `target` (>= for max-mode metrics, <= for min-mode ones), per trial of `history`.

    Returns a Table of `trial_id` and `x`, one row per trial in order of first appearance, with
    null where the trial never reached the target. `x` must grow with the step.
    """
    compare = pc.greater_equal if _mode(metric, mode) == "max" else pc.less_equal
    hit = pc.fill_null(compare(history[metric], target), False)
    first = history.filter(hit).group_by("trial_id").aggregate([(x, "min")])
    reached = dict(zip(first["trial_id"].to_pylist(), first[f"{x}_min"].to_pylist(), strict=True))
    ids = pc.unique(history["trial_id"]).to_pylist()
    values = pa.array([reached.get(i) for i in ids], type=history.schema.field(x).type)
    return pa.table({"trial_id": pa.array(ids, pa.string()), x: values})


def seed_spread(table: pa.Table, value: str, by: Sequence[str], mode: Mode) -> pa.Table:
    """Median and min–max band of `value` over the rows of each group of `by` (the seeds of
    one configuration). A null value counts as the worst possible one (a diverged loss, a target
    never reached); a statistic that lands on it comes out null.

    Returns the `by` columns plus `median`, `low`, `high` and `seeds` (rows in the group),
    sorted by `by`.
    """
    worst = -math.inf if mode == "max" else math.inf
    frame = table.select([*by, value]).to_pandas()
    frame[value] = frame[value].astype(float).fillna(worst)
    grouped = frame.groupby(list(by), dropna=False, sort=True)[value]
    spread = grouped.agg(median="median", low="min", high="max", seeds="count").reset_index()
    stats = ["median", "low", "high"]
    spread[stats] = spread[stats].replace([math.inf, -math.inf], math.nan)
    return pa.Table.from_pandas(spread, preserve_index=False)


def best_per_batch_size(spread: pa.Table, mode: Mode, by: Sequence[str]) -> pa.Table:
    """The row of `spread` (from `seed_spread`) with the best median in each group of `by`
    (e.g. LR rule and batch size): for a searched sweep, the best lr.base per batch size.

    Ties go to the earlier row; a group whose medians are all null keeps one row. Returns the
    winning rows, sorted by `by`.
    """
    frame = spread.to_pandas()
    score = frame["median"] if mode == "max" else -frame["median"]
    ranked = frame.assign(_score=score).sort_values(
        "_score", ascending=False, na_position="last", kind="stable"
    )
    best = ranked.drop_duplicates(list(by)).drop(columns="_score").sort_values(list(by))
    return pa.Table.from_pandas(best, preserve_index=False)


def perfect_scaling(
    batch_sizes: Sequence[int], steps: Sequence[float | None]
) -> list[float | None]:
    """The steps that perfect scaling predicts at each batch size: steps ∝ 1/B, anchored at the
    smallest batch size with a value (the smallest that reached the target). All None if none did.
    """
    reached = [(b, s) for b, s in zip(batch_sizes, steps, strict=True) if s is not None]
    if not reached:
        return [None] * len(batch_sizes)
    anchor, anchor_steps = min(reached)
    return [anchor_steps * anchor / b for b in batch_sizes]
