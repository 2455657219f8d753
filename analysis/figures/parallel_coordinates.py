"""One line per trial across the keys that were varied. A fixed-rule sweep: the grid keys that
vary (LR rule, batch size, others; never the seed), coloured by the final metric. A searched
sweep (`extract_studies`): the batch size, the other grid keys that vary and the searched
parameters, each study's finished trials coloured by their objective relative to their study's
best (steps as a multiple of the best, a metric as a share of the study's range), infeasible
trials grey. Axes with one value and the search's bookkeeping (`search.*`) are left out;
log-uniform parameters and ranges of 10x or more sit on log axes (plotly's parallel coordinates
have none: log10 values, ticks labelled in real units)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc

from analysis.figures._draw import colour_scale, finish, log_ticks
from analysis.metrics import BATCH, RULE, SEED, prepared, varying_keys
from lbs_tune.names import is_bookkeeping
from lbs_tune.studies import ran_out

if TYPE_CHECKING:
    from analysis.summary import Summary

# Relative steps are coloured up to this multiple of the study's best (and beyond, alike).
WORST_RATIO = 8.0
GREY = "rgb(150, 150, 150)"
# Of the colour range, the share that feasible trials take; infeasible ones sit above it.
FEASIBLE_SHARE = 0.9


class Dimension(NamedTuple):
    label: str
    values: list[float]
    tickvals: list[float] | None
    ticktext: list[str] | None


class ParallelCoordinates(NamedTuple):
    colour: str  # what the colour says (the colour bar's title)
    dimensions: list[Dimension]
    values: list[float]  # the colour of each line
    ticks: dict[float, str]  # colour-bar ticks; {} for plain numbers
    infeasible: bool  # values above FEASIBLE_SHARE are infeasible trials (drawn grey)


def shown_keys(trials: pa.Table) -> list[str]:
    """The config keys that vary across `trials`, rule and batch size first, without the seed
    and the search's bookkeeping."""
    keys = [k for k in varying_keys(trials) if k != SEED and not is_bookkeeping(k)]
    first = [k for k in (RULE, BATCH) if k in keys]
    return first + [k for k in keys if k not in first]


def extract(trials: pa.Table, metric: str) -> ParallelCoordinates:
    """A fixed-rule sweep's trials: a dimension per varying key (`shown_keys`, see
    `dimension`), coloured by the final `metric`; trials without one are left out."""
    trials = prepared(trials)
    column = f"final/{metric}"
    if column not in trials.column_names:
        return ParallelCoordinates(f"final {metric}", [], [], {}, False)
    trials = trials.filter(pc.is_valid(trials[column]))
    dimensions = [dimension(k, trials[k].to_pylist()) for k in shown_keys(trials)]
    return ParallelCoordinates(f"final {metric}", dimensions, trials[column].to_pylist(), {}, False)


def _badness(value: float | None, values: list[float], steps: bool, mode: str) -> float:
    """0 for the study's best, 1 for its worst shown (steps: WORST_RATIO times the best), above
    1 (1 / FEASIBLE_SHARE) for an infeasible trial."""
    if value is None:
        return 1 / FEASIBLE_SHARE
    if steps:
        return min(math.log(value / min(values)) / math.log(WORST_RATIO), 1.0)
    best, worst = (max(values), min(values)) if mode == "max" else (min(values), max(values))
    return 0.0 if best == worst else (best - value) / (best - worst)


def extract_studies(summary: Summary, space: dict[str, Any] | None = None) -> ParallelCoordinates:
    """Every finished trial of every study: batch size, the other grid keys that vary, and the
    searched parameters (`space`: the sweep's `search.space` as in its record, for which are
    log-uniform; without it a range of 10x or more is drawn on a log axis)."""
    steps = summary.objective.kind == "steps_to_target"
    rows, colours = [], []
    for p in summary.points:
        done = [t for t in p.trials if ran_out(t)]
        values = [t["value"] for t in done if t["state"] == "COMPLETE"]
        for t in done:
            value = t["value"] if t["state"] == "COMPLETE" else None
            rows.append({**p.point, BATCH: p.batch_size, **t["params"]})
            colours.append(_badness(value, values, steps, summary.objective.mode))
    kinds = {k: next(iter(v)) for k, v in (space or {}).items() if isinstance(v, dict) and v}
    keys = [BATCH] + [k for r in rows for k in r if k not in (BATCH, SEED)]
    dimensions = []
    for key in dict.fromkeys(keys):
        values = [r.get(key) for r in rows]
        if len({repr(v) for v in values}) > 1:
            kind = kinds.get(key)  # None: not searched, or no record: the range decides
            log = None if kind is None else kind == "log_uniform"
            dimensions.append(dimension(key, values, log))
    if steps:
        label = f"steps to {summary.target_label} / the study's best"
        ticks = {0.0: "best", 1 / 3: "2×", 2 / 3: "4×", 1.0: f"≥ {WORST_RATIO:g}×"}
    else:
        label = f"{summary.objective.metric}, from the study's best to its worst"
        ticks = {0.0: "best", 1.0: "worst"}
    infeasible = any(c > 1 for c in colours)
    if infeasible:
        ticks[1 / FEASIBLE_SHARE] = "not reached" if steps else "diverged"
    return ParallelCoordinates(label, dimensions, colours, ticks, infeasible)


def dimension(label: str, values: list[Any], log: bool | None = None) -> Dimension:
    """Numbers on a log axis, labelled '<label> (log)', when `log` (or, with `log` None, when
    all are positive and span a factor of 10 or more), ticked at the values where there are at
    most 10 of them, else at 1-2-5 steps; other numbers on a linear axis; anything else as
    categories."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numbers and values:
        low, high = min(values), max(values)
        if log is None:
            log = low > 0 and high / low >= 10
        if log and low > 0:
            distinct = sorted(set(values))
            if len(distinct) <= 10:
                ticks, text = distinct, [f"{t:g}" for t in distinct]
            else:
                ticks, text = log_ticks(values)
                shown = [(t, s) for t, s in zip(ticks, text, strict=True) if low <= t <= high]
                ticks, text = [t for t, _ in shown], [s for _, s in shown]
            return Dimension(
                f"{label} (log)",
                [math.log10(v) for v in values],
                [math.log10(t) for t in ticks],
                text,
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
    scale = colour_scale()
    line: dict[str, Any] = {"color": data.values, "showscale": True}
    bar: dict[str, Any] = {"title": {"text": data.colour, "side": "right"}}
    if data.ticks:
        bar |= {"tickvals": list(data.ticks), "ticktext": list(data.ticks.values())}
        top = 1 / FEASIBLE_SHARE if data.infeasible else 1.0
        share = FEASIBLE_SHARE if data.infeasible else 1.0
        scale = [[p * share, c] for p, c in scale]
        if data.infeasible:
            scale += [[FEASIBLE_SHARE + 1e-6, GREY], [1.0, GREY]]
        line |= {"cmin": 0.0, "cmax": top}
    line |= {"colorscale": scale, "colorbar": bar}
    fig = go.Figure(
        go.Parcoords(
            line=line,
            dimensions=dimensions,
            labelfont={"size": 14},
            tickfont={"size": 12},
            # The ends of each axis' range would print beside its first and last ticks.
            rangefont={"color": "rgba(0, 0, 0, 0)"},
        )
    )
    fig.update_layout(margin={"l": 80, "r": 80, "t": 110})
    title = f"trials across the keys varied, coloured by {data.colour}"
    return finish(fig, title)
