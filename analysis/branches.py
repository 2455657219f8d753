"""The numbers of a branched sweep (a sweep file's `branch:` section, `lbs_tune.probes`): every
branch as a row of a table (`branches.parquet` of `lbs-tune export`), the local critical batch
size at each point with its spread over seeds, the planned schedule, and the comparison of the
schedule with the constant small and large batches (`summary.json`'s `branches`).

The branch losses and the local critical batch sizes are computed as the sweep's own searcher
computed them to plan the schedule (`lbs_tune.probes.branch_loss` and `point_sizes` over the
reports of each branch), from the trials' result files. Comparison: each seed's small-batch run's
final validation loss is the target of that seed's runs; each run's steps to it are those of its
first evaluation at or below it (`lbs_tune.names.first_reached`), the small run's own included.
No torch, Ray or pandas.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from analysis._arrow import rows_to_table, strings
from analysis.tables import Results
from lbs_tune.config import BRANCH_KEY
from lbs_tune.experiment import write_parquet
from lbs_tune.names import first_reached
from lbs_tune.probes import branch_loss, point_sizes, smoothing, tolerance
from lbs_tune.storage import Location, locate
from lbs_tune.sweep import BranchSpec

BRANCHES_FILE = "branches.parquet"
TARGET_METRIC = "val/loss"  # the comparison's: the small-batch run's final validation loss
BRANCH_SCHEMA = pa.schema(
    [
        ("point", pa.int64()),
        ("point_examples", pa.int64()),
        ("point_step", pa.int64()),
        ("k", pa.int64()),
        ("batch_size", pa.int64()),
        ("seed", pa.int64()),
        ("smoothed_loss", pa.float64()),
        ("final_loss", pa.float64()),
        ("steps", pa.int64()),
        ("examples", pa.int64()),
        ("lr", pa.float64()),
        ("diverged", pa.bool_()),
        ("state", pa.string()),
        ("trial_id", pa.string()),
    ]
)


def _key(name: str) -> str:
    return f"{BRANCH_KEY}.{name}"


def branch_spec(results: Results) -> BranchSpec | None:
    """The sweep's branch section (from its record), None for a sweep without one."""
    section = ((results.sweep or {}).get("spec") or {}).get("branch")
    return BranchSpec.model_validate(section) if section else None


def phase_trials(results: Results, phase: str) -> list[dict[str, Any]]:
    """The trials (rows of the trials table) of one phase ("reference", "branch", "compare"),
    one per place (`branch.label`): a place asked again after a driver was killed (its first
    trial unknown to Ray's saved state) may have left a folder of its own, and the trial that
    Ray's state holds wins, else the one started last."""
    trials = results.trials
    if _key("phase") not in trials.column_names:
        return []
    mine = trials.filter(pc.equal(trials[_key("phase")], pa.scalar(phase))).to_pylist()
    chosen: dict[str, dict[str, Any]] = {}
    started = {t["trial_id"]: t["start_time"].timestamp() if t["start_time"] else 0 for t in mine}
    for t in sorted(mine, key=lambda t: (t["state"] is not None, started[t["trial_id"]])):
        chosen[t[_key("label")]] = t
    return sorted(chosen.values(), key=lambda t: t["trial_id"])


def _reports(results: Results, ids: list[str], metric: str) -> dict[str, list[dict[str, Any]]]:
    """{trial id: its reports' step, examples, lr and `metric`, in step order} of `ids`."""
    history = results.history
    found: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if not ids:
        return found
    rows = history.filter(pc.is_in(history["trial_id"], value_set=strings(ids)))
    columns = ["trial_id", "step", "examples", "lr"]
    columns += [metric] if metric in history.column_names else []
    for row in rows.select(columns).to_pylist():
        found[row["trial_id"]].append({**row, "value": row.get(metric)})
    return found


# ============================================================================ The branches


