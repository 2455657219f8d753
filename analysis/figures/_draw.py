"""Drawing helpers that several figures share: colours by batch size and by LR rule, a curve
with its min–max band, a line with error bars, points, and the batch-size axis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.figures._common import Curve, Line, Points
from analysis.metrics import RULE

DIVERGED_MARKER = {"symbol": "x", "size": 11, "color": "crimson"}
RULE_DASHES = ("solid", "dash", "dot", "dashdot")


def batch_colour(batch_size: int, sizes: list[int]) -> str:
    """A Viridis colour by position on a log2 scale between the smallest and largest size."""
    low, high = math.log2(min(sizes)), math.log2(max(sizes))
    where = 0.0 if high == low else (math.log2(batch_size) - low) / (high - low)
    return plotly.colors.sample_colorscale("Viridis", [where])[0]


def _transparent(colour: str) -> str:
    red, green, blue = plotly.colors.unlabel_rgb(colour)
    return f"rgba({red:g}, {green:g}, {blue:g}, 0.2)"


def rule_colour(rule: str, rules: list[str]) -> str:
    palette = plotly.colors.qualitative.Plotly
    return palette[sorted(rules).index(rule) % len(palette)] if rule in rules else palette[0]


def curve_traces(
    curve: Curve, name: str, line: dict[str, str], show: bool, mode: str = "lines"
) -> tuple[go.Scatter, go.Scatter]:
    """A curve's min–max band (behind) and its median, in one legend group named `name`."""
    band = go.Scatter(
        x=curve.x + curve.x[::-1],
        y=curve.high + curve.low[::-1],
        fill="toself",
        fillcolor=_transparent(line["color"]),
        line={"width": 0},
        hoverinfo="skip",
        name=f"{name} min–max",
        legendgroup=name,
        showlegend=False,
    )
    median = go.Scatter(
        x=curve.x,
        y=curve.median,
        mode=mode,
        line=line,
        name=name,
        legendgroup=name,
        showlegend=show,
    )
    return band, median


def line_trace(line: Line, colour: str, show: bool = True) -> go.Scatter:
    """Median with min–max error bars (where all three exist)."""
    above = [None if None in (m, h) else h - m for m, h in zip(line.median, line.high, strict=True)]
    below = [
        None if None in (m, lo) else m - lo for m, lo in zip(line.median, line.low, strict=True)
    ]
    return go.Scatter(
        x=line.batch_sizes,
        y=line.median,
        mode="lines+markers",
        name=line.name,
        legendgroup=line.name,
        showlegend=show,
        line={"color": colour},
        error_y={"type": "data", "symmetric": False, "array": above, "arrayminus": below},
    )


def points_trace(points: Points, marker: dict[str, Any], show: bool = True) -> go.Scatter:
    return go.Scatter(
        x=points.x,
        y=points.y,
        mode="markers",
        name=points.name,
        legendgroup=points.name,
        showlegend=show,
        marker=marker,
        text=points.text,
    )


def batch_axis(fig: go.Figure, series: Sequence[Line | Points]) -> None:
    """A log axis ticked at the batch sizes themselves (powers of two read as such)."""
    sizes = sorted({b for s in series for b in (s.batch_sizes if isinstance(s, Line) else s.x)})
    fig.update_xaxes(
        type="log", title_text="batch size", tickvals=sizes, ticktext=[str(b) for b in sizes]
    )


def curves_figure(
    panels: list[str],
    curves: Sequence[Curve],
    x: str,
    y: str,
    title: str,
    mode: str = "lines",
    log_y: bool = False,
) -> go.Figure:
    """One panel per LR rule side by side sharing the y axis, one curve per batch size with its
    min–max band; colour runs over log2(batch size)."""
    panels = panels or [""]
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        subplot_titles=[f"{RULE} = {p}" for p in panels],
    )
    sizes = sorted({c.batch_size for c in curves}) or [1]
    for curve in curves:
        col = panels.index(curve.panel) + 1
        colour = batch_colour(curve.batch_size, sizes)
        for part in curve_traces(curve, f"B={curve.batch_size}", {"color": colour}, col == 1, mode):
            fig.add_trace(part, row=1, col=col)
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(type="log" if log_y else "linear", title_text=y, col=1)
    fig.update_layout(title=title)
    return fig
