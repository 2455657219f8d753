"""The sweep's figures. Each is two functions: one pure function that extracts the figure's data
from the loaded tables into a small named tuple (tested without drawing), and `plot_*`, which
renders that tuple with plotly.

Shared conventions: one panel or line per LR rule (`lr.scaling`); batch sizes on a log2 axis;
seeds aggregated as the median with a min–max band; for a searched sweep (lr.base or another key
varies besides batch size, rule and seed) the best configuration per batch size; errored trials
left out (a crash is not a result) while diverged ones stay in and are marked (divergence is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import plotly.colors
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
from plotly.subplots import make_subplots

from analysis.load import config_columns
from analysis.metrics import (
    Mode,
    best_per_batch_size,
    mode_of,
    perfect_scaling,
    seed_spread,
    to_target,
)
from lbs_tune.config import LRConfig, TrialConfig

RULE = "lr.scaling"
BATCH = "batch_size"
SEED = "seed"
# What a trial config without these keys means (the TrialConfig defaults).
DEFAULTS = {RULE: LRConfig().scaling, BATCH: TrialConfig.model_fields[BATCH].default}
DIVERGED_MARKER = {"symbol": "x", "size": 11, "color": "crimson"}
EVALUATION_SPLITS = ("train", "val", "test")
RULE_DASHES = ("solid", "dash", "dot", "dashdot")


class Curve(NamedTuple):
    """One learning curve: the seeds of one configuration, median and min–max per x."""

    panel: str
    batch_size: int
    x: list[float]
    median: list[float | None]
    low: list[float | None]
    high: list[float | None]


class Line(NamedTuple):
    """A value against batch size: the median over seeds with its min–max band."""

    panel: str
    name: str
    batch_sizes: list[int]
    median: list[float | None]
    low: list[float | None]
    high: list[float | None]


class Points(NamedTuple):
    """Single trials: x, y and the trial ids (hover text)."""

    panel: str
    name: str
    x: list[float]
    y: list[float | None]
    text: list[str]


class LearningCurves(NamedTuple):
    metric: str
    x: str
    panels: list[str]
    curves: list[Curve]


class EvaluationCurves(NamedTuple):
    """The checkpoints' metrics (`lbs-tune evaluate`): one LearningCurves per `<split>/loss` and
    `<split>/accuracy` present, losses first, splits in train, val, test order."""

    splits: list[str]
    curves: list[LearningCurves]


class MetricVsBatchSize(NamedTuple):
    metric: str
    lines: list[Line]
    diverged: list[Points]


class StepsToTarget(NamedTuple):
    metric: str
    target: float
    lines: list[Line]
    reference: Line | None


class LearningRates(NamedTuple):
    points: list[Points]
    diverged: Points


class Throughput(NamedTuple):
    points: list[Points]


class Dimension(NamedTuple):
    label: str
    values: list[float]
    tickvals: list[float] | None
    ticktext: list[str] | None


class ParallelCoordinates(NamedTuple):
    metric: str
    dimensions: list[Dimension]
    values: list[float]


# ============================================================================ Preparation


def prepared(trials: pa.Table) -> pa.Table:
    """The trials that figures show: errored ones dropped, a missing LR rule or batch size set
    to its TrialConfig default, and list-valued config keys turned into text (groupable)."""
    trials = trials.filter(pc.fill_null(pc.not_equal(trials["state"], "ERROR"), True))
    for key, default in DEFAULTS.items():
        if key not in trials.column_names:
            trials = trials.append_column(key, pa.array([default] * trials.num_rows))
        trials = trials.set_column(
            trials.schema.get_field_index(key), key, pc.fill_null(trials[key], default)
        )
    for key in config_columns(trials):
        if pa.types.is_nested(trials.schema.field(key).type):
            text = pa.array([None if v is None else str(v) for v in trials[key].to_pylist()])
            trials = trials.set_column(trials.schema.get_field_index(key), key, text)
    return trials


def varying_keys(trials: pa.Table) -> list[str]:
    """The config keys whose value differs between trials."""
    return [k for k in config_columns(trials) if len({repr(v) for v in trials[k].to_pylist()}) > 1]


def searched_keys(trials: pa.Table) -> list[str]:
    """Config keys that vary across the trials, other than rule, batch size and seed."""
    return [k for k in varying_keys(trials) if k not in (RULE, BATCH, SEED)]


def _best(trials: pa.Table, value: str, mode: Mode) -> pa.Table:
    """Seed spread of `value` for the best configuration of each rule and batch size."""
    spread = seed_spread(trials, value, [RULE, BATCH, *searched_keys(trials)], mode)
    return best_per_batch_size(spread, mode, [RULE, BATCH])


def _lines(best: pa.Table, panel: str | None = None) -> list[Line]:
    """One Line per rule from `_best`'s rows; `panel` names the subplot (default: the rule)."""
    rows = best.to_pylist()
    lines = []
    for rule in sorted({r[RULE] for r in rows}):
        mine = [r for r in rows if r[RULE] == rule]
        lines.append(
            Line(
                panel if panel is not None else rule,
                rule,
                [r[BATCH] for r in mine],
                *([r[stat] for r in mine] for stat in ("median", "low", "high")),
            )
        )
    return lines


