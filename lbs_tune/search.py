"""Tuned hyper-parameters per grid point: the sweep file's `search` section, and the Ray Tune
searcher that runs one Optuna study per grid point, all in one Ray Tune experiment.

```yaml
search:
  space:
    lr.base: {log_uniform: [0.001, 10.0]}
    optimizer.momentum: {uniform: [0.0, 0.99]}     # or {values: [...]}, {int: [a, b]}
  trials_per_point: 16
  sampler: tpe          # tpe | qmc | random
  seed: 0
  objective: steps_to_target    # or: metric
```

Every grid point gets a study named after it (`batch_size=64,seed=0`) in `optuna.db` (SQLite) in
the experiment folder; optuna-dashboard and Optuna's own API open it (`study_storage`). The
studies are the searcher's whole state: Ray's checkpoint of the searcher is a pointer, so a sweep
killed at any moment resumes from the storage (see `StudySearcher`).

`steps_to_target` minimises the first reported `step` at which the sweep's target is met; a
trial that never meets it, or diverges first, is FAIL with the reason in its user attrs (never a
made-up number). `metric` optimises the best reported value of the sweep's metric; a diverged
trial is FAIL. The searcher reads both from the trial's reports (`step`, the metric, and
`diverged` in the last one); every report's value is kept as the trial's intermediate value.

The plain-data half (models, checks, storage names, `read_studies`) imports neither Ray nor
Optuna at import time: the sweep spec and `analysis` import it. `StudySearcher` subclasses Ray
Tune's `Searcher` and is built on first use (module `__getattr__`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from lbs_tune.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import optuna

    from lbs_tune.config import Metric, Target, TrialConfig

STUDY_FILE = "optuna.db"
# The key of a searched trial's config that names its study and Optuna trial (params.json has
# it too); the trainable removes it before validating the TrialConfig.
SEARCH_KEY = "search"
# The Optuna user attr of a study that holds its grid point and search (one attr: one write).
STUDY = "lbs_tune"
# Optuna user attrs of a trial.
RAY_TRIAL = "ray_trial_id"  # the Ray Tune trial that runs (or last ran) it
REASON = "reason"  # why it is FAIL
DIVERGED = "diverged"
ERRORS = "ray_errors"  # runs that ended in ERROR in Ray (it stays RUNNING for the next resume)

Mode = Literal["max", "min"]


# ============================================================================ The spec


class _Strict(BaseModel):
    # lbs_tune.config's strictness; not imported, as config imports this module.
    model_config = ConfigDict(extra="forbid", frozen=True)


Finite = Annotated[float, Field(allow_inf_nan=False)]


def _ordered(low: float, high: float, what: str) -> None:
    if not low < high:
        raise ValueError(f"{what}: [low, high] with low < high, not [{low}, {high}]")


class LogUniform(_Strict):
    """A float drawn uniformly in log space between two positive bounds."""

    log_uniform: tuple[Finite, Finite]

    @model_validator(mode="after")
    def _range(self) -> LogUniform:
        _ordered(*self.log_uniform, "log_uniform")
        if self.log_uniform[0] <= 0:
            raise ValueError(f"log_uniform: the low bound must be > 0, not {self.log_uniform[0]}")
        return self

    def optuna(self):
        from optuna.distributions import FloatDistribution

        return FloatDistribution(*self.log_uniform, log=True)

    def at(self, u: float) -> float:
        """The value at quantile `u` in [0, 1)."""
        low, high = (math.log(b) for b in self.log_uniform)
        return min(max(math.exp(low + u * (high - low)), self.log_uniform[0]), self.log_uniform[1])

    def ends(self) -> list[Any]:
        return list(self.log_uniform)


class Uniform(_Strict):
    """A float drawn uniformly between two bounds."""

    uniform: tuple[Finite, Finite]

    @model_validator(mode="after")
    def _range(self) -> Uniform:
        _ordered(*self.uniform, "uniform")
        return self

    def optuna(self):
        from optuna.distributions import FloatDistribution

        return FloatDistribution(*self.uniform)

    def at(self, u: float) -> float:
        """The value at quantile `u` in [0, 1)."""
        low, high = self.uniform
        return min(max(low + u * (high - low), low), high)

    def ends(self) -> list[Any]:
        return list(self.uniform)


class IntRange(_Strict):
    """An integer drawn uniformly between two bounds, both included."""

    bounds: tuple[int, int] = Field(alias="int")

    @model_validator(mode="after")
    def _range(self) -> IntRange:
        _ordered(*self.bounds, "int")
        return self

    def optuna(self):
        from optuna.distributions import IntDistribution

        return IntDistribution(*self.bounds)

    def at(self, u: float) -> int:
        """The value at quantile `u` in [0, 1): each integer takes an equal share."""
        low, high = self.bounds
        return min(low + math.floor(u * (high - low + 1)), high)

    def ends(self) -> list[Any]:
        return list(self.bounds)


class Values(_Strict):
    """One of a list of values."""

    values: list[bool | int | float | str] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _once(cls, values: list[Any]) -> list[Any]:
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise ValueError(f"{repeated[0]!r} listed twice; list each value once")
        return values

    def optuna(self):
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.values)

    def at(self, u: float) -> Any:
        """The value at quantile `u` in [0, 1): each value takes an equal share."""
        return self.values[min(math.floor(u * len(self.values)), len(self.values) - 1)]

    def ends(self) -> list[Any]:
        return list(self.values)


KINDS = {"log_uniform": LogUniform, "uniform": Uniform, "int": IntRange, "values": Values}


def _one_kind(value: Any) -> Any:
    """A distribution is a mapping with exactly one known kind, else one clear error."""
    if isinstance(value, BaseModel):
        return value
    example = "e.g. {log_uniform: [0.001, 10.0]}"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"give a distribution, {example}; kinds: {', '.join(KINDS)}")
    unknown = [k for k in value if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown distribution '{unknown[0]}'{did_you_mean(unknown[0], KINDS)}")
    if len(value) > 1:
        raise ValueError(f"give one distribution, not {' and '.join(value)}")
    return value


def _kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next(iter(value))
    return next((k for k, model in KINDS.items() if isinstance(value, model)), None)


Distribution = Annotated[
    Union[tuple(Annotated[model, Tag(kind)] for kind, model in KINDS.items())],  # noqa: UP007
    Discriminator(_kind),
    BeforeValidator(_one_kind),
]


class SearchSpec(_Strict):
    """The `search` section: a space over dotted trial-config keys, searched per grid point."""

    space: dict[str, Distribution] = Field(min_length=1)
    trials_per_point: int = Field(16, ge=1)
    sampler: Literal["tpe", "qmc", "random"] = "tpe"
    seed: int = 0
    objective: Literal["steps_to_target", "metric"] = "steps_to_target"

    def distributions(self) -> dict[str, Any]:
        """{dotted key: Optuna distribution}."""
        return {key: dist.optuna() for key, dist in self.space.items()}

    def dump(self) -> dict[str, Any]:
        """The section as JSON data, as in the sweep file."""
        return self.model_dump(mode="json", by_alias=True)


def metric_mode(metric: str) -> Mode | None:
    """'max' for an accuracy, 'min' for a loss, None for a metric with no better direction."""
    if metric.endswith("accuracy"):
        return "max"
    if metric.endswith("loss"):
        return "min"
    return None


def check_search(
    search: SearchSpec,
    grid: dict[str, list[Any]],
    trials: list[TrialConfig],
    target: Target | None,
) -> list[tuple[str, str]]:
    """The search section against the rest of the sweep: (key in the sweep file, message) for
    every problem, [] when there is none. `trials` are the grid points' configs (SweepSpec.trials)
    and `grid` the sweep's grid: a space key must be a leaf of the trial config (not a budget key,
    not also a grid key) whose every end value (or listed value) makes a valid config at every
    grid point; with `lr.base` searched, `lr.scaling` must be `none`; `steps_to_target` needs a
    target whose metric has a direction."""
    from lbs_tune.config import BUDGET_KEYS

    problems = []
    leaves = trials[0].flat()
    for key, dist in search.space.items():
        at = f"search.space.{key}"
        if key in grid:
            problems.append((at, f"'{key}' is also a grid key; search it or list it, not both"))
        elif key in BUDGET_KEYS:
            problems.append((at, "the budget is not searched; set it in base or grid"))
        elif key not in leaves:
            problems.append((at, f"not a trial config key{did_you_mean(key, leaves)}"))
        else:
            found = (_invalid(t, key, v) for t in trials for v in dist.ends())
            problem = next(filter(None, found), None)
            if problem:
                problems.append((at, problem))
    if "lr.base" in search.space:
        scaled = [t for t in trials if t.lr.scaling != "none"]
        if scaled:
            at = "grid.lr.scaling" if "lr.scaling" in grid else "base.lr.scaling"
            problems.append(
                (
                    at,
                    f"must be 'none' when search.space has lr.base (the tuned rate is used as is "
                    f"at every batch size), not '{scaled[0].lr.scaling}'",
                )
            )
    if search.objective == "steps_to_target":
        if target is None:
            problems.append(
                (
                    "search.objective",
                    "steps_to_target needs a `target` (metric and value); add one or use "
                    "objective: metric",
                )
            )
        elif metric_mode(target.metric) is None:
            problems.append(
                (
                    "target.metric",
                    f"'{target.metric}' has no better direction; use an accuracy or a loss",
                )
            )
    return problems


def _invalid(trial: TrialConfig, key: str, value: Any) -> str | None:
    """Why `trial` with `key` set to `value` is not a valid TrialConfig, or None."""
    from lbs_tune.config import TrialConfig, set_dotted

    tree = trial.model_dump(mode="json")
    set_dotted(tree, key, value)
    try:
        TrialConfig.model_validate(tree)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        return f"{value!r} is not a valid {key}: {message}"
    return None


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
        """Whether a value of `metric` reaches the target (>= for max, <= for min)."""
        return value >= self.target if self.mode == "max" else value <= self.target

    def stop(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Ray Tune's stop condition (`RunConfig(stop=objective.stop)`): a steps_to_target trial
        stops at the first report that reaches the target."""
        value = _number(result.get(self.metric))
        return self.kind == "steps_to_target" and value is not None and self.meets(value)

    def outcome(self, values: dict[int, float], diverged: bool) -> tuple[float | None, str | None]:
        """(value, None) for a feasible trial, (None, reason) for an infeasible one, from the
        trial's reported values of `metric` by step and whether it diverged."""
        pick = max if self.mode == "max" else min
        best = pick(values.values()) if values else None
        if self.kind == "steps_to_target":
            hits = [step for step, value in values.items() if self.meets(value)]
            if hits:
                return float(min(hits)), None
            if diverged:
                return None, "diverged"
            if best is None:
                return None, f"no report of {self.metric}"
            op = ">=" if self.mode == "max" else "<="
            return None, f"target {self.metric} {op} {self.target} not reached (best {best:.4g})"
        if diverged:
            return None, "diverged"
        if best is None:
            return None, f"no report of {self.metric}"
        return best, None


