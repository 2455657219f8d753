"""The sweep's answer, the numbers at the top of its report and one sentence built from them
(pure: tables and a `Summary` in, named tuples and text out; no plots, no I/O).

A fixed-rule sweep (LR rules applied at every batch size) answers: how many steps each rule
needs to reach the target at each batch size, and up to which batch size each rule keeps
scaling. A rule *scales* at batch size B while its steps are at most FACTOR times what perfect
scaling predicts from its smallest batch size that reached the target, B0:
steps(B) <= FACTOR steps(B0) B0 / B. It stops at the first batch size that needs more (or never
reaches the target). With FACTOR 2 this is the critical batch size's own criterion: in
S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018) the steps at B are twice the perfect-
scaling prediction from B0 when B = B_crit + 2 B0, so a rule scales up to B_crit when B0 is far
below it.

A tuned sweep (the learning rate searched per batch size) answers with the fit of the best
steps: B_crit with its interval, S_min and E_min, and each batch size's best steps with their
spread over seeds. Fields that the summary may carry (`confirmed`: the best configuration run
again on fresh seeds; `cap_hits`: trials that ended at their step cap; `budget`: the search-
budget curve) are read by name where present (`field`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from analysis.metrics import BATCH, RULE, best_configs, perfect_scaling, prepared, reached_at
from analysis.scaling import regimes
from lbs_tune.names import target_label

if TYPE_CHECKING:
    from analysis.summary import PointSummary, SeriesFit, Steps, Summary

FACTOR = 2.0  # a batch size scales while its steps are within this factor of perfect scaling
STEPS = "target/step"  # the steps-to-target column that `fixed_steps` adds to the trials


def number(value: float | None, digits: int = 3) -> str:
    """A number as the page prints it: 3 significant digits, thousands separated
    ('4,600', '190', '0.052'); '—' for none."""
    if value is None:
        return "—"
    if value == float("inf"):
        return "∞"
    text = f"{value:.{digits}g}"
    if "e" in text or abs(value) >= 1000:
        return f"{round(float(text)):,}" if abs(value) >= 1 else text
    return text


# ============================================================================ Fixed rules


def fixed_steps(trials: pa.Table, history: pa.Table, metric: str, target: float) -> pa.Table:
    """Steps to reach `target` on `metric` per LR rule and batch size: for each, the best
    configuration (fewest median steps over seeds; `metrics.best_configs`) with its median,
    low, high and seeds; a seed that never reached it counts as the worst (null median where
    the median lands on it)."""
    trials = prepared(trials)
    trials = trials.append_column(STEPS, reached_at(trials, history, metric, target, "step"))
    return best_configs(trials, STEPS, "min")


def scaling_limit(
    batch_sizes: Sequence[int], steps: Sequence[float | None], factor: float = FACTOR
) -> tuple[int | None, int | None]:
    """(scales_to, stops_at) of one rule: `steps` at each of `batch_sizes` (ascending; None:
    never reached). From the smallest batch size B0 that reached the target, each batch size B
    in turn scales while steps(B) <= factor steps(B0) B0 / B; `scales_to` is the last that
    does, `stops_at` the first that does not (None: none fails). (None, None) if no batch size
    reached the target."""
    triples = list(zip(batch_sizes, steps, perfect_scaling(batch_sizes, steps), strict=True))
    start = next((i for i, (_, s, _) in enumerate(triples) if s is not None), None)
    if start is None:
        return None, None
    scales_to = triples[start][0]
    for b, s, perfect in triples[start + 1 :]:
        if s is None or s > factor * perfect:
            return scales_to, b
        scales_to = b
    return scales_to, None


class RuleSteps(NamedTuple):
    """One LR rule's steps to target per batch size (median and min–max over seeds) and where
    it stops scaling (see `scaling_limit`)."""

    rule: str
    batch_sizes: list[int]
    median: list[float | None]
    low: list[float | None]
    high: list[float | None]
    seeds: list[int]
    scales_to: int | None
    stops_at: int | None


class FixedAnswer(NamedTuple):
    target: str  # 'val/accuracy ≥ 0.3'
    factor: float
    rules: list[RuleSteps]


def fixed_answer(
    trials: pa.Table, history: pa.Table, metric: str, target: float, factor: float = FACTOR
) -> FixedAnswer:
    """The answer of a fixed-rule sweep to `target` on `metric` (see the module's docstring)."""
    rows = fixed_steps(trials, history, metric, target).to_pylist()
    found = []
    for rule in sorted({r[RULE] for r in rows}):
        mine = sorted((r for r in rows if r[RULE] == rule), key=lambda r: r[BATCH])
        sizes = [r[BATCH] for r in mine]
        median = [r["median"] for r in mine]
        found.append(
            RuleSteps(
                rule,
                sizes,
                median,
                [r["low"] for r in mine],
                [r["high"] for r in mine],
                [r["seeds"] for r in mine],
                *scaling_limit(sizes, median, factor),
            )
        )
    return FixedAnswer(target_label(metric, target), factor, found)


def fixed_sentence(answer: FixedAnswer) -> str:
    """One sentence: where each rule stops scaling."""
    several = len(answer.rules) > 1
    parts = []
    for r in answer.rules:
        who = f"lr.scaling {r.rule}" if several else "the sweep's rule"
        if r.scales_to is None:
            parts.append(f"{who} never reaches it")
        elif r.stops_at is None:
            parts.append(
                f"{who} scales through the largest batch size swept, {r.scales_to} "
                f"({number(r.median[r.batch_sizes.index(r.scales_to)])} steps)"
            )
        else:
            at = r.median[r.batch_sizes.index(r.stops_at)]
            why = "never reaches it" if at is None else f"needs {number(at)} steps"
            parts.append(f"{who} scales up to batch size {r.scales_to} (at {r.stops_at} it {why})")
    if not parts:
        return f"No trial has reached {answer.target} yet."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"To reach {answer.target}, {listed}."


# ============================================================================ Tuned


class TunedPoint(NamedTuple):
    """One batch size of a tuned series: the best steps (median and min–max over the seeds'
    studies), the examples they take, the studies' trials, and what newer summaries add."""

    batch_size: int
    steps: float | None  # None: the median seed's study never reached the target
    low: float | None
    high: float | None
    seeds: int
    examples: float | None
    feasible: int  # trials that reached the target, over the seeds' studies
    asked: int
    confirmed: Steps | None  # `PointSummary.confirmed` of the first study that has one
    cap_hits: int | None  # the sum of the studies' `PointSummary.cap_hits` (None: none has one)


class TunedSeries(NamedTuple):
    name: str  # '' for the only series
    fit: Any  # analysis.scaling.ScalingFit
    points: list[TunedPoint]
    perfect_below: float | None  # the regimes' boundaries, B_crit / 4 and 4 B_crit
    maximal_above: float | None


class TunedAnswer(NamedTuple):
    target: str
    series: list[TunedSeries]


def _tuned_point(series: SeriesFit, i: int, points: list[PointSummary]) -> TunedPoint:
    batch = series.batch_sizes[i]
    mine = [p for p in points if p.batch_size == batch and p.series == series.name]
    confirmed = next((p.confirmed for p in mine if p.confirmed is not None), None)
    hits = [p.cap_hits for p in mine if p.cap_hits is not None]
    steps = series.median[i]
    return TunedPoint(
        batch,
        steps,
        series.low[i],
        series.high[i],
        series.seeds[i],
        None if steps is None else steps * batch,
        sum(p.counts.get("feasible", 0) for p in mine),
        sum(p.counts.get("asked", 0) for p in mine),
        confirmed,
        sum(hits) if hits else None,
    )


def tuned_answer(summary: Summary) -> TunedAnswer:
    """The answer of a tuned sweep: per series of `summary.fits`, its fit and batch sizes."""
    found = []
    for s in summary.fits:
        rows = [_tuned_point(s, i, summary.points) for i in range(len(s.batch_sizes))]
        bands = regimes(s.fit.b_crit) if s.fit.b_crit is not None else None
        found.append(
            TunedSeries(
                s.name,
                s.fit,
                rows,
                bands.perfect_below if bands else None,
                bands.maximal_above if bands else None,
            )
        )
    return TunedAnswer(summary.target_label, found)


def interval(fit: Any, name: str) -> tuple[float, float] | None:
    """A fitted parameter's interval (low, high), None without one."""
    found = (fit.intervals or {}).get(name)
    return None if found is None else (float(found[0]), float(found[1]))


def with_interval(fit: Any, name: str) -> str:
    """'190 (95% interval 120–310)', or the value alone."""
    value = getattr(fit, name)
    bounds = interval(fit, name)
    if bounds is None:
        return number(value)
    level = f"{round(100 * fit.level)}% " if fit.level else ""
    return f"{number(value)} ({level}interval {number(bounds[0])}–{number(bounds[1])})"


def tuned_sentence(answer: TunedAnswer) -> str:
    """One sentence per series, built from its fit (or why there is none)."""
    sentences = []
    for s in answer.series:
        fit = s.fit
        where = f" for {s.name}" if s.name else ""
        if fit.b_crit is None:
            sentences.append(f"No critical batch size{where}: {fit.reason}.")
            continue
        swept = [p.batch_size for p in s.points]
        beyond = (
            ""
            if fit.bracketed
            else f", outside the batch sizes fitted ({min(swept)}–{max(swept)}), so an estimate"
        )
        sentences.append(
            f"The critical batch size{where} is {with_interval(fit, 'b_crit')}{beyond}: to reach "
            f"{answer.target} training needs at least S_min = {number(fit.s_min)} steps and "
            f"E_min = {number(fit.e_min)} examples; steps fall almost in proportion to the batch "
            f"size below {number(s.perfect_below)} and barely fall above "
            f"{number(s.maximal_above)}."
        )
    return " ".join(sentences) or "No batch size has reached the target yet: no fit."


# ============================================================================ Branched


def branch_sentence(branches: dict[str, Any]) -> str:
    """One sentence of a branched sweep (`analysis.branches.branches_json`): the local critical
    batch size at the first and last probe point, and the steps the planned schedule and the
    large-batch control saved against the small batch (median over seeds), or that they did
    not reach the small batch's final validation loss."""
    points = [p for p in branches["points"] if p["local_cbs"]["batch"] is not None]
    if not points:
        return "No probe point has its branches yet."
    first, last = points[0], points[-1]
    text = (
        f"The local critical batch size is {number(first['local_cbs']['batch'])} at "
        f"{number(first['examples'])} examples and {number(last['local_cbs']['batch'])} at "
        f"{number(last['examples'])}"
    )
    saved = branches["comparison"]["steps_saved"]
    arms = []
    for arm, name in (("schedule", "the planned schedule"), ("large", "the large batch")):
        median = saved.get(arm, {}).get("median")
        if median is not None:
            arms.append(
                f"{name} reaches the small batch's final validation loss in "
                f"{100 * median:.0f}% fewer steps"
            )
        elif saved.get(arm, {}).get("per_seed"):
            arms.append(f"{name} does not reach the small batch's final validation loss")
    return text + ("; " + " and ".join(arms) if arms else "") + "."
