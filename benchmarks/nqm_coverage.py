"""The pipeline's own coverage: how often the tuned NQM sweep's reported 95% intervals on S_min,
E_min and B_crit hold the exact values (analysis.known), over independent replicates.

Replicate r is sweeps/nqm_tuned.yaml (or --spec) with search.seed = r and base.seed = r: fresh
Sobol learning rates and fresh gradient noise. Each replicate runs the sweep's protocol in this
process, with the code `lbs-tune run` uses: the spec loaded and checked by `load_spec`, trial n
of grid point i drawing `lbs_tune.samplers.sobol_point(search, i, n)` (the qmc sampler's draw),
each trial trained by `lbs_tune.training.train`, its reports turned into the study's value by
`lbs_tune.studies.Objective.outcome`, the best `search.confirm.top` trials of each study (by
`lbs_tune.studies.ranked`) run again on the seeds of `lbs_tune.studies.confirmation_seeds`, as
the searcher runs them, and the studies summarised by `analysis.summary.summarize` (the fit and
intervals of summary.json and the report). What differs from `lbs-tune run`: no
Ray (the trials run one after another in this process, their reports kept in memory, not in
result.json), no Optuna storage (each study is built as the `StudyRecord` that
`read_studies` would read back), and a trial stops at its own `target` (the sweep file's
base.target has stop: true) where Ray stops it at the first report that reaches the sweep's
target, the same report when both targets are the same (checked). Only the qmc sampler.

    python benchmarks/nqm_coverage.py [--replicates 20] [--jobs 2] [--set KEY=VALUE ...]

Prints one JSON line per replicate and a closing line with the coverage of each interval: the
summary's (profile likelihood on the best steps per batch size) and, for comparison, the
hierarchical bootstrap over the studies' trials (`analysis.scaling.bootstrap_studies`).
"""

# ruff: noqa: E402  (the path fix below must run before the package imports)
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Run as a script, this file's folder comes first on the path and its name hides the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from analysis.known import COMPARED, compare, exact_answer
from analysis.scaling import bootstrap_studies
from analysis.summary import summarize
from lbs_tune.config import TrialConfig
from lbs_tune.names import set_dotted
from lbs_tune.samplers import sobol_point
from lbs_tune.spec import load_spec
from lbs_tune.studies import (
    CONFIRMS,
    SEED,
    Objective,
    StudyRecord,
    confirmation_seeds,
    finite_number,
    objective_for,
    ranked,
    study_name,
)

SWEEP = Path(__file__).resolve().parent.parent / "sweeps" / "nqm_tuned.yaml"


def run_trial(config: TrialConfig, objective: Objective, number: int, params: dict) -> dict:
    """One trial of a study, as `read_studies` reads it back."""
    import torch

    from lbs_tune.training import ListReporter, train

    torch.set_num_threads(1)
    reporter = ListReporter()
    train(config, reporter)
    values = {
        row["step"]: value
        for row in reporter.rows
        if (value := finite_number(row.get(objective.metric))) is not None
    }
    diverged = any(row.get("diverged") for row in reporter.rows)
    value, reason = objective.outcome(values, diverged)
    return {
        "number": number,
        "state": "COMPLETE" if value is not None else "FAIL",
        "value": value,
        "at_value": values.get(int(value)) if value is not None else None,
        "params": params,
        "ray_trial_id": None,
        "reason": reason,
        "diverged": diverged,
        "ray_errors": 0,
        "values": values,
    }