def _points(panel: str, name: str, rows: list[dict[str, Any]], values: list) -> Points:
    """Trials (rows of a trials table) as Points: batch size against `values`."""
    return Points(panel, name, [r[BATCH] for r in rows], values, [r["trial_id"] for r in rows])


def _by_rule(panel: str, rows: list[dict[str, Any]], values: list) -> list[Points]:
    """`_points` per LR rule, `values` aligned with `rows`."""
    return [
        _points(
            panel,
            rule,
            [r for r in rows if r[RULE] == rule],
            [v for r, v in zip(rows, values, strict=True) if r[RULE] == rule],
        )
        for rule in sorted({r[RULE] for r in rows})
    ]


def _attach(history: pa.Table, trials: pa.Table, keys: Sequence[str]) -> pa.Table:
    """`history` restricted to `trials`, with their `keys` columns added to each report."""
    history = history.filter(pc.is_in(history["trial_id"], trials["trial_id"]))
    index = pc.index_in(history["trial_id"], trials["trial_id"])
    for key in keys:
        history = history.append_column(key, trials[key].take(index))
    return history


# ============================================================================ Learning curves


def learning_curves(
    trials: pa.Table, history: pa.Table, metric: str, x: str = "step"
) -> LearningCurves:
    """`metric` against `x` (step, examples or epoch): one panel per LR rule, one curve
    per batch size (its best configuration by the final metric), median and band over seeds."""
    trials = prepared(trials)
    mode = mode_of(metric) or "max"
    keys = [RULE, BATCH, *searched_keys(trials)]
    if f"final/{metric}" in trials.column_names and keys[2:]:
        winners = _best(trials, f"final/{metric}", mode).select(keys).to_pylist()
        chosen = {tuple(w.values()) for w in winners}
        rows = trials.select(keys).to_pylist()
        trials = trials.filter(pa.array([tuple(r.values()) in chosen for r in rows]))
    reports = _attach(history, trials, [RULE, BATCH])
    spread = seed_spread(reports, metric, [RULE, BATCH, x], mode).to_pylist()
    curves = []
    for rule, batch in sorted({(r[RULE], r[BATCH]) for r in spread}):
        mine = [r for r in spread if (r[RULE], r[BATCH]) == (rule, batch)]
        curves.append(
            Curve(
                rule,
                batch,
                [r[x] for r in mine],
                *([r[stat] for r in mine] for stat in ("median", "low", "high")),
            )
        )
    return LearningCurves(metric, x, sorted({c.panel for c in curves}), curves)


def plot_learning_curves(data: LearningCurves) -> go.Figure:
    """Panels side by side sharing the y axis; colour runs over log2(batch size)."""
    panels = data.panels or [""]
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        subplot_titles=[f"{RULE} = {p}" for p in panels],
    )
    sizes = sorted({c.batch_size for c in data.curves})
    for curve in data.curves:
        col = panels.index(curve.panel) + 1
        colour = _batch_colour(curve.batch_size, sizes)
        for part in _curve_traces(curve, f"B={curve.batch_size}", {"color": colour}, col == 1):
            fig.add_trace(part, row=1, col=col)
    fig.update_xaxes(title_text=data.x)
    fig.update_yaxes(title_text=data.metric, col=1)
    fig.update_layout(title=f"{data.metric} during training (median and min–max over seeds)")
    return fig


# ============================================================================ Checkpoints


