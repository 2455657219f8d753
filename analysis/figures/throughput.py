"""Per trial against batch size, by LR rule: its training wall time and its mean throughput."""

from __future__ import annotations

from statistics import fmean
from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
from plotly.subplots import make_subplots

from analysis.figures._common import Points, points_by_rule
from analysis.figures._draw import (
    axis_title,
    batch_axis,
    finish,
    log_axis,
    points_trace,
    rule_colour,
)
from analysis.metrics import prepared

PANELS = ("time_s", "images_per_s")
# A language model's examples are tokens (lbs_tune.tasks): its throughput is tokens/s.
LANGUAGE_METRICS = ("val/perplexity", "test/perplexity")


class Throughput(NamedTuple):
    points: list[Points]
    unit: str = "images/s"  # or tokens/s for a language model


def extract(trials: pa.Table, history: pa.Table) -> Throughput:
    """`time_s` at each trial's last report, and its mean `images_per_s` over its reports."""
    trials = prepared(trials)
    speeds: dict[str, list[float]] = {}
    for r in history.select(["trial_id", "images_per_s"]).to_pylist():
        if r["images_per_s"] is not None:
            speeds.setdefault(r["trial_id"], []).append(r["images_per_s"])
    rows = trials.to_pylist()
    wall = [r.get("final/time_s") for r in rows]
    speed = [fmean(speeds[r["trial_id"]]) if r["trial_id"] in speeds else None for r in rows]
    tokens = any(
        m in history.column_names and history[m].null_count < history.num_rows
        for m in LANGUAGE_METRICS
    )
    return Throughput(
        points_by_rule(PANELS[0], rows, wall) + points_by_rule(PANELS[1], rows, speed),
        "tokens/s" if tokens else "images/s",
    )


def render(data: Throughput) -> go.Figure:
    titles = (axis_title("time_s"), f"throughput ({data.unit})")
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("training time", "mean throughput"), horizontal_spacing=0.12
    )
    rules = sorted({p.name for p in data.points})
    for found in data.points:
        col = PANELS.index(found.panel) + 1
        marker = {"color": rule_colour(found.name, rules), "size": 9}
        fig.add_trace(points_trace(found, marker, show=col == 1 and len(rules) > 1), row=1, col=col)
    batch_axis(fig, data.points)
    for col, (panel, title) in enumerate(zip(PANELS, titles, strict=True), start=1):
        values = [v for p in data.points if p.panel == panel for v in p.y]
        log_axis(fig, "y", values, row=1, col=col)
        fig.update_yaxes(title_text=title, row=1, col=col)
    legend = "lr.scaling" if len(rules) > 1 else None
    return finish(fig, "training time and throughput of each trial", legend=legend)
