"""The sweep spec: plain, typed data (pydantic only; no torch, no zoo).

A `SweepSpec` is a `base` trial config (`lbs_tune.config.TrialConfig`) plus a `grid` of dotted
keys, with the sweep's metric and target, its `search` (`lbs_tune.space`), a `branch` section,
the resources of one trial, its loggers and its start order. `trial_count` is the one home of
how many trials a sweep asks for.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lbs_tune.config import (
    MAX_BATCH,
    MAX_STEPS,
    KeyedError,
    MetricName,
    Strict,
    TrialConfig,
)
from lbs_tune.names import direction, set_dotted
from lbs_tune.space import SearchSpec


class Resources(Strict):
    """Resources of one trial. `gpu` maps batch size to a GPU fraction so small trials share."""

    cpu: float = Field(1.0, gt=0, le=10_000)
    gpu: Annotated[float, Field(le=1024)] | dict[str, Annotated[float, Field(le=1024)]] = 0.0

    @field_validator("gpu", mode="before")
    @classmethod
    def _keys_as_text(cls, value: Any) -> Any:
        # YAML reads `{16: 0.25}` with int keys; keep them as text so JSON round-trips.
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        values = value.values() if isinstance(value, dict) else [value]
        if any(v < 0 for v in values):
            raise ValueError("GPU fractions are >= 0")
        if isinstance(value, dict):
            for key in value:
                if key != "default" and not key.isdigit():
                    raise ValueError(f"gpu keys are batch sizes or 'default', not '{key}'")
        for v in values:
            if v > 1 and v != int(v):
                raise ValueError(f"a GPU request above 1 must be whole, not {v}")
        return value

    def for_batch(self, batch_size: int) -> tuple[float, float]:
        """(cpu, gpu) for a trial of this batch size. Listed sizes are upper bounds: the
        smallest listed size >= it wins ({32: 0.25, 128: 0.5, default: 1} gives batches up to 32
        a quarter GPU, up to 128 half, larger ones `default`)."""
        if not isinstance(self.gpu, dict):
            return self.cpu, self.gpu
        sizes = sorted(int(k) for k in self.gpu if k != "default")
        fitting = [s for s in sizes if s >= batch_size]
        if fitting:
            return self.cpu, self.gpu[str(fitting[0])]
        return self.cpu, self.gpu.get("default", 1.0)


class MLflowLogger(Strict):
    """Ray Tune's MLflowLoggerCallback: one MLflow run per trial (params: its config; metrics
    by optimizer step). None: MLflow's own defaults ($MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db in the working folder; the experiment named after the sweep)."""

    tracking_uri: str | None = None
    experiment_name: str | None = None


class WandbLogger(Strict):
    """Ray Tune's WandbLoggerCallback: one W&B run per trial. `mode` offline writes the runs
    into each trial's folder (`wandb sync` uploads them later); None: W&B's own ($WANDB_MODE)."""

    project: str | None = None  # None: $WANDB_PROJECT, else the sweep's name
    group: str | None = None  # None: the sweep's name
    mode: Literal["online", "offline", "disabled"] | None = None


class Loggers(Strict):
    """Where a sweep's trials are logged besides Ray's result.json: TensorBoard event files by
    optimizer step (lbs_tune.loggers, on by default), MLflow and W&B (optional extras)."""

    tensorboard: bool = True
    mlflow: MLflowLogger | None = None
    wandb: WandbLogger | None = None


class Metric(Strict):
    """The sweep's metric; its mode is the metric's own direction (`names.direction`), given
    only for a metric that has none."""

    name: MetricName = "val/accuracy"
    mode: Literal["max", "min"]

    @model_validator(mode="before")
    @classmethod
    def _own_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mode" not in data:
            own = (
                direction(data.get("name", "val/accuracy"))
                if isinstance(data.get("name", ""), str)
                else None
            )
            if own is not None:
                return {**data, "mode": own}
        return data

    @model_validator(mode="after")
    def _same_mode(self) -> Metric:
        own = direction(self.name)
        if own is not None and self.mode != own:
            raise KeyedError(
                "mode",
                f"{self.name} is better {'higher' if own == 'max' else 'lower'}; use mode: "
                f"{own} or leave mode out",
            )
        return self


class Target(Strict):
    """A value of a metric to reach (steps to target); the metric must have a direction."""

    metric: MetricName = "val/accuracy"
    value: float

    @model_validator(mode="after")
    def _directed(self) -> Target:
        if direction(self.metric) is None:
            raise KeyedError("metric", f"{self.metric} has no better direction to reach")
        return self


# The runs of a branched sweep's third phase: the planned batch schedule, and the constant
# batches it is compared with (the reference's, and the schedule's largest).
ARMS = ("schedule", "small", "large")


