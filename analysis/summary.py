"""The numbers of a searched sweep (one Optuna study per grid point, `lbs_tune.studies`): per grid
point the best trial and the spread of its study, the critical-batch fit of the best steps,
`summary.json`, and the study trials as a table for `lbs-tune export`.

The best trial of a study is `StudyRecord.best()`: fewest steps to the target, ties by the
better value of the metric at that step, then the earlier trial. Its `steps_to_target` is that
trial's objective value (an objective `metric` study: the first step at which its reported
values reach the target, when the target is on the study's metric).

How grid points combine into the fit: grid keys other than `batch_size` and `seed` (e.g.
`optimizer.name`) split the points into series, one fit each; the seeds of one batch size
combine as the median of their best steps, a seed whose study never reached the target counting
as the worst (`analysis.metrics.seed_spread`; a median that lands on it leaves that batch size
out of the fit, as a batch size that never reached it). The fit and its bootstrap intervals over
batch sizes are `analysis.scaling.fit_scaling`'s.

Reads the studies' SQLite storage through `lbs_tune.studies.read_studies` (Optuna, no Ray); no
torch, no pandas.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from analysis._arrow import rows_to_table
from analysis.metrics import BATCH, SEED, seed_spread
from analysis.scaling import LEVEL, PARAMETERS, RESAMPLES, ScalingFit, fit_scaling
from lbs_tune.experiment import REPORT_FILE, SUMMARY_FILE, write_parquet
from lbs_tune.names import comparison, first_reached
from lbs_tune.storage import Location, locate
from lbs_tune.studies import STUDY_FILE, Objective, StudyRecord, read_studies

STEPS = "steps_to_target"
FORMAT = 1  # summary.json's layout version


class Spread(NamedTuple):
    """Median and min–max of the objective over a study's feasible (COMPLETE) trials; None
    values when it has none."""

    of: str  # "steps_to_target" or the objective's metric
    median: float | None
    low: float | None
    high: float | None
    count: int


class PointSummary(NamedTuple):
    """One grid point's study, summarised."""

    study: str
    point: dict[str, Any]  # the grid point {dotted key: value}
    batch_size: int | None  # the point's, else the sweep's base batch size
    objective: Objective
    steps_to_target: float | None  # the best trial's; None if no trial reached the target
    best: dict[str, Any] | None  # the best trial, as `read_studies` gives it
    spread: Spread
    counts: dict[str, int]  # asked, feasible, infeasible, diverged, unfinished
    trials: list[dict[str, Any]]  # every trial of the study (read_studies' dicts)

    @property
    def group(self) -> dict[str, Any]:
        """The grid keys that make series (all but batch size and seed)."""
        return {k: v for k, v in self.point.items() if k not in (BATCH, SEED)}

    @property
    def series(self) -> str:
        """The group as text, 'optimizer.name=sgd' ('' when the grid has no such key)."""
        return ", ".join(f"{k}={v}" for k, v in self.group.items())


class SeriesFit(NamedTuple):
    """The best steps of one series (a value of the grid keys other than batch size and seed)
    against batch size, over seeds, and the critical-batch fit of their medians."""

    group: dict[str, Any]
    name: str  # the group as text ('' for the only series)
    batch_sizes: list[int]
    median: list[float | None]  # None: the median seed never reached the target
    low: list[float | None]
    high: list[float | None]
    seeds: list[int]
    fit: ScalingFit


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
        return f"{o.metric} {comparison(o.metric)} {o.target:g}"


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
        "unfinished": sum(t["state"] not in ("COMPLETE", "FAIL") for t in trials),
    }
    best = study.best()
    steps = trial_steps(best, study.objective, target) if best else None
    return PointSummary(
        study.name,
        dict(study.point),
        study.point.get(BATCH, batch_size),
        study.objective,
        steps,
        best,
        spread,
        counts,
        list(trials),
    )


