"""Sweep files and trial configs: typed models, YAML loading with line numbers, grid expansion.

A sweep file is a `base` trial config plus a `grid` of dotted keys. Every grid point is
validated as a `TrialConfig` before anything starts; errors name the file, the line and the key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lbs_tune.errors import UserError

# The metric names of every report: the same in the loop, in Ray's files, in the tables and plots.
METRICS = (
    "step",
    "epoch",
    "examples",
    "lr",
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "test/loss",
    "test/accuracy",
    "images_per_s",
    "diverged",
)


class KeyedError(ValueError):
    """A config error that belongs to one key although a whole-model validator found it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Strict):
    """Optimizer and its hyper-parameters; the learning rate itself comes from `LRConfig`."""

    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    # Goyal et al. 2017 and most large-batch work exempt batch-norm and bias parameters.
    decay_norm_and_bias: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    trust_coefficient: float = Field(0.001, gt=0)


class LRConfig(_Strict):
    """Learning-rate rule: a base LR at a base batch size, a scaling rule, warmup and decay."""

    base: float = Field(0.1, gt=0)
    base_batch_size: int = Field(256, gt=0)
    scaling: Literal["none", "linear", "sqrt"] = "none"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_from: Literal["base", "zero"] = "base"
    decay: Literal["constant", "step", "cosine", "linear"] = "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = Field(0.1, gt=0)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < m < 1 for m in value) or list(value) != sorted(value):
            raise ValueError("milestones are increasing fractions of the budget in (0, 1)")
        return value


class DataConfig(_Strict):
    """Where data lives and how the chosen dataset is split and augmented."""

    dir: str | None = None
    download: bool = False
    val_fraction: float = Field(0.1, ge=0, lt=1)
    samples: int = Field(50_000, gt=0)
    crop_padding: int | None = Field(None, ge=0)
    flip: bool | None = None
    shape: tuple[int, ...] = (3, 32, 32)
    classes: int = Field(10, ge=2)


class TrialConfig(_Strict):
    """Every knob of one training run. One grid point of a sweep is one `TrialConfig`."""

    dataset: str = "mnist1d"
    data: DataConfig = DataConfig()
    model: str = "mlp"
    batch_size: int = Field(128, gt=0)
    seed: int = 0
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    examples: int | None = Field(None, gt=0)
    eval_every: float = Field(1.0, gt=0)
    eval_batch_size: int = Field(1024, gt=0)
    checkpoint_every: float = Field(1.0, gt=0)
    keep_checkpoints: int | None = Field(None, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    lr: LRConfig = LRConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    max_device_batch: int | None = Field(None, gt=0)
    ghost_batch_size: int | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    divergence_loss: float | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from lbs_tune.data import DATASETS

        _check_name("dataset", value, DATASETS)
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from lbs_tune.models import validate_model_name

        validate_model_name(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrialConfig:
        from lbs_tune.data import DATASETS

        budgets = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        if len(budgets) > 1:
            raise KeyedError(budgets[-1], f"give one budget, not {' and '.join(budgets)}")
        if not budgets:
            raise ValueError("no budget: set one of epochs, steps or examples")
        train_size = DATASETS[self.dataset].train_size(self.data)
        if self.batch_size > train_size:
            raise KeyedError(
                "batch_size",
                f"batch_size {self.batch_size} is larger than the {train_size} training "
                f"examples of {self.dataset}; use at most {train_size}",
            )
        self._check_model_fits()
        for key in ("max_device_batch", "ghost_batch_size"):
            size = getattr(self, key)
            if size is not None and size < self.batch_size and self.batch_size % size:
                raise KeyedError(key, f"{key} {size} must divide batch_size {self.batch_size}")
        micro, ghost = self.micro_batch_size, self.ghost_batch_size
        if ghost is not None and ghost < micro and micro % ghost:
            raise KeyedError(
                "ghost_batch_size", f"ghost_batch_size {ghost} must divide max_device_batch {micro}"
            )
        return self

    def _check_model_fits(self) -> None:
        from lbs_tune.data import DATASETS
        from lbs_tune.models import check_model_fits, models_that_fit

        info = DATASETS[self.dataset]
        shape, classes = info.input_shape(self.data), info.num_classes(self.data)
        try:
            check_model_fits(self.model, classes, shape)
        except ValueError as exc:
            fitting = ", ".join(models_that_fit(classes, shape)) or "none of the zoo"
            raise KeyedError(
                "model",
                f"{self.model} cannot take {self.dataset} inputs of shape {shape} ({exc}); "
                f"models that can: {fitting}",
            ) from None

    @property
    def micro_batch_size(self) -> int:
        """The largest batch that goes through the network at once (gradient accumulation)."""
        return min(self.batch_size, self.max_device_batch or self.batch_size)

    def flat(self) -> dict[str, Any]:
        """The config as a flat dict with dotted keys (`lr.scaling`), for tables and reports."""
        return flatten(self.model_dump(mode="json"))


def _check_name(kind: str, value: str, known) -> None:
    if value not in known:
        raise ValueError(f"unknown {kind} '{value}'{did_you_mean(value, known)}")


def did_you_mean(value: str, candidates) -> str:
    """' (did you mean 'x'?)' for the closest candidate, else the list of known names."""
    value = str(value)
    scored = [
        (difflib.SequenceMatcher(None, value, c).ratio(), _common_prefix(value, c), c)
        for c in candidates
    ]
    best = max(scored, default=None)
    if best and best[0] >= 0.6:
        return f" (did you mean '{best[2]}'?)"
    return f"; known: {', '.join(sorted(candidates))}"


def _common_prefix(a: str, b: str) -> int:
    same = itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False))
    return sum(1 for _ in same)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lr': {'base': 0.1}} -> {'lr.base': 0.1}; lists and tuples stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


