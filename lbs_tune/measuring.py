"""What every measurement inside a trial shares: it leaves the model exactly as it found it
(`untouched`: parameters, `.grad`, buffers, modes and every random state), draws its random layers
from its own seeded stream (`seed_torch`), and works on flat lists of tensors. Torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# loss_fn(outputs, labels) -> the mean loss of the batch, a scalar tensor.
LossFn = Callable[[Any, Tensor], Tensor]


@contextlib.contextmanager
def untouched(model: nn.Module, generators: Sequence[torch.Generator] = ()) -> Iterator[None]:
    """Inside, `model`'s buffers and modes and the random states may change; on leaving they are
    put back exactly: every module's train/eval mode, every buffer's values, torch's CPU and
    (if initialised) CUDA random states, and the states of `generators`."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    generator_states = [(g, g.get_state()) for g in generators]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for g, state in generator_states:
            g.set_state(state)


def seed_torch(seed: int) -> None:
    """Seed torch's CPU generator and, if CUDA is initialised, the GPUs' (as `untouched`
    restores them); not `torch.manual_seed`, which queues a lazy CUDA seeding at every call
    before CUDA is initialised."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def child_seed(seed: int, key: int) -> int:
    """A seed of its own for the stream `key` under `seed` (numpy's SeedSequence spawn): its
    draws are independent of those of `seed` and of every other key's."""
    return int(np.random.SeedSequence(seed, spawn_key=(key,)).generate_state(1)[0])


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Σ ||t||² over the tensors, as a float64 scalar on their device (no host sync)."""
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).double().sum().item()
