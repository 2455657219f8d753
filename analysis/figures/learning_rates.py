"""The peak learning rate of each trial against batch size, by LR rule, diverged trials marked:
where the rule's LR grows past what the batch size bears."""

from __future__ import annotations

from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa

from analysis.figures._common import Points, points, points_by_rule
from analysis.figures._draw import (
    DIVERGED_MARKER,
    batch_axis,
    finish,
    log_axis,
    points_trace,
    rule_colour,
)
from analysis.metrics import prepared


class LearningRates(NamedTuple):
    points: list[Points]
    diverged: Points


def extract(trials: pa.Table, history: pa.Table) -> LearningRates:
    """Each trial's `peak_lr` as the loop reported it, or the largest `lr` it reported
    (experiments of versions before `peak_lr`)."""
    trials = prepared(trials)
    largest: dict[str, float] = {}
    for r in history.select(["trial_id", "lr"]).to_pylist():
        if r["lr"] is not None:
            largest[r["trial_id"]] = max(r["lr"], largest.get(r["trial_id"], r["lr"]))
    rows = trials.to_pylist()
    lrs = [r.get("final/peak_lr") or largest.get(r["trial_id"]) for r in rows]
    hit = [i for i, r in enumerate(rows) if r["diverged"]]
    diverged = points("", "diverged", [rows[i] for i in hit], [lrs[i] for i in hit])
    return LearningRates(points_by_rule("", rows, lrs), diverged)


def render(data: LearningRates) -> go.Figure:
    fig = go.Figure()
    rules = [p.name for p in data.points]
    for found in data.points:
        marker = {"color": rule_colour(found.name, rules), "size": 9}
        # One rule: its points need no name of their own beside 'diverged'.
        fig.add_trace(points_trace(found, marker, show=len(rules) > 1))
    fig.add_trace(points_trace(data.diverged, DIVERGED_MARKER))
    batch_axis(fig, data.points)
    log_axis(fig, "y", [v for p in data.points for v in p.y])
    fig.update_yaxes(title_text="peak learning rate")
    legend = "lr.scaling" if len(rules) > 1 else None
    return finish(fig, "peak learning rate of each trial against batch size", legend=legend)