def objective_for(search: SearchSpec, metric: Metric, target: Target | None) -> Objective:
    """The Objective of a checked sweep (see `check_search`)."""
    if search.objective == "steps_to_target":
        return Objective("steps_to_target", target.metric, metric_mode(target.metric), target.value)
    return Objective("metric", metric.name, metric.mode)


def _number(value: Any) -> float | None:
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
    OS drops its locks with the process (a journal file leaves a stale lock behind for 30 s)."""
    url = f"sqlite:///{Path(folder).expanduser().resolve() / STUDY_FILE}"
    return StudyStorage(url, f"optuna-dashboard {shlex.quote(url)}")


def study_name(point: dict[str, Any]) -> str:
    """The study of a grid point: 'batch_size=64,seed=0' ('base' for a sweep without a grid)."""
    return ",".join(f"{k}={v}" for k, v in point.items()) or "base"


def _seed(*parts: int) -> int:
    """A 32-bit seed that is a fixed function of `parts` (sweep seed, point, trial number)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_sampler(search: SearchSpec, point: int, number: int):
    """The sampler that asks trial `number` of grid point `point`'s study.

    A fresh sampler per trial, so that a trial's draw never depends on what this process asked
    before: a searcher rebuilt after a kill draws what the killed one would have. qmc: point
    `number` of a scrambled Sobol sequence over the whole space, seeded from (search.seed,
    point) (`sobol_point`); tpe and random: seeded from (search.seed, point, number).
    """
    import optuna

    if search.sampler == "qmc":
        return _sobol_class()(search, point)
    seed = _seed(search.seed, point, number)
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def sobol_point(search: SearchSpec, point: int, number: int) -> dict[str, Any]:
    """{key: value} of trial `number` of grid point `point`: the `number`-th point of the
    scrambled Sobol sequence (scipy's, seeded from search.seed and the point) over the unit cube
    of the space's keys in sorted order, each coordinate mapped through its distribution's
    quantile (log-uniform in log space, integers and values in equal shares)."""
    from scipy.stats import qmc

    keys = sorted(search.space)
    engine = qmc.Sobol(len(keys), scramble=True, seed=_seed(search.seed, point))
    if number:
        engine.fast_forward(number)
    unit = engine.random(1)[0]
    return {key: search.space[key].at(float(u)) for key, u in zip(keys, unit, strict=True)}


