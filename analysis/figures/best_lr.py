"""The tuned learning rate against batch size, log–log: each study's best `lr.base`, the
least-squares slope of log lr on log B (printed, with its standard error from 3 points on), and
the references of the linear rule (slope 1, Goyal et al. 2017) and the square-root rule (slope
1/2, Krizhevsky 2014; Hoffer et al. 2017), both through the smallest batch size's best lr
(the geometric mean over its seeds)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import plotly.graph_objects as go

from analysis.figures._common import Points
from analysis.figures._draw import batch_axis, finish, log_axis, rule_colour

if TYPE_CHECKING:
    from analysis.summary import Summary

PARAM = "lr.base"
REFERENCES = {"linear rule (slope 1)": 1.0, "square-root rule (slope 1/2)": 0.5}


class Slope(NamedTuple):
    slope: float
    stderr: float | None  # None with fewer than 3 points
    intercept: float  # of log lr on log B (natural logs)


class BestLR(NamedTuple):
    name: str  # the series (grid keys other than batch size and seed)
    batch_sizes: list[int]  # one per study with a best trial
    lrs: list[float]
    studies: list[str]
    slope: Slope | None  # None with fewer than 2 distinct batch sizes
    references: dict[str, list[float]]  # name -> lr at each of `sizes`
    sizes: list[int]  # the distinct batch sizes, ascending


class BestLRs(NamedTuple):
    param: str
    series: list[BestLR]


def fit_slope(batch_sizes: list[float], lrs: list[float]) -> Slope | None:
    """Least squares of log lr on log B; None with fewer than 2 distinct batch sizes."""
    if len(set(batch_sizes)) < 2:
        return None
    x, y = np.log(batch_sizes), np.log(lrs)
    (slope, intercept), residuals, *_ = np.polyfit(x, y, 1, full=True)
    stderr = None
    if len(x) >= 3:
        spread = float(residuals[0]) if len(residuals) else 0.0
        stderr = math.sqrt(spread / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    return Slope(float(slope), stderr, float(intercept))


def extract(summary: Summary, param: str = PARAM) -> BestLRs:
    """Per series (as in `summary.fits`, in order of first appearance), the best trial's
    `param` of every study that has one; no series when `param` was not searched."""
    by_series: dict[str, list] = {}
    for p in summary.points:
        if p.best is None or param not in p.best["params"] or p.batch_size is None:
            continue
        by_series.setdefault(p.series or "tuned", []).append(
            (p.batch_size, p.best["params"][param], p.study)
        )
    found = []
    for name, rows in by_series.items():
        rows.sort(key=lambda r: r[0])
        sizes = sorted({b for b, _, _ in rows})
        smallest = [lr for b, lr, _ in rows if b == sizes[0]]
        # Through the geometric mean of the smallest batch size's best rates (over seeds).
        anchor = math.exp(sum(math.log(lr) for lr in smallest) / len(smallest))
        references = {
            ref: [anchor * (b / sizes[0]) ** power for b in sizes]
            for ref, power in REFERENCES.items()
        }
        found.append(
            BestLR(
                name,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                fit_slope([r[0] for r in rows], [r[1] for r in rows]),
                references,
                sizes,
            )
        )
    return BestLRs(param, found)


def render(data: BestLRs) -> go.Figure:
    fig = go.Figure()
    names = [s.name for s in data.series]
    for s in data.series:
        colour = rule_colour(s.name, names)
        fig.add_trace(
            go.Scatter(
                x=s.batch_sizes,
                y=s.lrs,
                mode="markers",
                marker={"color": colour, "size": 10},
                text=s.studies,
                name=f"{s.name}: best {data.param}",
            )
        )
        if s.slope is not None:
            error = "" if s.slope.stderr is None else f" ± {s.slope.stderr:.2f}"
            fitted = [math.exp(s.slope.intercept) * b**s.slope.slope for b in s.sizes]
            fig.add_trace(
                go.Scatter(
                    x=s.sizes,
                    y=fitted,
                    mode="lines",
                    line={"color": colour},
                    name=f"{s.name}: fitted slope {s.slope.slope:.2f}{error}",
                )
            )
        for (ref, values), dash in zip(s.references.items(), ("dash", "dot"), strict=True):
            fig.add_trace(
                go.Scatter(
                    x=s.sizes,
                    y=values,
                    mode="lines",
                    line={"dash": dash, "color": "grey"},
                    name=ref,
                    legendgroup=ref,
                    showlegend=s is data.series[0],
                )
            )
    batch_axis(fig, [Points(s.name, s.name, s.sizes, [], []) for s in data.series])
    shown = [
        v for s in data.series for v in s.lrs + [r for ref in s.references.values() for r in ref]
    ]
    log_axis(fig, "y", shown)
    fig.update_yaxes(title_text=f"best {data.param}")
    slopes = ", ".join(
        f"{s.name + ' ' if len(data.series) > 1 else ''}{s.slope.slope:.2f}"
        for s in data.series
        if s.slope is not None
    )
    return finish(fig, f"tuned learning rate against batch size (log–log slope {slopes or 'n/a'})")
