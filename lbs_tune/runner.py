"""`lbs-tune run` and `lbs-tune resume`: start or join Ray, build the Tuner, resume a sweep.

The experiment folder is `<storage>/<name>`: Ray Tune's own files plus `lbs_sweep.json` (the
resolved spec, its digest, the lbs-tune version, the git commit, the command, the times). Running
the same spec again resumes it (finished trials kept; interrupted and errored ones continue from
their newest checkpoint; pending ones start); another spec under the same name is refused.

Every run makes a new Tuner from this run's settings and folder, and resumes the trials of Ray's
newest readable state there (`resume_point`): a sweep stopped at any moment, or copied or moved
elsewhere, ends with exactly the trials it asks for, in its own folder.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lbs_tune.config import SEARCH_KEY, SweepSpec, changes, data_dir, set_dotted
from lbs_tune.errors import UserError
from lbs_tune.experiment import (
    SWEEP_FILE,
    TRIAL_DIR_PREFIX,
    DiskFull,
    count_outcomes,
    disk_room,
    exclusive,
    finished_sweep,
    has_record,
    read_record,
    read_state,
    record_end,
    record_start,
    run_files,
    set_aside,
    state_files,
)
from lbs_tune.provenance import provenance
from lbs_tune.spec import check_spec, load_spec
from lbs_tune.storage import Location, locate, scaffolding
from lbs_tune.studies import STUDY_FILE

DEFAULT_STORAGE = "results"
SYNC_PERIOD_S = 10


# ============================================================================ The trials


def trial_configs(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every grid point's trial config as JSON data, in grid order: the spec's resolved trials
    (`lbs_tune.spec.check_spec` made their paths absolute), each key written out (defaults
    too), so every trial's params.json is its whole config. Ray's trials are made from these."""
    return [trial.model_dump(mode="json") for trial in spec.trials]


def param_space(spec: SweepSpec, grid_search) -> dict[str, Any]:
    """The Tuner's param space of a grid sweep: the first resolved trial config with each grid
    key a `grid_search` over the resolved trials' values (Ray accepts only preset points whose
    keys and values the param space holds; the points themselves are `trial_configs`)."""
    configs = trial_configs(spec)
    space = copy.deepcopy(configs[0])
    for key in spec.grid:
        values = [_dotted(c, key) for c in configs]
        set_dotted(space, key, grid_search(list(dict.fromkeys(map(_frozen, values)))))
    return space


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _frozen(value: Any) -> Any:
    # Lists (a shape, milestones) as tuples, so equal values count once.
    return tuple(value) if isinstance(value, list) else value


def trial_dirname(keys: tuple[str, ...], trial) -> str:
    """A trial folder's name: Ray's trial id and the grid (and search) keys that tell it apart,
    short enough for any file system ('train_trial_1a2b3_00004_batch_size=64,lr.scaling=none')."""
    tag = ",".join(f"{key}={_dotted(trial.config, key)}" for key in keys)
    tag = "".join(c if c.isalnum() or c in "=,._-" else "_" for c in tag)[:120]
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}_{tag}".rstrip("_")


def start_order(spec: SweepSpec) -> list[int]:
    """The grid points' indices in the order their trials start: longest first by an estimated
    cost (steps x seconds per step from the H200 throughput table of lbs_tune.schedule; models
    it lacks cost like ResNet-20, which keeps the order of batch sizes right), or grid order."""
    if spec.schedule == "grid":
        return list(range(len(spec.trials)))
    from lbs_tune import schedule
    from lbs_tune.data import DATASETS

    jobs = schedule.sweep_jobs(
        spec,
        lambda c: DATASETS[c.dataset].train_size(c.data),
        schedule.H200_DEVICE_RESIDENT,
        stand_in="resnet20",
    )
    return schedule.longest_first([job.seconds for job in jobs])


