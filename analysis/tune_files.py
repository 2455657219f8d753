"""Ray Tune's files in an experiment folder, read and parsed (text files only, never a pickle).

Which files make the tables (`manifest`), the newest readable `experiment_state-*.json` (trial
ids, states, configs, times, failures), every trial's `result.json` (its reports, parsed by
pyarrow's JSON reader in one call per chunk of files), `params.json`, the last line of
`error.txt`, and our `lbs_sweep.json`. The file names come from `lbs_tune.experiment`.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson

from analysis._arrow import empty
from lbs_tune.errors import UserError
from lbs_tune.experiment import (
    ERROR_FILE,
    PARAMS_FILE,
    RESULT_FILE,
    STATE_FILE,
    SWEEP_FILE,
    TRIAL_FILES,
)
from lbs_tune.names import METRICS
from lbs_tune.record import parse_record
from lbs_tune.storage import Location

# One read_json call parses up to this many bytes; bigger sweeps are parsed in chunks of it.
CHUNK_BYTES = 256 * 2**20
# A report line may be long (Ray repeats the whole config in it); blocks must hold whole lines.
BLOCK_BYTES = 8 * 2**20
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray copies a state file in milliseconds: one read again this much later finds it whole.
STATE_RETRY_S = 0.2

# Whole numbers and flags among the metrics; every other metric is a float.
_KINDS = {"diverged": pa.bool_()} | dict.fromkeys(
    ("step", "examples", "total_steps", "bn_batch", "micro_batch", "target/step"), pa.int64()
)
_FIRST = ("step", "epoch", "examples")
# The report fields we read; the rest of a line (Ray's nested `config` above all) is skipped.
REPORT_SCHEMA = pa.schema(
    [("trial_id", pa.string()), ("step", pa.int64()), ("epoch", pa.float64())]
    + [("examples", pa.int64()), ("training_iteration", pa.int64())]
    + [("timestamp", pa.float64()), ("time_s", pa.float64())]
    + [(m, _KINDS.get(m, pa.float64())) for m in METRICS if m not in _FIRST]
    + [("host", pa.string()), ("node_id", pa.string()), ("gpu_ids", pa.string())]
    + [("device", pa.string()), ("checkpoint_dir_name", pa.string())]
)
_PARSE = pajson.ParseOptions(explicit_schema=REPORT_SCHEMA, unexpected_field_behavior="ignore")
_RUNTIME = pajson.ParseOptions(
    explicit_schema=pa.schema(
        [
            ("start_time", pa.float64()),
            ("last_result_time", pa.float64()),
            ("num_failures", pa.int64()),
        ]
    ),
    unexpected_field_behavior="ignore",
    # Ray writes some of them indented, over many lines.
    newlines_in_values=True,
)
_READ = pajson.ReadOptions(block_size=BLOCK_BYTES)


def manifest(where: Location) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file that the tables are made of, by path in the experiment:
    lbs_sweep.json, Ray's experiment states (one per run of the sweep), and each trial folder's
    result.json, params.json and error.txt. A folder that is no Ray Tune experiment is a
    UserError."""
    try:
        infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True))
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(
            f"{where.uri}: no such experiment folder; give <storage>/<sweep name>"
        ) from None
    files = {}
    for info in infos:
        relative = info.path[len(where.path) :].lstrip("/")
        parts = relative.split("/")
        state = len(parts) == 1 and STATE_FILE.match(relative)
        if state or relative == SWEEP_FILE or (len(parts) == 2 and parts[1] in TRIAL_FILES):
            files[relative] = [info.size, info.mtime_ns or 0]
    if not state_files(files) and not any(p.endswith(RESULT_FILE) for p in files):
        raise UserError(
            f"{where.uri}: not a Ray Tune experiment folder (no experiment_state-*.json and no "
            f"trial folders with {RESULT_FILE}); give <storage>/<sweep name>"
        )
    return dict(sorted(files.items()))


def state_files(files: dict[str, list[int]]) -> list[str]:
    """The experiment states among the files of a manifest, newest first (Ray names each by
    the time its run of the sweep started)."""
    return sorted((p for p in files if STATE_FILE.match(p)), reverse=True)


def read_bytes(where: Location, paths: list[str]) -> list[bytes]:
    """The contents of files of the experiment (paths relative to it)."""
    if where.is_local:
        # Plain reads: a tenth of the per-file cost of pyarrow's streams, for hundreds of files.
        found = []
        for path in paths:
            with open(f"{where.path}/{path}", "rb") as f:
                found.append(f.read())
        return found

    def read(path: str) -> bytes:
        with where.fs.open_input_stream(f"{where.path}/{path}") as f:
            return f.readall()

    # Threads overlap the latency of many small reads from an object store.
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, paths))


def read_sweep(where: Location) -> bytes:
    """lbs_sweep.json as bytes, checked by `lbs_tune.record.parse_record` (a damaged record
    is the same one-line UserError here as in every other command)."""
    raw = read_bytes(where, [SWEEP_FILE])[0]
    parse_record(raw, where.join(SWEEP_FILE).uri)
    return raw


