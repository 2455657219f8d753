"""The trial config and the sweep spec: plain, typed data (pydantic only; no torch, no zoo).

A `TrialConfig` holds every knob of one training run; a `SweepSpec` is a `base` trial config plus
a `grid` of dotted keys. Validating them checks types, ranges and consistency; the checks that
need the dataset and model zoos (a known model, a batch that fits the split) live in
`lbs_tune.checks` and run once per grid point before anything starts.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lbs_tune.branching import parse_schedule, steps_to
from lbs_tune.errors import short
from lbs_tune.names import BUDGET_KEYS, METRICS, direction, flatten, set_dotted
from lbs_tune.nqm import problems as nqm_problems
from lbs_tune.space import SearchSpec

MetricName = Literal[METRICS]


# Upper bounds that keep every derived count finite and within int64 (examples = steps x batch).
MAX_BATCH = 2**31
MAX_STEPS = 10**12
MAX_EPOCHS = 1e6
MAX_SAMPLES = 10**7


class KeyedError(ValueError):
    """A config error that belongs to one key although a whole-model validator found it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Strict(BaseModel):
    # Every number finite: an inf or NaN passes a `gt=0` check and then fails every trial.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The epsilon each optimizer uses when the config leaves it unset (None): LAMB's paper and common
# implementations use 1e-6, Adam's 1e-8. SGD and LARS have no epsilon.
DEFAULT_EPS = {"adamw": 1e-8, "lamb": 1e-6}


class OptimizerConfig(_Strict):
    """Optimizer and its hyper-parameters; the learning rate itself comes from `LRConfig`."""

    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    # Goyal et al. 2017 and most large-batch work exempt batch-norm and bias parameters.
    decay_norm_and_bias: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = Field(None, gt=0)  # None: 1e-6 for lamb, 1e-8 for adamw (optim)
    trust_coefficient: float = Field(0.001, gt=0)

    @property
    def resolved_eps(self) -> float:
        """`eps`, or the default of `name` (DEFAULT_EPS) when it is None; AdamW and LAMB only."""
        return self.eps if self.eps is not None else DEFAULT_EPS[self.name]


class LRConfig(_Strict):
    """Learning-rate rule: a base LR at a base batch size, a scaling rule, warmup and decay."""

    base: float = Field(0.1, gt=0)
    base_batch_size: int = Field(256, gt=0, le=MAX_BATCH)
    # sde: AdamW only; the LR as sqrt, and the betas and eps moved too (lbs_tune.rules).
    scaling: Literal["none", "linear", "sqrt", "sde"] = "none"
    warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    warmup_from: Literal["base", "zero"] = "base"
    decay: Literal["constant", "step", "cosine", "linear", "poly"] = "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = Field(0.1, gt=0)
    power: float = Field(2.0, gt=0, le=100)  # poly decay: peak x (1 - progress)^power (LARS: 2)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < m < 1 for m in value) or list(value) != sorted(value):
            raise ValueError("milestones are increasing fractions of the budget in (0, 1)")
        return value


# The largest noisy quadratic: its arrays are made when a config is checked.
MAX_NQM_DIM = 10**7


