"""A metric during training: one panel per LR rule, one curve per batch size (its best
configuration by the final metric), the median over seeds with a min–max band."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
from plotly.subplots import make_subplots

from analysis._arrow import from_numpy
from analysis.figures._common import Curve
from analysis.figures._draw import batch_colour, curve_traces
from analysis.metrics import (
    BATCH,
    RULE,
    attach,
    best_configs,
    mode_of,
    prepared,
    searched_keys,
    seed_spread,
)


class LearningCurves(NamedTuple):
    metric: str
    x: str
    panels: list[str]
    curves: list[Curve]


def extract(trials: pa.Table, history: pa.Table, metric: str, x: str = "step") -> LearningCurves:
    """`metric` against `x` (step, examples or epoch) of the trials shown (`metrics.prepared`);
    for a searched sweep, only the best configuration per rule and batch size."""
    trials = prepared(trials)
    mode = mode_of(metric) or "max"
    keys = [RULE, BATCH, *searched_keys(trials)]
    if f"final/{metric}" in trials.column_names and keys[2:]:
        winners = best_configs(trials, f"final/{metric}", mode).select(keys).to_pylist()
        chosen = {tuple(w.values()) for w in winners}
        rows = trials.select(keys).to_pylist()
        trials = trials.filter(from_numpy(np.array([tuple(r.values()) in chosen for r in rows])))
    reports = attach(history, trials, [RULE, BATCH])
    spread = seed_spread(reports, metric, [RULE, BATCH, x], mode).to_pylist()
    curves = []
    for rule, batch in sorted({(r[RULE], r[BATCH]) for r in spread}):
        mine = [r for r in spread if (r[RULE], r[BATCH]) == (rule, batch)]
        curves.append(
            Curve(
                rule,
                batch,
                [r[x] for r in mine],
                *([r[stat] for r in mine] for stat in ("median", "low", "high")),
            )
        )
    return LearningCurves(metric, x, sorted({c.panel for c in curves}), curves)


def render(data: LearningCurves) -> go.Figure:
    """Panels side by side sharing the y axis; colour runs over log2(batch size)."""
    panels = data.panels or [""]
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        subplot_titles=[f"{RULE} = {p}" for p in panels],
    )
    sizes = sorted({c.batch_size for c in data.curves})
    for curve in data.curves:
        col = panels.index(curve.panel) + 1
        colour = batch_colour(curve.batch_size, sizes)
        for part in curve_traces(curve, f"B={curve.batch_size}", {"color": colour}, col == 1):
            fig.add_trace(part, row=1, col=col)
    fig.update_xaxes(title_text=data.x)
    fig.update_yaxes(title_text=data.metric, col=1)
    fig.update_layout(title=f"{data.metric} during training (median and min–max over seeds)")
    return fig
