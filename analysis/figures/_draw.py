"""Drawing helpers that several figures share: the page's look (white background, panel
heights), colours by batch size and by series, axis titles with units, log axes with readable
ticks, a curve with its min–max band, a line with error bars, points, and the batch-size axis.

Colours are chosen to read on white: every batch-size colour and every series colour has a
contrast ratio of at least 3 against it (WCAG's figure for graphics; `contrast`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.figures._common import Curve, FitCurve, Line, Points
from analysis.metrics import RULE

DIVERGED_MARKER = {"symbol": "x", "size": 11, "color": "crimson"}
RULE_DASHES = ("solid", "dash", "dot", "dashdot")
_AXIS = {
    "gridcolor": "#e6e9ef",
    "linecolor": "#c8ccd4",
    "zerolinecolor": "#e6e9ef",
    "ticks": "outside",
    "tickcolor": "#c8ccd4",
    "automargin": True,
    "title": {"standoff": 12},
}
# The look of plotly's "plotly_white", small: plotly's own templates carry every trace type's
# defaults into every figure's JSON and take a good part of a second to apply.
TEMPLATE = go.layout.Template(
    layout={
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "font": {"color": "#2a3f5f", "size": 13},
        "colorway": list(plotly.colors.qualitative.Dark24),
        "hovermode": "closest",
        "xaxis": _AXIS,
        "yaxis": _AXIS,
    }
)
PANEL_HEIGHT = 420  # px of one row of panels: a figure of n rows is n times this, plus margins
# Batch sizes run over Plasma from dark blue to this point (salmon red); past it the scale turns
# orange and yellow, too pale on white.
BATCH_SCALE, BATCH_SCALE_END = "Plasma", 0.62
# Series (LR rules, fits, compared sweeps): Plotly's Dark24, each of contrast >= 3 on white.
SERIES_COLOURS = plotly.colors.qualitative.Dark24
AXIS_TITLES = {
    "step": "steps",
    "examples": "examples",
    "epoch": "epochs",
    "time_s": "time (s)",
    "images_per_s": "throughput (images/s)",
    "batch_size": "batch size (examples)",
}
# Ticks of a log axis: powers of ten alone, else also 2 and 5 times them, else 1..9 times.
MANTISSAS = ((1,), (1, 2, 5), (1, 2, 3, 5), tuple(range(1, 10)))


def axis_title(name: str) -> str:
    """The axis title of a column, with its unit: 'steps', 'time (s)', 'batch size
    (examples)'; a metric's own name otherwise."""
    return AXIS_TITLES.get(name, name)


def contrast(colour: str, background: str = "rgb(255, 255, 255)") -> float:
    """The WCAG contrast ratio of two colours ('rgb(...)' or '#rrggbb'), 1 to 21."""

    def luminance(text: str) -> float:
        rgb = plotly.colors.hex_to_rgb(text) if text.startswith("#") else _rgb(text)
        linear = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in rgb]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    low, high = sorted((luminance(colour), luminance(background)))
    return (high + 0.05) / (low + 0.05)


def _rgb(text: str) -> tuple[float, float, float]:
    red, green, blue = plotly.colors.unlabel_rgb(text)[:3]
    return red / 255, green / 255, blue / 255


def batch_colour(batch_size: int, sizes: list[int]) -> str:
    """A colour by position on a log2 scale between the smallest and largest size (Plasma, dark
    blue to salmon red)."""
    low, high = math.log2(min(sizes)), math.log2(max(sizes))
    where = 0.0 if high == low else (math.log2(batch_size) - low) / (high - low)
    return plotly.colors.sample_colorscale(BATCH_SCALE, [where * BATCH_SCALE_END])[0]


def colour_scale(steps: int = 8) -> list[list[Any]]:
    """The batch sizes' colours as a continuous colour scale (for a colour bar)."""
    points = [i / steps for i in range(steps + 1)]
    colours = plotly.colors.sample_colorscale(BATCH_SCALE, [p * BATCH_SCALE_END for p in points])
    return [[p, c] for p, c in zip(points, colours, strict=True)]


def _transparent(colour: str) -> str:
    red, green, blue = plotly.colors.unlabel_rgb(colour)[:3]
    return f"rgba({red:g}, {green:g}, {blue:g}, 0.2)"


def rule_colour(rule: str, rules: list[str]) -> str:
    """A series colour (Dark24) by the series' place among `rules` (sorted)."""
    palette = SERIES_COLOURS
    return palette[sorted(rules).index(rule) % len(palette)] if rule in rules else palette[0]


def series_name(rule: str, rules: Sequence[str]) -> str:
    """A series' legend name: the LR rule where rules vary, '' where there is one (a label
    that names the only rule says nothing)."""
    return rule if len(set(rules)) > 1 else ""


def spread_note(seeds: int) -> str:
    """' (median and min–max over N seeds)' where there is more than one seed, else ''."""
    return f" (median and min–max over {seeds} seeds)" if seeds > 1 else ""


