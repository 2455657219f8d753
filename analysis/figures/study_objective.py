"""Every trial of every study: its objective (steps to target, or the metric) against its
learning rate, one colour per batch size, so that the basin of good rates and its shift with
batch size show. Infeasible trials (target never reached, diverged) have no objective: they
are drawn as crosses along the worst edge (the top for steps), diverged ones in red; the best
trial of each study is a star."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import plotly.graph_objects as go

from analysis.figures._draw import DIVERGED_MARKER, batch_colour, finish, log_axis
from lbs_tune.studies import ran_out

if TYPE_CHECKING:
    from analysis.summary import Summary

PARAM = "lr.base"
# Infeasible trials are drawn this factor beyond the worst objective shown (steps: log axis).
CEILING = 1.3


class StudyTrials(NamedTuple):
    study: str
    batch_size: int | None
    number: list[int]  # the finished trials (COMPLETE or FAIL), in order
    x: list[float]  # their `param`
    value: list[float | None]  # objective; None for an infeasible trial
    diverged: list[bool]
    reason: list[str | None]
    best: int | None  # the best trial's number


class StudyObjective(NamedTuple):
    param: str
    objective: str  # the y axis: 'steps to val/accuracy ≥ 0.5' or the metric
    log_y: bool  # steps are drawn on a log axis
    higher_is_better: bool  # an accuracy: infeasible trials go along the bottom, not the top
    studies: list[StudyTrials]


def extract(summary: Summary, param: str = PARAM) -> StudyObjective:
    """The finished trials of each study that set `param` (unfinished ones have no
    objective yet)."""
    found = []
    for p in summary.points:
        done = [t for t in p.trials if ran_out(t) and t["params"].get(param) is not None]
        found.append(
            StudyTrials(
                p.study,
                p.batch_size,
                [t["number"] for t in done],
                [t["params"][param] for t in done],
                [t["value"] if t["state"] == "COMPLETE" else None for t in done],
                [bool(t["diverged"]) for t in done],
                [t["reason"] for t in done],
                p.best["number"] if p.best else None,
            )
        )
    steps = summary.objective.kind == "steps_to_target"
    label = f"steps to {summary.target_label}" if steps else summary.objective.metric
    higher = not steps and summary.objective.mode == "max"
    return StudyObjective(param, label, steps, higher, found)


def render(data: StudyObjective) -> go.Figure:
    fig = go.Figure()
    sizes = sorted({s.batch_size for s in data.studies if s.batch_size is not None}) or [1]
    values = [v for s in data.studies for v in s.value if v is not None]
    if not values:
        edge = 1.0  # nothing feasible: the crosses alone, on a bare axis
    elif data.log_y:
        edge = max(values) * CEILING
    else:
        margin = (max(values) - min(values) or 1) * (CEILING - 1)
        edge = min(values) - margin if data.higher_is_better else max(values) + margin
    for s in data.studies:
        colour = batch_colour(s.batch_size, sizes) if s.batch_size is not None else "grey"
        good = [i for i, v in enumerate(s.value) if v is not None]
        fig.add_trace(
            go.Scatter(
                x=[s.x[i] for i in good],
                y=[s.value[i] for i in good],
                mode="markers",
                marker={"color": colour, "size": 9},
                text=[f"{s.study} #{s.number[i]}" for i in good],
                name=s.study,
                legendgroup=s.study,
            )
        )
        if s.best in s.number:
            i = s.number.index(s.best)
            fig.add_trace(
                go.Scatter(
                    x=[s.x[i]],
                    y=[s.value[i]],
                    mode="markers",
                    marker={"symbol": "star", "size": 16, "color": colour},
                    name=f"{s.study} best",
                    legendgroup=s.study,
                    showlegend=False,
                )
            )
        for diverged in (False, True):
            bad = [i for i, v in enumerate(s.value) if v is None and s.diverged[i] == diverged]
            if not bad:
                continue
            marker = DIVERGED_MARKER if diverged else {"symbol": "x", "size": 9, "color": colour}
            fig.add_trace(
                go.Scatter(
                    x=[s.x[i] for i in bad],
                    y=[edge] * len(bad),
                    mode="markers",
                    marker=marker,
                    text=[f"{s.study} #{s.number[i]}: {s.reason[i]}" for i in bad],
                    name=f"{s.study} {'diverged' if diverged else 'not reached'}",
                    legendgroup=s.study,
                    showlegend=False,
                )
            )
    log_axis(fig, "x", [v for s in data.studies for v in s.x])
    fig.update_xaxes(title_text=data.param)
    if data.log_y:
        log_axis(fig, "y", [*values, edge])
    fig.update_yaxes(title_text=data.objective)
    return finish(
        fig,
        f"every trial of every study: objective against {data.param} "
        "(× at the worst edge: infeasible; ★: best)",
        legend="study",
    )
