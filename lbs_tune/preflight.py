"""What a run checks and settles before Ray starts: the experiment folder (a sweep of another
spec refused, or moved aside with `--fresh`), a storage that can be written, the data files
there, trials that ask for no more than the machine has, and where a resume starts from
(`resume_point`: Ray's newest readable state; what no run will use again set aside). Also, on a
joined cluster, the one line that says what a sweep waits for.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from datetime import datetime
from typing import Any

import pyarrow.fs as pafs

from lbs_tune.cluster import check_reachable
from lbs_tune.config import changes
from lbs_tune.errors import UserError
from lbs_tune.experiment import (
    SWEEP_FILE,
    TRIAL_DIR_PREFIX,
    is_trial_folder,
    read_state,
    run_files,
    set_aside,
    state_files,
)
from lbs_tune.record import read_record
from lbs_tune.storage import Location, scaffolding
from lbs_tune.studies import STUDY_FILE
from lbs_tune.sweep import SweepSpec


def _move_aside(experiment: Location) -> str:
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    target = f"{experiment.path}.{stamp}"
    try:
        experiment.fs.move(experiment.path, target)
    except (OSError, NotImplementedError) as exc:
        raise UserError(
            f"{experiment.uri}: cannot move the old sweep aside on this storage ({exc}); "
            "use --name to start a new sweep instead"
        ) from None
    return target


def prepare_folder(spec: SweepSpec, experiment: Location, fresh: bool) -> dict[str, Any] | None:
    """Check the experiment folder; return the recorded sweep of the same spec, if any.

    A different spec is refused (or, with `fresh`, the old folder is renamed with a timestamp).
    """
    meta = experiment.join(SWEEP_FILE)
    if not experiment.exists() or not experiment.listdir():
        return None
    if not meta.exists():
        raise UserError(
            f"{experiment.uri} exists but holds no {SWEEP_FILE}: it is not an lbs-tune sweep; "
            "choose another --name or --storage"
        )
    if fresh:
        print(f"moved the old sweep aside to {_move_aside(experiment)}")
        return None
    recorded = read_record(experiment)
    if recorded["digest"] != spec.digest():
        diff = changes(recorded["spec"], spec.model_dump(mode="json"))
        raise UserError(
            f"{experiment.uri} holds sweep '{spec.name}' with another spec ({diff}); "
            "run with --fresh to move it aside (nothing is deleted) or pick another --name"
        )
    return recorded


def prepare_data(spec: SweepSpec) -> None:
    """For a cluster on this machine: check that the dataset files are there (a missing file is
    a UserError before anything starts, not a failure of every trial), and prepare datasets once
    (MNIST-1D's generation, Cityscapes' resizing), so that trials starting together don't all do
    it. Which dataset needs what is its entry in `lbs_tune.datasets`."""
    from lbs_tune.datasets import prepare_datasets

    prepare_datasets(spec.trials)


def told_trials(spec: SweepSpec, experiment: Location) -> dict[str, dict[str, Any]]:
    """The trials and confirmation runs of a searched sweep's studies that were told their
    outcome (`studies.told`; read-only), by Ray trial id: Ray runs none of them again."""
    if spec.search is None or not experiment.is_local:
        return {}
    from lbs_tune.studies import read_studies, told_by_ray_id

    return told_by_ray_id(read_studies(experiment.path))


def resume_point(spec: SweepSpec, experiment: Location, recorded: dict | None) -> bool:
    """Whether Ray resumes the trials of its saved state in `experiment` (True), or starts its
    bookkeeping anew (False): a new sweep, or one stopped before Ray first saved its state.

    Ray's newest readable state is the one resumed; newer ones that cannot be read (a kill cut
    one short while Ray rewrote it) are set aside with their run's other files, and so is every
    trial folder that the resumed run will not use again: one that Ray's state does not know,
    whose trial runs again under a new id, unless a searched sweep's study was told its
    outcome. A searched sweep whose studies are damaged, or missing while trials ran, is a
    UserError, as is what cannot be set aside on an object store. Call it before Ray starts."""
    if recorded is None:
        return False
    names = state_files(experiment)
    damaged, trials = [], None
    for name in names:
        trials = read_state(experiment.join(name))
        if trials is not None:
            break
        damaged.append(name)
    known = {t.folder for t in trials or [] if t.folder}
    folders = [
        i.base_name
        for i in experiment.listdir()
        if i.type == pafs.FileType.Directory and i.base_name.startswith(TRIAL_DIR_PREFIX)
    ]
    studies = experiment.join(STUDY_FILE)
    if spec.search is not None and (known or folders) and not studies.exists():
        raise UserError(
            f"{studies.uri}: the studies of this sweep are missing, though its trials ran; "
            "restore the file, or run the sweep file with --fresh to start again"
        )
    if studies.is_local and os.path.exists(f"{studies.path}-journal"):
        # A run killed while it wrote them: SQLite undoes that write on the next writable read
        # (this run holds the lock), which readers, opening the studies read-only, cannot do.
        with contextlib.closing(sqlite3.connect(studies.path)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchall()
    told = told_trials(spec, experiment)
    strays = [f for f in folders if f not in known and not any(is_trial_folder(f, t) for t in told)]
    files = [i.base_name for i in experiment.listdir() if i.type == pafs.FileType.File]
    aside = [f for name in damaged for f in files if run_files(name).match(f)] + strays
    if not aside:
        return trials is not None
    if damaged:
        reason = f"Ray's state {damaged[0]} cannot be read (cut short when the run was stopped?)"
    elif trials is None:
        reason = "the sweep was stopped before Ray first saved its state"
    else:
        reason = "trials started after Ray last saved its state"
    then = (
        f"resuming from {names[len(damaged)]}" if trials is not None else "its trials start again"
    )
    if not experiment.is_local:
        raise UserError(
            f"{experiment.uri}: {reason}, and on this storage what the run would not use again "
            "cannot be moved aside; run the sweep file with --fresh to start it again"
        )
    where = set_aside(experiment, aside)
    moved = f"{len(strays)} trial folders, {len(aside) - len(strays)} files of Ray's"
    print(
        f"lbs-tune: warning: {reason}: {then}; what no run will use again ({moved}) moved to "
        f"{experiment.join(where).uri}",
        file=sys.stderr,
    )
    return trials is not None


def check_writable(storage: Location) -> None:
    """UserError unless a file can be written in `storage`: a path under a file, a read-only
    folder or a full disk is found before Ray starts, not after; nothing is left behind."""
    probe = storage.join(f".lbs-write-check-{os.getpid()}")
    try:
        with scaffolding(storage):
            probe.write_text("lbs-tune checks that it can write here\n")
            probe.fs.delete_file(probe.path)
    except OSError as exc:
        reason = exc.strerror or str(exc).splitlines()[0]
        raise UserError(
            f"--storage {storage.uri}: cannot write there ({reason}); choose a folder you can "
            "write, with free space"
        ) from None


def before_starting(spec: SweepSpec, ray_args: dict[str, Any]) -> None:
    """What refuses a run before Ray starts: a cluster address nobody answers at; for a local
    sweep, trials that ask for more than this machine has, or missing data files (a cluster's
    nodes have their own)."""
    if ray_args.get("address"):
        check_reachable(ray_args["address"])
        return
    have = {"cpu": ray_args.get("cpus"), "gpu": ray_args.get("gpus")}
    if have["cpu"] is None:
        have["cpu"] = _local_cpus()
    if have["gpu"] is None:
        have["gpu"] = _local_gpus()
    short = shortfall(spec, have)
    if short:
        key, asked, batch = short
        given = ray_args.get(f"{key}s") is not None
        where = (
            f"the local Ray has {have[key]} (--{key}s)"
            if given
            else f"this machine has {have[key]}"
        )
        fix = "gpu=0 to train on the CPU" if key == "gpu" else f"cpu={have[key]} (or less)"
        raise UserError(
            f"resources.{key}: a trial of batch size {batch} asks for {asked:g} {key.upper()}, "
            f"but {where}: it would wait forever; run with --set resources.{fix}, or join a "
            "cluster that has them with --address"
        )
    prepare_data(spec)


def shortfall(spec: SweepSpec, have: dict[str, float]) -> tuple[str, float, int] | None:
    """(resource, amount, batch size) of the first trial of `spec` that asks for more of a
    resource ('cpu', 'gpu') than `have` holds, or None if every trial fits."""
    for config in spec.trials:
        asked = dict(zip(("cpu", "gpu"), spec.resources.for_batch(config.batch_size), strict=True))
        for key, amount in asked.items():
            if amount > have[key]:
                return key, amount, config.batch_size
    return None


def _local_cpus() -> int:
    """The CPUs a local Ray counts on this machine (its own count, cgroup limits included)."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:  # another Ray: the machine's count
        return os.cpu_count() or 1
    return get_num_cpus()


def _local_gpus() -> int:
    """The GPUs a local Ray finds (CUDA_VISIBLE_DEVICES respected)."""
    import torch

    return torch.cuda.device_count()


def waiting_for(spec: SweepSpec) -> None:
    """On a joined cluster: one line if a trial asks for more than the cluster has now, so that
    a sweep waiting for an autoscaler (or for nothing) says what it waits for."""
    import ray

    total = ray.cluster_resources()
    have = {"cpu": total.get("CPU", 0), "gpu": total.get("GPU", 0)}
    short = shortfall(spec, have)
    if short:
        key, asked, batch = short
        print(
            f"lbs-tune: waiting for the cluster to grow: a trial of batch size {batch} asks for "
            f"{asked:g} {key.upper()} (resources.{key}) and the cluster has {have[key]:g} now; "
            "an autoscaler may add nodes; if none will, stop this run and run it with less",
            file=sys.stderr,
        )
