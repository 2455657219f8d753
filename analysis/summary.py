"""The numbers of a searched sweep (one Optuna study per grid point, `lbs_tune.studies`): per grid
point the best trial of its search, its confirmation runs on fresh seeds, how its trials ended
against their step caps, the search-budget curve and the critical-batch fit (written as
`summary.json` by `analysis.summary_json`; the study trials as a table by
`analysis.studies_table`).

The best trial of a study is `StudyRecord.best()`: fewest steps to the target, ties by the
better value of the metric at that step, then the earlier trial. Its `steps_to_target` is that
trial's objective value (an objective `metric` study: the first step at which its reported
values reach the target, when the target is on the study's metric).

A point's steps to target (`PointSummary.steps`, also `confirmed` when they come from
confirmation runs): with `search.confirm`, the median over the confirmation seeds of the
search's best configuration (rank 0), with their min-max; else the search's best. The
configuration is chosen on the search's seed and measured on seeds that took no part in
choosing it; taking the best of the top k by the same runs that report it would bring back the
winner's curse (the minimum of k noisy medians is biased low). The runner-up configurations'
runs are given beside it, so a reader sees whether the ranking holds.

How grid points combine into the fit: grid keys other than `batch_size` and `seed` (e.g.
`optimizer.name`) split the points into series, one fit each. A batch size's observations are
its points' confirmation runs of their rank-0 configuration (else each point's search best);
their median is its steps, a run that never reached the target counting as the worst
(`analysis.metrics.seed_spread`; a median that lands on it leaves that batch size out of the
fit). The fit is `analysis.scaling.fit_scaling`'s of one median per batch size, not of every
run: the seeds of one batch size share its configuration and that configuration's distance
from the true optimum, so they are not independent observations of S(B); fitted as such
(pseudo-replication), the interval narrows by up to sqrt(seeds) and under-covers as soon as
the batch sizes scatter about the curve by more than their seeds do. On 200 synthetic sweeps
(8 batch sizes x 3 seeds, seed noise and a per-batch-size offset of sd 0.1 each in log steps)
the 95% interval of B_crit covers 94.5% fitted to the medians and 75.5% fitted to every run; with
no offset both cover (95.5%, 94%) (tests/test_summary.py). The medians' scatter about the curve
carries the seeds' spread into the residual variance, on which the profile-likelihood
intervals rest.

Reads the studies' SQLite storage through `lbs_tune.studies.read_studies` (Optuna, no Ray); no
torch, no pandas.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from analysis._arrow import rows_to_table
from analysis.budget import BudgetCurve, Censoring, best_of_k, censoring
from analysis.metrics import BATCH, SEED, seed_spread
from analysis.scaling import RESAMPLES, ScalingFit, fit_scaling
from lbs_tune.names import first_reached, target_label
from lbs_tune.storage import Location
from lbs_tune.studies import STUDY_FILE, Objective, StudyRecord, ran_out, read_studies, told

STEPS = "steps_to_target"
FORMAT = 2  # summary.json's layout version
CONFIRMED, SEARCH = "confirmed", "search"  # where a point's steps come from


class Spread(NamedTuple):
    """Median and min–max of the objective over a study's feasible (COMPLETE) trials; None
    values when it has none."""

    of: str  # "steps_to_target" or the objective's metric
    median: float | None
    low: float | None
    high: float | None
    count: int


class Steps(NamedTuple):
    """Steps to target over runs: median and min–max, a run that never reached the target
    counting as the worst (a statistic that lands on it is None)."""

    median: float | None
    low: float | None
    high: float | None
    count: int  # the runs behind them, one per seed (as `Spread.count`)
    source: str  # CONFIRMED (confirmation runs) or SEARCH (the search's best trial)


class Confirmed(NamedTuple):
    """One confirmed configuration of a study: its search trial and its confirmation runs."""

    rank: int  # 0: the study's best trial
    trial: int  # the search trial's number
    params: dict[str, Any]
    search_steps: float | None  # its steps to target in the search (None: never reached)
    runs: list[dict[str, Any]]  # its told confirmation runs (read_studies' dicts), by seed
    run_steps: list[float | None]  # each run's steps to the target (None: not reached)
    steps: Steps | None  # over `runs` (None before any is told)


class Budget(NamedTuple):
    """The search-budget curve of a study (`analysis.budget.best_of_k`) over its told trials'
    steps to target. A PRUNED trial enters at one step past where it stopped, a lower bound of
    its steps: a quantile of the curve (`median`, `low`, `high`) at or below `exact_up_to` (the
    first step a pruned trial stopped at; None: none was pruned, all exact) is exact, one above
    it a lower bound; `infeasible` is then a lower bound too, and `expected` neither."""

    curve: BudgetCurve
    exact_up_to: float | None
    pruned: int  # the PRUNED trials among them


class PointSummary(NamedTuple):
    """One grid point's study, summarised."""

    study: str
    point: dict[str, Any]  # the grid point {dotted key: value}
    batch_size: int | None  # the point's, else the sweep's base batch size
    objective: Objective
    steps_to_target: float | None  # the search's best trial's; None if no trial reached it
    best: dict[str, Any] | None  # the best trial, as `read_studies` gives it
    spread: Spread
    counts: dict[str, int]  # asked, feasible, infeasible, diverged, pruned, unfinished
    trials: list[dict[str, Any]]  # every trial of the study (read_studies' dicts)
    confirmations: list[Confirmed]  # the confirmed configurations, best first; [] without
    seeds: list[int]  # the confirmation seeds
    steps: Steps  # the point's steps to target (see the module docstring)
    censoring: Censoring | None  # its told, unpruned trials against their caps
    budget: Budget | None  # None without a trial's steps to target

    @property
    def confirmed(self) -> Steps | None:
        """The point's steps from its confirmation runs, None while it has none."""
        return self.steps if self.steps.source == CONFIRMED else None

    @property
    def cap_hits(self) -> int | None:
        """Trials that ran to their step cap without reaching the target or diverging (None
        without reported caps)."""
        return self.censoring.capped if self.censoring else None

    @property
    def group(self) -> dict[str, Any]:
        """The grid keys that make series (all but batch size and seed)."""
        return {k: v for k, v in self.point.items() if k not in (BATCH, SEED)}

    @property
    def series(self) -> str:
        """The group as text, 'optimizer.name=sgd' ('' when the grid has no such key)."""
        return ", ".join(f"{k}={v}" for k, v in self.group.items())


