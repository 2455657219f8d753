"""The model zoo: networks by name, built for a dataset's input shape and number of classes.

Names: the CIFAR ResNets of He et al. (`resnet20` ... `resnet110`), the CIFAR `resnet18`, wide
ResNets `wrnD_K` for any depth D = 6n + 4 and width K, `vgg11/13/16/19` with batch norm, and the
small `lenet`, `mlp` and `cnn1d`. With a ghost batch size every batch norm becomes a
`GhostBatchNorm` with the same state_dict keys (see `ghost_bn`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from lbs_tune.errors import did_you_mean
from lbs_tune.models.ghost_bn import GhostBatchNorm, use_ghost_batch_norm
from lbs_tune.models.resnet import cifar_resnet, resnet18
from lbs_tune.models.small import CNN1d, LeNet, mlp
from lbs_tune.models.vgg import VGG_CONFIGS, vgg
from lbs_tune.models.wrn import check_wrn, parse_wrn_name, wide_resnet

__all__ = [
    "MODEL_NAMES",
    "GhostBatchNorm",
    "build_model",
    "check_model_fits",
    "use_ghost_batch_norm",
    "validate_model_name",
]

# Each builder takes (num_classes, input_shape) and returns a freshly initialised model.
_BUILDERS: dict[str, Callable[[int, Sequence[int]], nn.Module]] = {
    **{f"resnet{depth}": partial(cifar_resnet, depth) for depth in (20, 32, 44, 56, 110)},
    "resnet18": resnet18,
    **{name: partial(vgg, name) for name in VGG_CONFIGS},
    "lenet": LeNet,
    "mlp": mlp,
    "cnn1d": CNN1d,
}

# Wide ResNets are built for any valid wrnD_K; these common ones are listed by name.
_LISTED_WRNS = ("wrn16_4", "wrn16_8", "wrn28_10")

MODEL_NAMES: tuple[str, ...] = (*_BUILDERS, *_LISTED_WRNS)


def _builder(name: str) -> Callable[[int, Sequence[int]], nn.Module]:
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


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    ghost_batch_size: int | None = None,
) -> nn.Module:
    """The model `name` for inputs of `input_shape` (without the batch dim) and `num_classes`.

    With `ghost_batch_size`, every batch norm is a ghost batch norm over chunks of that many
    examples (models without batch norm are unchanged). Returns the model on the CPU, in float32
    and training mode; ValueError for an unknown name or an input shape the model cannot take.
    """
    model = _builder(name)(num_classes, tuple(input_shape))
    if ghost_batch_size is not None:
        model = use_ghost_batch_norm(model, ghost_batch_size)
    return model


@functools.lru_cache(maxsize=64)
def check_model_fits(name: str, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """ValueError if model `name` cannot take inputs of `input_shape`, found by building it once
    per process (on the meta device a first init costs seconds of torch imports; the CPU build of
    even WRN-28-10 takes less), so that every grid point of a sweep is checked before it starts."""
    build_model(name, num_classes, input_shape)


def models_that_fit(num_classes: int, input_shape: tuple[int, ...]) -> list[str]:
    """The small and common models that take inputs of `input_shape`, for error messages."""
    fitting = []
    for name in ("mlp", "cnn1d", "lenet", "resnet20", "wrn16_4"):
        try:
            check_model_fits(name, num_classes, input_shape)
        except ValueError:
            continue
        fitting.append(name)
    return fitting