def evaluation_curves(trials: pa.Table, evaluation: pa.Table) -> EvaluationCurves:
    """Loss and accuracy of every evaluated checkpoint (rows of evaluation.parquet: trial_id,
    step, split, loss, accuracy) against its step, per split; as in `learning_curves`, a curve
    per LR rule and batch size with median and band over seeds."""
    present = set(evaluation["split"].to_pylist())
    splits = [s for s in EVALUATION_SPLITS if s in present]
    metrics = [f"{split}/{kind}" for kind in ("loss", "accuracy") for split in splits]
    wide: dict[tuple[str, int], dict[str, Any]] = {}
    for r in evaluation.to_pylist():
        row = wide.setdefault(
            (r["trial_id"], r["step"]),
            {"trial_id": r["trial_id"], "step": r["step"]} | dict.fromkeys(metrics),
        )
        row[f"{r['split']}/loss"], row[f"{r['split']}/accuracy"] = r["loss"], r["accuracy"]
    schema = pa.schema(
        [("trial_id", pa.string()), ("step", pa.int64())] + [(m, pa.float64()) for m in metrics]
    )
    table = pa.Table.from_pylist([wide[k] for k in sorted(wide)], schema)
    return EvaluationCurves(splits, [learning_curves(trials, table, m) for m in metrics])


def plot_evaluation_curves(data: EvaluationCurves) -> go.Figure:
    """Losses in the top row, accuracies below, a column per split; colour runs over
    log2(batch size), the dash tells the LR rule."""
    columns = len(data.splits) or 1
    fig = make_subplots(
        rows=2, cols=columns, subplot_titles=[c.metric for c in data.curves], shared_xaxes=True
    )
    sizes = sorted({c.batch_size for lc in data.curves for c in lc.curves})
    rules = sorted({c.panel for lc in data.curves for c in lc.curves})
    for number, lc in enumerate(data.curves):
        row, col = divmod(number, columns)
        for curve in lc.curves:
            line = {
                "color": _batch_colour(curve.batch_size, sizes),
                "dash": RULE_DASHES[rules.index(curve.panel) % len(RULE_DASHES)],
            }
            name = f"B={curve.batch_size} {curve.panel}"
            # Checkpoints are few: markers show where each one is.
            for part in _curve_traces(curve, name, line, number == 0, "lines+markers"):
                fig.add_trace(part, row=row + 1, col=col + 1)
    fig.update_xaxes(title_text="checkpoint step", row=2)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", row=2, col=1)
    fig.update_layout(
        title="checkpoints evaluated by lbs-tune evaluate (median and min–max over seeds)"
    )
    return fig


# ============================================================================ Against batch size


def metric_vs_batch_size(trials: pa.Table, metric: str) -> MetricVsBatchSize:
    """Final and best `metric` against batch size, a line per LR rule (median and band over
    seeds, best configuration per batch size); diverged trials as separate points."""
    trials = prepared(trials)
    mode = mode_of(metric) or "max"
    lines, diverged = [], []
    hit = trials.filter(trials["diverged"]).to_pylist()
    for kind in ("final", "best"):
        column = f"{kind}/{metric}"
        if column not in trials.column_names:
            continue
        lines += _lines(_best(trials, column, mode), panel=kind)
        diverged.append(_points(kind, "diverged", hit, [r[column] for r in hit]))
    return MetricVsBatchSize(metric, lines, diverged)


def plot_metric_vs_batch_size(data: MetricVsBatchSize) -> go.Figure:
    panels = list(dict.fromkeys(line.panel for line in data.lines)) or ["final"]
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[f"{p} {data.metric}" for p in panels]
    )
    rules = sorted({line.name for line in data.lines})
    for line in data.lines:
        fig.add_trace(
            _line_trace(line, _rule_colour(line.name, rules), panels.index(line.panel) == 0),
            row=1,
            col=panels.index(line.panel) + 1,
        )
    for points in data.diverged:
        if points.panel in panels:
            first = panels.index(points.panel) == 0
            fig.add_trace(
                _points_trace(points, DIVERGED_MARKER, show=first),
                row=1,
                col=panels.index(points.panel) + 1,
            )
    _batch_axis(fig, data.lines)
    fig.update_yaxes(title_text=data.metric)
    fig.update_layout(title=f"{data.metric} against batch size")
    return fig


