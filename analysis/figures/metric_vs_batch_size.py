"""The final and the best value of a metric against batch size: a line per LR rule (median and
band over seeds, the best configuration per batch size), diverged trials as separate points."""

from __future__ import annotations

from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
from plotly.subplots import make_subplots

from analysis.figures._common import Line, Points, lines, most_seeds, points
from analysis.figures._draw import (
    DIVERGED_MARKER,
    batch_axis,
    finish,
    line_trace,
    points_trace,
    rule_colour,
    series_name,
    spread_note,
)
from analysis.metrics import best_configs, better, prepared
from lbs_tune.names import Mode

PANELS = {"final": "at the last report", "best": "best over training"}


class MetricVsBatchSize(NamedTuple):
    metric: str
    lines: list[Line]
    diverged: list[Points]
    seeds: int = 1  # the most seeds behind one point


def extract(trials: pa.Table, metric: str, mode: Mode | None = None) -> MetricVsBatchSize:
    """Lines on the panels `final` and `best` (where the trials table has those columns) and
    the diverged trials' values on each; `mode`: the sweep's mode of `metric`
    (`metrics.better`)."""
    trials = prepared(trials)
    mode = better(metric, mode)
    found, diverged, seeds = [], [], 0
    hit = trials.filter(trials["diverged"]).to_pylist()
    for kind in ("final", "best"):
        column = f"{kind}/{metric}"
        if column not in trials.column_names:
            continue
        best = best_configs(trials, column, mode)
        found += lines(best, panel=kind)
        seeds = max(seeds, most_seeds(best))
        diverged.append(points(kind, "diverged", hit, [r[column] for r in hit]))
    return MetricVsBatchSize(metric, found, diverged, seeds)


def render(data: MetricVsBatchSize) -> go.Figure:
    panels = list(dict.fromkeys(line.panel for line in data.lines)) or ["final"]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[PANELS.get(p, p) for p in panels])
    rules = sorted({line.name for line in data.lines})
    for line in data.lines:
        name = series_name(line.name, rules) or data.metric
        first = panels.index(line.panel) == 0
        fig.add_trace(
            line_trace(line, rule_colour(line.name, rules), first, name=name),
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
    fig.update_yaxes(title_text=data.metric, col=1)
    title = f"{data.metric} against batch size, at a fixed training budget"
    legend = "lr.scaling" if len(rules) > 1 else None
    return finish(fig, title + spread_note(data.seeds), legend=legend)
