"""Steps to the target against batch size with the learning rate tuned per batch size (Shallue
et al. 2018): the best trial's steps (median and min–max over seeds), the fit S(B) = S_min (1 +
B_crit / B) with B_crit and its interval marked (McCandlish et al. 2018), the three regimes
shaded, and beside them the fixed-rule series (the best configuration per rule and batch size)
of this sweep's unsearched trials or of a compared sweep, to the same target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc

from analysis.answer import number
from analysis.figures import steps_to_target
from analysis.figures._common import FitCurve, Line, fit_curve
from analysis.figures._draw import (
    axis_title,
    batch_axis,
    finish,
    fit_trace,
    footnote,
    line_trace,
    log_axis,
    rule_colour,
    spread_note,
)
from analysis.scaling import Regimes, regimes
from lbs_tune.names import SEARCH_KEY

if TYPE_CHECKING:
    from analysis.summary import Summary

SEARCH_COLUMN = f"{SEARCH_KEY}.study"  # set in every searched trial's config (lbs_tune.searcher)


class Critical(NamedTuple):
    """B_crit of one series with its interval (None without one)."""

    name: str
    b_crit: float
    low: float | None
    high: float | None
    bracketed: bool
    steps: float | None = None  # S(B_crit) = 2 S_min, where the fit puts it


class TunedSteps(NamedTuple):
    target: str  # 'val/accuracy ≥ 0.5'
    tuned: list[Line]  # one per series: the best steps, median and min–max over seeds
    not_reached: list[Line]  # per series, the batch sizes whose median seed never reached it
    fits: list[FitCurve]
    critical: list[Critical]
    regimes: Regimes | None  # shaded only for a single series with a fit
    fixed: list[Line]  # fixed-rule series, named '<source>: <rule>'
    seeds: int = 1  # the most seeds behind one tuned point


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
        curves.append(fit_curve(name, fit, series.batch_sizes))
        low, high = fit.intervals.get("b_crit", (None, None))
        critical.append(Critical(name, fit.b_crit, low, high, fit.bracketed, 2 * fit.s_min))
    shade = regimes(critical[0].b_crit) if len(summary.fits) == 1 and critical else None
    lines = []
    if objective.target is not None:
        for label, trials, history in fixed:
            lines += fixed_rule_lines(label, trials, history, objective.metric, objective.target)
    seeds = max((n for series in summary.fits for n in series.seeds), default=1)
    return TunedSteps(summary.target_label, tuned, missing, curves, critical, shade, lines, seeds)


# The regimes as background bands, green, amber and red, strong enough to tell apart on white;
# B_crit's interval is no band but an error bar on its point of the fit (black), so the two
# never blend.
REGIME_COLOURS = (
    "rgba(44, 160, 44, 0.14)",
    "rgba(255, 160, 0, 0.16)",
    "rgba(214, 39, 40, 0.12)",
)
REGIME_NAMES = ("perfect scaling", "diminishing returns", "maximal data parallelism")


def render(data: TunedSteps) -> go.Figure:
    """Log–log; the regimes as background bands (boundaries at B_crit / 4 and 4 B_crit), named
    along the top; B_crit as a black diamond on the fit at 2 S_min with its interval as a
    horizontal error bar, and a dashed line."""
    fig = go.Figure()
    names = [line.name for line in data.tuned] + [line.name for line in data.fixed]
    for line in data.tuned:
        colour = rule_colour(line.name, names)
        fig.add_trace(line_trace(line, colour, name=f"{line.name}: best trial of each batch size"))
    for fit in data.fits:
        colour = rule_colour(fit.name, names)
        fig.add_trace(fit_trace(fit, colour, f"{fit.name}: fit S_min (1 + B_crit / B)"))
    for line in data.fixed:
        fig.add_trace(line_trace(line, rule_colour(line.name, names)))
    for missing in data.not_reached:
        if missing.batch_sizes:
            sizes = ", ".join(str(b) for b in missing.batch_sizes)
            footnote(fig, f"{missing.name}: target not reached at B = {sizes}")
    for c in data.critical:
        interval = "" if c.low is None else f" [{number(c.low)}, {number(c.high)}]"
        outside = "" if c.bracketed else ", outside the batch sizes fitted"
        # A side that the data do not bound (0 or inf) gets no bar: the legend says so.
        bars = [
            None if side is None or not 0 < side < math.inf else abs(side - c.b_crit)
            for side in (c.high, c.low)
        ]
        error = (
            {
                "type": "data",
                "symmetric": False,
                "array": [bars[0] or 0],
                "arrayminus": [bars[1] or 0],
                "thickness": 2.5,
                "width": 8,
                "color": "black",
            }
            if any(bars)
            else None
        )
        fig.add_trace(
            go.Scatter(
                x=[c.b_crit],
                y=[c.steps],
                mode="markers",
                marker={"symbol": "diamond", "size": 13, "color": "black"},
                error_x=error,
                name=f"{c.name}: B_crit {c.b_crit:.3g}{interval}{outside}",
            )
        )
        fig.add_vline(x=c.b_crit, line={"dash": "dash", "color": "black", "width": 1})
    if data.regimes is not None:
        sizes = [b for line in data.tuned + data.fixed for b in line.batch_sizes]
        edges = [min(sizes) / 1.5, data.regimes.perfect_below, data.regimes.maximal_above]
        edges.append(max(sizes) * 1.5)
        places = ("top left", "top center", "top right")  # the outer labels inside the plot
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
                    label={"text": name, "textposition": places[i], "font": {"size": 12}},
                )
    batch_axis(fig, data.tuned + data.fixed)
    shown = [v for line in data.tuned + data.fixed for v in line.low + line.high + line.median]
    log_axis(fig, "y", shown + [v for f in data.fits for v in f.steps])
    fig.update_yaxes(title_text=axis_title("step"))
    title = f"steps to reach {data.target}, learning rate tuned per batch size"
    return finish(fig, title + spread_note(data.seeds))
