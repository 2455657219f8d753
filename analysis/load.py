"""Experiment folder (or ResultGrid) -> Arrow tables: one row per trial, one row per report.

Only text files are read: the newest `experiment_state-*.json` (trial ids, states, configs), each
trial folder's `result.json`, `params.json` and `error.txt`, and our `lbs_sweep.json`; no pickle
is ever opened (`load_evaluation` reads the Parquet table of `lbs-tune evaluate`). The
`result.json` files are read as bytes, joined and parsed by one `pyarrow.json.read_json` call.
Both tables are cached as Parquet in `<experiment>/.lbs_cache/` beside a manifest of the size
and mtime of every file read; a changed file rebuilds them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson

from analysis.metrics import final_and_best
from lbs_tune.config import METRICS, flatten
from lbs_tune.errors import UserError
from lbs_tune.experiment import (
    CACHE_DIR,
    ERROR_FILE,
    PARAMS_FILE,
    RESULT_FILE,
    STATE_FILE,
    SWEEP_FILE,
    TRIAL_FILES,
    read_evaluation,
    read_parquet,
    write_parquet,
)
from lbs_tune.storage import Location, locate

# Part of the manifest: a new table layout makes every old cache stale.
CACHE_VERSION = 5
SWEEP_KEY = b"lbs_sweep"
# One read_json call parses up to this many bytes; bigger sweeps are parsed in chunks of it.
CHUNK_BYTES = 256 * 2**20
# A report line may be long (Ray repeats the whole config in it); blocks must hold whole lines.
BLOCK_BYTES = 8 * 2**20
FINISHED = ("TERMINATED", "ERROR")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

_COUNTS = ("step", "epoch", "examples", "diverged", "total_steps")
_MEASURES = [m for m in METRICS if m not in _COUNTS]
# The report fields we read; the rest of a line (Ray's nested `config` above all) is skipped.
REPORT_SCHEMA = pa.schema(
    [("trial_id", pa.string()), ("step", pa.int64()), ("epoch", pa.float64())]
    + [("examples", pa.int64()), ("total_steps", pa.int64()), ("training_iteration", pa.int64())]
    + [("timestamp", pa.float64()), ("time_s", pa.float64())]
    + [(m, pa.float64()) for m in _MEASURES]
    + [("diverged", pa.bool_()), ("host", pa.string()), ("node_id", pa.string())]
    + [("gpu_ids", pa.string())]
    + [("device", pa.string()), ("checkpoint_dir_name", pa.string())]
)
_PARSE = pajson.ParseOptions(explicit_schema=REPORT_SCHEMA, unexpected_field_behavior="ignore")
_READ = pajson.ReadOptions(block_size=BLOCK_BYTES)
# Per-trial values that `final/<field>` columns carry (the value at the trial's last report).
FINAL_FIELDS = [
    f
    for f in REPORT_SCHEMA.names
    if f not in ("trial_id", "training_iteration", "checkpoint_dir_name")
]
# The trials table's own columns; the config keys and the final/ and best/ columns follow them.
TRIAL_FIELDS = (
    "trial_id",
    "folder",
    "state",
    "error",
    "diverged",
    "reports",
    "num_failures",
    "start_time",
    "end_time",
)
_TIME = pa.timestamp("ms", tz="UTC")


class Results(NamedTuple):
    """What `load` returns; unpacks as `trials, history`.

    `trials`: one row per trial (TRIAL_FIELDS, the config as dotted columns, `final/<field>`
    and `best/<metric>`); `history`: one row per report (trial_id, step, epoch, examples, Ray's
    training_iteration and timestamp, time_s, the metrics, host, gpu_ids, device, and Ray's
    checkpoint_dir_name where the report came with a checkpoint).
    """

    trials: pa.Table
    history: pa.Table

    @property
    def sweep(self) -> dict[str, Any] | None:
        """The experiment's lbs_sweep.json (name, spec, git commit, times), None without one."""
        raw = (self.trials.schema.metadata or {}).get(SWEEP_KEY)
        return json.loads(raw) if raw else None