def print_dry_run(spec: SweepSpec, experiment: Location, recorded: dict | None) -> None:
    """The trials that would run: grid point and resources, one line each (for a searched sweep,
    one line per grid point's study, with the space, the sampler and the number of trials)."""
    points = spec.points()
    search = spec.search
    print(f"sweep {spec.name}: {spec.trial_count} trials -> {experiment.uri}")
    if search is not None:
        space = ", ".join(f"{k} {json.dumps(v)}" for k, v in search.dump()["space"].items())
        print(
            f"  search: {search.trials_per_point} trials per grid point ({len(points)} studies), "
            f"sampler {search.sampler} (seed {search.seed}), objective {search.objective}; "
            f"space: {space}"
        )
    if recorded is not None and recorded["digest"] == spec.digest():
        print("  (a sweep of this spec is there: running would resume it)")
    elif recorded is not None:
        diff = changes(recorded["spec"], spec.model_dump(mode="json"))
        print(
            f"  (a sweep of another spec is there ({diff}): running would be refused; "
            "--fresh moves it aside)"
        )
    order = start_order(spec) if search is None else list(range(len(points)))
    if spec.schedule == "longest_first" and search is None:
        print("  (trials start longest first: schedule: grid keeps the grid's order)")
    for i in order:
        point, config = points[i], spec.trials[i]
        cpu, gpu = spec.resources.for_batch(config.batch_size)
        grid = ", ".join(f"{k}={v}" for k, v in point.items()) or "(base config)"
        print(f"  {i:4d}  {grid}  [cpu {cpu:g}, gpu {gpu:g}]")


# ============================================================================ The folder


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


# ============================================================================ Ray


def prepare_data(spec: SweepSpec) -> None:
    """For a cluster on this machine: check that the dataset files are there (a missing file is
    a UserError before anything starts, not a failure of every trial), and generate or resize
    datasets once (MNIST-1D, Cityscapes), so that trials starting together don't all do it."""
    from lbs_tune.data import load_raw
    from lbs_tune.formats import DATASET_NAMES, LOCAL_DATASET_NAMES, check_files

    seen = set()
    for config in spec.trials:
        key = (config.dataset, config.data.dir, config.data.samples, config.data.image_size)
        if key in seen:
            continue
        seen.add(key)
        # WikiText-2 and Cityscapes cannot be downloaded: their files must be there.
        if config.dataset in LOCAL_DATASET_NAMES or (
            config.dataset in DATASET_NAMES and not config.data.download
        ):
            check_files(config.dataset, data_dir(config.data))
        if config.dataset in ("mnist1d", "cityscapes"):
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


def _use_token_if_there() -> None:
    """Ray turns token auth on by itself only for clusters it finds; with an explicit address it
    must be told, so use the token whenever one is there (RAY_AUTH_MODE still wins). Ray has no
    public call for this: without its private one (a Ray other than 2.60), say how to do it."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        if "RAY_AUTH_MODE" not in os.environ:
            print(
                "lbs-tune: warning: this Ray cannot be told to use ~/.ray/auth_token; if the "
                "cluster asks for a token, set RAY_AUTH_MODE=token",
                file=sys.stderr,
            )
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def start_ray(
    address: str | None = None,
    cpus: int | None = None,
    gpus: int | None = None,
    log_to_driver: bool = True,
) -> None:
    """Join the cluster at `address`, or start a local one with the dashboard on. The trials'
    stdout and stderr reach this process only with `log_to_driver`.

    A local Ray listens on the loopback only (GCS, raylets, workers, the metrics endpoint, the
    dashboard): Ray takes 127.0.0.1 as its node address when told this machine is no cluster
    node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by Ray and by every process it starts).
    Trials see the environment of the node they run on: a local cluster's nodes inherit this
    process's (LBS_DATA_DIR included); a cluster's nodes have their own (see docker/).
    """
    if not address:
        os.environ[LOCAL_ONLY] = "0"
    import ray

    if ray.is_initialized():
        return
    if address:
        _use_token_if_there()
        _check_reachable(address)
        try:
            context = ray.init(address=address, log_to_driver=log_to_driver)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"--address {address}: cannot join the Ray cluster ({reason})"
            ) from None
    else:
        _loopback_in_this_process()
        # address="local": always a new cluster, never one that happens to run on this machine.
        context = ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=gpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=log_to_driver,
        )
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}")
        print(f"  {_auth_mode()}")


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_in_this_process() -> None:
    """Ray reads LOCAL_ONLY when it is imported: if it was imported before (a test, a notebook),
    set what it read. Without that module (another Ray), the loopback is not guaranteed."""
    try:
        from ray._private import ray_constants
    except ImportError:
        return
    ray_constants.ENABLE_RAY_CLUSTER = False


def _auth_mode() -> str:
    """One line that says how to sign in to the dashboard, from the mode Ray really runs in."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return "sign in with the token in ~/.ray/auth_token if the dashboard asks for one"
    if is_token_auth_enabled():
        return (
            "token authentication is on: sign in with the token in ~/.ray/auth_token "
            "(`ray get-auth-token` prints it)"
        )
    return (
        "token authentication is OFF (RAY_AUTH_MODE=disabled or a cluster without a token): "
        "whoever reaches the dashboard controls the cluster"
    )


