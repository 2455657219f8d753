"""Steps to reach a target against batch size (Shallue et al. 2018): a line per LR rule, the
median and band over seeds (never reaching counts as worst), and the perfect-scaling reference,
steps ∝ 1/B from the smallest batch size that reached the target."""

from __future__ import annotations

from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa

from analysis.figures._common import Line, lines
from analysis.figures._draw import batch_axis, line_trace, rule_colour
from analysis.metrics import best_configs, perfect_scaling, prepared, reached_at
from lbs_tune.names import comparison


class StepsToTarget(NamedTuple):
    metric: str
    target: float
    lines: list[Line]
    reference: Line | None


def extract(trials: pa.Table, history: pa.Table, metric: str, target: float) -> StepsToTarget:
    """The best configuration per rule and batch size by fewest steps; the reference anchored
    at the fewest median steps of any rule at the smallest batch size that reached it."""
    trials = prepared(trials)
    trials = trials.append_column(
        "target/step", reached_at(trials, history, metric, target, "step")
    )
    found = lines(best_configs(trials, "target/step", "min"))
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
    return StepsToTarget(metric, target, found, reference)


def render(data: StepsToTarget) -> go.Figure:
    """Log–log: on the perfect-scaling line steps halve as B doubles; the curves bend away from
    it into diminishing returns and flatten at maximal data parallelism."""
    fig = go.Figure()
    rules = sorted({line.name for line in data.lines})
    for line in data.lines:
        fig.add_trace(line_trace(line, rule_colour(line.name, rules)))
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
    batch_axis(fig, data.lines)
    fig.update_yaxes(type="log", title_text="steps")
    fig.update_layout(
        title=f"steps to reach {data.metric} {comparison(data.metric)} {data.target:g}"
    )
    return fig
