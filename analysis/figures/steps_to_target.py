"""Steps to reach a target against batch size (Shallue et al. 2018): a line per LR rule, the
median and band over seeds (never reaching counts as worst), and the perfect-scaling reference,
steps ∝ 1/B from the smallest batch size that reached the target; each rule's last batch size
that still scales (`analysis.answer.scaling_limit`) is ringed."""

from __future__ import annotations

from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa

from analysis.answer import FACTOR, fixed_steps, scaling_limit
from analysis.figures._common import Line, lines, most_seeds
from analysis.figures._draw import (
    axis_title,
    batch_axis,
    finish,
    footnote,
    line_trace,
    log_axis,
    rule_colour,
    series_name,
    spread_note,
)
from analysis.metrics import perfect_scaling
from lbs_tune.names import target_label


class StepsToTarget(NamedTuple):
    metric: str
    target: float
    lines: list[Line]
    reference: Line | None
    seeds: int  # the most seeds behind one point
    scales_to: dict[str, int | None]  # per rule, its last batch size that scales


def extract(trials: pa.Table, history: pa.Table, metric: str, target: float) -> StepsToTarget:
    """The best configuration per rule and batch size by fewest steps
    (`analysis.answer.fixed_steps`); the reference anchored at the fewest median steps of any
    rule at the smallest batch size that reached it."""
    best = fixed_steps(trials, history, metric, target)
    found = lines(best)
    fewest: dict[int, float] = {}
    for line in found:
        for batch, median in zip(line.batch_sizes, line.median, strict=True):
            if median is not None:
                fewest[batch] = min(median, fewest.get(batch, median))
    sizes = sorted({b for line in found for b in line.batch_sizes})
    steps = perfect_scaling(sizes, [fewest.get(b) for b in sizes])
    reference = (
        Line("", "perfect scaling", sizes, steps, steps, steps)
        if any(s is not None for s in steps)
        else None
    )
    limits = {line.name: scaling_limit(line.batch_sizes, line.median)[0] for line in found}
    return StepsToTarget(metric, target, found, reference, most_seeds(best), limits)


def render(data: StepsToTarget) -> go.Figure:
    """Log–log: steps fall as 1/B along the reference while batches scale perfectly; rules bend
    away from it into diminishing returns and flatten at maximal data parallelism."""
    fig = go.Figure()
    rules = sorted({line.name for line in data.lines})
    ringed = False  # the ring's legend entry is shown once
    for line in data.lines:
        colour = rule_colour(line.name, rules)
        name = series_name(line.name, rules) or "steps to target"
        fig.add_trace(line_trace(line, colour, name=name))
        last = data.scales_to.get(line.name)
        if last is not None:
            steps = line.median[line.batch_sizes.index(last)]
            fig.add_trace(
                go.Scatter(
                    x=[last],
                    y=[steps],
                    mode="markers",
                    marker={
                        "symbol": "circle-open",
                        "size": 18,
                        "color": colour,
                        "line": {"width": 2},
                    },
                    name=f"last batch size within {FACTOR:g}× of perfect scaling",
                    legendgroup="last",
                    showlegend=not ringed,
                )
            )
            ringed = True
    if data.reference is not None:
        fig.add_trace(
            go.Scatter(
                x=data.reference.batch_sizes,
                y=data.reference.median,
                mode="lines",
                name="perfect scaling (steps ∝ 1/B)",
                line={"dash": "dash", "color": "grey"},
            )
        )
    missed = [
        f"{series_name(line.name, rules) or 'B'} at {', '.join(str(b) for b in never)}"
        for line in data.lines
        if (never := [b for b, m in zip(line.batch_sizes, line.median, strict=True) if m is None])
    ]
    if missed:
        footnote(fig, "target not reached (median seed): " + "; ".join(missed))
    batch_axis(fig, data.lines)
    shown = [v for line in data.lines for v in line.low + line.high + line.median]
    shown += data.reference.median if data.reference else []
    log_axis(fig, "y", shown)
    fig.update_yaxes(title_text=axis_title("step"))
    title = f"steps to reach {target_label(data.metric, data.target)}{spread_note(data.seeds)}"
    return finish(fig, title, legend="lr.scaling" if len(rules) > 1 else None)
