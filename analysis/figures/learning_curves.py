"""A metric during training: one panel per LR rule (where rules vary), one curve per batch size
(its best configuration by the final metric, or each study's best trial), the median over seeds
with a min–max band where there are several."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import plotly.graph_objects as go
import pyarrow as pa

from analysis.figures._common import Curve, curves, most_seeds
from analysis.figures._draw import curves_figure, spread_note
from analysis.metrics import BATCH, RULE, attach, better, seed_spread, shown_trials
from lbs_tune.names import Mode


class LearningCurves(NamedTuple):
    metric: str
    x: str
    panels: list[str]
    curves: list[Curve]
    seeds: int = 1  # the most seeds behind one point of a curve


def extract(
    trials: pa.Table,
    history: pa.Table,
    metric: str,
    x: str = "step",
    keep: Collection[str] | None = None,
    mode: Mode | None = None,
) -> LearningCurves:
    """`metric` against `x` (step, examples or epoch) of the trials shown
    (`metrics.shown_trials`): `keep` (trial ids, e.g. the studies' best trials) when given, else
    for a searched sweep only the best configuration per rule and batch size; `mode`: the
    sweep's mode of `metric` (`metrics.better`)."""
    reports = attach(history, shown_trials(trials, metric, keep, mode), [RULE, BATCH])
    spread = seed_spread(reports, metric, [RULE, BATCH, x], better(metric, mode))
    found = curves(spread, x)
    return LearningCurves(metric, x, sorted({c.panel for c in found}), found, most_seeds(spread))


def render(data: LearningCurves, which: str = "") -> go.Figure:
    """Panels side by side sharing the y axis; colour runs over log2(batch size). `which`
    says which trials are drawn (e.g. 'best trial of each study'), in the title."""
    shown = f", {which}" if which else ""
    title = f"{data.metric} during training{shown}{spread_note(data.seeds)}"
    return curves_figure(data.panels, data.curves, data.x, data.metric, title)