def _summary(spec: SweepSpec, experiment: Location, results, started: float) -> tuple[str, int]:
    """The sweep's final line and exit code: the trials that ran of the `spec.trial_count` it
    asks for, by outcome, and the wall time; 0 if they all ran and none errored. Ray's
    `results` lack a searched trial that was told to its study after Ray last saved its state
    before an interruption: its study counts it."""
    outcomes = {
        Path(r.path).name: (
            "ERROR" if r.error is not None else "TERMINATED",
            bool((r.metrics or {}).get("diverged")),
        )
        for r in results
    }
    for trial in _told(spec, experiment):
        folder = f"{TRIAL_DIR_PREFIX}{trial['ray_trial_id']}_"
        if not any(name.startswith(folder) for name in outcomes):
            outcomes[folder] = ("TERMINATED", bool(trial["diverged"]))
    counts = count_outcomes(outcomes.values())
    wall = time.monotonic() - started
    ran, asked = len(outcomes), spec.trial_count
    line = ", ".join(f"{n} {label}" for label, n in counts.items() if label != "running or pending")
    line = f"{ran} of {asked} trials: {line}, wall time {wall:.0f} s"
    if ran < asked:
        line += f"; {asked - ran} did not run: run the same command again to run them"
    elif ran > asked:
        line += f"; {ran - asked} more than the sweep asks for (see lbs-tune status)"
    return line, 1 if counts["errored"] or ran != asked else 0


def _told(spec: SweepSpec, experiment: Location) -> list[dict[str, Any]]:
    """The trials of a searched sweep's studies that were told their outcome (read-only)."""
    if spec.search is None or not experiment.is_local:
        return []
    from lbs_tune.studies import read_studies

    return [
        trial
        for study in read_studies(experiment.path)
        for trial in study.trials
        if trial["state"] in ("COMPLETE", "FAIL")
    ]


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
    told = {f"{TRIAL_DIR_PREFIX}{t['ray_trial_id']}_" for t in _told(spec, experiment)}
    strays = [f for f in folders if f not in known and not any(f.startswith(t) for t in told)]
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


def execute(
    spec: SweepSpec,
    experiment: Location,
    recorded: dict | None,
    verbose: bool = False,
    table: Callable[[str], str] | None = None,
    **ray_args,
) -> int:
    """Run (or resume) the sweep into `experiment`; return the exit code. `verbose` keeps Ray's
    own output; `table` (experiment URI -> text) is printed at the end."""
    started = time.monotonic()
    from lbs_tune.console import ray_init_options
    from lbs_tune.loggers import callbacks as logger_callbacks

    # A missing logger package is refused before Ray starts, and so are damaged studies.
    loggers = logger_callbacks(spec, experiment)
    resume = resume_point(spec, experiment, recorded)
    with ray_running(**ray_args, **ray_init_options(verbose, ray_args.get("address"))):
        return _fit(
            spec,
            experiment,
            recorded,
            resume,
            loggers,
            started,
            verbose,
            table,
            ray_args.get("address"),
        )


@contextlib.contextmanager
def ray_running(**options) -> Iterator[None]:
    """Join Ray or start it (`start_ray(**options)`) for the body. A Ray started here is shut
    down after it, and the forkserver folders its dashboard leaves in $TMPDIR are removed, as
    are those of earlier local sweeps that were killed (lbs_tune.leftovers)."""
    from lbs_tune.leftovers import pymp_folders, remove_forkserver_folders

    ray = sys.modules.get("ray")  # not imported here: start_ray sets what Ray reads on import
    here = not options.get("address") and not (ray and ray.is_initialized())
    before = pymp_folders()
    if here:
        remove_forkserver_folders()
    start_ray(**options)
    try:
        yield
    finally:
        if here:
            import ray

            ray.shutdown()
            remove_forkserver_folders(wait_for=pymp_folders() - before, wait_s=5)


