"""The Ray Tune searcher of a searched sweep: one Optuna study per grid point (`lbs_tune.studies`),
all in one Ray Tune experiment. Imported by the runner alone (it subclasses Ray's `Searcher`).

Each suggestion is the grid point's resolved trial config (`SweepSpec.trials`, absolute paths)
with the drawn values set at their dotted keys and `search: {study, point, number}`; the Tuner's
param space is empty, so the suggestion is the trial's whole config. The Optuna trial records its
Ray trial id (user attr `ray_trial_id`).

Resume: Ray saves its trials' states some seconds after it creates them; a trial asked in
between is unknown to the restored experiment. Rebuilt from the storage, the searcher waits for
every RUNNING Optuna trial whose Ray trial is in Ray's newest experiment state (Ray runs it again,
same id and config) and offers the others again, with the same parameters, before asking anything
new: every study ends with exactly trials_per_point finished trials, and with the qmc sampler an
interrupted sweep asks exactly the parameters of an uninterrupted one. The studies are the
searcher's whole state: Ray's checkpoint of the searcher is a pointer.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from ray.tune.search import Searcher

from lbs_tune.config import SEARCH_KEY
from lbs_tune.errors import UserError
from lbs_tune.experiment import STATE_FILE
from lbs_tune.names import set_dotted
from lbs_tune.samplers import make_sampler
from lbs_tune.space import SearchSpec
from lbs_tune.studies import (
    DIVERGED,
    ERRORS,
    RAY_TRIAL,
    REASON,
    STUDY,
    STUDY_FILE,
    Objective,
    create_storage,
    finite_number,
    study_name,
    study_storage,
)


def _ray_trial_ids(folder: str) -> set[str]:
    """The trial ids of Ray Tune's newest experiment state in `folder`: the state that
    Tuner.restore restores (it takes the newest by name too), so these are the trials that Ray
    runs again or keeps; none if there is no state yet. A newer state that this run's driver
    is copying there right now (half a file) is passed over for the one before it."""
    states = sorted(p for p in Path(folder).iterdir() if STATE_FILE.match(p.name))
    for path in reversed(states):
        try:
            state = json.loads(path.read_text())
        except ValueError:
            continue
        return {json.loads(trial)["trial_id"] for trial, _ in state["trial_data"]}
    return set()


class _Run:
    """A searcher's view of the storage while a sweep runs (rebuilt from the storage alone)."""

    def __init__(self, searcher: StudySearcher):
        db = Path(searcher.folder, STUDY_FILE)
        if searcher.restored and not db.exists():
            raise UserError(
                f"{db}: the studies of this sweep are missing (was the experiment folder moved "
                "or the file deleted?); resume the sweep where it started, or run it with --fresh"
            )
        if not db.exists():
            create_storage(db)
        # A reader (optuna-dashboard) may hold the file for a moment: wait, don't fail.
        storage = optuna.storages.RDBStorage(
            study_storage(searcher.folder).url, engine_kwargs={"connect_args": {"timeout": 60}}
        )
        known = _ray_trial_ids(searcher.folder)
        self.studies: list[optuna.Study] = []
        self.asked: list[int] = []  # trials each study has asked (all states)
        self.live: dict[str, tuple[int, optuna.Trial]] = {}  # Ray trial id -> its Optuna trial
        self.values: dict[str, dict[int, float]] = {}  # Ray trial id -> reported {step: value}
        self.orphans: list[tuple[int, int]] = []  # (point, number): asked, unknown to Ray
        for index, name in enumerate(searcher.names):
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                direction=searcher.objective.direction,
                load_if_exists=True,
            )
            expected = searcher.study_attrs(index)
            found = study.user_attrs.get(STUDY)
            if found is None:
                study.set_user_attr(STUDY, expected)
            elif found != expected:
                raise UserError(
                    f"{db}: study '{name}' was made by another search (space, sampler, seed, "
                    "objective or grid); run this sweep with --fresh or under another --name"
                )
            trials = study.get_trials(deepcopy=False)
            for t in trials:
                ray_id = t.user_attrs.get(RAY_TRIAL)
                if t.state != optuna.trial.TrialState.RUNNING:
                    continue
                if ray_id in known:  # Ray runs it again under its id: wait for its reports
                    self.live[ray_id] = (index, optuna.trial.Trial(study, t._trial_id))
                    self.values[ray_id] = dict(t.intermediate_values)
                else:  # asked after Ray's last saved state: offer it again, same parameters
                    self.orphans.append((index, t.number))
            self.studies.append(study)
            self.asked.append(len(trials))


