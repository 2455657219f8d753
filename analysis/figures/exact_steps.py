"""The measured answer of a sweep on the noisy quadratic model against the known one
(`analysis.known`): the best trial's steps to the target per batch size (median and min–max over
seeds) over the exact best steps of the same protocol and their fit S(B) = S_min (1 + B_crit /
B), and the measured B_crit with its interval beside the exact B_crit. The first figure of such
a sweep's report: it shows at a glance whether the pipeline finds the answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import plotly.graph_objects as go

from analysis.figures._common import FitCurve, Line, fit_curve
from analysis.figures._draw import batch_axis, finish, fit_trace, line_trace, rule_colour
from analysis.figures.tuned_steps import Critical
from analysis.known import Exact, holds

if TYPE_CHECKING:
    from analysis.summary import Summary


class ExactCritical(NamedTuple):
    name: str
    b_crit: float
    held: bool | None  # whether the measured interval holds it (None: no interval)


class ExactSteps(NamedTuple):
    target: str  # 'val/loss ≤ 5'
    measured: list[Line]  # per series: the best trial's steps, median and min–max over seeds
    exact: list[Line]  # per series: the exact best steps (no band)
    fits: list[FitCurve]  # per series: the fit of the exact steps
    critical: list[Critical]  # per series: the measured B_crit and its interval
    exact_critical: list[ExactCritical]
    reasons: list[str]  # '<series>: <why there is no exact answer>'


def extract(summary: Summary, exact: Sequence[Exact]) -> ExactSteps:
    """The series of `summary` with their exact answers (matched by grid keys)."""
    measured, lines, curves, critical, exact_critical, reasons = [], [], [], [], [], []
    for series in summary.fits:
        name = series.name or "measured"
        mine = next((e for e in exact if e.group == series.group), None)
        measured.append(Line("", name, series.batch_sizes, series.median, series.low, series.high))
        fit = series.fit
        if fit.s_min is not None:
            low, high = fit.intervals.get("b_crit", (None, None))
            critical.append(Critical(name, fit.b_crit, low, high, fit.bracketed))
        if mine is None or mine.reason is not None:
            reasons.append(f"{name}: {mine.reason if mine else 'no exact answer'}")
            continue
        steps = [s if np.isfinite(s) else None for s in mine.steps]
        lines.append(Line("", f"{name} exact", list(mine.batch_sizes), steps, steps, steps))
        if mine.fit is not None and mine.fit.s_min is not None:
            curves.append(fit_curve(name, mine.fit, mine.batch_sizes))
            interval = fit.intervals.get("b_crit") if fit.s_min is not None else None
            exact_critical.append(
                ExactCritical(name, mine.fit.b_crit, holds(interval, mine.fit.b_crit))
            )
    return ExactSteps(
        summary.target_label, measured, lines, curves, critical, exact_critical, reasons
    )


def render(data: ExactSteps) -> go.Figure:
    """Log–log: measured steps with min–max bars, exact steps as open diamonds, the exact fit
    dotted; B_crit measured (dashed, its interval shaded) and exact (solid)."""
    fig = go.Figure()
    names = [line.name for line in data.measured]
    for line in data.measured:
        fig.add_trace(line_trace(line, rule_colour(line.name, names)))
    for line in data.exact:
        colour = rule_colour(line.name.removesuffix(" exact"), names)
        fig.add_trace(
            go.Scatter(
                x=line.batch_sizes,
                y=line.median,
                mode="markers",
                name=line.name,
                marker={"symbol": "diamond-open", "size": 11, "color": colour},
            )
        )
    for fit in data.fits:
        colour = rule_colour(fit.name, names)
        fig.add_trace(fit_trace(fit, colour, f"{fit.name} exact: S_min (1 + B_crit / B)"))
    for c in data.critical:
        interval = "" if c.low is None else f" [{c.low:.3g}, {c.high:.3g}]"
        fig.add_vline(
            x=c.b_crit,
            line={"dash": "dash", "color": "black"},
            name=f"{c.name}: measured B_crit {c.b_crit:.3g}{interval}",
            showlegend=True,
        )
        if c.low is not None:
            fig.add_vrect(
                x0=c.low,
                x1=c.high,
                fillcolor="rgba(0, 0, 0, 0.08)",
                line_width=0,
                name=f"{c.name}: measured B_crit 95% interval",
                showlegend=True,
            )
    for c in data.exact_critical:
        verdict = {True: ", inside the interval", False: ", OUTSIDE the interval"}.get(c.held, "")
        fig.add_vline(
            x=c.b_crit,
            line={"color": "crimson"},
            name=f"{c.name}: exact B_crit {c.b_crit:.3g}{verdict}",
            showlegend=True,
        )
    for i, reason in enumerate(data.reasons):
        fig.add_annotation(
            text=f"exact answer: {reason}",
            xref="paper",
            yref="paper",
            x=0,
            y=1 + 0.06 * i,
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
        )
    batch_axis(fig, data.measured + data.exact)
    fig.update_yaxes(type="log", title_text="steps")
    return finish(fig, f"steps to reach {data.target}: measured against the exact answer")
