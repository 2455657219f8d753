"""The final and the best value of a metric against batch size: a line per LR rule (median and
band over seeds, the best configuration per batch size), diverged trials as separate points."""

from __future__ import annotations

from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
from plotly.subplots import make_subplots

from analysis.figures._common import Line, Points, lines, points
from analysis.figures._draw import (
    DIVERGED_MARKER,
    batch_axis,
    line_trace,
    points_trace,
    rule_colour,
)
from analysis.metrics import best_configs, prepared
from lbs_tune.names import direction


class MetricVsBatchSize(NamedTuple):
    metric: str
    lines: list[Line]
    diverged: list[Points]


def extract(trials: pa.Table, metric: str) -> MetricVsBatchSize:
    """Lines on the panels `final` and `best` (where the trials table has those columns) and
    the diverged trials' values on each."""
    trials = prepared(trials)
    mode = direction(metric) or "max"
    found, diverged = [], []
    hit = trials.filter(trials["diverged"]).to_pylist()
    for kind in ("final", "best"):
        column = f"{kind}/{metric}"
        if column not in trials.column_names:
            continue
        found += lines(best_configs(trials, column, mode), panel=kind)
        diverged.append(points(kind, "diverged", hit, [r[column] for r in hit]))
    return MetricVsBatchSize(metric, found, diverged)


def render(data: MetricVsBatchSize) -> go.Figure:
    panels = list(dict.fromkeys(line.panel for line in data.lines)) or ["final"]
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[f"{p} {data.metric}" for p in panels]
    )
    rules = sorted({line.name for line in data.lines})
    for line in data.lines:
        fig.add_trace(
            line_trace(line, rule_colour(line.name, rules), panels.index(line.panel) == 0),
            row=1,
            col=panels.index(line.panel) + 1,
        )
    for diverged in data.diverged:
        if diverged.panel in panels:
            first = panels.index(diverged.panel) == 0
            fig.add_trace(
                points_trace(diverged, DIVERGED_MARKER, show=first),
                row=1,
                col=panels.index(diverged.panel) + 1,
            )
    batch_axis(fig, data.lines)
    fig.update_yaxes(title_text=data.metric)
    fig.update_layout(title=f"{data.metric} against batch size")
    return fig
