"""Experiment folder (or ResultGrid) -> Arrow tables: one row per trial, one row per report.

`load` asks `analysis.tune_files` which files make the tables (a manifest of their sizes and
mtimes), takes the tables from the Parquet cache (`analysis.cache`) when none of them changed,
and otherwise builds them (`analysis.tables`) and caches them. Only text files are read, never
a pickle; neither torch, Ray nor pandas is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from analysis.cache import TABLES, read_cache, write_cache, write_tables
from analysis.tables import Results, build
from analysis.tune_files import manifest
from lbs_tune.experiment import read_evaluation
from lbs_tune.storage import Location, locate, scaffolding


def experiment_location(source: Any) -> Location:
    """Where an experiment lives: `source` is a folder path, a pyarrow URI (file://, s3://, ...)
    or a `ray.tune.ResultGrid`."""
    # Duck-typed ResultGrid, so that loading never imports Ray.
    if hasattr(source, "experiment_path") and hasattr(source, "filesystem"):
        path = str(source.experiment_path).rstrip("/")
        return Location(source.filesystem, path, path)
    return locate(source)


def load(source: Any, cache: bool = True) -> Results:
    """Load an experiment as `Results(trials, history)` (see `analysis.tables.Results`).

    `source` is an experiment folder (path or URI) or a ResultGrid. With `cache`, the tables come
    from `<experiment>/.lbs_cache/` when no file read to make them has changed (size or mtime),
    and are written there otherwise. A truncated or malformed line of a result.json is skipped
    with a warning; a step reported twice (a trial resumed from a checkpoint) keeps its last row.
    A folder that is no Ray Tune experiment is a UserError.
    """
    where = experiment_location(source)
    files = manifest(where)
    if cache:
        cached = read_cache(where, files)
        if cached is not None:
            return cached
    results = build(where, files)
    if cache:
        write_cache(where, files, results)
    return results


def export(source: Any, out_dir: str | Path) -> list[str]:
    """Write `trials.parquet` and `history.parquet` of an experiment into `out_dir` (a folder
    path or URI), for pandas, polars or DuckDB; the sweep record rides in the schema metadata.
    The history carries the grid keys; metrics never reported are left out; config columns
    have their declared types (analysis.exported). A searched sweep adds `studies.parquet`:
    every trial of its Optuna studies; a branched sweep `branches.parquet` (analysis.branches).
    All files are written or none (a full disk is an OSError that says how much space they
    need, and leaves an earlier export as it was, and no folder made for this one). Returns the
    paths written."""
    # Here, not at the top: a plain load needs neither Optuna nor the fit's scipy.
    from analysis.branches import branch_table
    from analysis.exported import for_export
    from analysis.studies_table import study_trials_table

    results = load(source)
    tables = dict(zip(TABLES, for_export(results), strict=True))
    studies = study_trials_table(experiment_location(source))
    if studies is not None:
        tables["studies"] = studies
    branches = branch_table(results)  # a branched sweep's branches.parquet
    if branches is not None:
        tables["branches"] = branches
    target = locate(out_dir)
    with scaffolding(target):
        return write_tables(tables, target)


def load_evaluation(source: Any) -> pa.Table | None:
    """The experiment's evaluation.parquet (written by `lbs-tune evaluate`), None without one."""
    return read_evaluation(experiment_location(source))