class NQMConfig(_Strict):
    """Dataset `nqm`'s problem, the arguments of `lbs_tune.nqm.quadratic`: curvatures h_i =
    scale * i^-power for i = 1..dim, or the given `values`; per-example gradient-noise variances
    noise_scale * h (noise covariance proportional to the Hessian), or the given `noise`; the
    start theta0, one value for every dimension or one per dimension."""

    dim: int | None = Field(None, le=MAX_NQM_DIM)
    power: float = 1.0
    scale: float = 1.0
    values: tuple[float, ...] | None = Field(None, max_length=MAX_NQM_DIM)
    noise_scale: float = 1.0
    noise: tuple[float, ...] | None = Field(None, max_length=MAX_NQM_DIM)
    theta0: float | tuple[float, ...] = 1.0

    @model_validator(mode="after")
    def _a_problem(self) -> NQMConfig:
        if self.values is not None and self.dim is not None:
            raise KeyedError("values", "give dim (with power and scale) or values, not both")
        found = nqm_problems(**self.arguments())
        if found:
            raise KeyedError(*found[0])
        return self

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of `lbs_tune.nqm.quadratic` (and `problems`)."""
        return self.model_dump()

    @property
    def dimension(self) -> int:
        """d: the number of curvatures."""
        return len(self.values) if self.values is not None else self.dim


class DataConfig(_Strict):
    """Where data lives and how the chosen dataset is split and augmented."""

    dir: str | None = None
    download: bool = False
    val_fraction: float = Field(0.1, ge=0, lt=1)
    samples: int = Field(50_000, gt=0, le=MAX_SAMPLES)
    crop_padding: int | None = Field(None, ge=0)
    flip: bool | None = None
    shape: tuple[Annotated[int, Field(gt=0, le=65_536)], ...] = Field((3, 32, 32), min_length=1)
    classes: int = Field(10, ge=2, le=1_000_000)
    # Language models: each sequence of a batch is `bptt` tokens (truncated backpropagation).
    bptt: int = Field(35, gt=0, le=100_000)
    # Segmentation: images and masks are resized to (height, width) once, when loaded.
    image_size: tuple[
        Annotated[int, Field(gt=0, le=65_536)], Annotated[int, Field(gt=0, le=65_536)]
    ] = (256, 512)
    # Dataset nqm: the noisy quadratic model (lbs_tune.quadratic).
    nqm: NQMConfig | None = None


class NoiseScaleConfig(_Strict):
    """The gradient noise scales B_simple and B_noise (McCandlish et al. 2018) from per-example
    gradients, see `lbs_tune.measure`: windows of `window` consecutive steps every `every`
    epochs, each step on `batch` examples of its own (drawn with replacement from the training
    split, augmented, by the measurement's own generator), B_noise from Hessian-vector products
    with `hessian_examples` of them (with batch norm: of its groups; 0: no B_noise).
    `micro_batch` divides `batch`: the examples whose gradients are taken at once (a memory
    bound), or with batch norm the examples of a group, one pass each (None: all at once, or
    at most 16 groups); the results do not depend on it, beyond their spread."""

    every: float = Field(gt=0, le=MAX_EPOCHS)
    window: int = Field(10, ge=1, le=100_000)
    batch: int = Field(256, ge=2, le=MAX_BATCH)
    micro_batch: int | None = Field(None, gt=0, le=MAX_BATCH)
    hessian_examples: int = Field(16, ge=0, le=MAX_BATCH)

    @model_validator(mode="after")
    def _sizes(self) -> NoiseScaleConfig:
        if self.micro_batch is not None and (
            self.micro_batch >= self.batch or self.batch % self.micro_batch
        ):
            raise KeyedError(
                "micro_batch",
                f"micro_batch {self.micro_batch} must divide batch {self.batch} and be smaller",
            )
        if self.hessian_examples > self.batch:
            raise KeyedError(
                "hessian_examples",
                f"hessian_examples {self.hessian_examples} is more than batch {self.batch}; "
                f"use at most {self.batch}",
            )
        return self


class SharpnessConfig(_Strict):
    """The top eigenvalue of the training loss's Hessian every `every` epochs, on the first
    `batch` training examples (unaugmented) as the step computes the loss (train mode: batch
    norm on the statistics of each micro-batch), by `iterations` Lanczos steps; for AdamW also
    that of the preconditioned Hessian P^-1 H (`lbs_tune.measure`)."""

    every: float = Field(gt=0, le=MAX_EPOCHS)
    batch: int = Field(1024, gt=0, le=MAX_BATCH)
    iterations: int = Field(20, ge=1, le=10_000)


class TrialTarget(_Strict):
    """A value of a metric that the trial watches for at its evaluations: the first step that
    reaches it is reported as `target/step` (null until then); with `stop`, the trial ends there
    (all a steps-to-target measurement needs)."""

    metric: MetricName = "val/accuracy"
    value: float
    stop: bool = False


def _number_text(value: Any) -> Any:
    """'2e5' -> 200000.0 (YAML 1.1 reads an exponent without a dot as text); else `value`."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def data_dir(data: DataConfig) -> Path:
    """The absolute data folder of a config: data.dir, else $LBS_DATA_DIR, else
    ~/.cache/lbs-tune/data."""
    if data.dir:
        return Path(data.dir).expanduser().resolve()
    env = os.environ.get("LBS_DATA_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "lbs-tune" / "data").resolve()


class TrialConfig(_Strict):
    """Every knob of one training run. One grid point of a sweep is one `TrialConfig`."""

    dataset: str = "mnist1d"
    data: DataConfig = DataConfig()
    model: str = "mlp"
    batch_size: int = Field(128, gt=0, le=MAX_BATCH)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS)
    steps: int | None = Field(None, gt=0, le=MAX_STEPS)
    examples: int | None = Field(None, gt=0, le=MAX_STEPS)
    # A floor on an epochs or examples budget, in steps (`total_steps`): equal epochs leave the
    # largest batch sizes too few steps to reach a target that needs ~S_min of them.
    min_steps: int | None = Field(None, gt=0, le=MAX_STEPS)
    eval_every: float = Field(1.0, gt=0, le=MAX_EPOCHS)
    eval_batch_size: int = Field(1024, gt=0, le=MAX_BATCH)
    checkpoint_every: float = Field(1.0, gt=0, le=MAX_EPOCHS)
    keep_checkpoints: int | None = Field(None, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    lr: LRConfig = LRConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    # The most examples through the network at once (gradient accumulation above it); "auto":
    # the largest divisor of batch_size that fits the GPU, probed at the start of the trial.
    max_device_batch: Annotated[int, Field(gt=0, le=MAX_BATCH)] | Literal["auto"] | None = None
    ghost_batch_size: int | None = Field(None, gt=0, le=MAX_BATCH)
    # Keyword arguments of the model's builder (e.g. the LSTM's emsize, nhid, nlayers, dropout).
    model_options: dict[str, int | float | bool] = {}
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Clip the gradient's global norm to this before each update (None: no clipping).
    clip_grad_norm: float | None = Field(None, gt=0)
    divergence_loss: float | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How the training step runs: eagerly ("off"), through torch.compile ("default"), or
    # captured whole in one CUDA graph ("graphs"); "auto" is "off" until measured on a GPU.
    compile: Literal["auto", "off", "default", "graphs"] = "auto"
    noise_scale: NoiseScaleConfig | None = None
    sharpness: SharpnessConfig | None = None
    target: TrialTarget | None = None
    # The batch size as a step function of examples seen, [[0, 64], [200000, 128], ...]
    # (lbs_tune.branching); batch_size is its first batch. The LR (and under lr.scaling sde
    # Adam's betas and eps) moves with the batch by the LR rule at every switch.
    batch_schedule: tuple[tuple[int, int], ...] | None = None
    # A checkpoint file (path or URI) to start from: its model and optimizer state; the data
    # order, augmentation and random states are this trial's own (its seed), and its step
    # counter (and so its budget, warmup and decay) restarts at 0. Resuming the trial itself
    # continues from the trial's own checkpoints instead.
    start_from: str | None = None

    @field_validator("batch_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        if value is None:
            return None
        # YAML reads 2e5 (no dot) as text: take numbers written so.
        entries = (
            [[_number_text(v) for v in entry] for entry in value]
            if isinstance(value, list | tuple) and all(isinstance(e, list | tuple) for e in value)
            else value
        )
        try:
            return parse_schedule(entries)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{exc}; write [[0, first batch], [examples, batch], ...] (e.g. "
                "[[0, 64], [200000, 128]])"
            ) from None

    @field_validator("max_device_batch", mode="before")
    @classmethod
    def _device_batch(cls, value: Any) -> Any:
        # One message for both forms, not one per member of the union.
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_BATCH:
            raise ValueError(
                f"got {short(value)}: a number of examples from 1 to {MAX_BATCH}, or auto "
                "(the largest that fits the GPU)"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _first_batch(cls, data: Any) -> Any:
        # With a batch schedule, batch_size defaults to its first batch.
        if isinstance(data, dict) and "batch_size" not in data:
            schedule = data.get("batch_schedule")
            if isinstance(schedule, list | tuple) and schedule:
                first = schedule[0]
                if isinstance(first, list | tuple) and len(first) == 2:
                    return {**data, "batch_size": _number_text(first[1])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrialConfig:
        budgets = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        if len(budgets) > 1:
            raise KeyedError(budgets[-1], f"give one budget, not {' and '.join(budgets)}")
        if not budgets:
            raise ValueError("no budget: set one of epochs, steps or examples")
        if self.min_steps is not None and self.steps is not None:
            raise KeyedError(
                "min_steps",
                "min_steps is a floor on an epochs or examples budget; with steps given, "
                "remove it (or raise steps)",
            )
        for key in ("max_device_batch", "ghost_batch_size"):
            size = getattr(self, key)
            if size in (None, "auto"):
                continue
            if size < self.batch_size and self.batch_size % size:
                raise KeyedError(key, f"{key} {size} must divide batch_size {self.batch_size}")
        micro, ghost = self.micro_batch_size, self.ghost_batch_size
        if ghost is not None and ghost < micro and micro % ghost:
            raise KeyedError(
                "ghost_batch_size", f"ghost_batch_size {ghost} must divide max_device_batch {micro}"
            )
        if (
            ghost is not None
            and isinstance(self.max_device_batch, int)
            and ghost > self.max_device_batch
        ):
            # Each micro-batch is normalised by its own statistics: a larger ghost batch can't be.
            raise KeyedError(
                "ghost_batch_size",
                f"ghost_batch_size {ghost} is larger than max_device_batch "
                f"{self.max_device_batch}; use at most {self.max_device_batch}",
            )
        if self.target is not None and direction(self.target.metric) is None:
            raise KeyedError(
                "target.metric", f"{self.target.metric} has no better direction to reach"
            )
        if self.batch_schedule is not None:
            self._check_schedule()
        return self

    def _check_schedule(self) -> None:
        """A batch schedule: batch_size is its first batch, and every batch of it must satisfy
        what batch_size must (micro-batches, ghost batches, the noise scale's micro-batch)."""
        first = self.batch_schedule[0][1]
        if self.batch_size != first:
            raise KeyedError(
                "batch_size",
                f"batch_size {self.batch_size} is not batch_schedule's first batch {first}; "
                f"set batch_size: {first} or leave it out",
            )
        if self.compile == "graphs":
            raise KeyedError(
                "compile",
                "compile: graphs captures one batch shape and batch_schedule changes it; use "
                "compile: default or off",
            )
        if self.max_device_batch == "auto":
            raise KeyedError(
                "max_device_batch",
                "max_device_batch: auto is probed for one batch size and batch_schedule has "
                "several; give a number that divides every batch of the schedule",
            )
        for _, batch in self.batch_schedule[1:]:
            tree = self.model_dump() | {"batch_size": batch, "batch_schedule": None}
            try:
                TrialConfig.model_validate(tree)
            except ValidationError as exc:
                cause = exc.errors()[0].get("ctx", {}).get("error")
                key = cause.key if isinstance(cause, KeyedError) else "batch_schedule"
                message = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise KeyedError(key, f"at batch_schedule's batch {batch}: {message}") from None

    @property
    def micro_batch_size(self) -> int:
        """The largest batch that goes through the network at once (gradient accumulation).
        With max_device_batch "auto" this is the whole batch: the trial finds the real one."""
        if self.max_device_batch in (None, "auto"):
            return self.batch_size
        return min(self.batch_size, self.max_device_batch)

    @property
    def bn_batch(self) -> int:
        """The examples each batch norm normalises over: the ghost batch, else the micro-batch
        (with gradient accumulation every micro-batch is normalised by its own statistics)."""
        return min(self.ghost_batch_size or self.micro_batch_size, self.micro_batch_size)

    def flat(self) -> dict[str, Any]:
        """The config as a flat dict with dotted keys (`lr.scaling`), for tables and reports."""
        return flatten(self.model_dump(mode="json"))


def resolved(config: TrialConfig) -> TrialConfig:
    """The config as a trial runs it wherever it runs: a relative `data.dir` (and a local
    `start_from`) made absolute against this process's working directory (a trial process runs
    inside its trial folder)."""
    if config.start_from is not None and "://" not in config.start_from:
        start = str(Path(config.start_from).expanduser().resolve())
        config = config.model_copy(update={"start_from": start})
    if config.data.dir is None:
        return config
    folder = str(Path(config.data.dir).expanduser().resolve())
    return config.model_copy(update={"data": config.data.model_copy(update={"dir": folder})})


# The key of a searched trial's params that names its study and Optuna trial
# ({study, point, number}); it is no knob of the run, so `trial_config` leaves it out.
SEARCH_KEY = "search"
# The same for a trial of a branched sweep: its phase and place (lbs_tune.probes).
BRANCH_KEY = "branch"


def trial_config(params: dict[str, Any]) -> TrialConfig:
    """The TrialConfig of a trial's params (Ray's params.json, what the trainable gets): the
    one way from a trial folder back to its config (trainable, evaluate, branches). A ValueError
    (pydantic's ValidationError is one) for params that are not a trial config."""
    if not isinstance(params, dict):
        raise ValueError(f"not a JSON object but {type(params).__name__}")
    return TrialConfig.model_validate(
        {k: v for k, v in params.items() if k not in (SEARCH_KEY, BRANCH_KEY)}
    )


def changes(old: dict[str, Any], new: dict[str, Any], ignore=(), limit: int = 4) -> str:
    """What differs between two nested configs, as 'key: old -> new; ...' (at most `limit`
    keys, then '(+N more)'); keys in `ignore` (dotted) do not count. '' when nothing differs."""
    a, b = flatten(old), flatten(new)
    changed = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k) != b.get(k)
    ]
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


# --------------------------------------------------------------------------- Sweep spec


class Resources(_Strict):
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


class MLflowLogger(_Strict):
    """Ray Tune's MLflowLoggerCallback: one MLflow run per trial (params: its config; metrics
    by optimizer step). None: MLflow's own defaults ($MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db in the working folder; the experiment named after the sweep)."""

    tracking_uri: str | None = None
    experiment_name: str | None = None


class WandbLogger(_Strict):
    """Ray Tune's WandbLoggerCallback: one W&B run per trial. `mode` offline writes the runs
    into each trial's folder (`wandb sync` uploads them later); None: W&B's own ($WANDB_MODE)."""

    project: str | None = None  # None: $WANDB_PROJECT, else the sweep's name
    group: str | None = None  # None: the sweep's name
    mode: Literal["online", "offline", "disabled"] | None = None


class Loggers(_Strict):
    """Where a sweep's trials are logged besides Ray's result.json: TensorBoard event files by
    optimizer step (lbs_tune.loggers, on by default), MLflow and W&B (optional extras)."""

    tensorboard: bool = True
    mlflow: MLflowLogger | None = None
    wandb: WandbLogger | None = None


class Metric(_Strict):
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


class Target(_Strict):
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


class BranchSpec(_Strict):
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


class SweepSpec(_Strict):
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
        # results (and a sweep recorded before `loggers` existed keeps its digest).
        body = self.model_dump(mode="json", exclude={"description", "schedule", "loggers"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def epoch_steps(train_size: int, batch_size: int) -> float:
    """Steps in one epoch, N / B: fractional, since batches run across epoch boundaries (every
    batch size sees the same examples per epoch; `lbs_tune.data.BatchSampler`)."""
    return train_size / batch_size


def every_steps(epochs: float, per_epoch: float) -> int:
    """Steps between two events every `epochs` epochs (evaluations, checkpoints, measurements)
    of `per_epoch` steps each: at least one."""
    return max(1, round(epochs * per_epoch))


def total_steps(config: TrialConfig, train_size: int) -> int:
    """The budget in optimizer steps, the one home of its formula: the steps given, else
    round(epochs x N / B) (the same examples for every batch size, within one batch) or
    examples // B, at least `min_steps` (and 1). With a batch schedule, the fewest steps that
    see the examples (epochs x N rounded, or `examples`) by the schedule's step accounting
    (`lbs_tune.branching.steps_to`).

    Equal epochs give steps that fall as 1/B, faster than steps to target, which stop falling
    near S_min above the critical batch size: MNIST-1D at 10 epochs gives batch 2048 35 steps
    where the best needed 27. A floor of a few S_min gives the largest batch sizes room and
    changes nothing at the small ones."""
    if config.steps is not None:
        return config.steps
    seen = config.examples if config.examples is not None else round(config.epochs * train_size)
    if config.batch_schedule is not None:
        steps = steps_to(config.batch_schedule, seen)
    elif config.examples is not None:
        steps = config.examples // config.batch_size
    else:
        steps = round(config.epochs * epoch_steps(train_size, config.batch_size))
    return max(1, config.min_steps or 1, steps)