def read_state(where: Location, names: list[str]) -> dict[str, dict[str, Any]]:
    """Folder -> trial_id, state, config, start_time, end_time (Ray's last result time) and
    num_failures, from the newest readable of Ray's experiment states `names` (newest first).

    Ray rewrites a running sweep's state file in place, so a reader may find it empty or cut
    short: it is read again once, STATE_RETRY_S later. One still unreadable is passed over for
    the one before (an earlier run's) with a warning; {} with a warning if none can be read."""
    for number, name in enumerate(names):
        for attempt in range(2):
            try:
                return _parse_state(read_bytes(where, [name])[0])
            except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
                problem = exc
                if attempt == 0:
                    time.sleep(STATE_RETRY_S)
        older = names[number + 1] if number + 1 < len(names) else None
        then = f"read {older} instead" if older else "trial states are unknown"
        warnings.warn(f"{where.join(name).uri}: unreadable ({problem}); {then}", stacklevel=2)
    return {}


def _parse_state(raw: bytes) -> dict[str, dict[str, Any]]:
    pairs = json.loads(raw)["trial_data"]
    # Ray's run-time record of a trial is long (every metric's history): pyarrow's reader
    # takes the three numbers from all of them in one pass.
    runtime = pajson.read_json(
        pa.BufferReader("\n".join(r for _, r in pairs).encode()), parse_options=_RUNTIME
    ).to_pylist()
    trials = {}
    for (trial_json, _), times in zip(pairs, runtime, strict=True):
        trial = json.loads(trial_json)
        # A trial that never started may have no folder name yet.
        trials[trial.get("relative_logdir") or trial["trial_id"]] = {
            "trial_id": trial["trial_id"],
            "state": trial["status"],
            "config": trial.get("config"),
            "start_time": times["start_time"],
            "end_time": times["last_result_time"],
            "num_failures": times["num_failures"],
        }
    return trials


def read_params(where: Location, folders: list[str]) -> dict[str, dict[str, Any]]:
    """Folder -> the config in its params.json; a file that is not a JSON object is left out
    with a warning."""
    texts = read_bytes(where, [f"{f}/{PARAMS_FILE}" for f in folders])
    params = {}
    for folder, text in zip(folders, texts, strict=True):
        try:
            config = json.loads(text)
        except ValueError:
            config = None
        if isinstance(config, dict):
            params[folder] = config
        else:
            warnings.warn(f"{where.join(folder, PARAMS_FILE).uri}: not JSON", stacklevel=2)
    return params


def read_errors(where: Location, folders: list[str]) -> dict[str, str | None]:
    """Folder -> the last line of its error.txt (the trial's latest exception, colours
    removed), None for an empty file."""
    texts = read_bytes(where, [f"{f}/{ERROR_FILE}" for f in folders])
    return {f: _last_line(t.decode(errors="replace")) for f, t in zip(folders, texts, strict=True)}


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1] if lines else None


# ============================================================================ Reports


def read_reports(
    where: Location, folders: list[str], sizes: list[int]
) -> tuple[pa.Table, np.ndarray]:
    """All reports in the result.json of `folders` (of about `sizes` bytes) as a table of
    REPORT_SCHEMA, and for each row the index of its folder in `folders`. A truncated last
    line is dropped and a malformed line skipped, each with a warning."""
    tables, owners = [], []
    for chunk in _chunks(sizes):
        names = [f"{folders[i]}/{RESULT_FILE}" for i in chunk]
        raw = read_bytes(where, names)
        blobs = [_whole_lines(blob, where, name) for blob, name in zip(raw, names, strict=True)]
        table, counts = _parse(blobs, where, names)
        tables.append(table)
        owners.append(np.repeat(np.asarray(chunk, dtype=np.int64), counts))
    if not tables:
        return empty(REPORT_SCHEMA), np.zeros(0, dtype=np.int64)
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


def _whole_lines(blob: bytes, where: Location, name: str) -> bytes:
    """The blob up to its last complete line; a truncated last line is dropped with a warning."""
    if not blob or blob.endswith(b"\n"):
        return blob
    head, newline, tail = blob.rpartition(b"\n")
    try:
        json.loads(tail)
        return blob + b"\n"
    except ValueError:
        warnings.warn(
            f"{where.join(name).uri}: the last line is incomplete (a running or interrupted "
            "trial); skipped it",
            stacklevel=2,
        )
        return head + newline


def _parse(blobs: list[bytes], where: Location, names: list[str]) -> tuple[pa.Table, list[int]]:
    """Parse whole-line blobs with one read_json call; file by file if some line is bad."""
    counts = [blob.count(b"\n") for blob in blobs]
    table = _read_json(b"".join(blobs), sum(counts))
    if table is not None:
        return table, counts
    tables = [_parse_file(blob, where, name) for blob, name in zip(blobs, names, strict=True)]
    return pa.concat_tables(tables), [t.num_rows for t in tables]


def _read_json(data: bytes, lines: int) -> pa.Table | None:
    """The reports in `data`, or None unless every one of its `lines` is a valid report."""
    if not lines:
        return empty(REPORT_SCHEMA)
    try:
        table = pajson.read_json(pa.BufferReader(data), read_options=_READ, parse_options=_PARSE)
    except pa.ArrowInvalid:
        return None
    return table if table.num_rows == lines else None


def _parse_file(blob: bytes, where: Location, name: str) -> pa.Table:
    """One file; if some line is bad, line by line, skipping bad lines with a warning."""
    table = _read_json(blob, blob.count(b"\n"))
    if table is not None:
        return table
    rows = []
    for number, line in enumerate(blob.split(b"\n"), start=1):
        row = _read_json(line, 1) if line.strip() else None
        if row is not None:
            rows.append(row)
        elif line.strip():
            warnings.warn(
                f"{where.join(name).uri}: line {number} is not a valid report; skipped it",
                stacklevel=2,
            )
    return pa.concat_tables(rows) if rows else empty(REPORT_SCHEMA)