def tick_label(value: float) -> str:
    """A tick's text: 0.05, 2, 500, 2k, 10k, 1M."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def log_ticks(values: Iterable[float | None]) -> tuple[list[float], list[str]]:
    """Ticks of a log axis over `values` (non-positive and missing ones ignored): powers of
    ten, or 1-2-5 times them, or more, the first of those that puts 3 ticks within the values'
    range; one decade beyond each end rides along (plotly shows only the ticks in range)."""
    shown = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not shown:
        return [], []
    low, high = min(shown), max(shown)
    decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 2)
    for mantissas in MANTISSAS:
        ticks = [float(f"{m}e{d}") for d in decades for m in mantissas]
        if sum(low <= t <= high for t in ticks) >= 3:
            break
    return ticks, [tick_label(t) for t in ticks]


def log_axis(fig: go.Figure, axis: str, values: Iterable[float | None], **where: Any) -> None:
    """Make the x or y axis (`axis`) of the panels selected by `where` (row=, col=) a log axis
    ticked by `log_ticks(values)`."""
    ticks, text = log_ticks(values)
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    update(type="log", tickvals=ticks or None, ticktext=text or None, **where)


def footnote(fig: go.Figure, text: str) -> None:
    """A line under the plot, at its right (e.g. which batch sizes never reached the target)."""
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=1,
        y=-0.2,
        xanchor="right",
        yanchor="top",
        showarrow=False,
    )
    fig.update_layout(margin={"b": 110})


def finish(fig: go.Figure, title: str, rows: int = 1, legend: str | None = None) -> go.Figure:
    """The page's look: white template, `rows` panels of PANEL_HEIGHT each, the title, and a
    legend title where given."""
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title, "x": 0.02, "xanchor": "left"},
        height=PANEL_HEIGHT * rows + 80,
        legend={"title": {"text": legend}} if legend else {},
    )
    return fig


def curve_traces(
    curve: Curve, name: str, line: dict[str, str], show: bool, mode: str = "lines"
) -> tuple[go.Scatter, go.Scatter]:
    """A curve's min–max band (behind) and its median, in one legend group named `name`."""
    band = go.Scatter(
        x=curve.x + curve.x[::-1],
        y=curve.high + curve.low[::-1],
        fill="toself",
        fillcolor=_transparent(line["color"]),
        mode="lines",  # plotly marks the corners of a short path otherwise
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


def line_trace(line: Line, colour: str, show: bool = True, name: str | None = None) -> go.Scatter:
    """Median with min–max error bars (where all three exist and some bar has a length)."""
    above = [None if None in (m, h) else h - m for m, h in zip(line.median, line.high, strict=True)]
    below = [
        None if None in (m, lo) else m - lo for m, lo in zip(line.median, line.low, strict=True)
    ]
    bars = any(v for v in above + below)
    name = line.name if name is None else name
    return go.Scatter(
        x=line.batch_sizes,
        y=line.median,
        mode="lines+markers",
        name=name,
        legendgroup=name,
        showlegend=show,
        line={"color": colour},
        marker={"size": 8},
        error_y=(
            {"type": "data", "symmetric": False, "array": above, "arrayminus": below}
            if bars
            else None
        ),
    )


def fit_trace(fit: FitCurve, colour: str, name: str) -> go.Scatter:
    """A fitted S(B) as a dotted line."""
    return go.Scatter(
        x=fit.batch_sizes,
        y=fit.steps,
        mode="lines",
        name=name,
        line={"dash": "dot", "color": colour, "width": 2},
    )


def points_trace(points: Points, marker: dict[str, Any], show: bool = True) -> go.Scatter:
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


def batch_axis(fig: go.Figure, series: Sequence[Line | Points], **where: Any) -> None:
    """A log axis ticked at the batch sizes themselves (powers of two read as such)."""
    sizes = sorted({b for s in series for b in (s.batch_sizes if isinstance(s, Line) else s.x)})
    fig.update_xaxes(
        type="log",
        title_text=axis_title("batch_size"),
        tickvals=sizes,
        ticktext=[str(b) for b in sizes],
        **where,
    )


def curves_figure(
    panels: list[str],
    curves: Sequence[Curve],
    x: str,
    y: str,
    title: str,
    mode: str = "lines",
    log_y: bool = False,
) -> go.Figure:
    """One panel per LR rule side by side sharing the y axis (titled only where rules vary),
    one curve per batch size with its min–max band; colour runs over log2(batch size)."""
    panels = panels or [""]
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        subplot_titles=[f"{RULE} = {p}" for p in panels] if len(panels) > 1 else None,
    )
    sizes = sorted({c.batch_size for c in curves}) or [1]
    for curve in curves:
        col = panels.index(curve.panel) + 1
        colour = batch_colour(curve.batch_size, sizes)
        for part in curve_traces(curve, f"B={curve.batch_size}", {"color": colour}, col == 1, mode):
            fig.add_trace(part, row=1, col=col)
    fig.update_xaxes(title_text=axis_title(x))
    if log_y:
        log_axis(fig, "y", [v for c in curves for v in c.low + c.high])
    fig.update_yaxes(title_text=y, col=1)
    if x == "step" and len(sizes) > 1:  # steps differ by the ratio of batch sizes
        log_axis(fig, "x", [v for c in curves for v in c.x])
    return finish(fig, title, legend="batch size")