def branch_rows(results: Results) -> list[dict[str, Any]]:
    """One row per branch trial (BRANCH_SCHEMA), by point, k and seed: its point (index, the
    reference's examples and step there), k, batch size, seed, its smoothed loss of the sweep's
    `branch.metric` (see the module), that metric's last value, its steps and examples, its LR,
    whether it diverged, its Ray state and id. [] for a sweep without branches."""
    spec = branch_spec(results)
    trials = phase_trials(results, "branch")
    if spec is None or not trials:
        return []
    reports = _reports(results, [t["trial_id"] for t in trials], spec.metric)
    rows = []
    for t in trials:
        mine = reports[t["trial_id"]]
        values = [r["value"] for r in mine]
        last = mine[-1] if mine else {}
        rows.append(
            {
                "point": t[_key("point")],
                "point_examples": t[_key("examples_at")],
                "point_step": t[_key("step_at")],
                "k": t[_key("k")],
                "batch_size": t["batch_size"],
                "seed": t[_key("seed")],
                "smoothed_loss": _finite(
                    branch_loss(values, smoothing(spec), t["state"] == "ERROR")
                ),
                "final_loss": last.get("value"),
                "steps": last.get("step"),
                "examples": last.get("examples"),
                "lr": last.get("lr"),
                "diverged": bool(t["diverged"]),
                "state": t["state"],
                "trial_id": t["trial_id"],
            }
        )
    # Seeds in the section's order: seed i of every k is paired (branching.local_cbs).
    return sorted(rows, key=lambda r: (r["point"], r["k"], spec.seeds.index(r["seed"])))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def branch_table(results: Results) -> pa.Table | None:
    """`branch_rows` as an Arrow table; None for a sweep without branches."""
    rows = branch_rows(results)
    return rows_to_table(rows, BRANCH_SCHEMA) if rows else None


def write_branch_table(results: Results, out_dir: Location | str) -> str | None:
    """Write `branches.parquet` (see `branch_rows`) into `out_dir`; its URI, None without
    branches (for `lbs-tune export`)."""
    table = branch_table(results)
    if table is None:
        return None
    folder = out_dir if isinstance(out_dir, Location) else locate(out_dir)
    target = folder.join(BRANCHES_FILE)
    write_parquet(target, table)
    return target.uri


# ============================================================================ Local CBS


class PointSize(NamedTuple):
    """The local critical batch size at one point: `batch` from the seeds' mean losses (the
    CBS lies in [batch, upper), upper None past the largest branch), `per_seed` from each seed
    alone, and their median, min and max."""

    point: int
    examples: int
    step: int
    batch: int
    upper: int | None
    per_seed: list[int]
    median: float
    low: int
    high: int


def local_sizes(results: Results) -> list[PointSize]:
    """The local critical batch size at every point all of whose branches have ended (ended:
    Ray's TERMINATED or ERROR; an errored or diverged branch counts as infinitely bad)."""
    spec = branch_spec(results)
    rows = branch_rows(results)
    if spec is None or not rows:
        return []
    batch = rows[0]["batch_size"] // rows[0]["k"]
    expected = len(spec.multiples) * len(spec.seeds)
    losses: dict[int, dict[int, list[float]]] = {}
    places: dict[int, tuple[int, int]] = {}
    for point in sorted({r["point"] for r in rows}):
        mine = [r for r in rows if r["point"] == point]
        if len(mine) != expected or any(r["state"] not in ("TERMINATED", "ERROR") for r in mine):
            continue
        places[point] = (mine[0]["point_examples"], mine[0]["point_step"])
        for r in mine:
            loss = r["smoothed_loss"] if r["smoothed_loss"] is not None else math.inf
            losses.setdefault(point, {}).setdefault(r["k"], []).append(loss)
    found = []
    for point, size in point_sizes(losses, batch, tolerance(spec)).items():
        examples, step = places[point]
        seeds = list(size.per_seed)
        found.append(
            PointSize(
                point,
                examples,
                step,
                size.batch,
                size.upper,
                seeds,
                statistics.median(seeds),
                min(seeds),
                max(seeds),
            )
        )
    return found


