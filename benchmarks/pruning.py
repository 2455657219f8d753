"""What stopping the trials that can no longer win saves (issue 18.4): sweeps/quickstart_tuned.yaml
run twice on one local Ray cluster, with `search.prune: true` and `false`, each printing its
trial-steps (the steps every trial ran, the search's and the confirmation runs' apart), its wall
time, B_crit with its interval and each batch size's best trial. The last line says whether the
best trial of every batch size and B_crit are the same, and the ratio of the search's
trial-steps (the issue's target: the same answer with at least 2x fewer trial-steps).

    python benchmarks/pruning.py --storage /tmp/pruning
    python benchmarks/pruning.py --set "grid.batch_size=[16, 256, 2048]" \
        --set search.trials_per_point=4

Each line is JSON. The two sweeps share the machine in turn, never at once; on a loaded machine
their wall times are only as comparable as its load.
"""

# ruff: noqa: E402  (the path fix below must run before the package imports)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# benchmarks/analysis.py would shadow the analysis package: the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.load import load
from analysis.summary import read_summary
from lbs_tune.cluster import start_ray
from lbs_tune.runner import run
from lbs_tune.storage import locate

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "quickstart_tuned.yaml"
CONFIRM_COLUMN = "search.confirm"  # set in a confirmation run's config (lbs_tune.searcher)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=SWEEP)
    parser.add_argument("--storage", default="/tmp/lbs-pruning")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpus", type=int, default=None, help="the local Ray cluster's CPUs")
    return parser.parse_args(argv)


def trial_steps(folder: Path) -> dict[str, int]:
    """The steps every Ray trial of an experiment ran (its last reported step): the search's
    trials, the confirmation runs and all."""
    trials = load(folder, cache=False).trials
    steps = [int(s or 0) for s in trials["final/step"].to_pylist()]
    confirm = (
        trials[CONFIRM_COLUMN].to_pylist()
        if CONFIRM_COLUMN in trials.column_names
        else [None] * len(steps)
    )
    search = sum(s for s, c in zip(steps, confirm, strict=True) if c is None)
    return {"search": search, "confirm": sum(steps) - search, "all": sum(steps)}


def outcome(folder: Path) -> dict[str, Any]:
    """B_crit with its interval and each batch size's best trial (number, steps to target)."""
    summary = read_summary(locate(folder))
    fit = summary.fits[0].fit if summary and summary.fits else None
    return {
        "b_crit": fit.b_crit if fit else None,
        "b_crit_interval": list(fit.intervals.get("b_crit", ())) if fit else None,
        "best": {
            p.batch_size: [p.best["number"] if p.best else None, p.steps_to_target]
            for p in (summary.points if summary else [])
        },
        "pruned": sum(p.counts["pruned"] for p in (summary.points if summary else [])),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_ray(cpus=args.cpus)
    found = {}
    for prune in (True, False):
        name = f"pruning_{str(prune).lower()}"
        overrides = [*args.overrides, f"search.prune={str(prune).lower()}", f"name={name}"]
        started = time.monotonic()
        code = run(args.sweep, overrides, storage=args.storage, fresh=True)
        wall = time.monotonic() - started
        folder = Path(args.storage) / name
        found[prune] = {
            "prune": prune,
            "exit": code,
            "wall_s": round(wall, 1),
            "trial_steps": trial_steps(folder),
            **outcome(folder),
        }
        print(json.dumps(found[prune]), flush=True)
    on, off = found[True], found[False]
    print(
        json.dumps(
            {
                "same_best_trials": on["best"] == off["best"],
                "same_b_crit": on["b_crit"] == off["b_crit"],
                "search_steps_ratio": round(
                    off["trial_steps"]["search"] / max(1, on["trial_steps"]["search"]), 2
                ),
                "all_steps_ratio": round(
                    off["trial_steps"]["all"] / max(1, on["trial_steps"]["all"]), 2
                ),
                "wall_ratio": round(off["wall_s"] / max(1e-9, on["wall_s"]), 2),
            }
        )
    )
    return 0 if on["exit"] == off["exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