BUDGET_KEYS = ("epochs", "steps", "examples")


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `tree['a']['b'] = value` for key 'a.b', making the inner dicts as needed.

    Setting one budget key (epochs, steps, examples) removes the others: it replaces the budget.
    """
    if key in BUDGET_KEYS:
        for other in BUDGET_KEYS:
            tree.pop(other, None)
    *parents, leaf = key.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"'{part}' of '{key}' is a value, not a section")
        tree = child
    tree[leaf] = value


# --------------------------------------------------------------------------- Sweep spec


class Resources(_Strict):
    """Resources of one trial. `gpu` maps batch size to a GPU fraction so small trials share."""

    cpu: float = Field(1.0, gt=0)
    gpu: float | dict[str, float] = 0.0

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


class Metric(_Strict):
    name: str = "val/accuracy"
    mode: Literal["max", "min"] = "max"


class Target(_Strict):
    metric: str = "val/accuracy"
    value: float


class SweepSpec(_Strict):
    """A whole sweep: the base trial config, the grid, the analysis target and the resources."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    metric: Metric = Metric()
    target: Target | None = None
    resources: Resources = Resources()
    max_concurrent: int | None = Field(None, gt=0)
    max_failures: int = Field(2, ge=0)

    def points(self) -> list[dict[str, Any]]:
        """The grid points in order: one {dotted key: value} dict each (one {} for no grid)."""
        keys = list(self.grid)
        return [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.grid.values())
        ]

    def trial_dict(self, point: dict[str, Any]) -> dict[str, Any]:
        """The nested, unvalidated config dict of one grid point (base + point)."""
        tree = copy.deepcopy(self.base)
        for key, value in point.items():
            set_dotted(tree, key, value)
        return tree

    def digest(self) -> str:
        """A hash of everything that decides the trials, to recognise the same sweep again."""
        body = self.model_dump(mode="json", exclude={"description"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- Loading


class _Source:
    """A loaded YAML file: its data and the line of every dotted key, for error messages."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = getattr(exc, "problem", None) or str(exc)
            raise UserError(f"{where}: malformed YAML: {problem}; fix the syntax") from None
        if not isinstance(self.data, dict):
            raise UserError(f"{path}: a sweep file is a mapping with 'name', 'base' and 'grid'")
        self.lines: dict[str, int] = {}
        self._index(node, "")

    def _index(self, node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key in self.lines:
                # YAML keeps the last of two equal keys: the first would be silently ignored.
                raise UserError(
                    f"{self.path}:{line}: {key}: given twice (first on line {self.lines[key]}); "
                    "keep one"
                )
            self.lines[key] = line
            self._index(value_node, key + ".")

    def where(self, key: str) -> str:
        """'file:line' for the nearest enclosing key that has a line."""
        parts = key.split(".")
        while parts:
            line = self.lines.get(".".join(parts))
            if line:
                return f"{self.path}:{line}"
            parts.pop()
        return str(self.path)


def _describe(error: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, message) for one pydantic error, with did-you-mean for unknown keys."""
    loc = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, KeyedError):
        loc = [*loc, *cause.key.split(".")]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        return key, f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], fields)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error":
        message = f"got {error['input']!r}: {message.lower()}"
        choices = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        hint = did_you_mean(error["input"], choices) if choices else ""
        if hint.startswith(" (did you mean"):
            message += hint
    return key, message


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def validation_message(exc: ValidationError, model: type[BaseModel], where) -> str:
    """One line for a pydantic error: 'file:line: key: problem' (+N more)."""
    errors = exc.errors()
    key, message = _describe(errors[0], model)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where(key)}: {key or 'config'}: {message}{more}"


