"""An experiment's parsed files -> two Arrow tables: `trials` (one row per trial) and `history`
(one row per report).

Trials are ordered by Ray's trial id, reports by step within each trial; of a step reported
twice (a trial resumed from a checkpoint repeats the reports made after it) the last row stays.
Built without pandas (see `analysis._arrow`).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis._arrow import filled, from_numpy, rows_to_table, strings, to_numpy
from analysis.metrics import final_and_best
from analysis.tune_files import (
    REPORT_SCHEMA,
    read_errors,
    read_params,
    read_reports,
    read_state,
    read_sweep,
    state_files,
)
from lbs_tune.experiment import ERROR_FILE, PARAMS_FILE, RESULT_FILE, SWEEP_FILE
from lbs_tune.names import flatten
from lbs_tune.storage import Location

SWEEP_KEY = b"lbs_sweep"
FINISHED = ("TERMINATED", "ERROR")
# Per-trial values that `final/<field>` columns carry (the value at the trial's last report).
FINAL_FIELDS = [
    f
    for f in REPORT_SCHEMA.names
    if f not in ("trial_id", "training_iteration", "checkpoint_dir_name")
]
_TRIAL_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("folder", pa.string()),
        ("state", pa.string()),
        ("error", pa.string()),
        ("num_failures", pa.int64()),
    ]
)
_TIME = pa.timestamp("ms", tz="UTC")


class Results(NamedTuple):
    """What `analysis.load` returns; unpacks as `trials, history`.

    `trials`: one row per trial (`columns.TRIAL_FIELDS`, the config as dotted columns,
    `final/<field>` and `best/<metric>`); `history`: one row per report (trial_id, step, epoch,
    examples, Ray's training_iteration and timestamp, time_s, the metrics, total_steps, host,
    node_id, gpu_ids, device, and Ray's checkpoint_dir_name where the report came with a
    checkpoint).
    """

    trials: pa.Table
    history: pa.Table

    @property
    def sweep(self) -> dict[str, Any] | None:
        """The experiment's lbs_sweep.json (name, spec, git commit, times), None without one."""
        raw = (self.trials.schema.metadata or {}).get(SWEEP_KEY)
        return json.loads(raw) if raw else None


def build(where: Location, files: dict[str, list[int]]) -> Results:
    """The tables of the experiment at `where`, made of `files` (its manifest)."""
    trial_files = {p for p in files if "/" in p}
    known = read_state(where, state_files(files))
    folders = set(known) | {p.split("/")[0] for p in trial_files}
    with_results = sorted(f for f in folders if f"{f}/{RESULT_FILE}" in trial_files)
    sizes = [files[f"{f}/{RESULT_FILE}"][0] for f in with_results]
    reports, owner = read_reports(where, with_results, sizes)
    first = dict(zip(with_results, _first_ids(reports, owner, len(with_results)), strict=True))
    # A folder newer than the state file is named by Ray's trial_id in its first report.
    ids = {f: known[f]["trial_id"] if f in known else first.get(f) or f for f in folders}
    ordered = sorted(folders, key=ids.__getitem__)
    rank = {f: i for i, f in enumerate(ordered)}
    row_rank = np.array([rank[f] for f in with_results], dtype=np.int64)[owner]
    history = _history(reports, row_rank, strings([ids[f] for f in ordered]))
    trials = _trials(where, ordered, ids, known, history, trial_files)
    sweep = read_sweep(where) if SWEEP_FILE in files else None
    if sweep is not None:
        trials = trials.replace_schema_metadata({SWEEP_KEY: sweep})
    return Results(trials, history)


