"""Steps to the target against batch size with the learning rate tuned per batch size (Shallue
et al. 2018): the best trial's steps (median and min–max over seeds), the fit S(B) = S_min (1 +
B_noise / B) with B_crit and its interval marked (McCandlish et al. 2018), the three regimes
shaded, and beside them the fixed-rule series (the best configuration per rule and batch size)
of this sweep's unsearched trials or of a compared sweep, to the same target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc

from analysis.figures import steps_to_target
from analysis.figures._common import Line
from analysis.figures._draw import batch_axis, line_trace, rule_colour
from analysis.scaling import Regimes, fitted_curve, regimes

if TYPE_CHECKING:
    from analysis.summary import Summary

SEARCH_COLUMN = "search.study"  # set in every searched trial's config (lbs_tune.searcher)
FIT_POINTS = 100


class FitCurve(NamedTuple):
    name: str
    batch_sizes: list[float]
    steps: list[float]


class Critical(NamedTuple):
    """B_crit of one series with its bootstrap interval (None without one)."""

    name: str
    b_crit: float
    low: float | None
    high: float | None
    bracketed: bool


class TunedSteps(NamedTuple):
    target: str  # 'val/accuracy ≥ 0.5'
    tuned: list[Line]  # one per series: the best steps, median and min–max over seeds
    not_reached: list[Line]  # per series, the batch sizes whose median seed never reached it
    fits: list[FitCurve]
    critical: list[Critical]
    regimes: Regimes | None  # shaded only for a single series with a fit
    fixed: list[Line]  # fixed-rule series, named '<source>: <rule>'


def fixed_rule_lines(
    label: str, trials: pa.Table, history: pa.Table, metric: str, target: float
) -> list[Line]:
    """The fixed-rule series of a sweep's unsearched trials (`steps_to_target`'s lines, by the
    steps-to-target column of `analysis.metrics`), named '<label>: <rule>'."""
    if SEARCH_COLUMN in trials.column_names:
        trials = trials.filter(pc.is_null(trials[SEARCH_COLUMN]))
    if not trials.num_rows or metric not in history.column_names:
        return []
    found = steps_to_target.extract(trials, history, metric, target).lines
    return [line._replace(name=f"{label}: {line.name}") for line in found]


def extract(summary: Summary, fixed: Sequence[tuple[str, pa.Table, pa.Table]] = ()) -> TunedSteps:
    """The tuned series and fits of `summary`; `fixed`: (label, trials, history) of sweeps
    whose fixed-rule series are drawn beside them, to the study objective's target (none when
    the studies optimise the metric without a target)."""
    objective = summary.objective
    tuned, missing, curves, critical = [], [], [], []
    for series in summary.fits:
        name = series.name or "tuned"
        tuned.append(Line("", name, series.batch_sizes, series.median, series.low, series.high))
        never = [b for b, m in zip(series.batch_sizes, series.median, strict=True) if m is None]
        missing.append(Line("", name, never, [None] * len(never), [], []))
        fit = series.fit
        if fit.s_min is None:
            continue
        span = np.geomspace(min(series.batch_sizes), max(series.batch_sizes), FIT_POINTS)
        curve = fitted_curve(fit, span)
        curves.append(FitCurve(name, curve.batch_sizes.tolist(), curve.steps.tolist()))
        low, high = fit.intervals.get("b_crit", (None, None))
        critical.append(Critical(name, fit.b_crit, low, high, fit.bracketed))
    shade = regimes(critical[0].b_crit) if len(summary.fits) == 1 and critical else None
    lines = []
    if objective.target is not None:
        for label, trials, history in fixed:
            lines += fixed_rule_lines(label, trials, history, objective.metric, objective.target)
    return TunedSteps(summary.target_label, tuned, missing, curves, critical, shade, lines)


REGIME_COLOURS = ("rgba(44, 160, 44, 0.08)", "rgba(255, 127, 14, 0.08)", "rgba(214, 39, 40, 0.08)")
REGIME_NAMES = ("perfect scaling", "diminishing returns", "maximal data parallelism")


def render(data: TunedSteps) -> go.Figure:
    """Log–log; the regimes as background bands (boundaries at B_crit / 4 and 4 B_crit)."""
    fig = go.Figure()
    names = [line.name for line in data.tuned] + [line.name for line in data.fixed]
    for line in data.tuned:
        colour = rule_colour(line.name, names)
        fig.add_trace(line_trace(line._replace(name=f"{line.name} (best trial)"), colour))
    for fit in data.fits:
        fig.add_trace(
            go.Scatter(
                x=fit.batch_sizes,
                y=fit.steps,
                mode="lines",
                name=f"{fit.name}: S_min (1 + B_noise / B)",
                line={"dash": "dot", "color": rule_colour(fit.name, names)},
            )
        )
    for line in data.fixed:
        fig.add_trace(line_trace(line, rule_colour(line.name, names)))
    for missing in data.not_reached:
        if missing.batch_sizes:
            fig.add_annotation(
                text=f"{missing.name}: not reached at B = "
                + ", ".join(str(b) for b in missing.batch_sizes),
                xref="paper",
                yref="paper",
                x=1,
                y=1,
                yanchor="bottom",
                showarrow=False,
            )
    # Shapes, named in the legend: annotations sit at log10 positions on log axes, shapes not.
    for c in data.critical:
        interval = "" if c.low is None else f" [{c.low:.3g}, {c.high:.3g}]"
        outside = "" if c.bracketed else ", outside the batch sizes fitted"
        fig.add_vline(
            x=c.b_crit,
            line={"dash": "dash", "color": "black"},
            name=f"{c.name}: B_crit {c.b_crit:.3g}{interval}{outside}",
            showlegend=True,
        )
        if c.low is not None:
            fig.add_vrect(
                x0=c.low,
                x1=c.high,
                fillcolor="rgba(0, 0, 0, 0.08)",
                line_width=0,
                name=f"{c.name}: B_crit 95% interval",
                showlegend=True,
            )
    if data.regimes is not None:
        sizes = [b for line in data.tuned + data.fixed for b in line.batch_sizes]
        edges = [min(sizes) / 2, data.regimes.perfect_below, data.regimes.maximal_above]
        edges.append(max(sizes) * 2)
        for i, (name, colour) in enumerate(zip(REGIME_NAMES, REGIME_COLOURS, strict=True)):
            if edges[i] < edges[i + 1]:
                fig.add_vrect(
                    x0=edges[i],
                    x1=edges[i + 1],
                    fillcolor=colour,
                    line_width=0,
                    layer="below",
                    name=name,
                    showlegend=True,
                )
    batch_axis(fig, data.tuned + data.fixed)
    fig.update_yaxes(type="log", title_text="steps")
    fig.update_layout(title=f"steps to reach {data.target}, learning rate tuned per batch size")
    return fig
