"""`lbs-tune status` and `lbs-tune where`: the trials of an experiment, while it runs or after.

Both read the experiment's files through `analysis.load` (never a pickle), so they work on a
running sweep, a crashed one and a finished one, local or at a storage URI. Every number comes
from the files (a trial's step budget is the `total_steps` it reported): no torch, no Ray.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from analysis.columns import config_columns
from analysis.load import experiment_location, load
from lbs_tune.config import SweepSpec
from lbs_tune.errors import UserError, cut, did_you_mean, printable
from lbs_tune.experiment import has_record, mixed_runs, read_record
from lbs_tune.studies import STUDY_FILE


def _state(row: dict[str, Any]) -> str:
    """Ray's recorded state; where none could be read (Ray has not written its experiment
    state yet, or is copying it right now), RUNNING if the trial has reported, else PENDING."""
    return row["state"] or ("RUNNING" if row["reports"] else "PENDING")


def _checkpoints(history: pa.Table) -> dict[str, str]:
    """Per trial id, its newest checkpoint as 'checkpoint_NNNNNN (step S)', from its reports."""
    if "checkpoint_dir_name" not in history.column_names:
        return {}
    made = history.filter(pc.is_valid(history["checkpoint_dir_name"]))
    rows = made.select(["trial_id", "step", "checkpoint_dir_name"]).to_pylist()
    # History is in step order within each trial: the last row of a trial is its newest.
    return {r["trial_id"]: f"{r['checkpoint_dir_name']} (step {r['step']})" for r in rows}


def _rows(trials: pa.Table) -> list[dict[str, Any]]:
    """The trials as dicts, times as milliseconds since the epoch: pyarrow turns a time with a
    zone into Python through pandas, whose import costs more than the rest of `status`."""
    for index, field in enumerate(trials.schema):
        if pa.types.is_timestamp(field.type):
            trials = trials.set_column(index, field.name, trials[index].cast(pa.int64()))
    return trials.to_pylist()


def _when(milliseconds: int | None) -> str:
    if milliseconds is None:
        return "-"
    return datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        for line in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _load(source: str):
    """(experiment location, lbs_sweep.json or {}, Results or None while Ray has written no
    trial files yet)."""
    experiment = experiment_location(source)
    try:
        results = load(source)
    except UserError:
        # The runner writes its record before Ray writes anything: a sweep just started.
        if not has_record(experiment):
            raise
        return experiment, read_record(experiment), None
    return experiment, results.sweep or {}, results


def status(source: str) -> str:
    """The status table of an experiment: one row per trial, below a header about the sweep."""
    experiment, sweep, results = _load(source)
    spec = sweep.get("spec") or {}
    metric = (spec.get("metric") or {}).get("name", "val/accuracy")
    trials = _rows(results.trials) if results else []
    keys = config_columns(results.trials) if results else []
    grid = list(spec.get("grid") or {}) or [
        k for k in ("batch_size", "lr.scaling", "seed") if k in keys
    ]
    checkpoints = _checkpoints(results.history) if results else {}
    states: dict[str, int] = {}
    rows, errors = [], []
    for t in trials:
        state = _state(t)
        states[state] = states.get(state, 0) + 1
        step, budget = t.get("final/step"), t.get("final/total_steps")
        progress = f"{step or 0}/{budget}" if budget else str(step or 0)
        where = t.get("final/host") or "-"
        if t.get("final/node_id"):
            where += f" node {t['final/node_id'][:8]}"
        if t.get("final/gpu_ids"):
            where += f" gpu {t['final/gpu_ids']}"
        rows.append(
            [
                t["trial_id"],
                *(str(t.get(k)) for k in grid),
                state,
                progress,
                _number(t.get(f"final/{metric}")),
                _number(t.get(f"best/{metric}")),
                "yes" if t["diverged"] else "no",
                where,
                str(t["num_failures"] or 0),
                checkpoints.get(t["trial_id"], "-"),
                _when(t["start_time"]),
            ]
        )
        if t["error"]:
            errors.append(f"  {t['trial_id']}: {t['error']}")
    header = [
        "trial",
        *grid,
        "state",
        "step",
        f"latest {metric}",
        "best",
        "diverged",
        "host / node / gpu",
        "failures",
        "last checkpoint",
        "started",
    ]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none yet"
    planned = SweepSpec.model_validate(spec).trial_count if spec else None
    if planned and planned > len(trials):
        counts += f"; {planned - len(trials)} more trials not started"
    ended = sweep.get("ended") or "running or interrupted"
    lines = [
        f"sweep {sweep.get('name', experiment.name)} at {experiment.uri}",
        f"  git commit {sweep.get('git_commit') or '-'}, started {sweep.get('started', '-')}, "
        f"ended {ended}",
        f"  {len(trials)} trials: {counts}",
    ]
    runs = sweep.get("runs") or []
    mixed = mixed_runs(runs)
    if mixed:
        lines.append(f"  {len(runs)} runs, under other code or data than the first: {mixed}")
    if experiment.join(STUDY_FILE).exists():  # a searched sweep; a damaged optuna.db: UserError
        from analysis.summary import studies_of

        studies = studies_of(experiment)
        told = sum(s.finished for s in studies)
        lines.append(f"  Optuna studies: {len(studies)}, {told} trials told to them")
    lines += ["", _table(header, rows) if rows else "(no trials yet)"]
    if errors:
        lines += ["", "errors:", *errors]
    # Error files, configs and the record are other people's text: no terminal escapes.
    return printable("\n".join(lines))


def where(source: str, filters: list[str]) -> list[str]:
    """The folders of the trials whose config matches every KEY=VALUE exactly (dotted keys)."""
    experiment, sweep, results = _load(source)
    keys = config_columns(results.trials) if results else []
    if not keys and sweep.get("spec"):
        keys = _spec_keys(sweep["spec"])
    wanted = []
    for text in filters:
        key, sep, raw = text.partition("=")
        if not sep:
            raise UserError(f"{text}: expected KEY=VALUE, e.g. batch_size=32 or lr.scaling=linear")
        if key not in keys:
            raise UserError(f"{text}: no config key '{key}' in this sweep{did_you_mean(key, keys)}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise UserError(
                f"{cut(text)}: the value is not YAML ({problem}); quote it, e.g. 'key=\"...\"'"
            ) from None
        wanted.append((key, value))
    if results is None:
        return []
    found = []
    for row in _rows(results.trials):
        if all(_equal(row.get(key), value) for key, value in wanted):
            found.append(experiment.join(row["folder"]).uri)
    return found


def _spec_keys(spec: dict[str, Any]) -> list[str]:
    """The dotted config keys of a sweep's trials, from its recorded spec: for the first seconds
    of a sweep, before Ray has written any trial's config ([] for a spec this version rejects)."""
    try:
        return list(SweepSpec.model_validate(spec).trials[0].flat())
    except ValueError:
        return []


def _equal(actual: Any, wanted: Any) -> bool:
    """Exact match of a config value and a KEY=VALUE value; numbers compare as numbers, also
    those YAML reads as text (1e-3)."""
    if isinstance(actual, bool) or isinstance(wanted, bool) or actual is None or wanted is None:
        return actual == wanted
    if isinstance(actual, int | float):
        try:
            return float(actual) == float(wanted)
        except (TypeError, ValueError):
            return False
    return str(actual) == str(wanted)
