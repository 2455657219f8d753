"""The Optuna studies of a searched sweep: one per grid point, in `optuna.db` (SQLite) in the
experiment folder. What a study optimises (`Objective`), where the studies live
(`study_storage`), and how they are read back (`read_studies`, for the report, status and
export). Plain data and Optuna only: no Ray, no torch (`analysis` reads through this module; the
Ray Tune searcher that fills the studies is `lbs_tune.searcher`, imported by the runner alone).

`steps_to_target` minimises the first reported `step` at which the sweep's target is met; a
trial that never meets it, or diverges first, is FAIL with the reason in its user attrs (never a
made-up number); a trial stopped because it can no longer win is PRUNED, with the step it was
stopped at (its steps to target are more) in user attr `pruned_at`. `metric` optimises the best
reported value of the sweep's metric; a diverged trial is FAIL. Every report's value is kept as
the trial's intermediate value, and the step budget the trial reported as user attr
`total_steps`.

Confirmation runs (`search.confirm`): a grid point's study of its search has a second study,
`confirm:<name>`, whose user attr CONFIRM holds the confirmed search trials (best first, fixed
when the search study has all its trials) and the seeds; its trial n runs confirmed trial
n // seeds on seed n % seeds, with user attrs `confirms` (the search trial) and `seed`.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import quote

from lbs_tune.errors import UserError
from lbs_tune.names import Mode, comparison, direction, first_reached, meets
from lbs_tune.space import SearchSpec
from lbs_tune.sweep import Metric, Target

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

STUDY_FILE = "optuna.db"
# The Optuna user attr of a study that holds its grid point and search (one attr: one write).
STUDY = "lbs_tune"
# The user attr of a confirmation study: the search study, the confirmed trials, the seeds.
CONFIRM = "lbs_tune_confirm"
# Optuna user attrs of a trial.
RAY_TRIAL = "ray_trial_id"  # the Ray Tune trial that runs (or last ran) it
REASON = "reason"  # why it is FAIL
DIVERGED = "diverged"
ERRORS = "ray_errors"  # runs that ended in ERROR in Ray (it stays RUNNING for the next resume)
PRUNED_AT = "pruned_at"  # the step a PRUNED trial was stopped at
TOTAL_STEPS = "total_steps"  # the step budget the trial reported (its cap)
CONFIRMS = "confirms"  # a confirmation run's search trial (its number)
SEED = "seed"  # a confirmation run's seed


# ============================================================================ The objective


class Objective(NamedTuple):
    """What a study optimises and how a finished trial's reports become its value."""

    kind: Literal["steps_to_target", "metric"]
    metric: str  # the reported key each report's intermediate value is taken from
    mode: Mode  # the better direction of `metric`
    target: float | None = None  # steps_to_target: the value of `metric` to reach

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        if self.kind == "steps_to_target" or self.mode == "min":
            return "minimize"
        return "maximize"

    def meets(self, value: float) -> bool:
        """Whether a value of `metric` reaches the target (`lbs_tune.names.meets`)."""
        return meets(value, self.target, self.mode)

    def stop(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Ray Tune's stop condition (`RunConfig(stop=objective.stop)`): a steps_to_target trial
        stops at the first report that reaches the target."""
        value = finite_number(result.get(self.metric))
        return self.kind == "steps_to_target" and value is not None and self.meets(value)

    def outcome(self, values: dict[int, float], diverged: bool) -> tuple[float | None, str | None]:
        """(value, None) for a feasible trial, (None, reason) for an infeasible one, from the
        trial's reported values of `metric` by step and whether it diverged."""
        pick = max if self.mode == "max" else min
        best = pick(values.values()) if values else None
        if self.kind == "steps_to_target":
            hit = first_reached(values, self.target, self.mode)
            if hit is not None:
                return float(hit), None
            if diverged:
                return None, "diverged"
            if best is None:
                return None, f"no report of {self.metric}"
            op = comparison(self.metric, ascii=True)
            return None, f"target {self.metric} {op} {self.target:g} not reached (best {best:.4g})"
        if diverged:
            return None, "diverged"
        if best is None:
            return None, f"no report of {self.metric}"
        return best, None


def objective_for(search: SearchSpec, metric: Metric, target: Target | None) -> Objective:
    """The Objective of a checked sweep (see `check_search`)."""
    if search.objective == "steps_to_target":
        return target_objective(target)
    return Objective("metric", metric.name, metric.mode)


def target_objective(target: Target) -> Objective:
    """The steps to reach the sweep's `target`, in its metric's direction."""
    return Objective("steps_to_target", target.metric, direction(target.metric), target.value)


def finite_number(value: Any) -> float | None:
    """A reported value as a finite float, else None (missing, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ============================================================================ The storage


class StudyStorage(NamedTuple):
    url: str  # what optuna.load_study(storage=...) takes
    dashboard: str  # the shell command that shows the studies


def study_storage(folder: str | Path) -> StudyStorage:
    """The studies' storage in an experiment folder (a local or shared POSIX path): SQLite,
    because a transaction either lands whole or not at all when the driver is SIGKILLed, and the
    OS drops its locks with the process (a journal file leaves a stale lock behind for 30 s).
    The path is percent-escaped (spaces aside, as the URL reads well with them): a folder named
    with `?`, `#` or `%41` is that folder."""
    url = f"sqlite:///{quote(str(Path(folder).expanduser().resolve() / STUDY_FILE), safe='/ ')}"
    return StudyStorage(url, f"optuna-dashboard {shlex.quote(url)}")


def read_only_url(db: Path) -> str:
    """A URL that opens the study storage `db` read-only (SQLite's `mode=ro`): a reader never
    writes to an experiment, not even a schema into an empty file. Escaped twice: SQLAlchemy
    unescapes the URL's path once, SQLite the `file:` URI's."""
    return f"sqlite:///file:{quote(quote(str(Path(db).resolve())))}?mode=ro&uri=true"


def study_name(point: dict[str, Any]) -> str:
    """The study of a grid point: 'batch_size=64,seed=0' ('base' for a sweep without a grid)."""
    return ",".join(f"{k}={v}" for k, v in point.items()) or "base"


def confirm_study_name(name: str) -> str:
    """The confirmation study of the search study `name`."""
    return f"confirm:{name}"


def confirmation_seeds(search: SearchSpec, seeds: list[int]) -> list[int]:
    """The seeds of the confirmation runs: the `search.confirm.seeds` integers after the largest
    seed a search trial can use (`seeds`: the grid points' own, base or grid; and the top of
    `seed` in the search space). The same at every grid point, so that every batch size is
    confirmed on the same seeds."""
    if search.confirm is None:
        return []
    used = list(seeds)
    if "seed" in search.space:
        used += [v for v in search.space["seed"].ends() if isinstance(v, int)]
    start = max(used, default=-1) + 1
    return list(range(start, start + search.confirm.seeds))


def trial_record(t: FrozenTrial, objective: Objective) -> dict[str, Any]:
    """An Optuna trial as plain data (see `read_studies`)."""
    values = dict(sorted(t.intermediate_values.items()))
    done = t.state.name == "COMPLETE"
    steps = objective.kind == "steps_to_target" and done and t.value is not None
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value if done else None,  # Optuna gives a PRUNED trial its last report
        "at_value": values.get(int(t.value)) if steps else None,
        "params": dict(t.params),
        "ray_trial_id": t.user_attrs.get(RAY_TRIAL),
        "reason": t.user_attrs.get(REASON),
        "diverged": t.user_attrs.get(DIVERGED),
        "ray_errors": t.user_attrs.get(ERRORS, 0),
        "pruned_at": t.user_attrs.get(PRUNED_AT),
        "total_steps": t.user_attrs.get(TOTAL_STEPS),
        "values": values,
    }


def ranked(trials: list[dict[str, Any]], objective: Objective) -> list[dict[str, Any]]:
    """The told trials (`trial_record`s), best first: COMPLETE ones by their value
    (steps_to_target: fewest steps, ties by the better reported value at that step; metric:
    the better value), then FAIL and PRUNED ones by the best value of the metric they reported
    (the nearest to the target first; none reported: last); ties by the lower number. RUNNING
    trials (not told) are left out."""
    sign = 1 if objective.mode == "max" else -1
    done = [t for t in trials if t["state"] == "COMPLETE"]
    if objective.kind == "steps_to_target":
        done.sort(key=lambda t: (t["value"], -sign * (t["at_value"] or 0.0), t["number"]))
    else:
        done.sort(key=lambda t: (-sign * t["value"], t["number"]))
    rest = [t for t in trials if t["state"] in ("FAIL", "PRUNED")]
    pick = max if sign > 0 else min
    rest.sort(
        key=lambda t: (
            not t["values"],
            -sign * pick(t["values"].values()) if t["values"] else 0.0,
            t["number"],
        )
    )
    return done + rest


TOLD = ("COMPLETE", "FAIL", "PRUNED")


def told(trial: dict[str, Any]) -> bool:
    """Whether a trial of `read_studies` (a search trial or a confirmation run) was told its
    outcome: COMPLETE, FAIL (infeasible) or PRUNED (stopped when it could no longer win). One
    that was not (RUNNING) runs again when the sweep is resumed."""
    return trial["state"] in TOLD


def diverged_as_told(diverged: bool, trial: dict[str, Any] | None) -> bool:
    """Whether a trial counts as diverged in a sweep's counts: its last report said so, unless
    its study recorded it COMPLETE (`trial`, its dict of `read_studies`; None for a trial of no
    study). A steps-to-target trial whose report reached the target as its loss crossed the
    divergence bound is reached, as its study counts it and its line says."""
    return diverged and not (trial is not None and trial["state"] == "COMPLETE")


def told_by_ray_id(studies: Sequence[StudyRecord]) -> dict[str, dict[str, Any]]:
    """The told trials and confirmation runs of `studies`, by their Ray trial id."""
    return {t["ray_trial_id"]: t for s in studies for t in s.runs() if told(t)}


def ran_out(trial: dict[str, Any]) -> bool:
    """Whether a told trial ran until it ended on its own (COMPLETE or FAIL), not stopped by the
    search (PRUNED): its outcome is that of its whole budget."""
    return trial["state"] in ("COMPLETE", "FAIL")


class StudyRecord(NamedTuple):
    """One study as read back from the storage (see `read_studies`), with its confirmation
    runs (none without `search.confirm`, or before the study has all its trials)."""

    name: str
    point: dict[str, Any]  # the grid point: {dotted key: value}
    index: int  # its position in the grid
    objective: Objective
    trials: list[dict[str, Any]]
    confirmed: tuple[int, ...] = ()  # the search trials confirmed, best first
    seeds: tuple[int, ...] = ()  # the confirmation seeds
    confirmations: tuple[dict[str, Any], ...] = ()  # the confirmation runs, by number

    @property
    def finished(self) -> int:
        """Search trials told to the study (`told`)."""
        return sum(told(t) for t in self.trials)

    def runs(self) -> tuple[dict[str, Any], ...]:
        """Its search trials, then its confirmation runs."""
        return (*self.trials, *self.confirmations)

    def best(self) -> dict[str, Any] | None:
        """The best COMPLETE trial (first in `ranked`), None if there is none."""
        order = ranked(self.trials, self.objective)
        return order[0] if order and order[0]["state"] == "COMPLETE" else None


def read_studies(folder: str | Path) -> list[StudyRecord]:
    """Every study of an experiment folder, in grid order ([] if it has no study storage).

    Each trial is a plain dict: `number`, `state` ('COMPLETE'; 'FAIL': infeasible; 'PRUNED':
    stopped when it could no longer win; 'RUNNING': asked and not told, e.g. errored in Ray or
    still running), `value` (steps to target or the best metric; None unless COMPLETE),
    `at_value` (steps_to_target: the reported value at that step), `params` ({dotted key:
    value}), `ray_trial_id`, `reason` (why FAIL), `diverged`, `ray_errors` (its runs that ended
    in ERROR), `pruned_at` (the step a PRUNED trial stopped at), `total_steps` (its step
    budget, None before its first report) and `values` ({step: reported value}). A
    confirmation run's dict adds `confirms` (the search trial it runs again) and `seed`.
    """
    db = Path(folder, STUDY_FILE)
    if not db.exists():
        return []
    import sqlite3

    import optuna
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _read_studies(
            optuna.storages.RDBStorage(read_only_url(db), skip_table_creation=True)
        )
    except (StorageInternalError, SQLAlchemyError, sqlite3.Error) as exc:
        raise UserError(f"{db}: {_damage(db, exc)}") from None


def _damage(db: Path, exc: BaseException) -> str:
    """What is wrong with the study storage `db` that could not be read, and what to do."""
    cause = exc.__cause__ or exc.__context__ or exc
    reason = str(getattr(cause, "orig", None) or cause).splitlines()[0]
    if Path(f"{db}-journal").exists():
        return (
            f"cannot be read as it is ({reason}): a run was stopped while writing it; running "
            "the sweep again finishes or undoes that write"
        )
    return (
        f"damaged study storage ({reason}); restore it from a copy, or run the sweep file with "
        "--fresh to move this sweep aside and start again"
    )


def _read_studies(storage) -> list[StudyRecord]:
    import optuna

    records, confirms = [], {}
    for name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        attrs = study.user_attrs.get(STUDY)
        confirm = study.user_attrs.get(CONFIRM)
        if attrs is None and confirm is None:  # made this instant: its attrs follow
            continue
        objective = Objective(*(attrs or confirm)["objective"])
        stored = study.get_trials(deepcopy=False)
        trials = [trial_record(t, objective) for t in stored]
        if confirm is not None:
            for t, frozen in zip(trials, stored, strict=True):
                t[CONFIRMS] = frozen.user_attrs.get(CONFIRMS)
                t[SEED] = frozen.user_attrs.get(SEED)
            confirms[confirm["study"]] = (confirm, trials)
            continue
        records.append(StudyRecord(name, attrs["point"], attrs["index"], objective, trials))
    found = []
    for r in sorted(records, key=lambda r: r.index):
        if r.name in confirms:
            plan, runs = confirms[r.name]
            r = r._replace(
                confirmed=tuple(plan["confirms"]),
                seeds=tuple(plan["seeds"]),
                confirmations=tuple(runs),
            )
        found.append(r)
    return found


def create_storage(db: Path) -> None:
    """Make an empty study storage at `db` at once: the schema is made in a file beside it,
    then renamed into place, so that a reader opening it meanwhile (optuna-dashboard, `status`)
    never finds half a schema and makes the same tables at the same time."""
    import optuna

    db.parent.mkdir(parents=True, exist_ok=True)
    building = db.with_name(f".{db.name}.{os.getpid()}")
    # Made by this Optuna now: nothing to check its schema against.
    url = f"sqlite:///{quote(str(building))}"
    optuna.storages.RDBStorage(url, skip_compatibility_check=True).engine.dispose()
    os.replace(building, db)