class StudySearcher(Searcher):
    """A Ray Tune Searcher: one Optuna study per grid point, in one experiment.

    StudySearcher(search, points, configs, folder, objective): `points` are the grid points
    ({dotted key: value}, SweepSpec.points()), `configs` their resolved trial configs (nested
    dicts, what the trainable gets), `folder` the local experiment folder holding optuna.db.
    """

    def __init__(
        self,
        search: SearchSpec,
        points: list[dict[str, Any]],
        configs: list[dict[str, Any]],
        folder: str | Path,
        objective: Objective,
    ):
        super().__init__(metric=None, mode=None)  # Ray's Searcher: Tune checks no metric of ours
        if len(points) != len(configs):
            raise ValueError(f"{len(points)} grid points but {len(configs)} configs")
        self.search = search
        self.points = [dict(p) for p in points]
        self.configs = copy.deepcopy(list(configs))
        self.names = [study_name(p) for p in self.points]
        self.folder = str(Path(folder).expanduser().resolve())
        self.objective = objective
        self.restored = False
        self._run: _Run | None = None

    # Ray pickles the searcher into tuner.pkl when the Tuner is made, and unpickles that copy on
    # Tuner.restore: keep only the plain settings; the studies are opened again from the storage.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_run": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def study_attrs(self, index: int) -> dict[str, Any]:
        """A study's user attr STUDY: its grid point and the search that made it."""
        return {
            "point": self.points[index],
            "index": index,
            "search": self.search.dump(),
            "objective": list(self.objective),
        }

    def _open(self) -> _Run:
        if self._run is None:
            self._run = _Run(self)
        return self._run

    # ------------------------------------------------------------------------ Ray's calls

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Tune passes the Tuner's param space here: it is empty (each suggestion is a whole
        trial config), and the metric and mode are the studies' own."""
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        """A trial for Ray: an orphan again if any, else a new trial of the study that has
        asked the fewest; FINISHED once every study has asked trials_per_point trials."""
        run = self._open()
        if run.orphans:
            index, number = run.orphans.pop(0)
            study = run.studies[index]
            study.sampler = make_sampler(self.search, index, number)
            frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
            trial = optuna.trial.Trial(study, frozen._trial_id)
            run.values[trial_id] = dict(frozen.intermediate_values)
        else:
            open_points = [i for i, n in enumerate(run.asked) if n < self.search.trials_per_point]
            if not open_points:
                return self.FINISHED
            index = min(open_points, key=lambda i: (run.asked[i], i))
            study = run.studies[index]
            study.sampler = make_sampler(self.search, index, run.asked[index])
            trial = study.ask()
            run.asked[index] += 1
            run.values[trial_id] = {}
        trial.set_user_attr(RAY_TRIAL, trial_id)
        # Already drawn parameters (an orphan's) come back as they are; missing ones are drawn.
        params = {key: _suggest(trial, key, d) for key, d in self.search.distributions().items()}
        run.live[trial_id] = (index, trial)
        return self._config(index, trial.number, params)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        run = self._open()
        if trial_id in run.live:
            self._record(run.live[trial_id][1], run.values[trial_id], result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Tell the study. An errored trial stays RUNNING (its `ray_errors` counted): Ray runs it
        again, same id and config, when the sweep is resumed (resume_errored). A trial told
        before (Ray ran it again after a restart) is left as it was."""
        run = self._open()
        entry = run.live.pop(trial_id, None)
        if entry is None:
            return
        index, trial = entry
        if error:
            trial.set_user_attr(ERRORS, trial.user_attrs.get(ERRORS, 0) + 1)
            return
        if result:
            self._record(trial, run.values[trial_id], result)
        diverged = bool((result or {}).get("diverged"))
        value, reason = self.objective.outcome(run.values.pop(trial_id), diverged)
        trial.set_user_attr(DIVERGED, diverged)
        state = optuna.trial.TrialState
        if value is None:
            trial.set_user_attr(REASON, reason)
            run.studies[index].tell(trial, state=state.FAIL)
        else:
            run.studies[index].tell(trial, value)

    def save(self, checkpoint_path: str) -> None:
        """Ray's searcher checkpoint: only a pointer, the state is the study storage."""
        storage = study_storage(self.folder)
        Path(checkpoint_path).write_text(json.dumps({"storage": storage.url}))

    def restore(self, checkpoint_path: str) -> None:
        """Called by Tuner.restore: the studies are read again from the storage on first use."""
        self.restored = True
        self._run = None

    # ------------------------------------------------------------------------ Helpers

    def _record(self, trial, values: dict[int, float], result: dict[str, Any]) -> None:
        """Keep a report's value of the objective's metric in `values` and as the trial's
        intermediate value (once per step: a resumed trial sends its earlier reports again)."""
        step, value = result.get("step"), finite_number(result.get(self.objective.metric))
        if step is None or value is None or step in values:
            return
        values[int(step)] = value
        trial.report(value, int(step))

    def _config(self, index: int, number: int, params: dict[str, Any]) -> dict[str, Any]:
        """The trial config of trial `number` of point `index`: the point's resolved config
        with the drawn `params` set, and its place in the studies under SEARCH_KEY."""
        full = copy.deepcopy(self.configs[index])
        for key, value in params.items():
            set_dotted(full, key, value)
        full[SEARCH_KEY] = {"study": self.names[index], "point": index, "number": number}
        return full


def _suggest(trial, key: str, dist) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)