def experiment_location(source: Any) -> Location:
    """Where an experiment lives: `source` is a folder path, a pyarrow URI (file://, s3://, ...)
    or a `ray.tune.ResultGrid`."""
    # Duck-typed ResultGrid, so that loading never imports Ray.
    if hasattr(source, "experiment_path") and hasattr(source, "filesystem"):
        path = str(source.experiment_path).rstrip("/")
        return Location(source.filesystem, path, path)
    return locate(source)


def load(source: Any, cache: bool = True) -> Results:
    """Load an experiment as `Results(trials, history)` (see `Results`).

    `source` is an experiment folder (path or URI) or a ResultGrid. With `cache`, the tables come
    from `<experiment>/.lbs_cache/` when no file read to make them has changed (size or mtime),
    and are written there otherwise. A truncated or malformed line of a result.json is skipped
    with a warning; a step reported twice (a trial resumed from a checkpoint) keeps its last row.
    """
    where = experiment_location(source)
    manifest = _manifest(where)
    if cache:
        cached = _read_cache(where, manifest)
        if cached is not None:
            return cached
    results = _build(where, manifest)
    if cache:
        _write_cache(where, manifest, results)
    return results


def export(source: Any, out_dir: str | Path) -> list[str]:
    """Write `trials.parquet` and `history.parquet` of an experiment into `out_dir` (a folder
    path or URI), for pandas, polars or DuckDB; the sweep record rides in the schema metadata.
    Returns the paths written."""
    results = load(source)
    out = locate(out_dir)
    out.fs.create_dir(out.path, recursive=True)
    written = []
    for name, table in (("trials", results.trials), ("history", results.history)):
        target = out.join(f"{name}.parquet")
        write_parquet(target, table)
        written.append(target.uri)
    return written


def load_evaluation(source: Any) -> pa.Table | None:
    """The experiment's evaluation.parquet (written by `lbs-tune evaluate`), None without one."""
    return read_evaluation(experiment_location(source))


def config_columns(trials: pa.Table) -> list[str]:
    """The dotted config keys among the columns of a trials table (derived columns have a '/')."""
    return [c for c in trials.column_names if c not in TRIAL_FIELDS and "/" not in c]


# ============================================================================ Files