def steps_to_target(
    trials: pa.Table, history: pa.Table, metric: str, target: float
) -> StepsToTarget:
    """Steps to reach `target` in `metric` against batch size, a line per LR rule (median and
    band over seeds, never reaching counts as worst), and the perfect-scaling reference: steps
    ∝ 1/B from the smallest batch size that reached it (Shallue et al. 2018)."""
    trials = prepared(trials)
    reached = to_target(_attach(history, trials, []), metric, target, "step")
    index = pc.index_in(trials["trial_id"], reached["trial_id"])
    trials = trials.append_column("target/step", reached["step"].take(index))
    lines = _lines(_best(trials, "target/step", "min"))
    fewest: dict[int, float] = {}
    for line in lines:
        for batch, median in zip(line.batch_sizes, line.median, strict=True):
            if median is not None:
                fewest[batch] = min(median, fewest.get(batch, median))
    sizes = sorted({b for line in lines for b in line.batch_sizes})
    steps = perfect_scaling(sizes, [fewest.get(b) for b in sizes])
    reference = (
        Line("", "perfect scaling", sizes, steps, steps, steps)
        if any(s is not None for s in steps)
        else None
    )
    return StepsToTarget(metric, target, lines, reference)


def plot_steps_to_target(data: StepsToTarget) -> go.Figure:
    """Log–log: on the perfect-scaling line steps halve as B doubles; the curves bend away from
    it into diminishing returns and flatten at maximal data parallelism."""
    fig = go.Figure()
    rules = sorted({line.name for line in data.lines})
    for line in data.lines:
        fig.add_trace(_line_trace(line, _rule_colour(line.name, rules)))
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
    _batch_axis(fig, data.lines)
    fig.update_yaxes(type="log", title_text="steps")
    fig.update_layout(
        title=f"steps to reach {data.metric} {comparison(data.metric)} {data.target:g}"
    )
    return fig


def learning_rates(trials: pa.Table, history: pa.Table) -> LearningRates:
    """The peak LR of each trial against batch size, by LR rule: the `peak_lr` the loop
    reported, or the largest `lr` it reported (experiments of versions before `peak_lr`)."""
    trials = prepared(trials)
    top = history.group_by("trial_id").aggregate([("lr", "max")])
    reported = dict(zip(top["trial_id"].to_pylist(), top["lr_max"].to_pylist(), strict=True))
    rows = trials.to_pylist()
    lrs = [r.get("final/peak_lr") or reported.get(r["trial_id"]) for r in rows]
    hit = [i for i, r in enumerate(rows) if r["diverged"]]
    diverged = _points("", "diverged", [rows[i] for i in hit], [lrs[i] for i in hit])
    return LearningRates(_by_rule("", rows, lrs), diverged)


def plot_learning_rates(data: LearningRates) -> go.Figure:
    fig = go.Figure()
    rules = [p.name for p in data.points]
    for points in data.points:
        fig.add_trace(_points_trace(points, {"color": _rule_colour(points.name, rules), "size": 9}))
    fig.add_trace(_points_trace(data.diverged, DIVERGED_MARKER))
    _batch_axis(fig, data.points)
    fig.update_yaxes(type="log", title_text="lr")
    fig.update_layout(title="peak learning rate against batch size")
    return fig


def throughput(trials: pa.Table, history: pa.Table) -> Throughput:
    """Per trial against batch size, by LR rule: its training wall time (`time_s` at the last
    report) and its mean `images_per_s` over the reports."""
    trials = prepared(trials)
    mean = history.group_by("trial_id").aggregate([("images_per_s", "mean")])
    speed = dict(
        zip(mean["trial_id"].to_pylist(), mean["images_per_s_mean"].to_pylist(), strict=True)
    )
    rows = trials.to_pylist()
    wall = [r.get("final/time_s") for r in rows]
    return Throughput(
        _by_rule("time_s", rows, wall)
        + _by_rule("images_per_s", rows, [speed.get(r["trial_id"]) for r in rows])
    )


def plot_throughput(data: Throughput) -> go.Figure:
    panels = ["time_s", "images_per_s"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=panels)
    rules = sorted({p.name for p in data.points})
    for points in data.points:
        col = panels.index(points.panel) + 1
        marker = {"color": _rule_colour(points.name, rules), "size": 9}
        fig.add_trace(_points_trace(points, marker, show=col == 1), row=1, col=col)
    _batch_axis(fig, data.points)
    for col, panel in enumerate(panels, start=1):
        fig.update_yaxes(title_text=panel, type="log", row=1, col=col)
    fig.update_layout(title="wall time and throughput per trial")
    return fig


