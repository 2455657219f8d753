"""`lbs-tune run` and `lbs-tune resume`: start or join Ray, build the Tuner, resume a sweep.

The experiment folder is `<storage>/<name>`: Ray Tune's own files plus `lbs_sweep.json` (the
resolved spec, its digest, the lbs-tune version, the git commit, the command, the times). Running
the same spec again resumes it (finished trials kept; interrupted and errored ones continue from
their newest checkpoint; pending ones start); another spec under the same name is refused.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lbs_tune import __version__
from lbs_tune.errors import UserError
from lbs_tune.spec import SweepSpec, TrialConfig, check_spec, flatten, load_spec, set_dotted
from lbs_tune.storage import Location, locate

SWEEP_FILE = "lbs_sweep.json"
DEFAULT_STORAGE = "results"
SYNC_PERIOD_S = 10


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_commit(folder: Path) -> str | None:
    """The commit checked out in `folder` ('+dirty' if it has changes); outside git, the one
    that $LBS_GIT_COMMIT names (the Docker image sets it to the commit it was built from)."""
    outside = os.environ.get("LBS_GIT_COMMIT") or None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return outside
    if commit.returncode != 0:
        return outside
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


# ============================================================================ The trials


def param_space(spec: SweepSpec, grid_search) -> dict[str, Any]:
    """The Tuner's param_space: every key of a full trial config, each grid key a grid_search.

    Every key is written out (defaults too), so each trial's params.json is its whole config.
    A relative `data.dir` is made absolute here: trial processes run inside their trial folders.
    """
    points = spec.points()
    tree = TrialConfig.model_validate(spec.trial_dict(points[0])).model_dump(mode="json")
    if tree["data"]["dir"]:
        tree["data"]["dir"] = str(Path(tree["data"]["dir"]).expanduser().resolve())
    for key, values in spec.grid.items():
        if key == "data.dir":
            values = [str(Path(v).expanduser().resolve()) for v in values]
        set_dotted(tree, key, grid_search(values))
    return tree


def trial_configs(spec: SweepSpec) -> list[TrialConfig]:
    """Every grid point as a validated TrialConfig, in grid order."""
    return [TrialConfig.model_validate(spec.trial_dict(p)) for p in spec.points()]


def print_dry_run(spec: SweepSpec, experiment: Location, recorded: dict | None) -> None:
    """The trials that would run: grid point and resources, one line each."""
    points = spec.points()
    print(f"sweep {spec.name}: {len(points)} trials -> {experiment.uri}")
    if recorded is not None and recorded["digest"] == spec.digest():
        print("  (a sweep of this spec is there: running would resume it)")
    elif recorded is not None:
        changes = _spec_changes(recorded["spec"], spec.model_dump(mode="json"))
        print(
            f"  (a sweep of another spec is there ({changes}): running would be refused; "
            "--fresh moves it aside)"
        )
    for i, (point, config) in enumerate(zip(points, trial_configs(spec), strict=True)):
        cpu, gpu = spec.resources.for_batch(config.batch_size)
        grid = ", ".join(f"{k}={v}" for k, v in point.items()) or "(base config)"
        print(f"  {i:4d}  {grid}  [cpu {cpu:g}, gpu {gpu:g}]")


# ============================================================================ The folder


def _spec_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = flatten(old), flatten(new)
    changed = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return "; ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")


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
        changes = _spec_changes(recorded["spec"], spec.model_dump(mode="json"))
        raise UserError(
            f"{experiment.uri} holds sweep '{spec.name}' with another spec ({changes}); "
            "run with --fresh to move it aside (nothing is deleted) or pick another --name"
        )
    return recorded


def record_start(experiment: Location, spec: SweepSpec, recorded: dict[str, Any] | None) -> None:
    """Write lbs_sweep.json: the spec and its digest, version, commit, command and times."""
    command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    meta = recorded or {
        "name": spec.name,
        "spec": spec.model_dump(mode="json"),
        "digest": spec.digest(),
        "lbs_tune_version": __version__,
        "git_commit": git_commit(Path.cwd()),
        "command": command,
        "started": now_iso(),
        "storage": experiment.uri,
        "runs": [],
    }
    meta["runs"] = [*meta["runs"], {"started": now_iso(), "command": command}]
    meta["ended"] = None
    experiment.join(SWEEP_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_record(experiment: Location) -> dict[str, Any]:
    """The sweep's lbs_sweep.json; a damaged one is the user's to restore (UserError)."""
    meta = experiment.join(SWEEP_FILE)
    try:
        record = json.loads(meta.read_text())
        problem = None if isinstance(record, dict) else "not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = f"not valid JSON: {exc}"
    if problem is None:
        missing = [k for k in ("spec", "digest") if k not in record]
        problem = f"no {' and '.join(missing)}" if missing else None
    if problem:
        raise UserError(
            f"{meta.uri}: damaged sweep record ({problem}); restore it, or run the sweep file "
            "with --fresh to move this sweep aside and start again"
        )
    return record


def record_end(experiment: Location) -> None:
    """Stamp the end time into lbs_sweep.json."""
    meta = read_record(experiment)
    meta["ended"] = now_iso()
    experiment.join(SWEEP_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# ============================================================================ Ray


def prepare_data(spec: SweepSpec) -> None:
    """For a cluster on this machine: check that the files of torchvision datasets are there
    (a missing file is a UserError before anything starts, not a failure of every trial), and
    generate embedded datasets once, so that trials starting together don't all do it."""
    from lbs_tune.data import data_dir, load_raw
    from lbs_tune.formats import DATASET_NAMES, check_files

    seen = set()
    for config in trial_configs(spec):
        key = (config.dataset, config.data.dir, config.data.samples)
        if key in seen:
            continue
        seen.add(key)
        if config.dataset in DATASET_NAMES and not config.data.download:
            check_files(config.dataset, data_dir(config.data))
        elif config.dataset == "mnist1d":
            load_raw(config)