class SeriesFit(NamedTuple):
    """The steps of one series (a value of the grid keys other than batch size and seed)
    against batch size, over runs, and the critical-batch fit of their medians."""

    group: dict[str, Any]
    name: str  # the group as text ('' for the only series)
    batch_sizes: list[int]
    median: list[float | None]  # None: the median run never reached the target
    low: list[float | None]
    high: list[float | None]
    seeds: list[int]  # the runs behind each median
    fit: ScalingFit
    search: list[float | None]  # the median over the batch size's studies of their best
    sources: list[str]  # CONFIRMED or SEARCH, per batch size


class Summary(NamedTuple):
    points: list[PointSummary]
    fits: list[SeriesFit]  # one per series; [] when the points have no batch sizes or steps

    @property
    def objective(self) -> Objective:
        return self.points[0].objective

    @property
    def target_label(self) -> str:
        """'val/accuracy ≥ 0.5' (the objective's target), or the objective's metric."""
        o = self.objective
        if o.target is None:
            return o.metric
        return target_label(o.metric, o.target)


# ============================================================================ Pure parts


def trial_steps(
    trial: dict[str, Any], objective: Objective, target: tuple[str, float] | None = None
) -> float | None:
    """A trial's steps to target: its value in a steps_to_target study; in a `metric` study the
    first step whose reported value reaches `target` (only when the target is on the study's
    metric: its reports hold no other); None otherwise or when never reached."""
    if objective.kind == STEPS:
        return trial["value"] if trial["state"] == "COMPLETE" else None
    if target is None or target[0] != objective.metric:
        return None
    hit = first_reached(trial["values"], target[1], objective.mode)
    return None if hit is None else float(hit)


def spread_of(steps: Sequence[float | None], source: str) -> Steps:
    """Median and min–max of runs' steps to target (None: never reached, the worst)."""
    table = rows_to_table(
        [{"group": 0, "steps": s} for s in steps],
        pa.schema([("group", pa.int64()), ("steps", pa.float64())]),
    )
    (row,) = seed_spread(table, "steps", ["group"], "min").to_pylist()
    return Steps(row["median"], row["low"], row["high"], row["seeds"], source)


