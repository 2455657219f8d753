"""The steps–examples trade-off (McCandlish et al. 2018, Fig. 1): the examples E = B S against
the steps S that each batch size's best trial needed to reach the target, and the fitted
hyperbola (S / S_min - 1)(E / E_min - 1) = 1 with its asymptotes S_min and E_min; B_crit sits at
(2 S_min, 2 E_min), where neither steps nor examples are more than twice their minimum."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import plotly.graph_objects as go

from analysis.figures._draw import axis_title, finish, log_axis, rule_colour
from analysis.scaling import fitted_curve

if TYPE_CHECKING:
    from analysis.summary import Summary

# The hyperbola is drawn for B from B_crit / SPAN to B_crit * SPAN: near both asymptotes.
SPAN = 100.0
FIT_POINTS = 200


class Frontier(NamedTuple):
    """One series: its points (batch sizes that reached the target) and, with a fit, the
    hyperbola and its minima."""

    name: str
    batch_sizes: list[int]
    steps: list[float]
    examples: list[float]
    curve_steps: list[float]  # [] without a fit
    curve_examples: list[float]
    s_min: float | None
    e_min: float | None
    b_crit: float | None


class Pareto(NamedTuple):
    target: str
    series: list[Frontier]


def extract(summary: Summary) -> Pareto:
    """Per series of `summary.fits`, the median best steps of each batch size that reached
    the target, their examples B S, and the fitted curve."""
    found = []
    for series in summary.fits:
        reached = [
            (b, s) for b, s in zip(series.batch_sizes, series.median, strict=True) if s is not None
        ]
        if not reached:
            continue
        fit = series.fit
        curve_s, curve_e = [], []
        if fit.s_min is not None:
            span = np.geomspace(fit.b_crit / SPAN, fit.b_crit * SPAN, FIT_POINTS)
            curve = fitted_curve(fit, span)
            curve_s, curve_e = curve.steps.tolist(), curve.examples.tolist()
        found.append(
            Frontier(
                series.name or "tuned",
                [b for b, _ in reached],
                [s for _, s in reached],
                [b * s for b, s in reached],
                curve_s,
                curve_e,
                fit.s_min,
                fit.e_min,
                fit.b_crit,
            )
        )
    return Pareto(summary.target_label, found)


def render(data: Pareto) -> go.Figure:
    """Log–log, steps across, examples up; each point labelled with its batch size."""
    fig = go.Figure()
    names = [f.name for f in data.series]
    for f in data.series:
        colour = rule_colour(f.name, names)
        fig.add_trace(
            go.Scatter(
                x=f.steps,
                y=f.examples,
                mode="markers+text",
                text=[f"B={b}" for b in f.batch_sizes],
                textposition="top right",
                marker={"color": colour, "size": 9},
                name=f"{f.name}: best trials",
            )
        )
        if f.curve_steps:
            fig.add_trace(
                go.Scatter(
                    x=f.curve_steps,
                    y=f.curve_examples,
                    mode="lines",
                    line={"dash": "dot", "color": colour},
                    name=f"{f.name}: (S/S_min - 1)(E/E_min - 1) = 1",
                )
            )
            fig.add_trace(
                go.Scatter(
                    x=[2 * f.s_min],
                    y=[2 * f.e_min],
                    mode="markers",
                    marker={"symbol": "star", "size": 14, "color": colour},
                    name=f"{f.name}: B_crit {f.b_crit:.3g} (2 S_min, 2 E_min)",
                )
            )
            fig.add_hline(y=f.e_min, line={"dash": "dash", "color": "grey"})
            fig.add_vline(x=f.s_min, line={"dash": "dash", "color": "grey"})
    steps = [v for f in data.series for v in [*f.steps, f.s_min or 0, 2 * (f.s_min or 0)]]
    examples = [v for f in data.series for v in [*f.examples, f.e_min or 0, 2 * (f.e_min or 0)]]
    log_axis(fig, "x", steps)
    log_axis(fig, "y", examples)
    # The hyperbola runs far along both asymptotes: show the points and the minima.
    fig.update_xaxes(title_text=f"steps S ({axis_title('step')})", range=_span(steps))
    fig.update_yaxes(title_text="examples E = B S (examples)", range=_span(examples))
    return finish(
        fig, f"examples against steps to reach {data.target} (asymptotes: S_min and E_min)"
    )


def _span(values: list[float]) -> list[float] | None:
    """A log axis' range (log10 units) around the positive `values`, a third of a decade
    beyond each end."""
    shown = [v for v in values if v > 0]
    if not shown:
        return None
    return [math.log10(min(shown)) - 0.3, math.log10(max(shown)) + 0.3]
