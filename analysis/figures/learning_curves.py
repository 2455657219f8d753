"""A metric during training: one panel per LR rule, one curve per batch size (its best
configuration by the final metric), the median over seeds with a min–max band."""

from __future__ import annotations

from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa

from analysis.figures._common import Curve, curves
from analysis.figures._draw import curves_figure
from analysis.metrics import BATCH, RULE, attach, seed_spread, shown_trials
from lbs_tune.names import direction


class LearningCurves(NamedTuple):
    metric: str
    x: str
    panels: list[str]
    curves: list[Curve]


def extract(trials: pa.Table, history: pa.Table, metric: str, x: str = "step") -> LearningCurves:
    """`metric` against `x` (step, examples or epoch) of the trials shown (`metrics.prepared`);
    for a searched sweep, only the best configuration per rule and batch size."""
    reports = attach(history, shown_trials(trials, metric), [RULE, BATCH])
    found = curves(seed_spread(reports, metric, [RULE, BATCH, x], direction(metric) or "max"), x)
    return LearningCurves(metric, x, sorted({c.panel for c in found}), found)


def render(data: LearningCurves) -> go.Figure:
    """Panels side by side sharing the y axis; colour runs over log2(batch size)."""
    title = f"{data.metric} during training (median and min–max over seeds)"
    return curves_figure(data.panels, data.curves, data.x, data.metric, title)
