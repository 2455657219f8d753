"""The simple gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018) over
training, one curve per batch size (median and min–max over seeds), and, for a sweep with a
critical-batch fit, B_simple at the target against the fitted B_crit: the paper predicts that
they agree within a small factor (the y = x line).

`measured_curves` (shared with the sharpness figure) draws any measured column over training
for the trials shown (`metrics.shown_trials`): the studies' best trials when given, else the best
configuration per LR rule and batch size by the sweep's metric, as the learning curves do.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc

from analysis._arrow import from_numpy, strings, to_numpy, valid
from analysis.figures._common import Curve, curves
from analysis.figures._draw import batch_colour, curves_figure, finish, log_axis
from analysis.metrics import BATCH, RULE, attach, seed_spread, shown_trials

if TYPE_CHECKING:
    from analysis.summary import Summary

COLUMN = "noise/b_simple"
HESSIAN_COLUMN = "noise/b_noise"  # tr(HΣ) / GᵀHG, McCandlish et al. eq. 2.8


class Measured(NamedTuple):
    column: str
    x: str
    panels: list[str]  # LR rules
    curves: list[Curve]  # per rule and batch size


def measured_curves(
    trials: pa.Table,
    history: pa.Table,
    column: str,
    x: str,
    metric: str,
    keep: Collection[str] | None = None,
) -> Measured:
    """`column` against `x` for the trials shown (see `metrics.shown_trials`): per rule and batch
    size the median and min–max over the trials (seeds) at each x, reports without a value of
    `column` left out."""
    reports = attach(history, shown_trials(trials, metric, keep), [RULE, BATCH])
    values = to_numpy(reports[column], np.nan).astype(float)
    reports = reports.filter(from_numpy(np.isfinite(values)))
    found = curves(seed_spread(reports, column, [RULE, BATCH, x], "max"), x)
    return Measured(column, x, sorted({c.panel for c in found}), found)


def extract(
    trials: pa.Table,
    history: pa.Table,
    x: str = "epoch",
    metric: str = "val/accuracy",
    keep: Collection[str] | None = None,
) -> Measured:
    """B_simple over training per batch size (see `measured_curves`)."""
    return measured_curves(trials, history, COLUMN, x, metric, keep)


def render_curves(data: Measured, title: str) -> go.Figure:
    """One panel per LR rule, one curve per batch size (colour over log2 B), log y."""
    return curves_figure(
        data.panels, data.curves, data.x, data.column, title, "lines+markers", log_y=True
    )


def render(data: Measured) -> go.Figure:
    if data.column == HESSIAN_COLUMN:
        title = "Hessian-weighted noise scale B_noise = tr(HΣ) / GᵀHG during training"
    else:
        title = "gradient noise scale B_simple = tr(Σ) / |G|² during training"
    return render_curves(data, f"{title} (McCandlish et al.)")


# ============================================================================ Against B_crit


class Versus(NamedTuple):
    """Per grid point with a best trial that measured B_simple: its B_simple at the target (the
    last measurement at or before the step that reached it) against its series' fitted B_crit."""

    series: list[str]
    batch_sizes: list[int]
    b_crit: list[float]
    b_crit_low: list[float | None]
    b_crit_high: list[float | None]
    b_simple: list[float]
    step: list[int]  # the step of that measurement


def extract_versus(summary: Summary, history: pa.Table) -> Versus:
    """Points only for series with a fit and best trials that reached the target."""
    fits = {s.name: s.fit for s in summary.fits if s.fit.b_crit is not None}
    steps = to_numpy(history["step"], -1)
    values = to_numpy(history[COLUMN], np.nan).astype(float)
    found = Versus([], [], [], [], [], [], [])
    for p in summary.points:
        name = p.series
        if name not in fits or p.best is None or p.steps_to_target is None:
            continue
        # index_in, not equal: a Python scalar in a compute call imports pandas.
        mine = valid(pc.index_in(history["trial_id"], value_set=strings([p.best["ray_trial_id"]])))
        rows = np.flatnonzero(mine & np.isfinite(values) & (steps <= p.steps_to_target))
        if not len(rows):
            continue
        last = rows[np.argmax(steps[rows])]
        fit = fits[name]
        low, high = fit.intervals.get("b_crit", (None, None))
        for field, value in zip(
            found,
            (name, p.batch_size, fit.b_crit, low, high, float(values[last]), int(steps[last])),
            strict=True,
        ):
            field.append(value)
    return found


def render_versus(data: Versus) -> go.Figure:
    """Log–log with the y = x line over the range of both."""
    fig = go.Figure()
    sizes = sorted(set(data.batch_sizes)) or [1]
    above = [
        None if h is None else h - c for c, h in zip(data.b_crit, data.b_crit_high, strict=True)
    ]
    below = [
        None if lo is None else c - lo for c, lo in zip(data.b_crit, data.b_crit_low, strict=True)
    ]
    fig.add_trace(
        go.Scatter(
            x=data.b_crit,
            y=data.b_simple,
            mode="markers",
            marker={"color": [batch_colour(b, sizes) for b in data.batch_sizes], "size": 11},
            error_x={"type": "data", "symmetric": False, "array": above, "arrayminus": below},
            text=[
                f"{s + ': ' if s else ''}B={b}, step {t}"
                for s, b, t in zip(data.series, data.batch_sizes, data.step, strict=True)
            ],
            name="best trial of each batch size",
        )
    )
    span = [v for v in data.b_crit + data.b_simple if v and v > 0]
    if span:
        ends = [min(span) / 2, max(span) * 2]
        fig.add_trace(
            go.Scatter(
                x=ends, y=ends, mode="lines", line={"dash": "dash", "color": "grey"}, name="y = x"
            )
        )
    log_axis(fig, "x", span)
    log_axis(fig, "y", span)
    fig.update_xaxes(title_text="fitted B_crit (examples)")
    fig.update_yaxes(title_text=f"{COLUMN} at the target (examples)")
    finish(fig, "measured noise scale against the fitted critical batch size")
    return fig
