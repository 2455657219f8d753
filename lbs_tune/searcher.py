"""The Ray Tune searcher of a searched sweep: one Optuna study per grid point (`lbs_tune.studies`),
all in one Ray Tune experiment. Imported by the runner alone (it subclasses Ray's `Searcher`).

Each suggestion is the grid point's resolved trial config (`SweepSpec.trials`, absolute paths)
with the drawn values set at their dotted keys and `search: {study, point, number}`; the Tuner's
param space is empty, so the suggestion is the trial's whole config. The Optuna trial records its
Ray trial id (user attr `ray_trial_id`).

Confirmation runs (`search.confirm`): once a study has asked all its trials and none is running
(an errored one, which Ray gave up on, is left out), its `top` best trials (`studies.ranked`)
are fixed in a confirmation study (`confirm:<name>`, user attr CONFIRM) and each runs again on
every confirmation seed (`studies.confirmation_seeds`), as trials of the same Ray Tune
experiment with `search: {study, point, confirm, confirms}`. They are asked after every
search trial has been asked, the point with the fewest first.

Stopping (`stop`, Ray Tune's stop condition): a steps_to_target trial stops at its first report
that reaches the target; a search trial also stops once it can no longer be among the best
`confirm.top` (else the best one) of its study (`search.prune`): a report of the metric at a
step at or past the k-th best steps to target so far, without the target, makes its steps to
target more than k trials' of the study. It is told PRUNED with that step (`pruned_at`). With
`prune: median` or `hyperband` (objective metric) Optuna's pruner decides. Confirmation runs
are never pruned.

Resume: Ray saves its trials' states some seconds after it creates them; a trial asked in
between is unknown to the restored experiment. Rebuilt from the storage, the searcher waits for
every RUNNING Optuna trial whose Ray trial is in Ray's newest experiment state (Ray runs it again,
same id and config) and offers the others again, with the same parameters (a confirmation run:
the same configuration and seed, from its number and the fixed confirmed trials), before asking
anything new: every study ends with exactly trials_per_point finished trials and every
confirmation study with top x seeds; with the qmc sampler an interrupted sweep asks exactly the
parameters and the confirmation runs of an uninterrupted one (pruning never stops one of the
top trials, so the confirmed trials do not depend on when a trial was stopped). The studies are
the searcher's whole state: Ray's checkpoint of the searcher is a pointer. A trial's reports
reach the experiment folder before its study is told (`keep`, the runner's
`trainable.KeepReports`): a told trial, which no run makes again, has its reports there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from ray.tune.search import Searcher

from lbs_tune.config import SEARCH_KEY
from lbs_tune.errors import UserError
from lbs_tune.experiment import read_state, state_files
from lbs_tune.names import set_dotted
from lbs_tune.samplers import FixedSampler, make_sampler
from lbs_tune.space import SearchSpec
from lbs_tune.storage import locate
from lbs_tune.studies import (
    CONFIRM,
    CONFIRMS,
    DIVERGED,
    ERRORS,
    PRUNED_AT,
    RAY_TRIAL,
    REASON,
    SEED,
    STUDY,
    STUDY_FILE,
    TOTAL_STEPS,
    Objective,
    confirm_study_name,
    confirmation_seeds,
    create_storage,
    finite_number,
    ranked,
    study_name,
    study_storage,
    trial_record,
)

RUNNING = optuna.trial.TrialState.RUNNING


def _ray_trial_ids(folder: str) -> set[str]:
    """The trial ids of Ray Tune's newest readable experiment state in `folder`: the state that
    the run resumes (`preflight.resume_point`), so these are the trials that Ray runs again or
    keeps; none if there is no state yet. A newer state that this run's driver is copying there
    right now (half a file) is passed over for the one before it."""
    experiment = locate(folder)
    for name in state_files(experiment):
        trials = read_state(experiment.join(name))
        if trials is not None:
            return {t.trial_id for t in trials}
    return set()


class _Point:
    """One grid point's studies while the sweep runs."""

    def __init__(self, study: optuna.Study):
        self.study = study
        self.asked = 0  # trials the search study has asked (all states)
        self.best: list[float] = []  # COMPLETE trials' values, the best first
        self.confirm: optuna.Study | None = None  # the confirmation study, once fixed
        self.plan: dict[str, Any] | None = None  # its CONFIRM attr
        self.confirm_asked = 0

    def runs(self) -> int:
        """Confirmation runs of its plan (0 before the plan is fixed)."""
        return len(self.plan["confirms"]) * len(self.plan["seeds"]) if self.plan else 0