def confirmed(record: StudyRecord, spec, config: TrialConfig, objective: Objective) -> StudyRecord:
    """The study with its confirmation runs, as `read_studies` reads them back: run n is the
    (n // seeds)-th best search trial on the (n % seeds)-th confirmation seed."""
    confirm = spec.search.confirm
    if confirm is None:
        return record
    best = ranked(record.trials, objective)[: confirm.top]
    seeds = confirmation_seeds(spec.search, [t.seed for t in spec.trials])
    runs = []
    for n in range(len(best) * len(seeds)):
        trial, seed = best[n // len(seeds)], seeds[n % len(seeds)]
        tree = config.model_dump(mode="json") | {"seed": seed}
        for key, value in trial["params"].items():
            set_dotted(tree, key, value)
        run = run_trial(TrialConfig.model_validate(tree), objective, n, trial["params"])
        runs.append(run | {CONFIRMS: trial["number"], SEED: seed})
    return record._replace(
        confirmed=tuple(t["number"] for t in best), seeds=tuple(seeds), confirmations=tuple(runs)
    )


def replicate(spec_path: str, overrides: list[str], r: int) -> dict:
    """Replicate `r`: the sweep run in-process with search.seed = base.seed = r; its measured
    fit, the exact answer and whether each interval holds it."""
    started = time.perf_counter()
    spec = load_spec(spec_path, [*overrides, f"search.seed={r}", f"base.seed={r}"])
    if spec.search is None or spec.search.sampler != "qmc":
        raise SystemExit("nqm_coverage: the sweep needs a search with sampler qmc")
    objective = objective_for(spec.search, spec.metric, spec.target)
    records = []
    for index, (point, config) in enumerate(zip(spec.points(), spec.trials, strict=True)):
        own = config.target
        if (
            own is None
            or not own.stop
            or (own.metric, own.value)
            != (
                objective.metric,
                objective.target,
            )
        ):
            raise SystemExit("nqm_coverage: base.target must be the sweep's target, with stop")
        trials = []
        for number in range(spec.search.trials_per_point):
            params = sobol_point(spec.search, index, number)
            tree = config.model_dump(mode="json")
            for key, value in params.items():
                set_dotted(tree, key, value)
            trials.append(run_trial(TrialConfig.model_validate(tree), objective, number, params))
        record = StudyRecord(study_name(point), point, index, objective, trials)
        records.append(confirmed(record, spec, config, objective))
    summary = summarize(records)
    (series,) = summary.fits
    (exact,) = exact_answer(spec)
    boot = bootstrap_studies(
        series.batch_sizes,
        [[[t["value"] for t in rec.trials]] for rec in records],
        seed=r,
    ).fit
    return {
        "replicate": r,
        "seconds": round(time.perf_counter() - started, 1),
        "measured_steps": series.median,
        "exact_steps": [s if math.isfinite(s) else None for s in exact.steps],
        "fit": {name: getattr(series.fit, name) for name in COMPARED},
        "intervals": {name: series.fit.intervals.get(name) for name in COMPARED},
        "exact": compare(exact, series.fit),
        "bootstrap": compare(exact, boot)["holds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(SWEEP))
    parser.add_argument("--replicates", type=int, default=20)
    parser.add_argument("--first", type=int, default=0, help="the first replicate's seed")
    parser.add_argument("--jobs", type=int, default=2, help="replicates run at once")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    seeds = range(args.first, args.first + args.replicates)
    held = {"summary": {n: 0 for n in COMPARED}, "bootstrap": {n: 0 for n in COMPARED}}
    b_crits = []
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(replicate, args.spec, args.set, r) for r in seeds]
        for future in futures:
            result = future.result()
            print(json.dumps(result), flush=True)
            b_crits.append(result["fit"]["b_crit"])
            for name in COMPARED:
                held["summary"][name] += bool(result["exact"]["holds"][name])
                held["bootstrap"][name] += bool(result["bootstrap"][name])
    n = len(seeds)
    exact = result["exact"]
    found = [b for b in b_crits if b is not None]
    closing = {
        "replicates": n,
        "exact": {name: exact[name] for name in COMPARED},
        "median_measured_b_crit": statistics.median(found) if found else None,
        "coverage": {
            kind: {name: f"{count}/{n} ({count / n:.0%})" for name, count in counts.items()}
            for kind, counts in held.items()
        },
    }
    print(json.dumps(closing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
