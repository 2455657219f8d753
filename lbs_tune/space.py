"""The `search` section of a sweep file, as plain data: a space of distributions over dotted
trial-config keys, searched per grid point (one Optuna study each, `lbs_tune.studies`).

```yaml
search:
  space:
    lr.base: {log_uniform: [0.001, 10.0]}
    optimizer.momentum: {uniform: [0.0, 0.99]}     # or {values: [...]}, {int: [a, b]}
  trials_per_point: 16
  sampler: tpe          # tpe | qmc | random
  seed: 0
  objective: steps_to_target    # or: metric
  confirm: {top: 3, seeds: 3}   # the 3 best configurations again on 3 fresh seeds each
  prune: true                   # false | true | median | hyperband (see SearchSpec)
```

No Optuna, no Ray, no torch at import time: `lbs_tune.config` holds a `SearchSpec`. How the
section is checked against the rest of the sweep (keys of the trial config, values valid at
every grid point) is `lbs_tune.spec.check_search`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from lbs_tune.errors import did_you_mean


class _Strict(BaseModel):
    # lbs_tune.config's strictness (config imports this module, not the other way).
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


PRUNERS = ("median", "hyperband")


def _prune_choice(value: Any) -> Any:
    """One clear error for a `prune` that is neither a boolean nor a pruner's name."""
    if isinstance(value, bool) or value in PRUNERS:
        return value
    raise ValueError(f"got {value!r}: true, false, {' or '.join(PRUNERS)}")


class ConfirmSpec(_Strict):
    """`search.confirm`: once a study has all its trials, its `top` best configurations run
    again, each on `seeds` seeds that no trial of the search used (`lbs_tune.studies.
    confirmation_seeds`), as trials of the same sweep."""

    top: int = Field(3, ge=1)
    seeds: int = Field(3, ge=1)

    @property
    def runs(self) -> int:
        """Confirmation runs per grid point."""
        return self.top * self.seeds


class SearchSpec(_Strict):
    """The `search` section: a space over dotted trial-config keys, searched per grid point.

    `confirm` (optional): the best configurations of each study run again on fresh seeds
    (ConfirmSpec). `prune`: true (the default) stops a steps_to_target trial that can no
    longer be among the best (the best `confirm.top`, else the best one): at a step as far as
    the study's current best without meeting the target, its steps to target are already
    worse. This changes no study's best trial (nor its top) and, with the qmc sampler, no
    trial's parameters. false keeps every trial whole. For `objective: metric`, `median` or
    `hyperband` stop trials by Optuna's MedianPruner or HyperbandPruner (defaults), which may
    stop a trial that would have won; true stops nothing there.
    """

    space: dict[str, Distribution] = Field(min_length=1)
    trials_per_point: int = Field(16, ge=1)
    sampler: Literal["tpe", "qmc", "random"] = "tpe"
    seed: int = 0
    objective: Literal["steps_to_target", "metric"] = "steps_to_target"
    confirm: ConfirmSpec | None = None
    prune: Annotated[bool | Literal[PRUNERS], BeforeValidator(_prune_choice)] = True

    @field_validator("confirm")
    @classmethod
    def _top_of_the_trials(cls, confirm: ConfirmSpec | None, info: ValidationInfo):
        trials = info.data.get("trials_per_point")
        if confirm is not None and trials is not None and confirm.top > trials:
            raise ValueError(
                f"top {confirm.top} is more than the {trials} trials per point; confirm at "
                f"most {trials}"
            )
        return confirm

    @field_validator("prune")
    @classmethod
    def _pruner_of_the_objective(cls, prune: bool | str, info: ValidationInfo):
        if isinstance(prune, str) and info.data.get("objective") == "steps_to_target":
            raise ValueError(
                f"{prune} pruning is for objective: metric; a steps_to_target study stops the "
                "trials that can no longer win with prune: true"
            )
        return prune

    # A sweep made before `confirm` and `prune` existed keeps its digest and its studies' attrs:
    # the keys are written only when they differ from their defaults.
    @model_serializer(mode="wrap")
    def _new_keys_only_when_set(self, handler) -> dict[str, Any]:
        data = handler(self)
        if self.confirm is None:
            data.pop("confirm", None)
        if self.prune is True:
            data.pop("prune", None)
        return data

    @property
    def confirm_runs(self) -> int:
        """Confirmation runs per grid point (0 without `confirm`)."""
        return self.confirm.runs if self.confirm else 0

    def distributions(self) -> dict[str, Any]:
        """{dotted key: Optuna distribution}."""
        return {key: dist.optuna() for key, dist in self.space.items()}

    def dump(self) -> dict[str, Any]:
        """The section as JSON data, as in the sweep file."""
        return self.model_dump(mode="json", by_alias=True)