# ============================================================================ Configurations


def parallel_coordinates(trials: pa.Table, metric: str) -> ParallelCoordinates:
    """One line per trial across the varying config keys (rule, batch size, searched keys),
    coloured by its final `metric`; trials without a final value are left out."""
    trials = prepared(trials)
    column = f"final/{metric}"
    if column not in trials.column_names:
        return ParallelCoordinates(metric, [], [])
    trials = trials.filter(pc.is_valid(trials[column]))
    keys = [RULE, BATCH, *searched_keys(trials)]
    dimensions = [_dimension(k, trials[k].to_pylist()) for k in keys]
    values = trials[column].to_pylist()
    return ParallelCoordinates(metric, dimensions, values)


def _dimension(label: str, values: list[Any]) -> Dimension:
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


def plot_parallel_coordinates(data: ParallelCoordinates) -> go.Figure:
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


# ============================================================================ Drawing helpers


def comparison(metric: str) -> str:
    """'≥' for a metric whose target is reached from below, '≤' for a loss."""
    return "≤" if mode_of(metric) == "min" else "≥"


def _batch_colour(batch_size: int, sizes: list[int]) -> str:
    """A Viridis colour by position on a log2 scale between the smallest and largest size."""
    low, high = math.log2(min(sizes)), math.log2(max(sizes))
    where = 0.0 if high == low else (math.log2(batch_size) - low) / (high - low)
    return plotly.colors.sample_colorscale("Viridis", [where])[0]


def _transparent(colour: str) -> str:
    red, green, blue = plotly.colors.unlabel_rgb(colour)
    return f"rgba({red:g}, {green:g}, {blue:g}, 0.2)"


def _rule_colour(rule: str, rules: list[str]) -> str:
    palette = plotly.colors.qualitative.Plotly
    return palette[sorted(rules).index(rule) % len(palette)] if rule in rules else palette[0]


def _curve_traces(
    curve: Curve, name: str, line: dict[str, str], show: bool, mode: str = "lines"
) -> tuple[go.Scatter, go.Scatter]:
    """A curve's min–max band (behind) and its median, in one legend group named `name`."""
    band = go.Scatter(
        x=curve.x + curve.x[::-1],
        y=curve.high + curve.low[::-1],
        fill="toself",
        fillcolor=_transparent(line["color"]),
        line={"width": 0},
        hoverinfo="skip",
        name=f"{name} min–max",
        legendgroup=name,
        showlegend=False,
    )
    median = go.Scatter(
        x=curve.x,
        y=curve.median,
        mode=mode,
        line=line,
        name=name,
        legendgroup=name,
        showlegend=show,
    )
    return band, median


def _line_trace(line: Line, colour: str, show: bool = True) -> go.Scatter:
    """Median with min–max error bars (where all three exist)."""
    above = [None if None in (m, h) else h - m for m, h in zip(line.median, line.high, strict=True)]
    below = [
        None if None in (m, lo) else m - lo for m, lo in zip(line.median, line.low, strict=True)
    ]
    return go.Scatter(
        x=line.batch_sizes,
        y=line.median,
        mode="lines+markers",
        name=line.name,
        legendgroup=line.name,
        showlegend=show,
        line={"color": colour},
        error_y={"type": "data", "symmetric": False, "array": above, "arrayminus": below},
    )


def _points_trace(points: Points, marker: dict[str, Any], show: bool = True) -> go.Scatter:
    return go.Scatter(
        x=points.x,
        y=points.y,
        mode="markers",
        name=points.name,
        legendgroup=points.name,
        showlegend=show,
        marker=marker,
        text=points.text,
    )


def _batch_axis(fig: go.Figure, series: Sequence[Line | Points]) -> None:
    """A log axis ticked at the batch sizes themselves (powers of two read as such)."""
    sizes = sorted({b for s in series for b in (s.batch_sizes if isinstance(s, Line) else s.x)})
    fig.update_xaxes(
        type="log", title_text="batch size", tickvals=sizes, ticktext=[str(b) for b in sizes]
    )