def _check_reachable(address: str, timeout_s: float = 10) -> None:
    """A one-line UserError at once for a host:port nobody listens on (Ray itself retries for
    minutes). `auto` and addresses without a port are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"--address {address}: cannot join the Ray cluster (nothing answers at {host}:{port}: "
            f"{exc.strerror or exc}); start it with `ray start --head` or check the address"
        ) from None


def start_ray(address: str | None = None, cpus: int | None = None, gpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a local one with the dashboard on.

    Trials see the environment of the node they run on: a local cluster's nodes inherit this
    process's (LBS_DATA_DIR included); a cluster's nodes have their own (see docker/).
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        # Ray turns token auth on by itself only for clusters it finds; with an explicit address
        # it must be told, so use the token whenever one is there (RAY_AUTH_MODE still wins).
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        _check_reachable(address)
        try:
            context = ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"--address {address}: cannot join the Ray cluster ({reason})"
            ) from None
    else:
        # address="local": always a new cluster, never one that happens to run on this machine.
        context = ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=gpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}")
        print(
            "  token authentication is on: sign in with the token in ~/.ray/auth_token "
            "(`ray get-auth-token` prints it)"
        )


def _summary(results, started: float) -> tuple[str, int]:
    finished = diverged = errored = 0
    for result in results:
        if result.error is not None:
            errored += 1
        elif (result.metrics or {}).get("diverged"):
            diverged += 1
        else:
            finished += 1
    wall = time.monotonic() - started
    line = f"finished {finished}, diverged {diverged}, errored {errored}, wall time {wall:.0f} s"
    return line, errored


def execute(spec: SweepSpec, experiment: Location, recorded: dict | None, **ray_args) -> int:
    """Run (or resume) the sweep into `experiment`; return the exit code."""
    from ray import tune

    from lbs_tune.trainable import placement, train_trial

    started = time.monotonic()
    start_ray(**ray_args)
    record_start(experiment, spec, recorded)
    keep = TrialConfig.model_validate(spec.trial_dict({})).keep_checkpoints
    gpu_of = functools.partial(_gpu_for_batch, spec.resources)
    trainable = tune.with_resources(
        train_trial, functools.partial(placement, cpu=spec.resources.cpu, gpu_by_batch=gpu_of)
    )
    space = param_space(spec, tune.grid_search)
    if recorded is not None and tune.Tuner.can_restore(experiment.uri):
        print(f"resuming sweep {spec.name} in {experiment.uri}")
        tuner = tune.Tuner.restore(
            experiment.uri,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=spec.metric.name,
                mode=spec.metric.mode,
                max_concurrent_trials=spec.max_concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=experiment.name,
                storage_path=experiment.parent().uri,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
                # Trial files reach the storage from the driver's staging folder at most every
                # sync_period (Ray's default is 5 minutes): keep status and reports current.
                sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
            ),
        )
    results = tuner.fit()
    line, errored = _summary(results, started)
    record_end(experiment)
    print(f"sweep {spec.name}: {line}")
    print(f"next: lbs-tune report {experiment.uri}")
    return 1 if errored else 0


def _gpu_for_batch(resources, batch_size: int) -> float:
    return resources.for_batch(batch_size)[1]


def run(
    spec_path: Path,
    overrides: list[str] = (),
    storage: str = DEFAULT_STORAGE,
    name: str | None = None,
    fresh: bool = False,
    dry_run: bool = False,
    **ray_args,
) -> int:
    """`lbs-tune run`: validate the spec, then run or resume it under `<storage>/<name>`."""
    spec = load_spec(spec_path, list(overrides) + ([f"name={name}"] if name else []))
    experiment = locate(storage).join(spec.name)
    if dry_run:
        recorded = None
        if experiment.join(SWEEP_FILE).exists():
            recorded = read_record(experiment)
        print_dry_run(spec, experiment, recorded)
        return 0
    if not ray_args.get("address"):  # a cluster's nodes have their own data folders
        prepare_data(spec)
    recorded = prepare_folder(spec, experiment, fresh)
    return execute(spec, experiment, recorded, **ray_args)


def resume(experiment_path: str, **ray_args) -> int:
    """`lbs-tune resume`: continue the sweep recorded in an experiment folder."""
    experiment = locate(experiment_path)
    meta = experiment.join(SWEEP_FILE)
    if not meta.exists():
        raise UserError(
            f"{experiment.uri}: no {SWEEP_FILE} here; give the folder of an lbs-tune sweep"
        )
    recorded = read_record(experiment)
    spec = check_spec(recorded["spec"], lambda key: f"{meta.uri} (spec.{key})")
    if not ray_args.get("address"):
        prepare_data(spec)
    return execute(spec, experiment, recorded, **ray_args)