# ============================================================================ Comparison


class Run(NamedTuple):
    """One run of the comparison: its arm and seed, final validation loss and steps, and its
    steps to its seed's small-batch final validation loss (None: never reached)."""

    arm: str
    seed: int
    batch_sizes: list[int]  # its batch sizes in order (one for a constant batch)
    final_loss: float | None
    steps: int | None
    steps_to_target: int | None
    target: float | None


def comparison(results: Results) -> list[Run]:
    """The comparison's runs (ended or not), by seed and arm; [] without any."""
    trials = phase_trials(results, "compare")
    reports = _reports(results, [t["trial_id"] for t in trials], TARGET_METRIC)
    finals = {}
    for t in trials:
        values = [r["value"] for r in reports[t["trial_id"]] if r["value"] is not None]
        finals[(t[_key("arm")], t[_key("seed")])] = values[-1] if values else None
    runs = []
    for t in trials:
        arm, seed = t[_key("arm")], t[_key("seed")]
        target = finals.get(("small", seed))
        reported = {r["step"]: r["value"] for r in reports[t["trial_id"]]}
        reached = None if target is None else first_reached(reported, target, "min")
        schedule = t.get("batch_schedule")
        runs.append(
            Run(
                arm,
                seed,
                [b for _, b in schedule] if schedule else [t["batch_size"]],
                finals[(arm, seed)],
                max(reported) if reported else None,
                reached,
                target,
            )
        )
    return sorted(runs, key=lambda r: (r.seed, r.arm))


def steps_saved(runs: list[Run], arm: str = "schedule") -> list[float | None]:
    """Per seed (in order), 1 - (the arm's steps to target) / (the small run's), None where
    either never reached it."""
    by = {(r.arm, r.seed): r for r in runs}
    saved = []
    for seed in sorted({r.seed for r in runs}):
        mine, small = by.get((arm, seed)), by.get(("small", seed))
        if mine is None or small is None or None in (mine.steps_to_target, small.steps_to_target):
            saved.append(None)
        else:
            saved.append(1 - mine.steps_to_target / small.steps_to_target)
    return saved


# ============================================================================ summary.json


def branches_json(results: Results) -> dict[str, Any] | None:
    """summary.json's `branches` of a branched sweep (None for another sweep): the settings,
    per point its examples and step and the local critical batch size (`batch`, `upper`,
    `per_seed`, `median`, `min`, `max`), the planned schedule, and the comparison (per run:
    arm, seed, batch sizes, final validation loss, steps, steps to its seed's small-batch final
    validation loss; per arm other than small the fraction of the small runs' steps saved, per
    seed and the median)."""
    spec = branch_spec(results)
    if spec is None:
        return None
    runs = comparison(results)
    planned = [t.get("batch_schedule") for t in phase_trials(results, "compare")]
    saved = {arm: steps_saved(runs, arm) for arm in ("schedule", "large")}
    return {
        "metric": spec.metric,
        "tolerance": tolerance(spec),
        "smoothing": smoothing(spec),
        "points": [
            {
                "point": p.point,
                "examples": p.examples,
                "step": p.step,
                "local_cbs": {
                    "batch": p.batch,
                    "upper": p.upper,
                    "per_seed": p.per_seed,
                    "median": p.median,
                    "min": p.low,
                    "max": p.high,
                },
            }
            for p in local_sizes(results)
        ],
        "schedule": next((p for p in planned if p), None),
        "comparison": {
            "target": TARGET_METRIC,
            "runs": [r._asdict() for r in runs],
            "steps_saved": {
                arm: {"per_seed": values, "median": _median(values)}
                for arm, values in saved.items()
            },
        },
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None
