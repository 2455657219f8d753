"""Where a sweep's trials are logged besides Ray's result.json: the Ray Tune logger callbacks of
a sweep (its `loggers` section).

- TensorBoard (on by default): our own callback. Event files in `<experiment>/tensorboard/<run>/`
  with short run names from the grid keys that vary (`bs=64,lr.scaling=linear`), the trial's own
  metrics against the optimizer step (tag `val/accuracy`) and against the examples seen (tag
  `by_examples/val/accuracy`), each step written once (a resumed trial sends earlier reports
  again), and HParams (the grid and searched keys, the final metrics) when a trial ends.
- MLflow and W&B: Ray Tune's own MLflowLoggerCallback and WandbLoggerCallback
  (lbs_tune.tracking), given only the trial's own metrics, each step once.

Ray's automatically added loggers are turned off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): its JSON
and CSV loggers, which write the result.json and params.json that `analysis` reads, are added
here explicitly; its TensorBoard logger (x axis: the report's index, Ray's keys mixed in, run
names of 150 characters) is not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import posixpath
import re
import struct
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, LoggerCallback

from lbs_tune.config import SEARCH_KEY
from lbs_tune.environ import environ
from lbs_tune.errors import UserError
from lbs_tune.names import flatten, own_metrics
from lbs_tune.storage import Location
from lbs_tune.sweep import SweepSpec

TENSORBOARD_DIR = "tensorboard"
BY_EXAMPLES = "by_examples/"
# Ray reads this when a Tuner's fit starts: "1" keeps it from adding its own loggers.
AUTO_LOGGERS_OFF = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
# Short names of keys in run names.
SHORT_KEYS = {"batch_size": "bs"}
# The package each optional logger needs, and the extra that installs it.
EXTRAS = {"mlflow": ("mlflow", "lbs-tune[mlflow]"), "wandb": ("wandb", "lbs-tune[wandb]")}


def callbacks(spec: SweepSpec, experiment: Location) -> list[LoggerCallback]:
    """The logger callbacks of a sweep in `experiment`: Ray's JSON and CSV loggers, then those
    of its `loggers` section; fit the Tuner inside `without_auto_loggers` (see the module's
    docstring). A missing optional package is a UserError that names its extra."""
    loggers = spec.loggers
    for name, (package, extra) in EXTRAS.items():
        if getattr(loggers, name) is not None and importlib.util.find_spec(package) is None:
            raise UserError(
                f"sweep {spec.name}: loggers.{name} needs the {package} package, which is not "
                f"installed; pip install '{extra}' (or remove loggers.{name})"
            )
    found: list[LoggerCallback] = [JsonLoggerCallback(), CSVLoggerCallback()]
    searched = list(spec.search.space) if spec.search else []
    if loggers.tensorboard:
        found.append(TensorBoard(list(spec.grid), varying_keys(spec), searched))
    if loggers.mlflow is not None:
        from lbs_tune.tracking import mlflow_callback

        found.append(mlflow_callback(spec))
    if loggers.wandb is not None:
        from lbs_tune.tracking import wandb_callback

        found.append(wandb_callback(spec, experiment))
    return found


@contextlib.contextmanager
def without_auto_loggers() -> Iterator[None]:
    """Ray adds none of its own loggers to a Tuner fitted in the body (`callbacks` gives the
    ones a sweep keeps); the process's setting is as it was after it."""
    with environ({AUTO_LOGGERS_OFF: "1"}):
        yield


def varying_keys(spec: SweepSpec) -> list[str]:
    """The grid keys with more than one value: what tells a sweep's trials apart."""
    return [key for key, values in spec.grid.items() if len(values) > 1]