def load_spec(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Load and validate a sweep file, including every grid point as a `TrialConfig`.

    `overrides` are 'KEY=VALUE' texts on the file's own dotted keys (`base.steps=2`,
    `grid.batch_size=[16,32]`, `max_concurrent=4`); a grid key keeps its dots (`grid.lr.scaling`).
    """
    source = _Source(Path(path))
    for text in overrides:
        key, value = parse_override(text)
        section, _, rest = key.partition(".")
        try:
            if section in ("grid", "base") and rest:
                if not isinstance(source.data.get(section), dict):
                    source.data[section] = {}
                if section == "grid":
                    source.data["grid"][rest] = value
                else:
                    set_dotted(source.data["base"], rest, value)
            else:
                set_dotted(source.data, key, value)
        except ValueError as exc:
            raise UserError(f"--set {text}: {exc}") from None
    return check_spec(source.data, source.where)


def check_spec(data: dict[str, Any], where: Callable[[str], str]) -> SweepSpec:
    """Validate a sweep as loaded from YAML or JSON; `where(key)` places a key in its file."""
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(exc, SweepSpec, where)) from None
    for key, values in spec.grid.items():
        if not values:
            fix = "list at least one or remove the key"
            raise UserError(f"{where(f'grid.{key}')}: grid.{key}: no values; {fix}")
        seen = []
        for value in values:
            if value in seen:
                fix = "each grid value makes trials; list it once (seeds make repeats)"
                raise UserError(
                    f"{where(f'grid.{key}')}: grid.{key}: {value!r} listed twice; {fix}"
                )
            seen.append(value)
    for point in spec.points():
        try:
            tree = spec.trial_dict(point)
        except ValueError as exc:  # a grid key under a base key that holds a value
            key = next(k for k in point if k.split(".")[0] in spec.base)
            fix = f"make base.{key.split('.')[0]} a section or change grid.{key}"
            raise UserError(f"{where(f'grid.{key}')}: grid.{key}: {exc}; {fix}") from None
        _trial_config(tree, where, point)
    for key, name in (
        ("metric.name", spec.metric.name),
        ("target.metric", spec.target and spec.target.metric),
    ):
        if name and name not in METRICS:
            raise UserError(
                f"{where(key)}: {key}: unknown metric '{name}'{did_you_mean(name, METRICS)}"
            )
    return spec


def _trial_config(tree: dict[str, Any], where, point: dict[str, Any]) -> TrialConfig:
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as exc:

        def locate(key: str) -> str:
            in_grid = next((g for g in point if key == g or key.startswith(g + ".")), None)
            return where(f"grid.{in_grid}") if in_grid else where(f"base.{key}")

        at = f" (grid point {_point_label(point)})" if point else ""
        raise UserError(validation_message(exc, TrialConfig, locate) + at) from None


def _point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def parse_override(text: str) -> tuple[str, Any]:
    """'lr.scaling=linear' -> ('lr.scaling', 'linear'); the value is parsed as YAML (64 -> int)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set batch_size=64")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def trial_from_spec(path: str | Path, overrides: list[str] = ()) -> TrialConfig:
    """The config `lbs-tune train` runs: the spec's base plus its first grid point plus --set."""
    spec = load_spec(path)
    points = spec.points()
    tree = spec.trial_dict(points[0] if points else {})
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_dotted(tree, key, value)
        except ValueError as exc:
            raise UserError(f"--set {text}: {exc}") from None
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(
            validation_message(exc, TrialConfig, lambda k: f"{path} (with --set)")
        ) from None


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Full batches in one pass over the training split (the last partial batch is dropped)."""
    return max(1, train_size // batch_size)


def total_steps(config: TrialConfig, train_size: int) -> int:
    """The budget in optimizer steps: epochs x steps per epoch, or examples // batch size."""
    if config.steps is not None:
        return config.steps
    if config.examples is not None:
        return max(1, config.examples // config.batch_size)
    return max(1, math.floor(config.epochs * steps_per_epoch(train_size, config.batch_size) + 1e-9))