class _Live(NamedTuple):
    index: int  # the grid point
    trial: optuna.Trial
    confirm: bool  # a confirmation run


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
        self.storage = optuna.storages.RDBStorage(
            study_storage(searcher.folder).url, engine_kwargs={"connect_args": {"timeout": 60}}
        )
        known = _ray_trial_ids(searcher.folder)
        existing = set(optuna.get_all_study_names(self.storage))
        self.points: list[_Point] = []
        self.live: dict[str, _Live] = {}  # Ray trial id -> its Optuna trial
        self.values: dict[str, dict[int, float]] = {}  # Ray trial id -> reported {step: value}
        self.pruned: dict[str, int] = {}  # Ray trial id -> the step it was stopped at
        self.orphans: list[tuple[int, int, bool]] = []  # (point, number, confirm): unknown to Ray
        for index, name in enumerate(searcher.names):
            study = optuna.create_study(
                storage=self.storage,
                study_name=name,
                direction=searcher.objective.direction,
                pruner=searcher.pruner(),
                load_if_exists=True,
            )
            expected = searcher.study_attrs(index)
            found = study.user_attrs.get(STUDY)
            if found is None:
                study.set_user_attr(STUDY, expected)
            elif found != expected:
                raise UserError(
                    f"{db}: study '{name}' was made by another search (space, sampler, seed, "
                    "objective, confirm or grid); run this sweep with --fresh or under another "
                    "--name"
                )
            point = _Point(study)
            trials = study.get_trials(deepcopy=False)
            point.asked = len(trials)
            done = [t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            point.best = sorted(done, reverse=searcher.objective.direction == "maximize")
            self._adopt(study, trials, index, False, known)
            confirm = confirm_study_name(name)
            if confirm in existing:
                study = optuna.load_study(study_name=confirm, storage=self.storage)
                point.plan = study.user_attrs.get(CONFIRM)
                if point.plan is not None:  # else made, then killed before its plan: made again
                    point.confirm = study
                    trials = study.get_trials(deepcopy=False)
                    point.confirm_asked = len(trials)
                    self._adopt(study, trials, index, True, known)
            self.points.append(point)

    def _adopt(self, study, trials, index: int, confirm: bool, known: set[str]) -> None:
        """Wait for the RUNNING trials that Ray runs again; offer the others again."""
        for t in trials:
            if t.state != RUNNING:
                continue
            ray_id = t.user_attrs.get(RAY_TRIAL)
            if ray_id in known:  # Ray runs it again under its id: wait for its reports
                self.live[ray_id] = _Live(index, optuna.trial.Trial(study, t._trial_id), confirm)
                self.values[ray_id] = dict(t.intermediate_values)
            else:  # asked after Ray's last saved state: offer it again, same parameters
                self.orphans.append((index, t.number, confirm))

    def searched(self, index: int) -> bool:
        """Whether a point's search study has asked all its trials and runs none of them."""
        return not any(
            i == index and not confirm for i, _, confirm in [*self.live.values(), *self.orphans]
        )


class StudySearcher(Searcher):
    """A Ray Tune Searcher: one Optuna study per grid point, in one experiment.

    StudySearcher(search, points, configs, folder, objective): `points` are the grid points
    ({dotted key: value}, SweepSpec.points()), `configs` their resolved trial configs (nested
    dicts, what the trainable gets), `folder` the local experiment folder holding optuna.db.
    Give Ray Tune `stop` as the stop condition (`RunConfig(stop=searcher.stop)`).
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
        self.seeds = confirmation_seeds(search, [c.get("seed", 0) for c in self.configs])
        self.restored = False
        self._run: _Run | None = None
        # Called with a Ray trial id before its study is told (trainable.KeepReports.keep).
        self.keep: Callable[[str], None] | None = None

    # Ray pickles the searcher into tuner.pkl when the Tuner is made, and unpickles that copy on
    # Tuner.restore: keep only the plain settings; the studies are opened again from the storage.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_run": None, "keep": None}

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

    def pruner(self) -> optuna.pruners.BasePruner:
        """The studies' Optuna pruner: `prune: median` or `hyperband` (Optuna's defaults), else
        none (steps_to_target's own stop is `_cannot_win`)."""
        if self.search.prune == "median":
            return optuna.pruners.MedianPruner()
        if self.search.prune == "hyperband":
            return optuna.pruners.HyperbandPruner()
        return optuna.pruners.NopPruner()

    def _open(self) -> _Run:
        if self._run is None:
            self._run = _Run(self)
        return self._run

    # ------------------------------------------------------------------------ Ray's calls

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Tune passes the Tuner's param space here: it is empty (each suggestion is a whole
        trial config), and the metric and mode are the studies' own."""
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """A trial for Ray: an orphan again if any; else a new trial of the study that has
        asked the fewest; else, once every study has asked trials_per_point trials, the next
        confirmation run of the point with the fewest whose search is done; None (ask again
        later) while a search that is to be confirmed still runs; FINISHED when all is asked."""
        run = self._open()
        if run.orphans:
            index, number, confirm = run.orphans.pop(0)
            return self._offer(run, trial_id, index, number, confirm)
        points = run.points
        open_points = [i for i, p in enumerate(points) if p.asked < self.search.trials_per_point]
        if open_points:
            index = min(open_points, key=lambda i: (points[i].asked, i))
            return self._offer(run, trial_id, index, points[index].asked, False)
        if self.search.confirm is None:
            return self.FINISHED
        for index in range(len(points)):
            self._fix_plan(run, index)
        ready = [i for i, p in enumerate(points) if p.plan and p.confirm_asked < p.runs()]
        if ready:
            index = min(ready, key=lambda i: (points[i].confirm_asked, i))
            return self._offer(run, trial_id, index, points[index].confirm_asked, True)
        return self.FINISHED if all(p.plan for p in points) else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        run = self._open()
        if trial_id in run.live:
            self._record(run.live[trial_id].trial, run.values[trial_id], result)

    def stop(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Ray Tune's stop condition: True at a steps_to_target trial's first report that
        reaches the target, or when a search trial can no longer win (see the module's
        docstring). Ray calls it before `on_trial_result`, so the report is recorded here."""
        if self.objective.stop(trial_id, result):
            return True
        # prune: true stops nothing in a metric study (no trial is known to lose there).
        if self.search.prune is False or (
            self.search.prune is True and self.objective.kind != "steps_to_target"
        ):
            return False
        run = self._open()
        entry = run.live.get(trial_id)
        if entry is None or entry.confirm:
            return False
        self._record(entry.trial, run.values[trial_id], result)
        step, value = result.get("step"), finite_number(result.get(self.objective.metric))
        # A report without the metric, a diverged trial or its last step: it ends anyway.
        last = step is not None and step >= (result.get("total_steps") or float("inf"))
        if step is None or value is None or result.get("diverged") or last:
            return False
        if self.objective.kind == "steps_to_target":
            best = run.points[entry.index].best
            k = self.search.confirm.top if self.search.confirm else 1
            stop = len(best) >= k and step >= best[k - 1]
        else:
            stop = entry.trial.should_prune()
        if stop:
            run.pruned[trial_id] = int(step)
        return stop

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
        index, trial, confirm = entry
        pruned = run.pruned.pop(trial_id, None)
        if error:
            trial.set_user_attr(ERRORS, trial.user_attrs.get(ERRORS, 0) + 1)
            return
        if self.keep is not None:  # its reports reach the folder before its study is told
            self.keep(trial_id)
        if result:
            self._record(trial, run.values[trial_id], result)
            if result.get("total_steps") is not None:
                trial.set_user_attr(TOTAL_STEPS, int(result["total_steps"]))
        point = run.points[index]
        study = point.confirm if confirm else point.study
        diverged = bool((result or {}).get("diverged"))
        value, reason = self.objective.outcome(run.values.pop(trial_id), diverged)
        trial.set_user_attr(DIVERGED, diverged)
        state = optuna.trial.TrialState
        if pruned is not None:
            trial.set_user_attr(PRUNED_AT, pruned)
            study.tell(trial, state=state.PRUNED)
        elif value is None:
            trial.set_user_attr(REASON, reason)
            study.tell(trial, state=state.FAIL)
        else:
            study.tell(trial, value)
            if not confirm:
                point.best.append(value)
                point.best.sort(reverse=self.objective.direction == "maximize")

    def save(self, checkpoint_path: str) -> None:
        """Ray's searcher checkpoint: only a pointer, the state is the study storage."""
        storage = study_storage(self.folder)
        Path(checkpoint_path).write_text(json.dumps({"storage": storage.url}))

    def restore(self, checkpoint_path: str) -> None:
        """Called by Tuner.restore: the studies are read again from the storage on first use."""
        self.restored = True
        self._run = None

    # ------------------------------------------------------------------------ Helpers

    def _fix_plan(self, run: _Run, index: int) -> None:
        """Once a point's search is done, fix its confirmation: its best `confirm.top` told
        trials (`ranked`) and the seeds, in the confirmation study's user attr."""
        point = run.points[index]
        if point.plan is not None or not run.searched(index):
            return
        trials = [trial_record(t, self.objective) for t in point.study.get_trials(deepcopy=False)]
        chosen = ranked(trials, self.objective)[: self.search.confirm.top]
        plan = {
            "study": self.names[index],
            "point": self.points[index],
            "index": index,
            "objective": list(self.objective),
            "confirms": [t["number"] for t in chosen],
            "params": [t["params"] for t in chosen],
            "seeds": self.seeds,
        }
        study = optuna.create_study(
            storage=run.storage,
            study_name=confirm_study_name(self.names[index]),
            direction=self.objective.direction,
            load_if_exists=True,
        )
        study.set_user_attr(CONFIRM, plan)
        point.confirm, point.plan = study, plan

    def _offer(
        self, run: _Run, trial_id: str, index: int, number: int, confirm: bool
    ) -> dict[str, Any]:
        """Trial `number` of point `index`'s search (or, with `confirm`, confirmation) study
        for Ray trial `trial_id`: asked now if it is the next number, else the one asked
        before (an orphan), its parameters drawn or kept."""
        point = run.points[index]
        study = point.confirm if confirm else point.study
        if confirm:
            rank, which = divmod(number, len(point.plan["seeds"]))
            study.sampler = FixedSampler(point.plan["params"][rank])
        else:
            study.sampler = make_sampler(self.search, index, number)
        asked = point.confirm_asked if confirm else point.asked
        if number == asked:
            trial = study.ask()
            if confirm:
                point.confirm_asked += 1
            else:
                point.asked += 1
            run.values[trial_id] = {}
        else:
            frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
            trial = optuna.trial.Trial(study, frozen._trial_id)
            run.values[trial_id] = dict(frozen.intermediate_values)
        trial.set_user_attr(RAY_TRIAL, trial_id)
        # Already drawn parameters (an orphan's) come back as they are; missing ones are drawn.
        params = {key: _suggest(trial, key, d) for key, d in self.search.distributions().items()}
        run.live[trial_id] = _Live(index, trial, confirm)
        full = copy.deepcopy(self.configs[index])
        for key, value in params.items():
            set_dotted(full, key, value)
        if not confirm:
            full[SEARCH_KEY] = {"study": self.names[index], "point": index, "number": number}
            return full
        confirms, seed = point.plan["confirms"][rank], point.plan["seeds"][which]
        trial.set_user_attr(CONFIRMS, confirms)
        trial.set_user_attr(SEED, seed)
        full["seed"] = seed
        full[SEARCH_KEY] = {
            "study": self.names[index],
            "point": index,
            "confirm": number,
            "confirms": confirms,
        }
        return full

    def _record(self, trial, values: dict[int, float], result: dict[str, Any]) -> None:
        """Keep a report's value of the objective's metric in `values` and as the trial's
        intermediate value (once per step: a resumed trial sends its earlier reports again)."""
        step, value = result.get("step"), finite_number(result.get(self.objective.metric))
        if step is None or value is None or step in values:
            return
        values[int(step)] = value
        trial.report(value, int(step))


def _suggest(trial, key: str, dist) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)
