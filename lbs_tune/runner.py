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
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lbs_tune.cluster import start_ray
from lbs_tune.config import BRANCH_KEY, SEARCH_KEY, changes, data_dir
from lbs_tune.errors import UserError
from lbs_tune.experiment import (
    SWEEP_FILE,
    TRIAL_DIR_PREFIX,
    DiskFull,
    count_outcomes,
    disk_room,
    is_trial_folder,
    state_files,
)
from lbs_tune.lock import exclusive
from lbs_tune.names import get_dotted, hashable, set_dotted
from lbs_tune.preflight import (
    before_starting,
    check_writable,
    prepare_folder,
    resume_point,
    told_trials,
    waiting_for,
)
from lbs_tune.provenance import provenance
from lbs_tune.record import finished_sweep, has_record, read_record, record_end, record_start
from lbs_tune.spec import check_spec, load_spec
from lbs_tune.storage import Location, locate, scaffolding
from lbs_tune.sweep import SweepSpec

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
        values = [get_dotted(c, key) for c in configs]
        set_dotted(space, key, grid_search(list(dict.fromkeys(map(hashable, values)))))
    return space


def trial_dirname(keys: tuple[str, ...], trial) -> str:
    """A trial folder's name: Ray's trial id and the grid (and search) keys that tell it apart,
    short enough for any file system ('train_trial_1a2b3_00004_batch_size=64,lr.scaling=none');
    a key the trial's config lacks is left out (a confirmation run has `search.confirm`, a
    search trial `search.number`)."""
    values = [(key, get_dotted(trial.config, key)) for key in keys]
    tag = ",".join(f"{key}={value}" for key, value in values if value is not None)
    tag = "".join(c if c.isalnum() or c in "=,._-" else "_" for c in tag)[:120]
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}_{tag}".rstrip("_")


def trial_costs(spec: SweepSpec) -> list[float]:
    """One trial's estimated cost at each grid point, in `spec.trials` order: steps x seconds
    per step from the H200 throughput table of lbs_tune.schedule (models it lacks cost like
    ResNet-20, which keeps the order of batch sizes right). The start order and the console's
    time left read it."""
    from lbs_tune import schedule
    from lbs_tune.datasets import DATASETS

    jobs = schedule.sweep_jobs(
        spec,
        lambda c: DATASETS[c.dataset].train_size(c.data),
        schedule.H200_DEVICE_RESIDENT,
        stand_in="resnet20",
    )
    return [job.seconds for job in jobs]


def start_order(spec: SweepSpec) -> list[int]:
    """The grid points' indices in the order their trials start: longest first by
    `trial_costs`, or grid order."""
    if spec.schedule == "grid":
        return list(range(len(spec.trials)))
    from lbs_tune import schedule

    return schedule.longest_first(trial_costs(spec))


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
        if search.confirm is not None:
            print(
                f"  confirm: the best {search.confirm.top} of each study again on "
                f"{search.confirm.seeds} fresh seeds ({search.confirm_runs} runs per grid point)"
            )
    if recorded is not None and recorded["digest"] == spec.digest():
        print("  (a sweep of this spec is there: running would resume it)")
    elif recorded is not None:
        diff = changes(recorded["spec"], spec.model_dump(mode="json"))
        print(
            f"  (a sweep of another spec is there ({diff}): running would be refused; "
            "--fresh moves it aside)"
        )
    if spec.branch is not None:
        branch = spec.branch
        print(
            f"  branch: the base config as the reference, then {len(branch.points)} points x "
            f"{len(branch.multiples)} multiples x {len(branch.seeds)} seeds, then a planned "
            f"schedule vs constant small and large batches x {len(branch.compared_seeds)} seeds"
        )
    order = start_order(spec) if search is None else list(range(len(points)))
    if spec.schedule == "longest_first" and search is None and spec.branch is None:
        print("  (trials start longest first: schedule: grid keeps the grid's order)")
    for i in order:
        point, config = points[i], spec.trials[i]
        cpu, gpu = spec.resources.for_batch(config.batch_size)
        grid = ", ".join(f"{k}={v}" for k, v in point.items()) or "(base config)"
        print(f"  {i:4d}  {grid}  [cpu {cpu:g}, gpu {gpu:g}]")


# ============================================================================ Ray


