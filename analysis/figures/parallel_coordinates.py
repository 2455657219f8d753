"""One line per trial across the varying config keys (LR rule, batch size, searched keys),
coloured by its final metric."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc

from analysis.metrics import BATCH, RULE, prepared, searched_keys


class Dimension(NamedTuple):
    label: str
    values: list[float]
    tickvals: list[float] | None
    ticktext: list[str] | None


class ParallelCoordinates(NamedTuple):
    metric: str
    dimensions: list[Dimension]
    values: list[float]


def extract(trials: pa.Table, metric: str) -> ParallelCoordinates:
    """A dimension per key (see `dimension`); trials without a final `metric` are left out."""
    trials = prepared(trials)
    column = f"final/{metric}"
    if column not in trials.column_names:
        return ParallelCoordinates(metric, [], [])
    trials = trials.filter(pc.is_valid(trials[column]))
    keys = [RULE, BATCH, *searched_keys(trials)]
    dimensions = [dimension(k, trials[k].to_pylist()) for k in keys]
    return ParallelCoordinates(metric, dimensions, trials[column].to_pylist())


def dimension(label: str, values: list[Any]) -> Dimension:
    """Numbers spanning a factor of 10 or more go on a log axis labelled with the real values;
    anything else that is not a number becomes categories."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numbers and values:
        low, high = min(values), max(values)
        if low > 0 and high / low >= 10:
            ticks = sorted(set(values))
            return Dimension(
                label,
                [math.log10(v) for v in values],
                [math.log10(t) for t in ticks],
                [f"{t:g}" for t in ticks],
            )
        return Dimension(label, [float(v) for v in values], None, None)
    categories = sorted({str(v) for v in values})
    return Dimension(
        label,
        [float(categories.index(str(v))) for v in values],
        list(range(len(categories))),
        categories,
    )


def render(data: ParallelCoordinates) -> go.Figure:
    dimensions = [
        {"label": d.label, "values": d.values}
        | ({"tickvals": d.tickvals, "ticktext": d.ticktext} if d.tickvals is not None else {})
        for d in data.dimensions
    ]
    dimensions.append({"label": f"final {data.metric}", "values": data.values})
    fig = go.Figure(
        go.Parcoords(
            line={
                "color": data.values,
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": {"text": data.metric}},
            },
            dimensions=dimensions,
        )
    )
    fig.update_layout(title=f"configurations and their final {data.metric}")
    return fig