def _manifest(where: Location) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file that the tables are made of, by path in the experiment."""
    try:
        infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True))
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(
            f"{where.uri}: no such experiment folder; give <storage>/<sweep name>"
        ) from None
    files, states = {}, {}
    for info in infos:
        relative = info.path[len(where.path) :].lstrip("/")
        parts = relative.split("/")
        if len(parts) == 1 and STATE_FILE.match(relative):
            states[relative] = [info.size, info.mtime_ns or 0]
        elif relative == SWEEP_FILE or (len(parts) == 2 and parts[1] in TRIAL_FILES):
            files[relative] = [info.size, info.mtime_ns or 0]
    if not states and not any(p.endswith(RESULT_FILE) for p in files):
        raise UserError(
            f"{where.uri}: not a Ray Tune experiment folder (no experiment_state-*.json and no "
            f"trial folders with {RESULT_FILE}); give <storage>/<sweep name>"
        )
    # Ray names state files by time; the newest is the current one.
    if states:
        newest = max(states)
        files[newest] = states[newest]
    return dict(sorted(files.items()))


def _read_bytes(where: Location, paths: list[str]) -> list[bytes]:
    def read(path: str) -> bytes:
        with where.fs.open_input_stream(where.join(path).path) as f:
            return f.readall()

    if where.is_local:
        return [read(p) for p in paths]
    # Threads overlap the latency of many small reads from an object store.
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, paths))


# ============================================================================ Building


def _build(where: Location, manifest: dict[str, list[int]]) -> Results:
    trial_files = {p for p in manifest if "/" in p}
    state_name = next((p for p in manifest if STATE_FILE.match(p)), None)
    known = _read_state(where, state_name) if state_name else {}
    folders = set(known) | {p.split("/")[0] for p in trial_files}
    with_results = sorted(f for f in folders if f"{f}/{RESULT_FILE}" in trial_files)
    sizes = [manifest[f"{f}/{RESULT_FILE}"][0] for f in with_results]
    reports, owner = _read_reports(where, with_results, sizes)
    first = dict(zip(with_results, _first_ids(reports, owner, len(with_results)), strict=True))
    # A folder newer than the state file is named by Ray's trial_id in its first report.
    ids = {f: known[f]["trial_id"] if f in known else first.get(f) or f for f in folders}
    ordered = sorted(folders, key=ids.__getitem__)
    rank = {f: i for i, f in enumerate(ordered)}
    row_rank = np.array([rank[f] for f in with_results], dtype=np.int64)[owner]
    history = _history(reports, row_rank, [ids[f] for f in ordered])
    trials = _trials(where, ordered, ids, known, history, trial_files)
    sweep = _read_sweep(where) if SWEEP_FILE in manifest else None
    if sweep is not None:
        trials = trials.replace_schema_metadata({SWEEP_KEY: sweep})
    return Results(trials, history)


def _read_sweep(where: Location) -> bytes | None:
    raw = _read_bytes(where, [SWEEP_FILE])[0]
    try:
        json.loads(raw)
    except ValueError:
        warnings.warn(f"{where.join(SWEEP_FILE).uri}: not JSON; ignored it", stacklevel=2)
        return None
    return raw


def _read_state(where: Location, name: str) -> dict[str, dict[str, Any]]:
    """Folder -> trial id, state, config, start and last-report times and failures, from Ray's
    experiment state."""
    trials = {}
    try:
        state = json.loads(_read_bytes(where, [name])[0])
        for trial_json, runtime_json in state["trial_data"]:
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            # A trial that never started may have no folder name yet.
            trials[trial.get("relative_logdir") or trial["trial_id"]] = {
                "trial_id": trial["trial_id"],
                "state": trial["status"],
                "config": trial.get("config"),
                "start_time": runtime.get("start_time"),
                "end_time": runtime.get("last_result_time"),
                "num_failures": runtime.get("num_failures"),
            }
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(
            f"{where.join(name).uri}: unreadable ({exc}); trial states are unknown", stacklevel=2
        )
        return {}
    return trials


def _configs(
    where: Location, folders: list[str], known: dict[str, dict], trial_files: set[str]
) -> list[dict[str, Any]]:
    """Each trial's flattened config: from the state file, else from its params.json."""
    missing = [f for f in folders if known.get(f, {}).get("config") is None]
    readable = [f for f in missing if f"{f}/{PARAMS_FILE}" in trial_files]
    params = dict(
        zip(readable, _read_bytes(where, [f"{f}/{PARAMS_FILE}" for f in readable]), strict=True)
    )
    configs = []
    for folder in folders:
        config = known.get(folder, {}).get("config")
        if config is None and folder in params:
            try:
                config = json.loads(params[folder])
            except ValueError:
                warnings.warn(f"{where.join(folder, PARAMS_FILE).uri}: not JSON", stacklevel=2)
        configs.append(flatten(config) if isinstance(config, dict) else {})
    return configs


def _read_reports(
    where: Location, folders: list[str], sizes: list[int]
) -> tuple[pa.Table, np.ndarray]:
    """All reports in the result.json of `folders` (of about `sizes` bytes), and for each row
    the index of its folder. Files are read and parsed in chunks of CHUNK_BYTES."""
    tables, owners = [], []
    for chunk in _chunks(sizes):
        names = [where.join(folders[i]).uri for i in chunk]
        raw = _read_bytes(where, [f"{folders[i]}/{RESULT_FILE}" for i in chunk])
        blobs = [_whole_lines(blob, name) for blob, name in zip(raw, names, strict=True)]
        table, counts = _parse(blobs, names)
        tables.append(table)
        owners.append(np.repeat(np.asarray(chunk, dtype=np.int64), counts))
    if not tables:
        return REPORT_SCHEMA.empty_table(), np.zeros(0, dtype=np.int64)
    return pa.concat_tables(tables), np.concatenate(owners)


