"""The numbers of batch-size science, as pure functions of the loaded tables (no I/O, no plots),
and the preparation of those tables for the figures.

Every function takes pyarrow Tables shaped like `analysis.load`'s (`history`: one row per report
with `trial_id` and the metric columns, ordered by step within each trial; per-trial tables: one
row per trial with config columns) and returns a Table or plain Python values. Groups come from
a stable sort (`analysis._arrow.groups`), so nothing here imports pandas.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis._arrow import from_numpy, group_ids, groups, strings, to_numpy, valid
from analysis.columns import config_columns
from lbs_tune.names import Mode, direction, is_bookkeeping, meets

# The config keys that the figures arrange trials by.
RULE = "lr.scaling"
BATCH = "batch_size"
SEED = "seed"


def better(metric: str, mode: Mode | None = None) -> Mode:
    """The direction a figure ranks `metric` in: `mode` (the sweep's metric mode, given for a
    metric without a direction of its own), else the metric's own (`names.direction`), else
    'max'."""
    return mode or direction(metric) or "max"


def _mode(metric: str, mode: Mode | None) -> Mode:
    mode = mode or direction(metric)
    if mode is None:
        raise ValueError(f"'{metric}' has no natural direction: pass mode='max' or 'min'")
    return mode


def _floats(values: np.ndarray) -> pa.Array:
    """Floats as an Arrow array, null where not finite."""
    return from_numpy(values.astype(np.float64), np.isfinite(values))


# ============================================================================ Per trial


def final_and_best(history: pa.Table, fields: Sequence[str]) -> pa.Table:
    """Per trial, in order of first appearance: `trial_id`, `reports` (the number of rows),
    `final/<field>` (the value of the last report, a null stays null) for every field, and
    `best/<field>` (max for accuracies, min for losses, nulls skipped) for every field that
    has a direction. `history` must be ordered by step within each trial.
    """
    directed = [f for f in fields if direction(f)]
    ids = history["trial_id"]
    unique = pc.unique(ids)
    codes = to_numpy(pc.index_in(ids, value_set=unique), -1)
    order = np.argsort(codes, kind="stable")
    n = len(order)
    starts = np.flatnonzero(np.diff(codes[order], prepend=-1))
    ends = np.append(starts[1:], n) if n else starts
    columns = {"trial_id": unique, "reports": from_numpy((ends - starts).astype(np.int64))}
    finals = history.select(list(fields)).take(from_numpy(order[ends - 1]))
    for field in fields:
        columns[f"final/{field}"] = finals[field]
    for field in directed:
        values = to_numpy(history[field], np.nan).astype(np.float64)[order]
        pick = np.fmax if direction(field) == "max" else np.fmin
        # fmax/fmin skip NaN (a null here) unless the whole trial has none.
        best = pick.reduceat(values, starts) if n else values
        kind = history.schema.field(field).type
        columns[f"best/{field}"] = from_numpy(best, ~np.isnan(best)).cast(kind)
    return pa.table(columns)


def to_target(
    history: pa.Table, metric: str, target: float, x: str = "step", mode: Mode | None = None
) -> pa.Table:
    """The `x` (step, examples, epoch, time_s) of the first report at which `metric` reaches
    `target` (>= for max-mode metrics, <= for min-mode ones), per trial of `history`.

    Returns a Table of `trial_id` and `x`, one row per trial in order of first appearance, with
    null where the trial never reached the target. `x` must grow with the step.
    """
    values = to_numpy(history[metric], np.nan)
    with np.errstate(invalid="ignore"):
        hit = meets(values, target, _mode(metric, mode))
    hit &= valid(history[x])
    ids = history["trial_id"]
    unique = pc.unique(ids)
    codes = to_numpy(pc.index_in(ids, value_set=unique), -1)
    xs = to_numpy(history[x], 0)
    rows = np.flatnonzero(hit)
    # Hits by trial, smallest x first: a trial's first hit row is its first in this order.
    rows = rows[np.lexsort((xs[rows], codes[rows]))]
    found, first_row = np.unique(codes[rows], return_index=True)
    first = np.zeros(len(unique), xs.dtype)
    reached = np.zeros(len(unique), bool)
    first[found], reached[found] = xs[rows[first_row]], True
    kind = history.schema.field(x).type
    return pa.table({"trial_id": unique, x: from_numpy(first, reached).cast(kind)})


def reached_at(
    trials: pa.Table, history: pa.Table, metric: str, target: float, x: str = "step"
) -> pa.Array:
    """The steps-to-target column: for each row of `trials`, the `x` of its first report at which
    `metric` reaches `target` (see `to_target`), null where it never did."""
    reached = to_target(history, metric, target, x)
    index = pc.index_in(trials["trial_id"], value_set=reached["trial_id"])
    return reached[x].take(index)


# ============================================================================ Over seeds


def seed_spread(table: pa.Table, value: str, by: Sequence[str], mode: Mode) -> pa.Table:
    """Median and min–max band of `value` over the rows of each group of `by` (the seeds of
    one configuration). A null value counts as the worst possible one (a diverged loss, a target
    never reached); a statistic that lands on it comes out null.

    Returns the `by` columns plus `median`, `low`, `high` and `seeds` (rows in the group),
    sorted by `by` (nulls last).
    """
    worst = -math.inf if mode == "max" else math.inf
    order, starts = groups(table, by)
    n = len(order)
    values = to_numpy(table[value], worst).astype(np.float64)[order]
    values[np.isnan(values)] = worst
    group = group_ids(starts, n)
    # Sorted by value within each group: the median sits in the middle of its group.
    values = values[np.lexsort((values, group))]
    counts = np.diff(np.r_[starts, n])
    median = (values[starts + (counts - 1) // 2] + values[starts + counts // 2]) / 2
    keys = table.select(list(by)).take(from_numpy(order[starts]))
    stats = {
        "median": _floats(median),
        "low": _floats(values[starts]),
        "high": _floats(values[starts + counts - 1]),
        "seeds": from_numpy(counts.astype(np.int64)),
    }
    for name, column in stats.items():
        keys = keys.append_column(name, column)
    return keys


def best_per_batch_size(spread: pa.Table, mode: Mode, by: Sequence[str]) -> pa.Table:
    """The row of `spread` (from `seed_spread`) with the best median in each group of `by`
    (e.g. LR rule and batch size): for a searched sweep, the best lr.base per batch size.

    Ties go to the earlier row; a group whose medians are all null keeps its first row. Returns
    the winning rows, sorted by `by`.
    """
    order, starts = groups(spread, by)
    n = len(order)
    score = to_numpy(spread["median"], np.nan)[order]
    score = np.where(np.isnan(score), -np.inf, score if mode == "max" else -score)
    # Best score first within each group, then the earlier row (`order` keeps table order).
    ranked = np.lexsort((np.arange(n), -score, group_ids(starts, n)))
    return spread.take(from_numpy(order[ranked[starts]]))


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


# ============================================================================ For the figures


def prepared(trials: pa.Table) -> pa.Table:
    """The trials that figures show: errored ones dropped (a crash is not a result; a diverged
    trial stays), a missing LR rule or batch size set to its TrialConfig default, and list-valued
    config keys turned into text (groupable)."""
    # Imported here: reading an experiment needs no trial-config models (pydantic builds them
    # in a fifth of a second).
    from lbs_tune.config import LRConfig, TrialConfig

    defaults = {RULE: LRConfig().scaling, BATCH: TrialConfig.model_fields[BATCH].default}
    trials = trials.filter(pc.invert(pc.is_in(trials["state"], value_set=strings(["ERROR"]))))
    for key, default in defaults.items():
        column = trials[key] if key in trials.column_names else pa.nulls(trials.num_rows)
        values = [default if v is None else v for v in column.to_pylist()]
        column = strings(values) if isinstance(default, str) else from_numpy(np.array(values))
        if key in trials.column_names:
            trials = trials.set_column(trials.schema.get_field_index(key), key, column)
        else:
            trials = trials.append_column(key, column)
    for key in config_columns(trials):
        if pa.types.is_nested(trials.schema.field(key).type):
            text = strings([None if v is None else str(v) for v in trials[key].to_pylist()])
            trials = trials.set_column(trials.schema.get_field_index(key), key, text)
    return trials


def distinct_batch_sizes(trials: pa.Table) -> int:
    """How many batch sizes the trials have (0 without the column)."""
    if BATCH not in trials.column_names:
        return 0
    return len(set(trials[BATCH].to_pylist()) - {None})


def varying_keys(trials: pa.Table) -> list[str]:
    """The config keys whose value differs between trials."""
    return [k for k in config_columns(trials) if len({repr(v) for v in trials[k].to_pylist()}) > 1]


def searched_keys(trials: pa.Table) -> list[str]:
    """Config keys that vary across the trials, other than rule, batch size, seed and the
    search's and branches' bookkeeping (`names.is_bookkeeping`): what tells configurations
    apart, so that a configuration's runs on several seeds (a search trial and its
    confirmation runs) are one."""
    return [
        k for k in varying_keys(trials) if k not in (RULE, BATCH, SEED) and not is_bookkeeping(k)
    ]


def best_configs(trials: pa.Table, value: str, mode: Mode) -> pa.Table:
    """Seed spread of the per-trial column `value` for the best configuration (by median) of
    each LR rule and batch size; one row per rule and batch size (see `best_per_batch_size`)."""
    spread = seed_spread(trials, value, [RULE, BATCH, *searched_keys(trials)], mode)
    return best_per_batch_size(spread, mode, [RULE, BATCH])


def attach(history: pa.Table, trials: pa.Table, keys: Sequence[str]) -> pa.Table:
    """`history` restricted to `trials`, with their `keys` columns added to each report."""
    history = history.filter(pc.is_in(history["trial_id"], value_set=trials["trial_id"]))
    index = pc.index_in(history["trial_id"], value_set=trials["trial_id"])
    for key in keys:
        history = history.append_column(key, trials[key].take(index))
    return history


def shown_trials(
    trials: pa.Table, metric: str, keep: Collection[str] | None = None, mode: Mode | None = None
) -> pa.Table:
    """The trials a figure over training draws: `keep` (trial ids) when given; else, where
    configurations other than rule, batch size and seed vary, the best one per rule and batch
    size by `final/<metric>` (in direction `better(metric, mode)`); else every trial. Errored
    trials never (`prepared`)."""
    trials = prepared(trials)
    if keep is not None:
        return trials.filter(pc.is_in(trials["trial_id"], value_set=strings(sorted(keep))))
    keys = [RULE, BATCH, *searched_keys(trials)]
    if keys[2:] and f"final/{metric}" in trials.column_names:
        winners = best_configs(trials, f"final/{metric}", better(metric, mode))
        chosen = {tuple(r.values()) for r in winners.select(keys).to_pylist()}
        rows = trials.select(keys).to_pylist()
        trials = trials.filter(from_numpy(np.array([tuple(r.values()) in chosen for r in rows])))
    return trials
