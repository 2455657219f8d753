"""The critical batch size over training, by three estimators on one pair of axes: the local
critical batch size of a branched sweep's probes at each point (Merrill et al. 2025; its
min–max over seeds as error bars), the gradient noise scale measured along the reference run
(B_simple, and B_noise where the trial reported it; McCandlish et al. 2018), and the sweep's
fitted B_crit of steps to target where one exists (a line with its interval). The batch schedule
planned from the probes is drawn as a step line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import plotly.graph_objects as go
import pyarrow.compute as pc

from analysis._arrow import strings
from analysis.branches import local_sizes, phase_trials
from analysis.figures._draw import finish, log_axis
from analysis.tables import Results

if TYPE_CHECKING:
    from analysis.summary import Summary

MEASURED = ("noise/b_simple", "noise/b_noise")


class Series(NamedTuple):
    name: str  # the history column
    examples: list[int]
    values: list[float]


class LocalCBSData(NamedTuple):
    examples: list[int]  # each point's examples seen by the reference
    batch: list[int]  # the local CBS from the seeds' mean losses
    low: list[int]  # min and max of the seeds' own
    high: list[int]
    upper: list[int | None]  # the next batch tried above `batch`
    measured: list[Series]  # B_simple, B_noise of the reference, where reported
    b_crit: float | None
    b_crit_interval: tuple[float, float] | None
    schedule: list[list[int]] | None  # the planned [[examples, batch], ...]
    budget: int | None  # the reference's examples at its end (where the schedule's line ends)


def extract(results: Results, summary: Summary | None = None) -> LocalCBSData:
    """The figure's data: `local_sizes` of the probes, the reference trial's reported
    MEASURED columns against examples, the fit of `summary` (`analysis.summary.read_summary`)
    when it has exactly one series with a B_crit, and the schedule of the comparison."""
    sizes = local_sizes(results)
    history = results.history
    reference = [t["trial_id"] for t in phase_trials(results, "reference")]
    planned = [t.get("batch_schedule") for t in phase_trials(results, "compare")]
    schedule = next((p for p in planned if p), None)
    mine = history.filter(pc.is_in(history["trial_id"], value_set=strings(reference)))
    measured, budget = [], None
    if mine.num_rows:
        budget = max(mine["examples"].to_pylist())
    for column in MEASURED:
        if column not in mine.column_names:
            continue
        pairs = [
            (r["examples"], r[column])
            for r in mine.select(["examples", column]).to_pylist()
            if r[column] is not None and r[column] > 0
        ]
        if pairs:
            measured.append(Series(column, *map(list, zip(*pairs, strict=True))))
    fits = [s.fit for s in (summary.fits if summary else []) if s.fit.b_crit is not None]
    fit = fits[0] if len(fits) == 1 else None
    interval = fit.intervals.get("b_crit") if fit is not None else None
    return LocalCBSData(
        [p.examples for p in sizes],
        [p.batch for p in sizes],
        [p.low for p in sizes],
        [p.high for p in sizes],
        [p.upper for p in sizes],
        measured,
        fit.b_crit if fit is not None else None,
        tuple(interval) if interval else None,
        schedule,
        budget,
    )


def render(data: LocalCBSData) -> go.Figure:
    """Batch size (log) against examples seen: the local CBS with its seeds' range, the
    measured noise scales, the fitted B_crit and the planned schedule."""
    fig = go.Figure()
    if data.examples:
        fig.add_trace(
            go.Scatter(
                x=data.examples,
                y=data.batch,
                mode="lines+markers",
                marker={"size": 10, "color": "black"},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [h - b for h, b in zip(data.high, data.batch, strict=True)],
                    "arrayminus": [b - lo for b, lo in zip(data.batch, data.low, strict=True)],
                },
                text=[f"next tried: {u}" if u else "largest tried" for u in data.upper],
                name="local critical batch size (branches; min–max over seeds)",
            )
        )
    for series in data.measured:
        fig.add_trace(
            go.Scatter(
                x=series.examples,
                y=series.values,
                mode="lines",
                name=f"{series.name} of the reference run",
            )
        )
    ends = [0, max([*data.examples, *(s.examples[-1] for s in data.measured), data.budget or 0])]
    if data.b_crit is not None:
        fig.add_trace(
            go.Scatter(
                x=ends,
                y=[data.b_crit] * 2,
                mode="lines",
                line={"dash": "dash", "color": "grey"},
                name="fitted B_crit (steps to target)",
            )
        )
        if data.b_crit_interval:
            low, high = data.b_crit_interval
            fig.add_hrect(y0=low, y1=high, fillcolor="grey", opacity=0.15, line_width=0)
    if data.schedule:
        x, y = [], []
        stops = [start for start, _ in data.schedule[1:]] + [data.budget or ends[1]]
        for (start, batch), stop in zip(data.schedule, stops, strict=True):
            x += [start, stop]
            y += [batch, batch]
        fig.add_trace(
            go.Scatter(x=x, y=y, mode="lines", line={"shape": "hv"}, name="planned batch schedule")
        )
    fig.update_xaxes(title_text="examples seen by the reference run")
    shown = [*data.low, *data.high, *(v for m in data.measured for v in m.values)]
    shown += [data.b_crit, *(data.b_crit_interval or ()), *(b for _, b in data.schedule or ())]
    log_axis(fig, "y", shown)
    fig.update_yaxes(title_text="batch size")
    return finish(fig, "the critical batch size over training: branched probes, noise scale, fit")
