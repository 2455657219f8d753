"""What several figures share: the named tuples of their data (a curve over steps, a line over
batch sizes, single trials as points) and how rows of the prepared tables become them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa

from analysis.metrics import BATCH, RULE
from analysis.scaling import fitted_curve

if TYPE_CHECKING:
    from analysis.scaling import ScalingFit

FIT_POINTS = 100  # a fitted S(B) drawn over the batch sizes swept


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


class FitCurve(NamedTuple):
    """A fitted S(B) = S_min (1 + B_crit / B), sampled over the batch sizes swept."""

    name: str
    batch_sizes: list[float]
    steps: list[float]


def fit_curve(name: str, fit: ScalingFit, batch_sizes: Sequence[float]) -> FitCurve:
    """`fit` over the range of `batch_sizes`, geometrically spaced."""
    span = np.geomspace(min(batch_sizes), max(batch_sizes), FIT_POINTS)
    curve = fitted_curve(fit, span)
    return FitCurve(name, curve.batch_sizes.tolist(), curve.steps.tolist())


def curves(spread: pa.Table, x: str) -> list[Curve]:
    """One Curve per LR rule and batch size from the rows of `metrics.seed_spread` by
    (rule, batch size, x)."""
    rows = spread.to_pylist()
    found = []
    for rule, batch in sorted({(r[RULE], r[BATCH]) for r in rows}):
        mine = [r for r in rows if (r[RULE], r[BATCH]) == (rule, batch)]
        found.append(
            Curve(
                rule,
                batch,
                [r[x] for r in mine],
                *([r[stat] for r in mine] for stat in ("median", "low", "high")),
            )
        )
    return found


def most_seeds(spread: pa.Table) -> int:
    """The most rows (seeds) behind one statistic of a `metrics.seed_spread` table (0 if
    empty): a figure names its aggregate over seeds only where this is above 1."""
    return max(spread["seeds"].to_pylist(), default=0)


def lines(best: pa.Table, panel: str | None = None) -> list[Line]:
    """One Line per LR rule from the rows of `metrics.best_configs`; `panel` names the subplot
    (default: the rule)."""
    rows = best.to_pylist()
    found = []
    for rule in sorted({r[RULE] for r in rows}):
        mine = [r for r in rows if r[RULE] == rule]
        found.append(
            Line(
                panel if panel is not None else rule,
                rule,
                [r[BATCH] for r in mine],
                *([r[stat] for r in mine] for stat in ("median", "low", "high")),
            )
        )
    return found


def points(panel: str, name: str, rows: list[dict[str, Any]], values: list) -> Points:
    """Trials (rows of a trials table) as Points: batch size against `values`."""
    return Points(panel, name, [r[BATCH] for r in rows], values, [r["trial_id"] for r in rows])


def points_by_rule(panel: str, rows: list[dict[str, Any]], values: list) -> list[Points]:
    """`points` per LR rule, `values` aligned with `rows`."""
    return [
        points(
            panel,
            rule,
            [r for r in rows if r[RULE] == rule],
            [v for r, v in zip(rows, values, strict=True) if r[RULE] == rule],
        )
        for rule in sorted({r[RULE] for r in rows})
    ]