def confirmed_configs(
    study: StudyRecord, target: tuple[str, float] | None = None
) -> list[Confirmed]:
    """The confirmed configurations of a study, best first, with their told runs (by seed)."""
    by_number = {t["number"]: t for t in study.trials}
    found = []
    for rank, number in enumerate(study.confirmed):
        runs = sorted(
            (c for c in study.confirmations if c["confirms"] == number and told(c)),
            key=lambda c: c["seed"],
        )
        steps = [trial_steps(c, study.objective, target) for c in runs]
        searched = by_number.get(number)
        found.append(
            Confirmed(
                rank,
                number,
                dict(searched["params"]) if searched else {},
                trial_steps(searched, study.objective, target) if searched else None,
                runs,
                steps,
                spread_of(steps, CONFIRMED) if runs else None,
            )
        )
    return found


def search_budget(
    trials: Sequence[dict[str, Any]], objective: Objective, target: tuple[str, float] | None
) -> Budget | None:
    """The search-budget curve of a study's told trials (see `Budget`); None when no trial
    reached the target in a study whose reports hold no steps to target (a `metric` study
    without a target on its metric) or when none is told."""
    ended = [t for t in trials if told(t)]
    if not ended or (objective.kind != STEPS and (target is None or target[0] != objective.metric)):
        return None
    pruned = [t["pruned_at"] for t in ended if not ran_out(t) and t["pruned_at"] is not None]
    values = []
    for t in ended:
        steps = trial_steps(t, objective, target)
        if steps is None and t["state"] == "PRUNED" and t["pruned_at"] is not None:
            steps = t["pruned_at"] + 1  # its steps to target are more than where it stopped
        values.append(steps)
    return Budget(best_of_k(values), float(min(pruned)) if pruned else None, len(pruned))


def trial_censoring(
    trials: Sequence[dict[str, Any]],
    batch_size: int,
    objective: Objective,
    target: tuple[str, float] | None = None,
) -> Censoring | None:
    """How a study's told trials ended against their step caps (`analysis.budget.censoring`;
    the cap is each trial's reported `total_steps`). PRUNED trials are left out (stopped by the
    search, not by their cap: `counts['pruned']`). None when no trial reported its cap."""
    rows = [
        (batch_size, trial_steps(t, objective, target), t["total_steps"], bool(t["diverged"]))
        for t in trials
        if ran_out(t) and t.get("total_steps") is not None
    ]
    return censoring(rows)[0] if rows else None


def summarize_point(
    study: StudyRecord,
    batch_size: int | None = None,
    target: tuple[str, float] | None = None,
) -> PointSummary:
    """One study summarised; `batch_size` is used where the grid point has none."""
    trials = study.trials
    feasible = [t for t in trials if t["state"] == "COMPLETE"]
    values = sorted(t["value"] for t in feasible)
    of = STEPS if study.objective.kind == STEPS else study.objective.metric
    spread = Spread(
        of,
        float(np.median(values)) if values else None,
        values[0] if values else None,
        values[-1] if values else None,
        len(values),
    )
    counts = {
        "asked": len(trials),
        "feasible": len(feasible),
        "infeasible": sum(t["state"] == "FAIL" for t in trials),
        "diverged": sum(bool(t["diverged"]) for t in trials),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "unfinished": sum(not told(t) for t in trials),
    }
    best = study.best()
    steps = trial_steps(best, study.objective, target) if best else None
    confirmations = confirmed_configs(study, target)
    if confirmations and confirmations[0].steps is not None:
        answer = confirmations[0].steps
    else:
        answer = Steps(steps, steps, steps, 1 if best else 0, SEARCH)
    batch = study.point.get(BATCH, batch_size)
    return PointSummary(
        study.name,
        dict(study.point),
        batch,
        study.objective,
        steps,
        best,
        spread,
        counts,
        list(trials),
        confirmations,
        list(study.seeds),
        answer,
        trial_censoring(trials, batch, study.objective, target) if batch is not None else None,
        search_budget(trials, study.objective, target),
    )