def seconds_to_time(seconds: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Array:
    """Seconds since the epoch as UTC timestamps (ms); null where not finite (Ray writes -inf
    as the last result time of a trial that never reported)."""
    values = seconds if isinstance(seconds, np.ndarray) else to_numpy(seconds, np.nan)
    finite = np.isfinite(values)
    milliseconds = np.where(finite, values * 1000.0, 0.0).astype(np.int64)
    return from_numpy(milliseconds, finite).cast(_TIME)


def _first_ids(reports: pa.Table, owner: np.ndarray, files: int) -> list[str | None]:
    """Ray's trial_id in the first report of each file (None for a file without reports)."""
    found, first_row = np.unique(owner, return_index=True)
    names = reports["trial_id"].take(from_numpy(first_row.astype(np.int64))).to_pylist()
    by_file = dict(zip(found.tolist(), names, strict=True))
    return [by_file.get(i) for i in range(files)]


def _history(reports: pa.Table, rank: np.ndarray, ids: pa.Array) -> pa.Table:
    """Rows ordered by trial (`rank`: each row's position in `ids`) and step; of a step reported
    twice the last row stays."""
    step = to_numpy(pc.coalesce(reports["step"], reports["training_iteration"]), -1)
    order = np.lexsort((np.arange(len(rank)), step, rank))
    sorted_rank, sorted_step = rank[order], step[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (sorted_rank[1:] != sorted_rank[:-1]) | (sorted_step[1:] != sorted_step[:-1])
    keep = order[last]
    history = reports.take(from_numpy(keep))
    history = history.set_column(0, "trial_id", ids.take(from_numpy(rank[keep])))
    index = history.schema.get_field_index("timestamp")
    return history.set_column(index, "timestamp", seconds_to_time(history["timestamp"]))


def _trials(
    where: Location,
    folders: list[str],
    ids: dict[str, str],
    known: dict[str, dict],
    history: pa.Table,
    trial_files: set[str],
) -> pa.Table:
    info = [known.get(f, {}) for f in folders]
    errors = read_errors(where, [f for f in folders if f"{f}/{ERROR_FILE}" in trial_files])
    own = rows_to_table(
        [
            {
                "trial_id": ids[f],
                "folder": f,
                "state": i.get("state"),
                "error": errors.get(f),
                "num_failures": i.get("num_failures"),
            }
            for f, i in zip(folders, info, strict=True)
        ],
        _TRIAL_SCHEMA,
    )
    per_trial = final_and_best(history, FINAL_FIELDS)
    values = per_trial.take(pc.index_in(own["trial_id"], value_set=per_trial["trial_id"]))
    start = np.array([i.get("start_time") for i in info], dtype=float)
    end = np.array(
        [i.get("end_time") if i.get("state") in FINISHED else None for i in info], dtype=float
    )
    columns = {
        "trial_id": own["trial_id"],
        "folder": own["folder"],
        "state": own["state"],
        "error": own["error"],
        "diverged": filled(values["final/diverged"], False),
        "reports": filled(values["reports"], 0),
        "num_failures": own["num_failures"],
        "start_time": seconds_to_time(start),
        "end_time": seconds_to_time(end),
    }
    configs = _configs(where, folders, known, trial_files)
    for key in configs.column_names:
        columns.setdefault(key, configs[key])
    for name in values.column_names[2:]:
        if name != "final/diverged":
            columns[name] = values[name]
    return pa.table(columns)


def _configs(
    where: Location, folders: list[str], known: dict[str, dict], trial_files: set[str]
) -> pa.Table:
    """Each trial's config (from the state file, else from its params.json), one column per
    dotted key in order of first appearance; a key missing from a trial's config is null there."""
    missing = [f for f in folders if known.get(f, {}).get("config") is None]
    params = read_params(where, [f for f in missing if f"{f}/{PARAMS_FILE}" in trial_files])
    rows = []
    for folder in folders:
        config = known.get(folder, {}).get("config")
        config = params.get(folder) if config is None else config
        rows.append(flatten(config) if isinstance(config, dict) else {})
    try:
        return rows_to_table(rows)
    except pa.ArrowInvalid:
        return _configs_with_text(rows)


def _configs_with_text(rows: list[dict[str, Any]]) -> pa.Table:
    """As `_configs`, where some key holds values of different kinds across trials (a number
    in one, a text in another): those keys become text columns (JSON for non-text values)."""
    kinds: dict[str, set[type]] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                # bool before int: True is an int to Python, not to JSON.
                kind = (
                    bool
                    if isinstance(value, bool)
                    else float
                    if isinstance(value, int | float)
                    else type(value)
                )
                kinds.setdefault(key, set()).add(kind)
    mixed = {k for k, found in kinds.items() if len(found) > 1}
    text = [
        {
            k: json.dumps(v) if k in mixed and v is not None and not isinstance(v, str) else v
            for k, v in row.items()
        }
        for row in rows
    ]
    order = list(dict.fromkeys(k for row in rows for k in row))
    table = rows_to_table(text, pa.schema([(k, pa.string()) for k in mixed]))
    return table.select(order)