class BranchSpec(Strict):
    """A branched probe of the local critical batch size (Merrill et al. 2025; the sweep's phases
    are `lbs_tune.probes`'): the base config runs once at its batch B (the reference); from its
    checkpoint at each of `points` (fractions of its budget, or example counts) continuations
    at k x B for k in `multiples` train `examples` (Δ) more each, per seed of `seeds`, the LR
    (and Adam's betas and eps under sde) moved by `scaling`; then a batch schedule planned from
    the local critical batch sizes runs against constant small and large batches per seed of
    `compare_seeds` (none: no third phase). None means the paper's setting (lbs_tune.branching)
    or, for `scaling`, the optimizer's rule (linear for SGD and LARS, sqrt for AdamW and LAMB)."""

    points: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=1000)]
    points_in: Literal["fraction", "examples"] = "fraction"
    multiples: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_BATCH)]], Field(min_length=2, max_length=64)
    ] = [1, 2, 4, 8, 16]
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1000)] = [
        0,
        1,
        2,
    ]
    examples: int | None = Field(None, gt=0, le=MAX_STEPS)
    # Reports per branch (evenly over Δ): the series whose exponential average is its loss.
    reports: int = Field(4, ge=1, le=10_000)
    metric: Literal["train/loss", "val/loss"] = "train/loss"
    scaling: Literal["linear", "sqrt", "sde"] | None = None
    tolerance: float | None = Field(None, ge=0)
    smoothing: float | None = Field(None, gt=0, le=1)
    compare_seeds: list[Annotated[int, Field(ge=0)]] | None = None  # None: `seeds`
    max_batch: int | None = Field(None, gt=0, le=MAX_BATCH)  # None: the largest k x B

    @field_validator("points")
    @classmethod
    def _increasing(cls, points: list[float]) -> list[float]:
        if points != sorted(set(points)):
            raise ValueError(f"{points}: list each point once, in increasing order")
        return points

    @field_validator("multiples")
    @classmethod
    def _from_one(cls, multiples: list[int]) -> list[int]:
        if multiples[0] != 1 or multiples != sorted(set(multiples)):
            raise ValueError(
                f"{multiples}: increasing multiples of the reference batch starting at 1 (the "
                "branch every other is compared with), e.g. [1, 2, 4, 8, 16]"
            )
        return multiples

    @field_validator("seeds", "compare_seeds")
    @classmethod
    def _once(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"{seeds}: list each seed once")
        return seeds

    @model_validator(mode="after")
    def _points(self) -> BranchSpec:
        if self.points_in == "fraction" and self.points[-1] >= 1:
            raise KeyedError(
                "points",
                f"{self.points[-1]:g} is not a fraction of the budget in (0, 1); use "
                "points_in: examples for example counts",
            )
        if self.points_in == "examples" and any(p != int(p) for p in self.points):
            raise KeyedError("points", f"{self.points}: example counts are whole numbers")
        return self

    @property
    def compared_seeds(self) -> list[int]:
        return self.seeds if self.compare_seeds is None else self.compare_seeds

    @property
    def trial_count(self) -> int:
        """The reference, every branch, and each arm of the comparison per seed."""
        branches = len(self.points) * len(self.multiples) * len(self.seeds)
        return 1 + branches + len(ARMS) * len(self.compared_seeds)


class SweepSpec(Strict):
    """A whole sweep: the base trial config, the grid, the analysis target and the resources."""

    # The experiment folder's name: short enough for every file system with Ray's names inside.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    base: dict[str, Any] = {}
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    metric: Metric = Metric(name="val/accuracy", mode="max")
    target: Target | None = None
    # Tuned hyper-parameters: one Optuna study per grid point (lbs_tune.studies).
    search: SearchSpec | None = None
    resources: Resources = Resources()
    max_concurrent: int | None = Field(None, gt=0, le=1_000_000)
    # Which trials start first: the longest (by estimated cost: small batches take the most
    # steps) so the sweep does not wait on them at its end, or the grid's own order.
    schedule: Literal["longest_first", "grid"] = "longest_first"
    max_failures: int = Field(2, ge=0, le=10_000)
    loggers: Loggers = Loggers()
    # A branched probe from the base config's run (no grid, no search): lbs_tune.probes.
    branch: BranchSpec | None = None

    @model_validator(mode="after")
    def _branch_alone(self) -> SweepSpec:
        if self.branch is not None and (self.search is not None or self.points() != [{}]):
            raise KeyedError(
                "branch",
                "a branch sweep runs the base config as its reference; remove the "
                f"{'search' if self.search is not None else 'grid'} section",
            )
        return self

    @field_validator("grid")
    @classmethod
    def _values_once(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise KeyedError(
                    key,
                    f"{repeated[0]!r} listed twice; each grid value makes trials; list it once "
                    "(seeds make repeats)",
                )
        return grid

    @property
    def trials_per_point(self) -> int:
        """Ray Tune trials per grid point: the search's trials of its study and its
        confirmation runs (`search.confirm`: top x seeds), else one."""
        if self.search is None:
            return 1
        return self.search.trials_per_point + self.search.confirm_runs

    @property
    def trial_count(self) -> int:
        """The trials this sweep asks for: grid points x trials per point (confirmation runs
        included). The one home of this count (runner, dry run, console and status read it)."""
        if self.branch is not None:
            return self.branch.trial_count
        return math.prod(len(values) for values in self.grid.values()) * self.trials_per_point

    def points(self) -> list[dict[str, Any]]:
        """The grid points in order: one {dotted key: value} dict each (one {} for no grid)."""
        keys = list(self.grid)
        return [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.grid.values())
        ]

    @cached_property
    def trials(self) -> list[TrialConfig]:
        """Every grid point as a validated TrialConfig, in grid order (`points()` order)."""
        return [TrialConfig.model_validate(self.trial_dict(p)) for p in self.points()]

    def trial_dict(self, point: dict[str, Any]) -> dict[str, Any]:
        """The nested, unvalidated config dict of one grid point (base + point)."""
        tree = copy.deepcopy(self.base)
        for key, value in point.items():
            set_dotted(tree, key, value)
        return tree

    def digest(self) -> str:
        """A hash of everything that decides the trials, to recognise the same sweep again."""
        # The start order, the description and the loggers decide nothing about any trial's
        # results; a sweep without a `branch` section hashes as one recorded before it existed.
        skip = {"description", "schedule", "loggers", *(() if self.branch else ("branch",))}
        body = self.model_dump(mode="json", exclude=skip)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