@functools.cache
def _sobol_class():
    import optuna

    class SobolSampler(optuna.samplers.BaseSampler):
        """Draws trial n's parameters from point n of the Sobol sequence (`sobol_point`). Optuna's
        own QMCSampler takes the next point from a counter in the study's storage, so a trial
        asked again after a kill (or one whose ask was cut short) would take a later point and
        an interrupted sweep would not draw what an uninterrupted one draws."""

        def __init__(self, search: SearchSpec, point: int):
            self._search, self._point = search, point

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            return sobol_point(self._search, self._point, trial.number)[param_name]

    return SobolSampler


def _ray_trial_ids(folder: str) -> set[str]:
    """The trial ids of Ray Tune's newest experiment state in `folder`: the state that
    Tuner.restore restores (it takes the newest by name too), so these are the trials that Ray
    runs again or keeps; none if there is no state yet. A newer state that this run's driver
    is copying there right now (half a file) is passed over for the one before it."""
    from lbs_tune.experiment import STATE_FILE

    states = sorted(p for p in Path(folder).iterdir() if STATE_FILE.match(p.name))
    for path in reversed(states):
        try:
            state = json.loads(path.read_text())
        except ValueError:
            continue
        return {json.loads(trial)["trial_id"] for trial, _ in state["trial_data"]}
    return set()


