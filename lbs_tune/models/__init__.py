"""The model zoo: networks by name, built for a dataset's task, input shape and number of classes.

Image classifiers: the CIFAR ResNets of He et al. (`resnet20` ... `resnet110`), the CIFAR
`resnet18`, torchvision's `resnet34`, `resnet50`, `densenet121`, `mobilenet_v2` and `alexnet`
with the CIFAR changes of their modules, wide ResNets `wrnD_K` for any depth D = 6n + 4 and
width K, `vgg11/13/16/19` with batch norm, and the small `lenet`, `mlp` and `cnn1d`.
Segmentation: `drn_d_22` (per-pixel logits). Language models: `lstm` and the decoder-only
`transformer` (next-token logits and a hidden state; see `lstm`, `transformer`). The noisy
quadratic model: `nqm` (its parameter theta; see `quadratic`). With a ghost
batch size every batch norm becomes a `GhostBatchNorm` with the same state_dict keys (see
`ghost_bn`).

Each model serves one task (`TASKS`): a model is refused for a dataset of another task.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from torch import nn

from lbs_tune.errors import did_you_mean
from lbs_tune.models.alexnet import alexnet
from lbs_tune.models.densenet import densenet121
from lbs_tune.models.drn import drn_d_22
from lbs_tune.models.ghost_bn import GhostBatchNorm, use_ghost_batch_norm
from lbs_tune.models.lstm import LSTMLanguageModel, detach_hidden
from lbs_tune.models.lstm import lstm as lstm_language_model
from lbs_tune.models.mobilenet import mobilenet_v2
from lbs_tune.models.quadratic import nqm
from lbs_tune.models.resnet import cifar_resnet, resnet18, torchvision_resnet
from lbs_tune.models.small import CNN1d, LeNet, mlp
from lbs_tune.models.transformer import transformer
from lbs_tune.models.vgg import VGG_CONFIGS, vgg
from lbs_tune.models.wrn import check_wrn, parse_wrn_name, wide_resnet

__all__ = [
    "MODEL_NAMES",
    "TASKS",
    "TASK_MODELS",
    "GhostBatchNorm",
    "LSTMLanguageModel",
    "Task",
    "build_model",
    "check_model_fits",
    "detach_hidden",
    "model_options",
    "model_task",
    "models_that_fit",
    "use_ghost_batch_norm",
    "validate_model_name",
]

Task = Literal["classification", "segmentation", "language_model", "nqm"]
TASKS: tuple[Task, ...] = ("classification", "segmentation", "language_model", "nqm")
# The model a task needs, in words for messages.
TASK_MODELS: dict[Task, str] = {
    "classification": "a classifier",
    "segmentation": "a segmentation model",
    "language_model": "a language model",
    "nqm": "the noisy quadratic model",
}

# Each builder takes (num_classes, input_shape) and returns a freshly initialised model; its
# keyword-only parameters are the model's options (sizes a config may set).
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{depth}": partial(cifar_resnet, depth) for depth in (20, 32, 44, 56, 110)},
    "resnet18": resnet18,
    "resnet34": partial(torchvision_resnet, 34),
    "resnet50": partial(torchvision_resnet, 50),
    "densenet121": densenet121,
    "mobilenet_v2": mobilenet_v2,
    "alexnet": alexnet,
    **{name: partial(vgg, name) for name in VGG_CONFIGS},
    "lenet": LeNet,
    "mlp": mlp,
    "cnn1d": CNN1d,
    "drn_d_22": drn_d_22,
    "lstm": lstm_language_model,
    "transformer": transformer,
    "nqm": nqm,
}

# Every model not named here is a classifier: (N, *input_shape) -> (N, num_classes) logits.
_TASKS: dict[str, Task] = {
    "drn_d_22": "segmentation",
    "lstm": "language_model",
    "transformer": "language_model",
    "nqm": "nqm",
}

# Wide ResNets are built for any valid wrnD_K; these common ones are listed by name.
_LISTED_WRNS = ("wrn16_4", "wrn16_8", "wrn28_10")

MODEL_NAMES: tuple[str, ...] = (*_BUILDERS, *_LISTED_WRNS)

# Cheap models tried, in this order, to suggest a model that fits a dataset.
_SUGGESTED = ("mlp", "cnn1d", "lenet", "resnet20", "wrn16_4", "drn_d_22", "lstm", "nqm")


def _builder(name: str) -> Callable[..., nn.Module]:
    """The builder for model `name`; ValueError naming the closest known name if none."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    wrn = parse_wrn_name(name)
    if wrn is None:
        raise ValueError(f"unknown model '{name}'{did_you_mean(name, MODEL_NAMES)}")
    try:
        check_wrn(*wrn)
    except ValueError as error:
        raise ValueError(f"unknown model '{name}': {error}") from None
    return partial(wide_resnet, *wrn)


def validate_model_name(name: str) -> None:
    """Return None if `name` is a known model, else raise ValueError with a suggestion."""
    _builder(name)


def model_task(name: str) -> Task:
    """The task model `name` serves (one of TASKS); ValueError for an unknown name."""
    _builder(name)
    return _TASKS.get(name, "classification")


def model_options(name: str) -> dict[str, Any]:
    """The options model `name` takes (keyword arguments of build_model) with their defaults."""
    parameters = inspect.signature(_builder(name)).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    ghost_batch_size: int | None = None,
    **options: Any,
) -> nn.Module:
    """The model `name` for inputs of `input_shape` (without the batch dim) and `num_classes`.

    Classifiers and `drn_d_22` take images or vectors of `input_shape` and return logits over
    `num_classes` (per pixel for segmentation); `lstm` and `transformer` take token ids of
    `input_shape` (bptt,) and `num_classes` is the vocabulary size. `options` are the model's own
    (see model_options; e.g. lstm's emsize, nhid, nlayers, dropout, tied). With
    `ghost_batch_size`, every batch norm is a ghost batch norm over chunks of that many examples
    (models without batch norm are unchanged). Returns the model on the CPU (or the current
    default device), in float32 and training mode; ValueError for an unknown name or option, or
    an input shape or option value the model cannot take.
    """
    builder = _builder(name)
    unknown = sorted(set(options) - set(model_options(name)))
    if unknown:
        known = ", ".join(model_options(name)) or "none"
        raise ValueError(f"model {name} has no option {', '.join(unknown)} (its options: {known})")
    model = builder(num_classes, tuple(input_shape), **options)
    if ghost_batch_size is not None:
        model = use_ghost_batch_norm(model, ghost_batch_size)
    return model


@functools.lru_cache(maxsize=64)
def check_model_fits(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    task: Task = "classification",
    **options: Any,
) -> None:
    """ValueError if model `name` does not serve `task` (the dataset's) or cannot take inputs of
    `input_shape` with `options`, found by building it once per process (on the meta device a
    first init costs seconds of torch imports; the CPU build of even WRN-28-10 takes less), so
    that every grid point of a sweep is checked before it starts. Options must be hashable."""
    served = model_task(name)
    if served != task:
        raise ValueError(f"{name} is {TASK_MODELS[served]}; the dataset needs {TASK_MODELS[task]}")
    build_model(name, num_classes, input_shape, **options)


def models_that_fit(
    num_classes: int, input_shape: tuple[int, ...], task: Task = "classification"
) -> list[str]:
    """The small and common models of `task` that take inputs of `input_shape`, for errors."""
    fitting = []
    for name in _SUGGESTED:
        if model_task(name) != task:
            continue
        try:
            check_model_fits(name, num_classes, input_shape, task)
        except ValueError:
            continue
        fitting.append(name)
    return fitting
