"""summary.json: a searched (or branched, or known-answer) sweep's numbers as JSON, written
beside its report, for scripts and papers. Built from `analysis.summary.Summary`; one name per
number (`b_crit` the fitted critical batch size; measured noise scales are metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.budget import Censoring
from analysis.known import Exact, compare
from analysis.scaling import PARAMETERS
from analysis.summary import (
    BATCH,
    FORMAT,
    STEPS,
    Budget,
    Confirmed,
    SeriesFit,
    Steps,
    Summary,
)
from lbs_tune.experiment import REPORT_FILE, SUMMARY_FILE
from lbs_tune.storage import locate


def _number(value: Any) -> Any:
    """A float as JSON takes it: whole floats as ints (steps), NaN and inf as None."""
    if isinstance(value, float | np.floating):
        value = float(value)
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() else value
    if isinstance(value, np.integer):
        return int(value)
    return value


def _numbers(values) -> list[Any]:
    return [_number(v) for v in values]


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
        "pruned_at": trial.get("pruned_at"),
        "total_steps": trial.get("total_steps"),
    }


def _steps_json(steps: Steps | None) -> dict[str, Any] | None:
    if steps is None:
        return None
    return {
        "median": _number(steps.median),
        "low": _number(steps.low),
        "high": _number(steps.high),
        "count": steps.count,
        "from": steps.source,
    }


def _confirmed_json(c: Confirmed) -> dict[str, Any]:
    runs = [
        {
            "seed": r["seed"],
            "number": r["number"],
            STEPS: _number(steps),
            "state": r["state"],
            "diverged": r["diverged"],
            "reason": r["reason"],
        }
        for r, steps in zip(c.runs, c.run_steps, strict=True)
    ]
    spread = _steps_json(c.steps)
    return {
        "rank": c.rank,
        "trial": c.trial,
        "config": c.params,
        "search_steps": _number(c.search_steps),
        **{k: (spread or {}).get(k) for k in ("median", "low", "high")},
        "runs": runs,
    }


def _censoring_json(c: Censoring | None, pruned: int) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "trials": c.trials,
        "reached": c.reached,
        "diverged": c.diverged,
        "capped": c.capped,
        "pruned": pruned,
        "best_steps": _number(c.best_steps),
        "best_cap": c.best_cap,
        "used": _number(c.used),
        "flagged": c.flagged,
    }


def _budget_json(b: Budget | None) -> dict[str, Any] | None:
    if b is None:
        return None
    curve = b.curve
    return {
        "k": curve.k.tolist(),
        "median": _numbers(curve.median),
        "low": _numbers(curve.low),
        "high": _numbers(curve.high),
        "p_none": _numbers(curve.infeasible),
        "exact_up_to": _number(b.exact_up_to),
        "pruned": b.pruned,
    }


def _fit_json(series: SeriesFit) -> dict[str, Any]:
    fit = series.fit
    return {
        "group": series.group,
        **{name: _number(getattr(fit, name)) for name in PARAMETERS},
        "intervals": {k: _numbers(fit.intervals[k]) for k in PARAMETERS if k in fit.intervals},
        "level": fit.level,
        "method": fit.method if fit.intervals else None,
        "residual_sd": _number(fit.residual_sd),
        "bracketed": fit.bracketed,
        "batch_sizes": _numbers(fit.batch_sizes),
        "steps": _numbers(fit.steps),
        "reason": fit.reason,
        "series": {
            BATCH: series.batch_sizes,
            "median": _numbers(series.median),
            "low": _numbers(series.low),
            "high": _numbers(series.high),
            "seeds": series.seeds,
            "search": _numbers(series.search),
            "from": series.sources,
        },
    }


def summary_json(summary: Summary, exact: Sequence[Exact] | None = None) -> dict[str, Any]:
    """summary.json's content (`format` 2), one name per number:

    - `objective`: kind, metric, mode, target.
    - `points`, per grid point: its grid keys, `batch_size`, `study`; `steps_to_target`: the
      point's steps {median, low, high, count, from: 'confirmed' (its best configuration's
      confirmation runs) or 'search' (the search's best trial)}; `examples_to_target` (the
      median x batch size); `search`: {best_trial, best_config, best_value, steps_to_target}
      of the search's best trial (on the search's seed); `confirmations`: per confirmed
      configuration, best first, {rank, trial, config, search_steps, median, low, high, runs:
      [{seed, number, steps_to_target, state, diverged, reason}]} ([] without confirmation);
      `confirm_seeds`; `censoring`: the search's told, unpruned trials against their caps
      {trials, reached, diverged, capped (ran to the cap without reaching the target or
      diverging), pruned, best_steps, best_cap, used (best_steps / best_cap), flagged (used >
      half, or nothing reached and some capped)} (null without caps); `search_budget`: the
      best steps of a search of k of its trials {k, median, low, high (10% and 90%), p_none,
      exact_up_to, pruned} (see `Budget`); `trials`: counts, the spread of the feasible
      trials' objective and every trial.
    - `fit`: the only series' fit (null when grid keys other than batch size and seed make
      several series): `s_min`, `e_min`, `b_crit` (= E_min / S_min, McCandlish et al.'s
      critical batch size; not the measured gradient noise scale), their `intervals` [low,
      high] at `level` by `method`, `residual_sd`, `bracketed`, the `batch_sizes` and `steps`
      fitted, `reason` (why there is no fit), and `series`: per batch size the `median`,
      `low`, `high` over `seeds` runs, the `search` best, and where they come `from`.
    - `fits`: every series' fit with its `group`.
    """
    o = summary.objective
    points = []
    for p in summary.points:
        median = p.steps.median
        best = p.best
        points.append(
            {
                **p.point,
                BATCH: p.batch_size,
                "study": p.study,
                STEPS: _steps_json(p.steps),
                "examples_to_target": _number(
                    None if median is None or p.batch_size is None else median * p.batch_size
                ),
                "search": {
                    "best_trial": best["number"] if best else None,
                    "best_config": best["params"] if best else None,
                    "best_value": _number(best["value"]) if best else None,
                    STEPS: _number(p.steps_to_target),
                },
                "confirmations": [_confirmed_json(c) for c in p.confirmations],
                "confirm_seeds": p.seeds,
                "censoring": _censoring_json(p.censoring, p.counts["pruned"]),
                "search_budget": _budget_json(p.budget),
                "trials": {
                    **p.counts,
                    "spread": {k: _number(v) for k, v in p.spread._asdict().items()},
                    "all": [_trial_json(t) for t in p.trials],
                },
            }
        )
    fits = [_fit_json(s) for s in summary.fits]
    for fit, series in zip(fits, summary.fits, strict=True):
        # A workload with a known answer: the exact values beside the measured fit.
        known = [e for e in exact or () if e.group == series.group]
        if known:
            fit["exact"] = compare(known[0], series.fit)
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


def write_summary(
    summary: Summary | None,
    path: str | Path,
    exact: Sequence[Exact] | None = None,
    branches: dict[str, Any] | None = None,
) -> Path | None:
    """Write summary.json to `path` (atomically) and return the path: `summary_json(summary,
    exact)` and, for a branched sweep, its `branches` (`analysis.branches.branches_json`).
    None, writing nothing, when there is neither."""
    if summary is None and branches is None:
        return None
    content = summary_json(summary, exact) if summary is not None else {"format": FORMAT}
    if branches is not None:
        content["branches"] = branches
    locate(path).write_text(json.dumps(content, indent=1) + "\n")
    return Path(path)
