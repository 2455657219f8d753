"""The Ray Tune adapter: TrialConfig in, `tune.report` out, `tune.Checkpoint` in and out.

The only training code that imports Ray. Each report also carries where the trial ran (host, Ray
node id, the GPU ids Ray assigned, the device it trained on) and sets gauges that the Ray
dashboard and its Prometheus endpoint show (images/s, step, train loss; tagged with sweep, trial
and batch size).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler
from ray.util.metrics import Gauge

from lbs_tune.build import resolve_device
from lbs_tune.checkpoints import resume_state, save_checkpoint
from lbs_tune.config import TrialConfig, trial_config
from lbs_tune.errors import out_of_memory
from lbs_tune.experiment import (
    CHECKPOINT_FILE,
    SWEEP_FILE,
    checkpoint_number,
    disk_room,
    trial_checkpoints,
)
from lbs_tune.storage import Location
from lbs_tune.training import train

GAUGE_TAGS = ("sweep", "trial", "batch_size")
GAUGES = {
    "images_per_s": "lbs_images_per_s",
    "step": "lbs_step",
    "train/loss": "lbs_train_loss",
}


def placement(config: dict[str, Any], cpu: float, gpu_by_batch) -> tune.PlacementGroupFactory:
    """The resources of one trial: CPUs always explicit (a bare {'GPU': 1} gets no CPU)."""
    bundle = {"CPU": cpu}
    gpu = gpu_by_batch(config["batch_size"])
    if gpu:
        bundle["GPU"] = gpu
    return tune.PlacementGroupFactory([bundle])


class HereScheduler(FIFOScheduler):
    """Ray's first-in-first-out scheduler that files every trial it is given under this run's
    experiment folder (`experiment`). A resumed run's search algorithm comes back from Ray's
    saved state with the experiment of the run that saved it, and makes its new trials there:
    for a moved or copied experiment, in the old folder."""

    def __init__(self, experiment: Location):
        super().__init__()
        self.experiment = experiment

    def on_trial_add(self, tune_controller, trial) -> None:
        here = self.experiment.parent().path, self.experiment.name
        if (trial.storage.storage_fs_path, trial.storage.experiment_dir_name) != here:
            # As Ray does for the trials of its saved state (TuneController._restore_trials).
            storage = copy.copy(trial.storage)
            storage.storage_filesystem = self.experiment.fs
            storage.storage_fs_path, storage.experiment_dir_name = here
            trial.set_storage(storage)
        super().on_trial_add(tune_controller, trial)


class DiskWatch(Callback):
    """Ends the sweep with `lbs_tune.experiment.DiskFull` once the experiment's disk has no room
    for what its running trials write next (`disk_room`, with the largest checkpoint seen so
    far): checked at most every `every_s` seconds, and whenever a trial fails (a full disk
    fails the trial that writes). The sweep so ended resumes as a killed one, once there is
    room."""

    def __init__(self, experiment: Location, trial_count: int, every_s: float = 1.0):
        self.experiment = experiment
        self.trial_count = trial_count
        self.every_s = every_s
        self.checked = 0.0
        self.checkpoint_bytes = 0

    def _check(self, trials: list) -> None:
        running = sum(t.status == "RUNNING" for t in trials)
        unfinished = self.trial_count - sum(t.status == "TERMINATED" for t in trials)
        full = disk_room(self.experiment, running, unfinished, self.checkpoint_bytes)
        if full is not None:
            raise full

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        if self.experiment.is_local:
            with contextlib.suppress(OSError):
                size = os.path.getsize(os.path.join(checkpoint.path, CHECKPOINT_FILE))
                self.checkpoint_bytes = max(self.checkpoint_bytes, size)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self.checked >= self.every_s:
            self.checked = time.monotonic()
            self._check(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._check(trials)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._check(trials)


class RecordOutOfSync(Callback):
    """Keeps the sweep record (lbs_sweep.json) out of Ray's syncs: once Ray has restored a run
    (it copied the experiment's .json files into its staging folder), the record's staged copy
    is removed (`leftovers.remove_staged`), so Ray never copies it back over the storage's.
    `states`: the names of the experiment's saved Ray states before the run."""

    def __init__(self, name: str, states: list[str]):
        self.name, self.states = name, states

    def setup(self, **info) -> None:
        from lbs_tune.leftovers import remove_staged

        if self.states:
            remove_staged(self.name, self.states, SWEEP_FILE)


class KeepReports(Callback):
    """Copies a trial's report files (Ray's result.json, progress.csv, params) from the driver's
    staging folder, where Ray's loggers write them, into the experiment folder: `keep(trial_id)`.
    Ray uploads that folder only every sync period, so a driver killed in between loses the
    reports of the trials that ended since. The searcher keeps a trial's reports before it tells
    its study the outcome: a trial that its study was told has its reports in the folder."""

    FILES = ("result.json", "progress.csv", "params.json", "params.pkl")

    def __init__(self):
        self.trials: dict[str, Any] = {}  # Ray trial id -> its Trial, once started

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl without its trials
        return {"trials": {}}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.trials[trial.trial_id] = trial

    def keep(self, trial_id: str) -> None:
        trial = self.trials.get(trial_id)
        if trial is None:
            return
        storage = trial.storage
        staged = Path(storage.trial_driver_staging_path)
        fs = storage.storage_filesystem
        fs.create_dir(storage.trial_fs_path, recursive=True)
        for name in self.FILES:
            if not (staged / name).is_file():
                continue
            # Whole or not at all: a kill mid-copy leaves the folder's earlier copy.
            target = f"{storage.trial_fs_path}/{name}"
            with (staged / name).open("rb") as src, fs.open_output_stream(f"{target}.tmp") as out:
                shutil.copyfileobj(src, out)
            fs.move(f"{target}.tmp", target)


class RayReporter:
    """Sends the loop's reports to Ray Tune, with checkpoints, host/GPU facts and gauges."""

    def __init__(self, where: dict[str, Any], tags: dict[str, str], sent: list[dict[str, Any]]):
        self.where = where
        self.tags = tags
        self.sent = sent
        self.gauges = {
            key: Gauge(name, description=f"lbs-tune trial {key}", tag_keys=GAUGE_TAGS)
            for key, name in GAUGES.items()
        }

    def step(self, step: int, total: int) -> None:
        """Nothing per step: Ray hears from the trial at reports only."""

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        for key, gauge in self.gauges.items():
            if metrics.get(key) is not None:
                gauge.set(float(metrics[key]), tags=self.tags)
        result = {**metrics, **self.where}
        self.sent.append(result)
        if checkpoint is None:
            tune.report(result)
            return
        # Made in the trial's working folder (Ray's, in its session folder; the current one),
        # not in $TMPDIR, and made anew each time: a kill leaves it to the trial's next save.
        folder = Path.cwd() / f".lbs-checkpoint-{self.tags['trial']}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            save_checkpoint({**checkpoint, "reports": self.sent}, folder / CHECKPOINT_FILE)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
        finally:  # Ray has copied it to the storage
            shutil.rmtree(folder, ignore_errors=True)


def _device(config: TrialConfig) -> torch.device:
    # Ray narrows CUDA_VISIBLE_DEVICES to the GPUs it assigned; with none, train on the CPU.
    if config.device == "auto" and not ray.get_gpu_ids():
        return torch.device("cpu")
    return resolve_device(config.device)


def tune_resume_state(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    """The state of Tune's checkpoint or, if that one is damaged, of the newest readable one
    before it in the trial's folder (each is reported; none is deleted). A UserError if none."""
    newest = Location(checkpoint.filesystem, checkpoint.path, checkpoint.path).join(CHECKPOINT_FILE)
    number = checkpoint_number(newest)
    older = [
        c for c in trial_checkpoints(newest.parent().parent()) if checkpoint_number(c) < number
    ]
    return resume_state([newest, *reversed(older)], fix="resume from")


def train_trial(params: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one grid point, resuming from Tune's checkpoint."""
    # A searched trial's params also name its study and Optuna trial (lbs_tune.searcher).
    config = trial_config(params)
    # As many torch threads as the CPUs Ray gave the trial (resources.cpu), so trials sharing a
    # node don't oversubscribe it.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    device = _device(config)
    config = config.model_copy(update={"device": device.type})
    checkpoint = tune.get_checkpoint()
    resume = None if checkpoint is None else tune_resume_state(checkpoint)
    context = tune.get_context()
    name = device.type
    if device.type == "cuda":
        name = f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    where = {
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "device": name,
    }
    tags = {
        "sweep": context.get_experiment_name(),
        "trial": context.get_trial_id(),
        "batch_size": str(config.batch_size),
    }
    sent = list(resume["reports"]) if resume else []
    # Ray's result.json on the storage may lag the trial (it is synced from the driver now and
    # then, and a restart copies the storage's copy back): send again every report up to the
    # checkpoint, so none is lost. Readers keep the last report of each step.
    for row in sent:
        tune.report({**row, "replayed": True})
    try:
        train(config, RayReporter(where, tags, sent), resume)
    except torch.OutOfMemoryError:
        # Not a crash to retry (it would run out of memory again): the trial ends with a result
        # that says so and how to fix it; the sweep goes on.
        last = sent[-1] if sent else {}
        tune.report(
            {
                **last,
                **where,
                "failed": out_of_memory(config.batch_size, config.micro_batch_size),
                "diverged": False,
            }
        )
