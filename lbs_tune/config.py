"""The trial config: plain, typed data (pydantic only; no torch, no zoo), and its budget in steps.

A `TrialConfig` holds every knob of one training run (a sweep of them is `lbs_tune.sweep`).
Validating it checks types, ranges and consistency; the checks that need the dataset and model
zoos (a known model, a batch that fits the split) live in `lbs_tune.checks` and run once per grid
point before anything starts.
"""

from __future__ import annotations

import os
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
from lbs_tune.names import BRANCH_KEY, BUDGET_KEYS, METRICS, SEARCH_KEY, direction, flatten
from lbs_tune.nqm import problems as nqm_problems

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


class Strict(BaseModel):
    # Every number finite: an inf or NaN passes a `gt=0` check and then fails every trial.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The epsilon each optimizer uses when the config leaves it unset (None): LAMB's paper and common
# implementations use 1e-6, Adam's 1e-8. SGD and LARS have no epsilon.
DEFAULT_EPS = {"adamw": 1e-8, "lamb": 1e-6}


class OptimizerConfig(Strict):
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


class LRConfig(Strict):
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


class NQMConfig(Strict):
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


class DataConfig(Strict):
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


class NoiseScaleConfig(Strict):
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


class SharpnessConfig(Strict):
    """The top eigenvalue of the training loss's Hessian every `every` epochs, on the first
    `batch` training examples (unaugmented) as the step computes the loss (train mode: batch
    norm on the statistics of each micro-batch), by `iterations` Lanczos steps; for AdamW also
    that of the preconditioned Hessian P^-1 H (`lbs_tune.measure`)."""

    every: float = Field(gt=0, le=MAX_EPOCHS)
    batch: int = Field(1024, gt=0, le=MAX_BATCH)
    iterations: int = Field(20, ge=1, le=10_000)


class TrialTarget(Strict):
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


class TrialConfig(Strict):
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
