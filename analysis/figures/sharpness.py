"""Sharpness, the top eigenvalue of the training loss's Hessian, over training per batch size,
with the stability threshold 2 / lr of each curve beside it (dotted): gradient descent at
learning rate lr is unstable along a direction of curvature above 2 / lr, and full-batch
training rises to it and hovers there, the edge of stability (Cohen et al. 2021). With heavy-ball
momentum β the threshold is (2 + 2β) / lr (their appendix); the line drawn is 2 / lr, the plain
gradient-descent one. `lr` is each report's own (warmup and decay included)."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa

from analysis._arrow import from_numpy, to_numpy
from analysis.figures._common import Curve
from analysis.figures._draw import batch_colour
from analysis.figures.noise_scale import Measured, measured_curves, render_curves

COLUMN = "sharpness/top_eig"
THRESHOLD = "2/lr"


class Sharpness(NamedTuple):
    sharpness: Measured
    threshold: list[Curve]  # 2 / lr at the same reports, per rule and batch size


def extract(
    trials: pa.Table,
    history: pa.Table,
    x: str = "epoch",
    metric: str = "val/accuracy",
    keep: Collection[str] | None = None,
) -> Sharpness:
    """Sharpness and 2 / lr over training for the trials shown (see
    `noise_scale.measured_curves`), both at the reports that measured sharpness."""
    measured = np.isfinite(to_numpy(history[COLUMN], np.nan).astype(float))
    lr = to_numpy(history["lr"], np.nan).astype(float)
    with np.errstate(divide="ignore"):
        limit = np.where(measured & (lr > 0), 2.0 / lr, np.nan)
    history = history.append_column(THRESHOLD, from_numpy(limit, np.isfinite(limit)))
    sharp = measured_curves(trials, history, COLUMN, x, metric, keep)
    threshold = measured_curves(trials, history, THRESHOLD, x, metric, keep).curves
    return Sharpness(sharp, threshold)


def render(data: Sharpness) -> go.Figure:
    fig = render_curves(
        data.sharpness,
        "sharpness (top Hessian eigenvalue) during training, and 2 / lr (dotted): the edge of "
        "stability (Cohen et al. 2021)",
    )
    panels = data.sharpness.panels or [""]
    sizes = sorted({c.batch_size for c in data.sharpness.curves}) or [1]
    for curve in data.threshold:
        if curve.panel not in panels:
            continue
        fig.add_trace(
            go.Scatter(
                x=curve.x,
                y=curve.median,
                mode="lines",
                line={"dash": "dot", "color": batch_colour(curve.batch_size, sizes)},
                name=f"2/lr, B={curve.batch_size}",
                legendgroup=f"B={curve.batch_size}",
                showlegend=False,
            ),
            row=1,
            col=panels.index(curve.panel) + 1,
        )
    return fig
