"""`lbs-tune status` and `lbs-tune where`: the trials of an experiment, while it runs or after.

Both read the experiment's files through `analysis.load` (never a pickle), so they work on a
running sweep, a crashed one and a finished one, local or at a storage URI. Every number comes
from the files (a trial's step budget is the `total_steps` it reported): no torch, no Ray.
"""

from __future__ import annotations

import functools
import textwrap
from datetime import datetime
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from analysis.columns import config_columns
from analysis.load import experiment_location, load
from analysis.tables import FINISHED
from lbs_tune.config import SEARCH_KEY
from lbs_tune.errors import UserError, cut, did_you_mean, printable
from lbs_tune.record import has_record, mixed_runs, read_record
from lbs_tune.studies import STUDY_FILE, Objective, finite_number, objective_for
from lbs_tune.sweep import SweepSpec


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


# The most columns of the default table: the console prints it at a sweep's end, and a wider
# line wraps in a terminal of this width (`--wide` has every column).
WIDTH = 120


class _Column(NamedTuple):
    header: str
    cells: list[str]
    keep: int | None  # 0: always; a higher number stays longer as the table narrows; None: wide


def status(source: str, wide: bool = False) -> str:
    """The status table of an experiment: one row per trial, in grid point and trial number
    order, below a header about the sweep. At most WIDTH columns (the columns that fit, the
    searched keys and the objective first), or every column with `wide`."""
    experiment, sweep, results = _load(source)
    spec = sweep.get("spec") or {}
    checked = SweepSpec.model_validate(spec) if spec else None
    metric = (spec.get("metric") or {}).get("name", "val/accuracy")
    trials = _rows(results.trials) if results else []
    keys = config_columns(results.trials) if results else []
    grid = list(spec.get("grid") or {}) or [
        k for k in ("batch_size", "lr.scaling", "seed") if k in keys
    ]
    searched = [k for k in (spec.get("search") or {}).get("space") or {} if k in keys]
    trials.sort(key=functools.partial(_order, spec.get("grid") or {}))
    checkpoints = _checkpoints(results.history) if results else {}
    objective = _objective(checked)
    values = _values(results.history, objective.metric) if objective and results else {}
    states: dict[str, int] = {}
    errors = []
    for t in trials:
        state = _state(t)
        states[state] = states.get(state, 0) + 1
        if t["error"]:
            errors.append(f"  {t['trial_id']}: {t['error']}")

    def column(header: str, keep: int | None, cell) -> _Column:
        return _Column(header, [cell(t) for t in trials], keep)

    columns = [
        column("trial", 0, lambda t: t["trial_id"]),
        *(column(k, 0, lambda t, k=k: str(t.get(k))) for k in grid),
        *(column(k, 0, lambda t, k=k: _cell(t.get(k))) for k in searched),
        column("state", 0, _state),
        column("step", 0, _progress),
        column(f"latest {metric}", 1, lambda t: _number(t.get(f"final/{metric}"))),
        column("best", 4, lambda t: _number(t.get(f"best/{metric}"))),
        *(
            [column(_objective_header(objective), 5, lambda t: _outcome(t, objective, values))]
            if objective and checked.search
            else []
        ),
        column("diverged", 3, lambda t: "yes" if t["diverged"] else "no"),
        column("host / node / gpu", None, _where),
        column("failures", 2, lambda t: str(t["num_failures"] or 0)),
        column("last checkpoint", None, lambda t: checkpoints.get(t["trial_id"], "-")),
        column("started", None, lambda t: _when(t["start_time"])),
    ]
    shown = columns if wide else _narrow(columns, WIDTH)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "none yet"
    planned = checked.trial_count if checked else None
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
    if trials:
        header = [c.header for c in shown]
        rows = [list(row) for row in zip(*(c.cells for c in shown), strict=True)]
        lines += ["", _table(header, rows)]
        hidden = [c.header for c in columns if c not in shown]
        if hidden:
            note = f"(more columns with --wide: {', '.join(hidden)})"
            lines += ["", *textwrap.wrap(note, WIDTH)]
    else:
        lines += ["", "(no trials yet)"]
    if errors:
        lines += ["", "errors:", *errors]
    # Error files, configs and the record are other people's text: no terminal escapes.
    return printable("\n".join(lines))


def _narrow(columns: list[_Column], width: int) -> list[_Column]:
    """The columns that fit `width`: the wide-only ones left out, then the others by their
    `keep` (the lowest first) until the table fits or only the `keep` 0 ones are left."""
    shown = [c for c in columns if c.keep is not None]
    while _width(shown) > width and any(c.keep for c in shown):
        shown.remove(min((c for c in shown if c.keep), key=lambda c: c.keep))
    return shown


def _width(columns: list[_Column]) -> int:
    widths = [max(len(c) for c in [column.header, *column.cells]) for column in columns]
    return sum(widths) + 2 * (len(widths) - 1)


def _order(grid: dict[str, list[Any]], trial: dict[str, Any]) -> tuple:
    """A trial's place: its grid point (the grid's own order), its number in the point's study
    (a searched trial), its id. A value the grid lacks goes after the grid's values."""
    place = []
    for key, options in grid.items():
        value = trial.get(key)
        place.append(options.index(value) if value in options else len(options))
    number = trial.get(f"{SEARCH_KEY}.number")
    return (*place, -1 if number is None else number, trial["trial_id"])


def _objective(spec: SweepSpec | None) -> Objective | None:
    """The objective of a searched sweep's studies, None for a sweep without a search."""
    if spec is None or spec.search is None:
        return None
    return objective_for(spec.search, spec.metric, spec.target)


def _objective_header(objective: Objective) -> str:
    return "steps to target" if objective.kind == "steps_to_target" else "objective"


def _values(history: pa.Table, metric: str) -> dict[str, dict[int, float]]:
    """Per trial id, its reported values of `metric` by step (finite ones)."""
    if metric not in history.column_names:
        return {}
    found: dict[str, dict[int, float]] = {}
    rows = history.select(["trial_id", "step", metric]).to_pylist()
    for row in rows:
        value = finite_number(row[metric])
        if value is not None and row["step"] is not None:
            found.setdefault(row["trial_id"], {})[row["step"]] = value
    return found


def _outcome(trial: dict[str, Any], objective: Objective, values: dict) -> str:
    """A searched trial's objective as its study sees it (`Objective.outcome` of its reports):
    the value, else 'diverged' or 'missed (best 0.47)' once it ended, '-' while it runs."""
    mine = values.get(trial["trial_id"], {})
    value, _ = objective.outcome(mine, bool(trial["diverged"]))
    if value is not None:
        return f"{value:g}" if objective.kind == "steps_to_target" else _number(value)
    if _state(trial) not in FINISHED:
        return "-"
    if trial["diverged"]:
        return "diverged"
    if objective.kind == "steps_to_target" and mine:
        pick = max if objective.mode == "max" else min
        return f"missed (best {_number(pick(mine.values()))})"
    return "-"


def _progress(trial: dict[str, Any]) -> str:
    step, budget = trial.get("final/step"), trial.get("final/total_steps")
    return f"{step or 0}/{budget}" if budget else str(step or 0)


def _where(trial: dict[str, Any]) -> str:
    where = trial.get("final/host") or "-"
    if trial.get("final/node_id"):
        where += f" node {trial['final/node_id'][:8]}"
    if trial.get("final/gpu_ids"):
        where += f" gpu {trial['final/gpu_ids']}"
    return where


def _cell(value: Any) -> str:
    """A searched value: numbers short (a drawn rate has 17 digits)."""
    return _number(value) if isinstance(value, float) else str(value)


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
