"""Per trial against batch size, by LR rule: its training wall time and its mean throughput."""

from __future__ import annotations

from statistics import fmean
from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
from plotly.subplots import make_subplots

from analysis.figures._common import Points, points_by_rule
from analysis.figures._draw import batch_axis, points_trace, rule_colour
from analysis.metrics import prepared

PANELS = ("time_s", "images_per_s")


class Throughput(NamedTuple):
    points: list[Points]


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
    return Throughput(
        points_by_rule(PANELS[0], rows, wall) + points_by_rule(PANELS[1], rows, speed)
    )


def render(data: Throughput) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=PANELS)
    rules = sorted({p.name for p in data.points})
    for found in data.points:
        col = PANELS.index(found.panel) + 1
        marker = {"color": rule_colour(found.name, rules), "size": 9}
        fig.add_trace(points_trace(found, marker, show=col == 1), row=1, col=col)
    batch_axis(fig, data.points)
    for col, panel in enumerate(PANELS, start=1):
        fig.update_yaxes(title_text=panel, type="log", row=1, col=col)
    fig.update_layout(title="wall time and throughput per trial")
    return fig