class StudyRecord(NamedTuple):
    """One study as read back from the storage (see `read_studies`)."""

    name: str
    point: dict[str, Any]  # the grid point: {dotted key: value}
    index: int  # its position in the grid
    objective: Objective
    trials: list[dict[str, Any]]

    @property
    def finished(self) -> int:
        """Trials told to the study (COMPLETE or FAIL)."""
        return sum(t["state"] in ("COMPLETE", "FAIL") for t in self.trials)

    def best(self) -> dict[str, Any] | None:
        """The best COMPLETE trial, None if there is none. steps_to_target: fewest steps, ties
        by the better reported value at that step; metric: best value; then the lower number."""
        done = [t for t in self.trials if t["state"] == "COMPLETE"]
        if not done:
            return None
        sign = 1 if self.objective.mode == "max" else -1
        if self.objective.kind == "steps_to_target":
            return min(done, key=lambda t: (t["value"], -sign * t["at_value"], t["number"]))
        return min(done, key=lambda t: (-sign * t["value"], t["number"]))


def read_studies(folder: str | Path) -> list[StudyRecord]:
    """Every study of an experiment folder, in grid order ([] if it has no study storage).

    Each trial is a plain dict: `number`, `state` ('COMPLETE'; 'FAIL': infeasible; 'RUNNING':
    asked and not told, e.g. errored in Ray or still running), `value` (steps to target or the
    best metric; None unless COMPLETE), `at_value` (steps_to_target: the reported value at that
    step), `params` ({dotted key: value}), `ray_trial_id`, `reason` (why FAIL), `diverged`,
    `ray_errors` (its runs that ended in ERROR) and `values` ({step: reported value}).
    """
    import optuna

    if not Path(folder, STUDY_FILE).exists():
        return []
    storage = optuna.storages.RDBStorage(study_storage(folder).url)
    records = []
    for name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        attrs = study.user_attrs.get(STUDY)
        if attrs is None:  # made this instant: its attrs follow
            continue
        objective = Objective(*attrs["objective"])
        trials = []
        for t in study.get_trials(deepcopy=False):
            values = dict(sorted(t.intermediate_values.items()))
            steps = objective.kind == "steps_to_target" and t.value is not None
            trials.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "value": t.value,
                    "at_value": values.get(int(t.value)) if steps else None,
                    "params": dict(t.params),
                    "ray_trial_id": t.user_attrs.get(RAY_TRIAL),
                    "reason": t.user_attrs.get(REASON),
                    "diverged": t.user_attrs.get(DIVERGED),
                    "ray_errors": t.user_attrs.get(ERRORS, 0),
                    "values": values,
                }
            )
        records.append(StudyRecord(name, attrs["point"], attrs["index"], objective, trials))
    return sorted(records, key=lambda r: r.index)


