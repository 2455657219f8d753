"""What a trial config becomes on a device: its data, its model and its task. The one place that
builds them: the training loop, `lbs-tune evaluate`, the branched probes and the benchmarks all
call `build_trial` (or `model_for` on data they already hold), so a model option, a ghost batch
size or a task's own evaluation can never be applied in one of them and forgotten in another.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from lbs_tune.config import TrialConfig
from lbs_tune.data import DeviceData, TokenStreams, load_dataset
from lbs_tune.errors import UserError
from lbs_tune.models import build_model
from lbs_tune.quadratic import QuadraticData
from lbs_tune.tasks import Task, make_task


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but torch sees no GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_precision(config: TrialConfig, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 on the CPU."""
    if config.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return config.precision


def channels_last(config: TrialConfig, device: torch.device) -> bool:
    """Whether images are kept channels-last: as configured, else on CUDA only."""
    return config.channels_last if config.channels_last is not None else device.type == "cuda"


def derived_seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for model init, data order and augmentation from the trial seed."""
    init, order, augment = np.random.SeedSequence(seed).generate_state(3)
    return int(init), int(order), int(augment)


class Built(NamedTuple):
    """A trial config made real on a device."""

    device: torch.device
    precision: str  # 'fp32', 'bf16' or 'fp16'
    data: DeviceData | TokenStreams
    model: nn.Module  # on `device`, in training mode, freshly initialised from the trial seed
    task: Task


def model_for(config: TrialConfig, data: DeviceData | TokenStreams) -> nn.Module:
    """The config's model for `data` (its classes and input shape), with the model options and
    ghost batch size of the config, on the CPU, initialised from torch's current random state
    (the noisy quadratic's: at its problem's start)."""
    model = build_model(
        config.model,
        data.num_classes,
        data.input_shape,
        config.ghost_batch_size,
        **config.model_options,
    )
    if isinstance(data, QuadraticData):
        data.start(model)
    return model


def task_for(config: TrialConfig, data: DeviceData | TokenStreams, precision: str) -> Task:
    """The config's task over `data`, its data order and augmentation seeded from the trial
    seed (the same stream for the same seed, whatever else differs)."""
    _, order_seed, augment_seed = derived_seeds(config.seed)
    return make_task(config, data, precision, order_seed, augment_seed)


def build_trial(
    config: TrialConfig,
    device: torch.device | None = None,
    data: DeviceData | TokenStreams | None = None,
) -> Built:
    """The data, model and task of `config` on `device` (default: the config's own device).

    The model is initialised from the trial seed (the same weights for the same seed and
    config); `data` already loaded for this config's dataset may be passed to share it."""
    device = device if device is not None else resolve_device(config.device)
    precision = resolve_precision(config, device)
    if data is None:
        data = load_dataset(config, device, channels_last(config, device))
    init_seed, _, _ = derived_seeds(config.seed)
    torch.manual_seed(init_seed)
    model = model_for(config, data).to(device)
    if getattr(data, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return Built(device, precision, data, model, task_for(config, data, precision))
