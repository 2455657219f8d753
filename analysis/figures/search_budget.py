"""Is the search budget enough? Per study, the best steps to target of a search of k of its
trials against k (Shallue et al. 2018's search-budget curve, `analysis.budget.best_of_k`: exact
over all k-subsets): the median and the 10–90% band. A curve that still falls at the last k says
more trials per point would find fewer steps. The curves are the summary's (`budget`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import plotly.graph_objects as go

from analysis.budget import QUANTILES
from analysis.figures._common import Curve
from analysis.figures._draw import batch_colour, curve_traces, finish, log_axis

if TYPE_CHECKING:
    from analysis.summary import Summary


class SearchBudget(NamedTuple):
    target: str
    studies: list[Curve]  # panel: the study's name; x: k; median, low, high: best steps


def _finite(values) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def extract(summary: Summary) -> SearchBudget:
    """One curve per study whose summary has one: a told trial and steps to target (a metric
    study without a target on its metric has none: its values are no steps)."""
    found = []
    for p in summary.points:
        if p.budget is None:
            continue
        curve = p.budget.curve
        found.append(
            Curve(
                p.study,
                p.batch_size or 0,
                [int(k) for k in curve.k],
                _finite(curve.median),
                _finite(curve.low),
                _finite(curve.high),
            )
        )
    return SearchBudget(summary.target_label, found)


def render(data: SearchBudget) -> go.Figure:
    """Log y; a colour per batch size (as the other figures), a line per study."""
    fig = go.Figure()
    sizes = sorted({c.batch_size for c in data.studies}) or [1]
    for curve in data.studies:
        colour = batch_colour(curve.batch_size, sizes) if curve.batch_size else "grey"
        # The band where both quantiles are finite: a share of the k-subsets that never reach
        # the target leaves its top unbounded (a suffix of k is finite: quantiles fall with k).
        bounded = [i for i in range(len(curve.x)) if None not in (curve.low[i], curve.high[i])]
        part = curve._replace(
            x=[curve.x[i] for i in bounded],
            low=[curve.low[i] for i in bounded],
            high=[curve.high[i] for i in bounded],
        )
        band, _ = curve_traces(part, curve.panel, {"color": colour}, True)
        _, median = curve_traces(curve, curve.panel, {"color": colour}, True, "lines+markers")
        fig.add_traces([band, median])
    fig.update_xaxes(title_text="trials per point (k)", dtick=1)
    log_axis(fig, "y", [v for c in data.studies for v in c.low + c.high])
    fig.update_yaxes(title_text=f"best steps to {data.target}")
    low, high = (round(100 * q) for q in QUANTILES)
    return finish(
        fig,
        f"search budget: the best of k trials (median and {low}–{high}% over the k-subsets)",
        legend="study",
    )