def run_name(config: dict[str, Any], varying: list[str]) -> str:
    """A trial's short name from its values of the `varying` grid keys, e.g.
    `bs=64,lr.scaling=linear`; a searched trial adds its study's trial number (`,trial=3`), a
    confirmation run its number (`,confirm=2`).
    Characters that a folder name should not hold become `_`."""
    flat = flatten({k: v for k, v in config.items() if k != SEARCH_KEY})
    parts = [f"{SHORT_KEYS.get(k, k)}={_value(flat.get(k))}" for k in varying]
    search = config.get(SEARCH_KEY)
    if isinstance(search, dict) and search.get("number") is not None:
        parts.append(f"trial={search['number']}")
    elif isinstance(search, dict) and search.get("confirm") is not None:
        parts.append(f"confirm={search['confirm']}")
    name = ",".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _hparams(config: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    flat = flatten({k: v for k, v in config.items() if k != SEARCH_KEY})
    return {k: flat[k] for k in keys if isinstance(flat.get(k), str | bool | int | float)}


# ============================================================================ TensorBoard


class TensorBoard(LoggerCallback):
    """Ray Tune logger callback writing each trial's metrics as TensorBoard scalars against the
    optimizer step (and `by_examples/` against examples seen), and its HParams when it ends.

    grid: the sweep's grid keys; varying: those with more than one value (the run names);
    searched: the keys of its `search` space. Runs live in `<experiment>/tensorboard/<run>/`
    (written in Ray's driver staging folder, which Ray copies to the storage with the rest).
    """

    def __init__(self, grid: list[str], varying: list[str], searched: list[str]):
        self.grid = grid
        self.varying = varying
        self.searched = searched
        self._writers: dict[Any, Any] = {}
        self._last_step: dict[Any, int] = {}
        self._last: dict[Any, dict[str, float]] = {}

    def log_trial_start(self, trial) -> None:
        if trial in self._writers:
            return
        from tensorboardX import SummaryWriter

        name = run_name(trial.config, self.varying)
        staging = posixpath.join(trial.local_experiment_path, TENSORBOARD_DIR, name)
        # A resumed sweep (or a trial retried after an error) writes a new event file beside
        # the earlier ones: the steps they hold, here or already on the storage, are not
        # written again.
        stored = posixpath.join(trial.remote_experiment_path, TENSORBOARD_DIR, name)
        written = written_steps(pafs.LocalFileSystem(), staging) | written_steps(
            trial.storage.storage_filesystem, stored
        )
        self._last_step[trial] = max(written, default=-1)
        # tensorboardX names a file by second and host: a second writer of the same second
        # (a quickly resumed trial) would overwrite the first's file without a suffix; the
        # nanoseconds keep the files in the order TensorBoard reads them (by name).
        suffix = f".{time.time_ns()}.{os.getpid()}"
        self._writers[trial] = SummaryWriter(staging, flush_secs=30, filename_suffix=suffix)

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        step = result.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        self.log_trial_start(trial)
        if step <= self._last_step[trial]:
            return  # a report sent again by a resumed trial, or a step made again
        writer = self._writers[trial]
        metrics = own_metrics(result)
        when = result.get("timestamp")
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step, walltime=when)
        examples = result.get("examples")
        if isinstance(examples, int) and not isinstance(examples, bool):
            for key, value in metrics.items():
                if key not in ("examples", "epoch"):
                    writer.add_scalar(BY_EXAMPLES + key, value, global_step=examples, walltime=when)
        writer.flush()
        self._last_step[trial] = step
        self._last[trial] = {**self._last.get(trial, {}), **metrics}

    def log_trial_end(self, trial, failed: bool = False) -> None:
        writer = self._writers.pop(trial, None)
        if writer is None:
            return
        final = self._last.pop(trial, {})
        self._last_step.pop(trial, None)
        # HParams once, for a trial that ended well (one that errored may yet be retried).
        if final and not failed:
            from tensorboardX.summary import hparams

            values = _hparams(trial.config, [*self.grid, *self.searched])
            for summary in hparams(hparam_dict=values, metric_dict=final):
                writer.file_writer.add_summary(summary)
        writer.close()

    def on_experiment_end(self, trials: list, **info) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __getstate__(self) -> dict[str, Any]:
        # The Tuner pickles its callbacks (tuner.pkl) before any writer opens.
        return {**self.__dict__, "_writers": {}, "_last_step": {}, "_last": {}}


def written_steps(fs: pafs.FileSystem, folder: str) -> set[int]:
    """The optimizer steps that the event files in `folder` (a path on `fs`) hold scalars of;
    empty without the folder."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()
    steps = set()
    for info in infos:
        if info.type != pafs.FileType.File or ".tfevents." not in info.base_name:
            continue
        with fs.open_input_stream(info.path) as stream:
            raw = stream.readall()
        for event in read_events(raw):
            tags = [v.tag for v in event.summary.value]
            if any(not t.startswith(BY_EXAMPLES) and not t.startswith("_hparams_") for t in tags):
                steps.add(event.step)
    return steps


def read_events(raw: bytes) -> Iterator[Any]:
    """The Event protos of an event file's bytes (TFRecord: length, its CRC, data, its CRC); a
    record cut short (a writer killed mid-write) ends the file."""
    from tensorboardX.proto.event_pb2 import Event

    at = 0
    while at + 12 <= len(raw):
        (length,) = struct.unpack_from("<Q", raw, at)
        end = at + 12 + length + 4
        if end > len(raw):
            return
        event = Event()
        event.ParseFromString(raw[at + 12 : at + 12 + length])
        yield event
        at = end