def _fit(
    spec: SweepSpec,
    experiment: Location,
    recorded: dict | None,
    resume: bool,
    loggers: list,
    started: float,
    verbose: bool,
    table: Callable[[str], str] | None,
    ray_address: str | None,
) -> int:
    """The sweep on a running Ray: the Tuner made, fitted, and its outcome printed."""
    from ray import tune

    from lbs_tune.console import Console
    from lbs_tune.leftovers import driver_folder
    from lbs_tune.trainable import DiskWatch, HereScheduler, placement, train_trial

    console = Console(spec, experiment, verbose=verbose, table=table)
    if ray_address:
        _waiting_for(spec)

    data_dirs = sorted({str(data_dir(t.data)) for t in spec.trials})
    studies = _studies(spec, experiment)
    record_start(
        experiment,
        spec.model_dump(mode="json"),
        spec.digest(),
        recorded,
        data_dirs,
        studies,
        machine=provenance(),
    )
    keep = spec.trials[0].keep_checkpoints
    gpu_of = functools.partial(_gpu_for_batch, spec.resources)
    trainable = tune.with_resources(
        train_trial, functools.partial(placement, cpu=spec.resources.cpu, gpu_by_batch=gpu_of)
    )
    # Each trial's config comes whole from the search algorithm: a point of the resolved list
    # `trial_configs` (within the param space that Ray asks for), or a study's suggestion.
    if spec.search is None:
        space, (options, stop) = param_space(spec, tune.grid_search), (_order(spec), None)
    else:
        space, (options, stop) = {}, _searched(spec, experiment)
    # A new Tuner every run, also to resume: a restored one (Tuner.restore) would bring the
    # search algorithm, scheduler and callbacks pickled by the first run, with its folder. Ray
    # resumes the trials of its saved state in this folder (`resume_config`, Tuner's own way
    # in: it passes _tuner_kwargs to tune.run).
    if resume:
        print(f"resuming sweep {spec.name} in {experiment.uri}")
    resume_config = tune.ResumeConfig(errored=tune.ResumeConfig.ResumeType.RESUME)
    keys = (*spec.grid, *((SEARCH_KEY + ".number",) if spec.search else ()))
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.metric.name,
            mode=spec.metric.mode,
            reuse_actors=True,
            trial_dirname_creator=functools.partial(trial_dirname, keys),
            scheduler=HereScheduler(experiment),
            **options,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=experiment.parent().uri,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
            # Trial files reach the storage from the driver's staging folder at most every
            # sync_period (Ray's default is 5 minutes): keep status and reports current.
            sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
            stop=stop,
            callbacks=[*loggers, DiskWatch(experiment, spec.trial_count)],
        ),
        _tuner_kwargs={"resume_config": resume_config} if resume else None,
    )
    try:
        with driver_folder():
            results = console.fit(tuner)
    except DiskFull as full:
        raise UserError(str(full)) from None
    except Exception:
        # What a full disk breaks first may be a write of the studies or of Ray's.
        full = disk_room(experiment, running=1, unfinished=spec.trial_count)
        if full is None:
            raise
        raise UserError(str(full)) from None
    line, code = _summary(spec, experiment, results, started)
    record_end(experiment)
    console.finish(f"sweep {spec.name}: {line}")
    return code