def _observations(point: PointSummary) -> tuple[list[float | None], str]:
    """A point's observations of its batch size's steps: its rank-0 configuration's told
    confirmation runs, else its search's best (one)."""
    if point.confirmations and point.confirmations[0].runs:
        return list(point.confirmations[0].run_steps), CONFIRMED
    return [point.steps_to_target], SEARCH


def fit_series(
    points: Sequence[PointSummary], resamples: int = RESAMPLES, seed: int = 0
) -> list[SeriesFit]:
    """One SeriesFit per group of grid keys other than batch size and seed, in order of first
    appearance; points without a batch size are left out. `resamples` and `seed` are passed to
    `fit_scaling` (whose profile-likelihood intervals need neither)."""
    points = [p for p in points if p.batch_size is not None]
    groups: dict[str, list[PointSummary]] = {}
    for p in points:
        groups.setdefault(p.series, []).append(p)
    fits = []
    for name, mine in groups.items():
        sizes = sorted({p.batch_size for p in mine})
        observed: dict[int, tuple[list[float | None], set[str]]] = {b: ([], set()) for b in sizes}
        for p in mine:
            runs, source = _observations(p)
            observed[p.batch_size][0].extend(runs)
            observed[p.batch_size][1].add(source)
        spreads = [spread_of(observed[b][0], "") for b in sizes]
        searched = [
            spread_of([p.steps_to_target for p in mine if p.batch_size == b], "") for b in sizes
        ]
        median = [s.median for s in spreads]
        fit = fit_scaling(sizes, median, resamples=resamples, seed=seed)
        fits.append(
            SeriesFit(
                mine[0].group,
                name,
                sizes,
                median,
                [s.low for s in spreads],
                [s.high for s in spreads],
                [s.count for s in spreads],
                fit,
                [s.median for s in searched],
                [SEARCH if SEARCH in observed[b][1] else CONFIRMED for b in sizes],
            )
        )
    return fits


def summarize(
    studies: Sequence[StudyRecord],
    batch_size: int | None = None,
    target: tuple[str, float] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Summary | None:
    """The Summary of a sweep's studies (`read_studies`), None when there are none.
    `batch_size`: the sweep's base batch size, for a grid without one; `target`: the report's,
    for studies whose objective is the metric (see `trial_steps`); `resamples` and `seed`: the
    fit's (see `fit_series`)."""
    if not studies:
        return None
    points = [summarize_point(s, batch_size, target) for s in studies]
    return Summary(points, fit_series(points, resamples, seed))


# ============================================================================ Reading studies


def studies_of(where: Location) -> list[StudyRecord]:
    """The studies of the experiment at `where` ([] if it has none): read in place on a local
    disk, from a copy in a temporary folder on remote storage (SQLite opens local files only)."""
    db = where.join(STUDY_FILE)
    if not db.exists():
        return []
    if where.is_local:
        return read_studies(where.path)
    with tempfile.TemporaryDirectory() as folder:
        with where.fs.open_input_stream(db.path) as f:
            Path(folder, STUDY_FILE).write_bytes(f.readall())
        return read_studies(folder)


def read_summary(
    where: Location,
    sweep: dict[str, Any] | None = None,
    target: tuple[str, float] | None = None,
    resamples: int = RESAMPLES,
) -> Summary | None:
    """The Summary of the experiment at `where`, None unless it has studies; `sweep` is its
    lbs_sweep.json (`Results.sweep`), for the base batch size of a grid without one."""
    return summarize(studies_of(where), base_batch_size(sweep), target, resamples)


def base_batch_size(sweep: dict[str, Any] | None) -> int | None:
    """The batch size of the trials of a grid without batch_size, from the spec in the sweep
    record `sweep`: its first trial's (the spec resolved as the runner resolves it, so a base
    without batch_size has the default, one with a batch schedule its first batch); None
    without a spec that can be read."""
    from lbs_tune.sweep import SweepSpec

    spec = (sweep or {}).get("spec")
    if not isinstance(spec, dict):
        return None
    try:
        return SweepSpec.model_validate(spec).trials[0].batch_size
    except (ValueError, IndexError):  # a record of another version of lbs-tune
        return (spec.get("base") or {}).get(BATCH)