def fit_series(
    points: Sequence[PointSummary], resamples: int = RESAMPLES, seed: int = 0
) -> list[SeriesFit]:
    """One SeriesFit per group of grid keys other than batch size and seed, in order of first
    appearance; points without a batch size are left out."""
    points = [p for p in points if p.batch_size is not None]
    groups: dict[str, list[PointSummary]] = {}
    for p in points:
        groups.setdefault(p.series, []).append(p)
    fits = []
    for name, mine in groups.items():
        rows = [{BATCH: p.batch_size, "steps": p.steps_to_target} for p in mine]
        spread = seed_spread(
            rows_to_table(rows, pa.schema([(BATCH, pa.int64()), ("steps", pa.float64())])),
            "steps",
            [BATCH],
            "min",
        )
        sizes = spread[BATCH].to_pylist()
        median = spread["median"].to_pylist()
        fit = fit_scaling(sizes, median, resamples=resamples, seed=seed)
        fits.append(
            SeriesFit(
                mine[0].group,
                name,
                sizes,
                median,
                spread["low"].to_pylist(),
                spread["high"].to_pylist(),
                spread["seeds"].to_pylist(),
                fit,
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
    fit's bootstrap."""
    if not studies:
        return None
    points = [summarize_point(s, batch_size, target) for s in studies]
    return Summary(points, fit_series(points, resamples, seed))


# ============================================================================ summary.json


def _number(value: Any) -> Any:
    """A float as JSON takes it: whole floats as ints (steps), NaN and inf as None."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() else value
    return value


def _trial_json(trial: dict[str, Any]) -> dict[str, Any]:
    # No Ray trial id and no time: an interrupted and an uninterrupted run of one qmc sweep
    # write the same points.
    return {
        "number": trial["number"],
        "state": trial["state"],
        "value": _number(trial["value"]),
        "params": trial["params"],
        "diverged": trial["diverged"],
        "reason": trial["reason"],
    }


def _fit_json(fit: ScalingFit) -> dict[str, Any]:
    return {
        **{name: _number(getattr(fit, name)) for name in PARAMETERS},
        "intervals": {k: [_number(lo), _number(hi)] for k, (lo, hi) in fit.intervals.items()},
        "level": LEVEL if fit.intervals else None,
        "resamples": fit.resamples,
        "bracketed": fit.bracketed,
        "batch_sizes": [_number(b) for b in fit.batch_sizes],
        "steps": [_number(s) for s in fit.steps],
        "reason": fit.reason,
    }


def summary_json(summary: Summary) -> dict[str, Any]:
    """summary.json's content: `objective`, `points` (per grid point: its grid keys,
    `batch_size`, `study`, `steps_to_target` (null if never), `examples_to_target`,
    `best_config` (the best trial's searched values), `best_value`, and `trials`: counts, the
    spread of the feasible trials' objective and every trial), `fit` (the only series' `s_min`,
    `e_min`, `b_noise`, `b_crit`, their `intervals` as [low, high], ...; null when grid keys
    other than batch size and seed make several series) and `fits` (every series' fit with its
    `group`)."""
    o = summary.objective
    points = []
    for p in summary.points:
        steps = p.steps_to_target
        points.append(
            {
                **p.point,
                BATCH: p.batch_size,
                "study": p.study,
                STEPS: _number(steps),
                "examples_to_target": _number(
                    None if steps is None or p.batch_size is None else steps * p.batch_size
                ),
                "best_config": p.best["params"] if p.best else None,
                "best_value": _number(p.best["value"]) if p.best else None,
                "trials": {
                    **p.counts,
                    "spread": {k: _number(v) for k, v in p.spread._asdict().items()},
                    "all": [_trial_json(t) for t in p.trials],
                },
            }
        )
    fits = [{"group": s.group, **_fit_json(s.fit)} for s in summary.fits]
    return {
        "format": FORMAT,
        "objective": {"kind": o.kind, "metric": o.metric, "mode": o.mode, "target": o.target},
        "points": points,
        "fit": fits[0] if len(fits) == 1 else None,
        "fits": fits,
    }


def summary_path(report: Path) -> Path:
    """Where summary.json goes beside a report: `summary.json` beside `report.html`,
    `NAME-summary.json` beside `NAME-report.html`, `STEM.summary.json` beside any other."""
    if report.name == REPORT_FILE:
        return report.with_name(SUMMARY_FILE)
    if report.name.endswith("-report.html"):
        return report.with_name(report.name.removesuffix("-report.html") + "-summary.json")
    return report.with_name(f"{report.stem}.{SUMMARY_FILE}")


def write_summary(summary: Summary, path: str | Path) -> Path:
    """Write `summary_json(summary)` to `path` (atomically); return the path."""
    locate(path).write_text(json.dumps(summary_json(summary), indent=1) + "\n")
    return Path(path)


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
    base = ((sweep or {}).get("spec") or {}).get("base") or {}
    return summarize(studies_of(where), base.get(BATCH), target, resamples)


def study_trials_table(source: Location | str | Path) -> pa.Table | None:
    """Every trial of every study of an experiment (a Location, folder or URI) as one table
    (None without studies): `study`, `point` (its grid index), the grid keys, `objective`,
    `objective_metric`, `number`, `state`, `value`, `at_value`, the searched keys (dotted),
    `ray_trial_id`, `reason`, `diverged`, `ray_errors`, and the reported values of the
    objective's metric as lists `report_steps` and `report_values`. For `lbs-tune export`
    (studies.parquet)."""
    where = source if isinstance(source, Location) else locate(source)
    studies = studies_of(where)
    if not studies:
        return None
    rows = []
    for s in studies:
        for t in s.trials:
            rows.append(
                {
                    "study": s.name,
                    "point": s.index,
                    **s.point,
                    "objective": s.objective.kind,
                    "objective_metric": s.objective.metric,
                    "number": t["number"],
                    "state": t["state"],
                    "value": t["value"],
                    "at_value": t["at_value"],
                    **t["params"],
                    "ray_trial_id": t["ray_trial_id"],
                    "reason": t["reason"],
                    "diverged": t["diverged"],
                    "ray_errors": t["ray_errors"],
                    "report_steps": list(t["values"]),
                    "report_values": list(t["values"].values()),
                }
            )
    fixed = pa.schema(
        [
            ("study", pa.string()),
            ("point", pa.int64()),
            ("objective", pa.string()),
            ("objective_metric", pa.string()),
            ("number", pa.int64()),
            ("state", pa.string()),
            ("value", pa.float64()),
            ("at_value", pa.float64()),
            ("ray_trial_id", pa.string()),
            ("reason", pa.string()),
            ("diverged", pa.bool_()),
            ("ray_errors", pa.int64()),
            ("report_steps", pa.list_(pa.int64())),
            ("report_values", pa.list_(pa.float64())),
        ]
    )
    table = rows_to_table(rows, fixed)
    # The grid keys after `point`, the searched keys after `at_value`, as a reader scans them.
    grid = list(dict.fromkeys(k for s in studies for k in s.point))
    params = [k for k in table.column_names if k not in fixed.names and k not in grid]
    names = fixed.names
    at = names.index("at_value") + 1
    return table.select(names[:2] + grid + names[2:at] + params + names[at:])


def write_study_trials(source: Location | str | Path, out_dir: Location | str | Path) -> str | None:
    """Write `studies.parquet` (see `study_trials_table`) into `out_dir`; its URI, or None
    when the experiment has no studies."""
    table = study_trials_table(source)
    if table is None:
        return None
    folder = out_dir if isinstance(out_dir, Location) else locate(out_dir)
    target = folder.join("studies.parquet")
    write_parquet(target, table)
    return target.uri