def _order(spec: SweepSpec) -> dict[str, Any]:
    """TuneConfig arguments that make one trial per grid point, in `start_order`: Ray creates
    trials in its search algorithm's order and starts them in that order as resources free up."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    configs = trial_configs(spec)
    points = [configs[i] for i in start_order(spec)]
    # With a search algorithm Ray ignores max_concurrent_trials: the generator limits instead.
    generator = BasicVariantGenerator(
        points_to_evaluate=points, max_concurrent=spec.max_concurrent or 0
    )
    return {"num_samples": len(points), "search_alg": generator}


def _studies(spec: SweepSpec, experiment: Location) -> dict[str, str]:
    """For a searched sweep, where its Optuna studies live (printed, and kept in the record)."""
    if spec.search is None:
        return {}
    from lbs_tune.studies import study_storage

    if not experiment.is_local:
        raise UserError(
            f"--storage {experiment.parent().uri}: a sweep with a `search` keeps its Optuna "
            "studies in SQLite, which needs a local or shared folder, not an object store"
        )
    url, dashboard = study_storage(experiment.path)
    print(f"Optuna studies: {url}\n  watch them with: {dashboard}")
    return {"optuna_storage": url}


def _searched(spec: SweepSpec, experiment: Location) -> tuple[dict, Any]:
    """(TuneConfig arguments, stop condition) of a searched sweep: one Optuna study per grid
    point (lbs_tune.searcher), trials_per_point trials each; a steps-to-target trial stops at its
    first report that reaches the target."""
    from lbs_tune.searcher import StudySearcher
    from lbs_tune.studies import objective_for

    objective = objective_for(spec.search, spec.metric, spec.target)
    searcher = StudySearcher(
        spec.search, spec.points(), trial_configs(spec), experiment.path, objective
    )
    options = {
        "search_alg": searcher,
        "num_samples": spec.trial_count,
        "max_concurrent_trials": spec.max_concurrent,
    }
    stop = objective.stop if objective.kind == "steps_to_target" else None
    return options, stop


def _gpu_for_batch(resources, batch_size: int) -> float:
    return resources.for_batch(batch_size)[1]


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


def run(
    spec_path: Path,
    overrides: list[str] = (),
    storage: str = DEFAULT_STORAGE,
    name: str | None = None,
    fresh: bool = False,
    dry_run: bool = False,
    force_unlock: bool = False,
    verbose: bool = False,
    table: Callable[[str], str] | None = None,
    **ray_args,
) -> int:
    """`lbs-tune run`: validate the spec, then run or resume it under `<storage>/<name>`, as the
    only writer of that experiment."""
    spec = load_spec(spec_path, list(overrides) + ([f"name={name}"] if name else []))
    experiment = locate(storage).join(spec.name)
    if dry_run:
        recorded = read_record(experiment) if has_record(experiment) else None
        print_dry_run(spec, experiment, recorded)
        return 0
    done = None if fresh else finished_sweep(experiment, spec.digest(), spec.trial_count)
    if done:  # read from the folder alone: no Ray, no lock, the record untouched
        print(done)
        return 0
    check_writable(experiment.parent())
    with scaffolding(experiment.parent()), exclusive(experiment, force_unlock):
        # The folder's checks first (they read a file; the data may take minutes to make), the
        # move aside of --fresh last (a run refused for its data leaves the old sweep in place).
        recorded = prepare_folder(spec, experiment, fresh=False) if not fresh else None
        _before_starting(spec, ray_args)
        if fresh:
            prepare_folder(spec, experiment, fresh=True)
        return execute(spec, experiment, recorded, verbose, table, **ray_args)


def resume(
    experiment_path: str,
    force_unlock: bool = False,
    verbose: bool = False,
    table: Callable[[str], str] | None = None,
    **ray_args,
) -> int:
    """`lbs-tune resume`: continue the sweep recorded in an experiment folder."""
    experiment = locate(experiment_path)
    if not has_record(experiment):
        raise UserError(
            f"{experiment.uri}: no {SWEEP_FILE} here; give the folder of an lbs-tune sweep"
        )
    recorded = read_record(experiment)
    meta = experiment.join(SWEEP_FILE)
    spec = check_spec(recorded["spec"], lambda key: f"{meta.uri} (spec.{key})")
    done = finished_sweep(experiment, spec.digest(), spec.trial_count)
    if done:  # read from the folder alone: no Ray, no lock, the record untouched
        print(done)
        return 0
    check_writable(experiment.parent())
    with exclusive(experiment, force_unlock):
        _before_starting(spec, ray_args)
        return execute(spec, experiment, recorded, verbose, table, **ray_args)


def _before_starting(spec: SweepSpec, ray_args: dict[str, Any]) -> None:
    """What refuses a run before Ray starts: a cluster address nobody answers at; for a local
    sweep, trials that ask for more than this machine has, or missing data files (a cluster's
    nodes have their own)."""
    if ray_args.get("address"):
        _check_reachable(ray_args["address"])
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


def _waiting_for(spec: SweepSpec) -> None:
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