def _summary(spec: SweepSpec, experiment: Location, results, started: float) -> tuple[str, int]:
    """The sweep's final line and exit code: the trials that ran of the `spec.trial_count` it
    asks for, by outcome, and the wall time; 0 if they all ran and none errored. Ray's
    `results` lack a searched trial that was told to its study after Ray last saved its state
    before an interruption: its study counts it."""
    from lbs_tune.studies import diverged_as_told

    told = told_trials(spec, experiment)
    outcomes = {}
    for r in results:
        name = Path(r.path).name
        study = next((t for ray_id, t in told.items() if is_trial_folder(name, ray_id)), None)
        diverged = diverged_as_told(bool((r.metrics or {}).get("diverged")), study)
        outcomes[name] = ("ERROR" if r.error is not None else "TERMINATED", diverged)
    for ray_id, trial in told.items():
        if not any(is_trial_folder(name, ray_id) for name in outcomes):
            diverged = diverged_as_told(bool(trial["diverged"]), trial)
            outcomes[f"{TRIAL_DIR_PREFIX}{ray_id}"] = ("TERMINATED", diverged)
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
    from lbs_tune.leftovers import driver_folder, remove_dead_staging
    from lbs_tune.loggers import without_auto_loggers
    from lbs_tune.trainable import (
        DiskWatch,
        HereScheduler,
        KeepReports,
        RecordOutOfSync,
        placement,
        train_trial,
    )

    console = Console(spec, experiment, table=table, costs=trial_costs(spec))
    if ray_address:
        waiting_for(spec)

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
    reports = KeepReports()
    if spec.branch is not None:
        space, (options, stop) = {}, (_branched(spec, experiment), None)
    elif spec.search is None:
        space, (options, stop) = param_space(spec, tune.grid_search), (_order(spec), None)
    else:
        space, (options, stop) = {}, _searched(spec, experiment)
        options["search_alg"].keep = reports.keep
    # A new Tuner every run, also to resume: a restored one (Tuner.restore) would bring the
    # search algorithm, scheduler and callbacks pickled by the first run, with its folder. Ray
    # resumes the trials of its saved state in this folder (`resume_config`, Tuner's own way
    # in: it passes _tuner_kwargs to tune.run).
    states = state_files(experiment) if resume else []
    if resume:
        print(f"resuming sweep {spec.name} in {experiment.uri}")
        remove_dead_staging(experiment.name, states)
    resume_config = tune.ResumeConfig(errored=tune.ResumeConfig.ResumeType.RESUME)
    searched = (f"{SEARCH_KEY}.number", f"{SEARCH_KEY}.confirm") if spec.search else ()
    keys = (*spec.grid, *searched, *((f"{BRANCH_KEY}.label",) if spec.branch else ()))
    # Without --verbose the console takes the place of Ray's output: a callback, verbosity 0.
    quiet = not verbose
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
            callbacks=[
                *loggers,
                *([console] if quiet else []),
                DiskWatch(experiment, spec.trial_count),
                reports,
                RecordOutOfSync(experiment.name, states),
            ],
            verbose=0 if quiet else None,
        ),
        _tuner_kwargs={"resume_config": resume_config} if resume else None,
    )
    try:
        with driver_folder(), without_auto_loggers():
            results = console.fit(tuner.fit, quiet=quiet)
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

    _local_only(experiment, "a sweep with a `search` keeps its Optuna studies in SQLite")
    url, dashboard = study_storage(experiment.path)
    print(f"Optuna studies: {url}\n  watch them with: {dashboard}")
    return {"optuna_storage": url}


def _searched(spec: SweepSpec, experiment: Location) -> tuple[dict, Any]:
    """(TuneConfig arguments, stop condition) of a searched sweep: one Optuna study per grid
    point (lbs_tune.searcher), trials_per_point trials each and their confirmation runs; the
    searcher's stop condition ends a steps-to-target trial at its first report that reaches the
    target, and a search trial that can no longer win (`search.prune`)."""
    from lbs_tune.searcher import StudySearcher
    from lbs_tune.studies import objective_for

    objective = objective_for(spec.search, spec.metric, spec.target)
    searcher = StudySearcher(
        spec.search, spec.points(), trial_configs(spec), experiment.path, objective
    )
    # One object: Ray pickles the searcher and its bound method into tuner.pkl together, so a
    # restored sweep's stop condition asks the restored searcher.
    return _asked_by(searcher, spec), searcher.stop


def _branched(spec: SweepSpec, experiment: Location) -> dict[str, Any]:
    """TuneConfig arguments of a branched sweep: its phases asked by lbs_tune.branch_searcher,
    whose state is a file of the (local) experiment folder."""
    from lbs_tune.branch_searcher import BranchSearcher
    from lbs_tune.data import dataset_info

    _local_only(
        experiment, "a branched sweep reads its reference's checkpoints and Ray's state from files"
    )
    reference = spec.trials[0]
    searcher = BranchSearcher(
        spec.branch,
        reference.model_dump(mode="json"),
        experiment.path,
        dataset_info(reference).train_size(reference.data),
    )
    return _asked_by(searcher, spec)


def _asked_by(searcher, spec: SweepSpec) -> dict[str, Any]:
    """TuneConfig arguments of a sweep whose trials `searcher` makes: all of its trials
    (`trial_count`), `max_concurrent` at once."""
    return {
        "search_alg": searcher,
        "num_samples": spec.trial_count,
        "max_concurrent_trials": spec.max_concurrent,
    }


def _local_only(experiment: Location, why: str) -> None:
    """Refuse an object store for a sweep that needs files: `why` says what it keeps there."""
    if not experiment.is_local:
        raise UserError(
            f"--storage {experiment.parent().uri}: {why}, which needs a local or shared "
            "folder, not an object store"
        )


def _gpu_for_batch(resources, batch_size: int) -> float:
    return resources.for_batch(batch_size)[1]


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
        before_starting(spec, ray_args)
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
        before_starting(spec, ray_args)
        return execute(spec, experiment, recorded, verbose, table, **ray_args)