def _chunks(sizes: list[int]) -> Iterator[list[int]]:
    chunk, total = [], 0
    for i, size in enumerate(sizes):
        if chunk and total + size > CHUNK_BYTES:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += size
    if chunk:
        yield chunk


def _whole_lines(blob: bytes, name: str) -> bytes:
    """The blob up to its last complete line; a truncated last line is dropped with a warning."""
    if not blob or blob.endswith(b"\n"):
        return blob
    head, newline, tail = blob.rpartition(b"\n")
    try:
        json.loads(tail)
        return blob + b"\n"
    except ValueError:
        warnings.warn(
            f"{name}/{RESULT_FILE}: the last line is incomplete (a running or interrupted "
            "trial); skipped it",
            stacklevel=2,
        )
        return head + newline


def _parse(blobs: list[bytes], names: list[str]) -> tuple[pa.Table, list[int]]:
    """Parse whole-line blobs with one read_json call; file by file if some line is bad."""
    counts = [blob.count(b"\n") for blob in blobs]
    table = _read_json(b"".join(blobs), sum(counts))
    if table is not None:
        return table, counts
    tables = [_parse_file(blob, name) for blob, name in zip(blobs, names, strict=True)]
    return pa.concat_tables(tables), [t.num_rows for t in tables]


def _read_json(data: bytes, lines: int) -> pa.Table | None:
    """The reports in `data`, or None unless every one of its `lines` is a valid report."""
    try:
        table = pajson.read_json(pa.BufferReader(data), read_options=_READ, parse_options=_PARSE)
    except pa.ArrowInvalid:
        return None
    return table if table.num_rows == lines else None


def _parse_file(blob: bytes, name: str) -> pa.Table:
    """One file; if some line is bad, line by line, skipping bad lines with a warning."""
    table = _read_json(blob, blob.count(b"\n"))
    if table is not None:
        return table
    rows = []
    for number, line in enumerate(blob.split(b"\n"), start=1):
        row = _read_json(line, 1)
        if row is not None:
            rows.append(row)
        elif line.strip():
            warnings.warn(
                f"{name}/{RESULT_FILE}: line {number} is not a valid report; skipped it",
                stacklevel=2,
            )
    return pa.concat_tables(rows) if rows else REPORT_SCHEMA.empty_table()


def _first_ids(reports: pa.Table, owner: np.ndarray, files: int) -> list[str | None]:
    """Ray's trial_id in the first report of each file (None for a file without reports)."""
    found, first_row = np.unique(owner, return_index=True)
    names = reports["trial_id"].take(pa.array(first_row, pa.int64())).to_pylist()
    by_file = dict(zip(found.tolist(), names, strict=True))
    return [by_file.get(i) for i in range(files)]