# ============================================================================ The searcher


class _Run:
    """A searcher's view of the storage while a sweep runs (rebuilt from the storage alone)."""

    def __init__(self, searcher: _StudySearch):
        import optuna

        self.optuna = optuna
        db = Path(searcher.folder, STUDY_FILE)
        if searcher.restored and not db.exists():
            raise UserError(
                f"{db}: the studies of this sweep are missing (was the experiment folder moved "
                "or the file deleted?); resume the sweep where it started, or run it with --fresh"
            )
        if not db.exists():
            _create(db)
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


def _create(db: Path) -> None:
    """Make an empty study storage at `db` at once: the schema is made in a file beside it,
    then renamed into place, so that a reader opening it meanwhile (optuna-dashboard, `status`)
    never finds half a schema and makes the same tables at the same time."""
    import optuna

    db.parent.mkdir(parents=True, exist_ok=True)
    building = db.with_name(f".{db.name}.{os.getpid()}")
    optuna.storages.RDBStorage(f"sqlite:///{building}").engine.dispose()
    os.replace(building, db)


class _StudySearch:
    """The logic of `StudySearcher`, free of Ray (the class that Ray sees adds its base)."""

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
        self._base: dict[str, Any] = {}
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
        """Tune passes the Tuner's param_space here: suggestions hold only what differs from
        it (Tune merges them into it), so its tables and trial names show the grid and search
        keys rather than every key of the config."""
        self._base = copy.deepcopy(config or {})
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
            trial = run.optuna.trial.Trial(study, frozen._trial_id)
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
        state = run.optuna.trial.TrialState
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
        step, value = result.get("step"), _number(result.get(self.objective.metric))
        if step is None or value is None or step in values:
            return
        values[int(step)] = value
        trial.report(value, int(step))

    def _config(self, index: int, number: int, params: dict[str, Any]) -> dict[str, Any]:
        from lbs_tune.config import set_dotted

        full = copy.deepcopy(self.configs[index])
        for key, value in params.items():
            set_dotted(full, key, value)
        full[SEARCH_KEY] = {"study": self.names[index], "point": index, "number": number}
        return _difference(full, self._base)


def _suggest(trial, key: str, dist) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)


def _difference(full: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The part of nested `full` that is not already in `base` (so merging it into base gives
    full back, given that both have the same keys)."""
    out = {}
    for key, value in full.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            inner = _difference(value, base[key])
            if inner:
                out[key] = inner
        elif key not in base or base[key] != value:
            out[key] = value
    return out


@functools.cache
def _searcher_class() -> type:
    from ray.tune.search import Searcher

    cls = type("StudySearcher", (_StudySearch, Searcher), {"__module__": __name__})
    cls.__doc__ = _STUDY_SEARCHER_DOC
    return cls


_STUDY_SEARCHER_DOC = """A Ray Tune Searcher: one Optuna study per grid point, in one experiment.

    StudySearcher(search, points, configs, folder, objective): `points` are the grid points
    ({dotted key: value}, SweepSpec.points()), `configs` their full trial configs (nested dicts,
    what the trainable gets), `folder` the local experiment folder holding optuna.db.

    Each suggestion is the grid point's config with the drawn values set at their dotted keys
    and `search: {study, point, number}`, less what the Tuner's param_space already holds. The
    Optuna trial records its Ray trial id (user attr `ray_trial_id`). Resume: Ray saves its
    trials' states some seconds after it creates them; a trial asked in between is unknown to
    the restored experiment. Rebuilt from the storage, the searcher waits for every RUNNING
    Optuna trial whose Ray trial is in Ray's newest experiment state (Ray runs it again, same id
    and config) and offers the others again, with the same parameters, before asking anything
    new: every study ends with exactly trials_per_point finished trials, and with the qmc
    sampler an interrupted sweep asks exactly the parameters of an uninterrupted one.
    """


def __getattr__(name: str) -> Any:
    # StudySearcher subclasses Ray's Searcher: made on first use, so importing this module for
    # the spec does not import Ray. Pickle finds it by name here, as the same class each time.
    if name == "StudySearcher":
        return _searcher_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
