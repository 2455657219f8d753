"""The experiment folder and the run folder: every file name, Ray's saved states, checkpoint
folders and the fall-back to an earlier checkpoint, disk room, the evaluation table. Everything
else asks this module (the sweep record's contents: `lbs_tune.record`).

An experiment folder `<storage>/<name>/` is Ray Tune's own experiment folder (its
`experiment_state-*.json`, one folder per trial with `params.json`, `result.json`, `error.txt` and
`checkpoint_NNNNNN/state.pt`) plus our files: `lbs_sweep.json` (the sweep record), the evaluation
table of `lbs-tune evaluate`, the loader's cache and the report. A run folder of `lbs-tune train`
holds `config.json`, `metrics.jsonl` and its checkpoints in the same layout as a trial's,
`checkpoint_<step>/state.pt`: one layout, listed by `trial_checkpoints`, resumed from by
`lbs_tune.checkpoints.resume_state`.

No torch and no Ray here: `analysis` reads through these names too.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lbs_tune.errors import UserError
from lbs_tune.storage import Location, size_text

T = TypeVar("T")

# ---------------------------------------------------------------------------- File names

SWEEP_FILE = "lbs_sweep.json"
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
ERROR_FILE = "error.txt"
TRIAL_FILES = (RESULT_FILE, PARAMS_FILE, ERROR_FILE)
STATE_FILE = re.compile(r"^experiment_state-.*\.json$")
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")  # a trial's (or a run's) checkpoint folders
CHECKPOINT_FILE = "state.pt"  # our state inside each of them
EVALUATION_FILE = "evaluation.parquet"
CACHE_DIR = ".lbs_cache"
REPORT_FILE = "report.html"
# Trial folders that no run of the sweep will use again, and Ray's files of a run whose state
# was lost (lbs_tune.runner), moved here rather than deleted.
SET_ASIDE_DIR = ".lbs_set_aside"
TRIAL_DIR_PREFIX = "train_trial_"  # every trial folder's name starts so (lbs_tune.runner)
SUMMARY_FILE = "summary.json"
# The state of a branched sweep's searcher (lbs_tune.branch_searcher), JSON text. Not named
# .json: on restore Ray copies the experiment folder's .json and .pkl files into its staging
# folder and later back over the storage's, which would undo the searcher's newer writes.
BRANCH_STATE_FILE = "branch_state.txt"
# `lbs-tune evaluate`'s table: one row per checkpoint and split, a column per score that a task's
# evaluation gives (null where the task has none, or the value is not finite).
EVALUATION_SCORES = ("loss", "accuracy", "perplexity", "miou", "pixel_accuracy")
EVALUATION_SCHEMA = pa.schema(
    [("trial_id", pa.string()), ("step", pa.int64()), ("split", pa.string())]
    + [(score, pa.float64()) for score in EVALUATION_SCORES]
)
# A run folder of `lbs-tune train`.
RUN_CONFIG_FILE = "config.json"
RUN_METRICS_FILE = "metrics.jsonl"


def is_trial_folder(name: str, trial_id: str) -> bool:
    """Whether the folder `name` is Ray trial `trial_id`'s (runner.trial_dirname names it by
    the id, then the keys that tell it apart)."""
    prefix = f"{TRIAL_DIR_PREFIX}{trial_id}"
    return name == prefix or name.startswith(f"{prefix}_")


def checkpoint_folder(number: int) -> str:
    """The folder of checkpoint `number` (Ray numbers a trial's in order; a run of `lbs-tune
    train` by the step): 'checkpoint_000044'."""
    return f"checkpoint_{number:06d}"


class RayTrial(NamedTuple):
    """One trial of Ray's experiment state."""

    trial_id: str
    state: str  # PENDING, RUNNING, PAUSED, TERMINATED or ERROR
    folder: str | None  # its folder in the experiment (None before it started)
    diverged: bool  # its last report said so


def state_files(experiment: Location) -> list[str]:
    """The names of Ray's experiment states in `experiment`, newest first (Ray names each by
    the start of the run that writes it, and restores from the newest)."""
    try:
        infos = experiment.fs.get_file_info(pafs.FileSelector(experiment.path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((i.base_name for i in infos if STATE_FILE.match(i.base_name)), reverse=True)


def read_state(state: Location) -> list[RayTrial] | None:
    """The trials of one of Ray's experiment state files; None if it cannot be read (Ray may
    be rewriting it, or a kill cut it short)."""
    try:
        pairs = json.loads(state.read_text())["trial_data"]
        trials = []
        for trial, runtime in pairs:
            info = json.loads(trial)
            last = json.loads(runtime).get("last_result") or {}
            folder = info.get("relative_logdir")
            trials.append(
                RayTrial(info["trial_id"], info["status"], folder, bool(last.get("diverged")))
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return trials


def run_files(name: str) -> re.Pattern[str]:
    """The files that Ray writes in the experiment for the run whose experiment state is `name`
    (its search algorithm's and callbacks' states share the run's time stamp)."""
    stamp = name.removeprefix("experiment_state-").removesuffix(".json")
    return re.compile(rf"^[a-z_-]+-{re.escape(stamp)}\.(json|pkl)$")


def set_aside(experiment: Location, names: list[str]) -> str:
    """Move the entries `names` of the experiment (files or trial folders) into a folder of
    SET_ASIDE_DIR named by the time; return that folder's path within the experiment. Readers
    and Ray never look there; nothing is deleted."""
    folder = posixpath.join(SET_ASIDE_DIR, datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    experiment.fs.create_dir(experiment.join(folder).path, recursive=True)
    for name in names:
        experiment.fs.move(experiment.join(name).path, experiment.join(folder, name).path)
    return folder


def count_outcomes(trials) -> dict[str, int]:
    """Trials by outcome from (Ray state, diverged) pairs: finished, diverged, errored, and
    running or pending (the rest)."""
    counts = {"finished": 0, "diverged": 0, "errored": 0, "running or pending": 0}
    for state, diverged in trials:
        if state == "ERROR":
            counts["errored"] += 1
        elif diverged:
            counts["diverged"] += 1
        elif state == "TERMINATED":
            counts["finished"] += 1
        else:
            counts["running or pending"] += 1
    return counts


# ---------------------------------------------------------------------------- Checkpoints


def trial_checkpoints(trial: Location) -> list[Location]:
    """The `state.pt` of each checkpoint folder of a trial (or of a run of `lbs-tune train`),
    oldest first (by the folder's number)."""
    try:
        infos = trial.fs.get_file_info(pafs.FileSelector(trial.path))
    except (FileNotFoundError, OSError):
        return []
    numbered = sorted(
        (int(match.group(1)), i.base_name)
        for i in infos
        if i.type == pafs.FileType.Directory and (match := CHECKPOINT_DIR.match(i.base_name))
    )
    return [trial.join(name, CHECKPOINT_FILE) for _, name in numbered]


def checkpoint_number(state: Location) -> int:
    """The number of the checkpoint folder that holds `state` (`.../checkpoint_000044/state.pt`
    -> 44): Ray's count of the trial's checkpoints, the step of a run of `lbs-tune train`."""
    return int(CHECKPOINT_DIR.match(state.parent().name).group(1))


def run_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints of a run folder of `lbs-tune train`, newest first."""
    states = trial_checkpoints(Location(pafs.LocalFileSystem(), str(folder), str(folder)))
    return [(checkpoint_number(s), Path(s.path)) for s in reversed(states)]


def newest_readable(
    candidates: list[Location], load: Callable[[Location], T], fix: str, set_aside: bool = False
) -> T | None:
    """The state of the newest of `candidates` (newest first) that `load` reads. Each damaged one
    newer than it is reported on stderr and, with `set_aside`, its checkpoint folder renamed to
    `<folder>.damaged` (so the resumed run can write that step again); none is deleted. None
    without candidates; a UserError whose fix is `fix` if every one is damaged."""
    damaged = []
    for candidate in candidates:
        try:
            state = load(candidate)
        except UserError as exc:
            damaged.append((candidate, str(exc)))
            continue
        except OSError as exc:
            damaged.append((candidate, f"{candidate.uri}: cannot read the checkpoint ({exc})"))
            continue
        for bad, problem in damaged:
            if set_aside:
                folder = bad.parent()
                aside = f"{folder.path}.damaged"
                folder.fs.move(folder.path, aside)
                problem += f"; moved it aside to {posixpath.basename(aside)}"
            print(
                f"lbs-tune: warning: {problem}; resuming from {_checkpoint_name(candidate)}",
                file=sys.stderr,
            )
        return state
    if damaged:
        raise UserError(f"{damaged[-1][1]}; no earlier checkpoint to {fix}")
    return None


def _checkpoint_name(checkpoint: Location) -> str:
    """'checkpoint_000002' for `.../checkpoint_000002/state.pt`, else the file's name."""
    folder = checkpoint.parent().name
    return folder if CHECKPOINT_DIR.match(folder) else checkpoint.name


# ---------------------------------------------------------------------------- Disk space


# Room kept for reports, the sweep record and the studies, beside checkpoints.
RESERVE_BYTES = 1_000_000


class DiskFull(Exception):
    """The disk of an experiment has no room for what its sweep writes next (see `disk_room`);
    `str()` is the user's one line."""


def disk_room(
    experiment: Location, running: int, unfinished: int, checkpoint_bytes: int | None = None
) -> DiskFull | None:
    """A DiskFull if the local disk of `experiment` has less room than its `running` trials'
    next checkpoints take (each as large as the largest so far: `checkpoint_bytes` if known,
    else read from the folder) and RESERVE_BYTES; None otherwise, and on object stores. Its
    message says how much is free, about how much the `unfinished` trials need (each as much as
    the largest trial folder so far), and what to do."""
    if not experiment.is_local or not os.path.isdir(experiment.path):
        return None
    stat = os.statvfs(experiment.path)
    free = stat.f_bavail * stat.f_frsize
    if checkpoint_bytes is not None and free >= running * checkpoint_bytes + RESERVE_BYTES:
        return None
    checkpoint, trial = _largest(experiment)
    if free >= running * checkpoint + RESERVE_BYTES:
        return None
    need = max(unfinished, 1) * max(trial, checkpoint) + RESERVE_BYTES
    return DiskFull(
        f"{experiment.uri}: the disk is full ({size_text(free)} free; this sweep needs about "
        f"{size_text(need)} more for its {unfinished} trials to go); free some space and run "
        "the same command again: it goes on where it stopped"
    )


def _largest(experiment: Location) -> tuple[int, int]:
    """(bytes of the largest checkpoint file, of the largest trial folder) of a local
    experiment."""
    checkpoint, trial = 0, 0
    for folder in Path(experiment.path).glob(f"{TRIAL_DIR_PREFIX}*"):
        files = [f for f in folder.rglob("*") if f.is_file()]
        trial = max(trial, sum(f.stat().st_size for f in files))
        checkpoint = max(
            [checkpoint] + [f.stat().st_size for f in files if f.name == CHECKPOINT_FILE]
        )
    return checkpoint, trial


# ---------------------------------------------------------------------------- Trials


def trial_folders(experiment: Location) -> list[Location]:
    """The trial folders of an experiment (those with a params.json), in name order."""
    try:
        infos = experiment.fs.get_file_info(pafs.FileSelector(experiment.path))
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(
            f"{experiment.uri}: no such experiment folder; give <storage>/<sweep name>"
        ) from None
    folders = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return [experiment.join(f) for f in folders if experiment.join(f, PARAMS_FILE).exists()]


def reported_checkpoints(trial: Location) -> tuple[str | None, dict[str, int]]:
    """(Ray's trial id, {checkpoint folder name: step}) from a trial's result.json: the reports
    that came with a checkpoint name it. Lines that are not JSON (a report being written) are
    skipped."""
    result = trial.join(RESULT_FILE)
    if not result.exists():
        return None, {}
    trial_id, steps = None, {}
    for line in result.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        trial_id = trial_id or row.get("trial_id")
        if row.get("checkpoint_dir_name") and row.get("step") is not None:
            steps[row["checkpoint_dir_name"]] = row["step"]
    return trial_id, steps


# ---------------------------------------------------------------------------- Tables


def read_parquet(source: Location) -> pa.Table:
    # ParquetFile skips the dataset discovery of pq.read_table: a third faster on small files.
    with source.fs.open_input_file(source.path) as f:
        return pq.ParquetFile(f).read()


def write_parquet(target: Location, table: pa.Table) -> None:
    """Write a table whole (atomically on a local disk: readers never see half a file)."""
    with target.atomic_output() as f:
        pq.write_table(table, f)


def read_evaluation(experiment: Location) -> pa.Table | None:
    """The experiment's evaluation table (written by `lbs-tune evaluate`), None without one."""
    target = experiment.join(EVALUATION_FILE)
    if not target.exists():
        return None
    table = read_parquet(target)
    for name in EVALUATION_SCHEMA.names:  # a table of an earlier version lacks some scores
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.float64()))
    return table.select(EVALUATION_SCHEMA.names).cast(EVALUATION_SCHEMA)
