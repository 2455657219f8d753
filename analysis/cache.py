"""An experiment's tables cached as Parquet in `<experiment>/.lbs_cache/`, beside a manifest
of the size and mtime of every file read to make them (a changed file makes the cache stale);
and the same tables exported for pandas, polars or DuckDB."""

from __future__ import annotations

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

from analysis.tables import Results
from lbs_tune.experiment import CACHE_DIR, read_parquet
from lbs_tune.storage import Location, atomic_outputs, check_space

# Part of the manifest: a new table layout makes every old cache stale.
CACHE_VERSION = 6
TABLES = ("trials", "history")


def read_cache(where: Location, files: dict[str, list[int]]) -> Results | None:
    """The cached tables, None unless they were made of exactly `files` (sizes and mtimes) by
    this version of the table layout."""
    folder = where.join(CACHE_DIR)
    try:
        with where.fs.open_input_stream(folder.join("manifest.json").path) as f:
            recorded = json.loads(f.readall())
        if recorded != {"version": CACHE_VERSION, "files": files}:
            return None
        trials, history = (read_parquet(folder.join(f"{name}.parquet")) for name in TABLES)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return Results(trials, history)


def write_cache(where: Location, files: dict[str, list[int]], results: Results) -> None:
    """Cache `results`, made of `files`; a folder that cannot be written only warns."""
    folder = where.join(CACHE_DIR)
    try:
        write_tables(dict(zip(TABLES, results, strict=True)), folder)
        # Written last: a manifest on disk means the tables beside it are complete.
        folder.join("manifest.json").write_text(
            json.dumps({"version": CACHE_VERSION, "files": files})
        )
    except OSError as exc:
        warnings.warn(
            f"{folder.uri}: cannot write the cache ({exc}); each load will parse the files",
            stacklevel=3,
        )


def write_tables(tables: dict[str, pa.Table], folder: Location) -> list[str]:
    """Write each table as `<name>.parquet` into `folder` (made as needed), all or none (see
    `lbs_tune.storage.atomic_outputs`), once the disk is known to have room for them (else an
    OSError that says how much is needed); the sweep record rides in the trials table's schema
    metadata. Returns their URIs."""
    blobs = {}
    for name, table in tables.items():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        blobs[name] = sink.getvalue()
    # A block per file on top of its bytes: what a file system takes at most beyond them.
    check_space(folder, sum(blob.size + 4096 for blob in blobs.values()))
    targets = [folder.join(f"{name}.parquet") for name in blobs]
    with atomic_outputs(targets) as files:
        for f, blob in zip(files, blobs.values(), strict=True):
            f.write(blob)
    return [target.uri for target in targets]