def _history(reports: pa.Table, rank: np.ndarray, ids: list[str]) -> pa.Table:
    """Rows ordered by trial (`rank`: each row's position in `ids`) and step; of a step reported
    twice (a trial resumed from a checkpoint repeats the reports made after it) the last stays."""
    step = pc.fill_null(pc.coalesce(reports["step"], reports["training_iteration"]), -1)
    step = step.to_numpy()
    order = np.lexsort((np.arange(len(rank)), step, rank))
    sorted_rank, sorted_step = rank[order], step[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (sorted_rank[1:] != sorted_rank[:-1]) | (sorted_step[1:] != sorted_step[:-1])
    keep = order[last]
    history = reports.take(pa.array(keep, pa.int64()))
    history = history.set_column(
        0, "trial_id", pa.array(ids, pa.string()).take(pa.array(rank[keep], pa.int64()))
    )
    index = history.schema.get_field_index("timestamp")
    return history.set_column(index, "timestamp", _seconds_to_time(history["timestamp"]))


def _seconds_to_time(seconds: pa.Array | pa.ChunkedArray) -> pa.Array:
    # Ray writes -inf as the last result time of a trial that never reported.
    seconds = pc.if_else(pc.is_finite(seconds), seconds, None)
    milliseconds = pc.multiply(seconds, 1000.0)
    return pc.cast(milliseconds, pa.int64(), safe=False).cast(_TIME)


def _trials(
    where: Location,
    folders: list[str],
    ids: dict[str, str],
    known: dict[str, dict],
    history: pa.Table,
    trial_files: set[str],
) -> pa.Table:
    info = [known.get(f, {}) for f in folders]
    states = [i.get("state") for i in info]
    per_trial = final_and_best(history, FINAL_FIELDS)
    row_of = {t: r for r, t in enumerate(per_trial["trial_id"].to_pylist())}
    values = per_trial.take(pa.array([row_of.get(ids[f]) for f in folders], pa.int64()))
    start = pa.array([i.get("start_time") for i in info], pa.float64())
    end = pa.array(
        [i.get("end_time") if s in FINISHED else None for i, s in zip(info, states, strict=True)],
        pa.float64(),
    )
    columns = {
        "trial_id": pa.array([ids[f] for f in folders], pa.string()),
        "folder": pa.array(folders, pa.string()),
        "state": pa.array(states, pa.string()),
        "error": pa.array(_errors(where, folders, trial_files), pa.string()),
        "diverged": pc.fill_null(values["final/diverged"], False),
        "reports": pc.fill_null(values["reports"], 0),
        "num_failures": pa.array([i.get("num_failures") for i in info], pa.int64()),
        "start_time": _seconds_to_time(start),
        "end_time": _seconds_to_time(end),
    }
    configs = _configs(where, folders, known, trial_files)
    for key, column in _config_arrays(configs).items():
        columns.setdefault(key, column)
    for name in values.column_names[2:]:
        if name != "final/diverged":
            columns[name] = values[name]
    return pa.table(columns)


def _config_arrays(configs: list[dict[str, Any]]) -> dict[str, pa.Array]:
    """One column per dotted config key; a key missing from a trial's config is null there."""
    keys = dict.fromkeys(k for config in configs for k in config)
    arrays = {}
    for key in keys:
        values = [config.get(key) for config in configs]
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types across trials: keep them readable as text.
            arrays[key] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            )
    return arrays


def _errors(where: Location, folders: list[str], trial_files: set[str]) -> list[str | None]:
    """The last line of each trial's error.txt (its latest exception), None without one.

    A trial that failed and was retried keeps its error visible, whatever its state now.
    """
    wanted = [f for f in folders if f"{f}/{ERROR_FILE}" in trial_files]
    texts = _read_bytes(where, [f"{f}/{ERROR_FILE}" for f in wanted])
    message = {
        f: _last_line(t.decode(errors="replace")) for f, t in zip(wanted, texts, strict=True)
    }
    return [message.get(f) for f in folders]


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1] if lines else None


# ============================================================================ Cache


def _read_cache(where: Location, manifest: dict[str, list[int]]) -> Results | None:
    folder = where.join(CACHE_DIR)
    try:
        with where.fs.open_input_stream(folder.join("manifest.json").path) as f:
            recorded = json.loads(f.readall())
        if recorded != {"version": CACHE_VERSION, "files": manifest}:
            return None
        trials, history = (
            read_parquet(folder.join(name)) for name in ("trials.parquet", "history.parquet")
        )
    except (OSError, ValueError, pa.ArrowException):
        return None
    return Results(trials, history)


def _write_cache(where: Location, manifest: dict[str, list[int]], results: Results) -> None:
    folder = where.join(CACHE_DIR)
    try:
        where.fs.create_dir(folder.path, recursive=True)
        write_parquet(folder.join("trials.parquet"), results.trials)
        write_parquet(folder.join("history.parquet"), results.history)
        # Written last: a manifest on disk means the tables beside it are complete.
        folder.join("manifest.json").write_text(
            json.dumps({"version": CACHE_VERSION, "files": manifest})
        )
    except OSError as exc:
        warnings.warn(
            f"{folder.uri}: cannot write the cache ({exc}); each load will parse the files",
            stacklevel=2,
        )
