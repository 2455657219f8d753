"""Measurements inside a trial: the gradient noise scale and the sharpness. Torch only, no I/O.

Gradient noise scale (McCandlish et al. 2018, "An empirical model of large-batch training",
Appendix A): with G the true gradient and Σ the per-example gradient covariance, a batch of size
B has E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes b < B give the unbiased estimates
    |G|²  = (B |G_B|² - b |G_b|²) / (B - b),     tr(Σ) = (|G_b|² - |G_B|²) / (1/b - 1/B),
each smoothed by an exponential moving average across measurements before the ratio
B_simple = tr(Σ) / |G|² is taken (`NoiseScale`). `gradient_norms` measures |G_b|² and |G_B|² on a
step's own batch, split into micro-batches of b.

Sharpness: the largest eigenvalue of the training loss's Hessian on a fixed batch, by Lanczos on
Hessian-vector products (`top_hessian_eigenvalue`).

Both measurements leave the model exactly as they found it: parameters, `.grad`, buffers (batch
norm's running statistics), train/eval modes and every random state, so a trial's trajectory is
bit-identical with the measurements on or off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

# loss_fn(outputs, labels) -> the mean loss of the batch, a scalar tensor.
LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- Gradient noise scale


def noise_estimates(small_sq: float, big_sq: float, small: int, big: int) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from |G_b|² at batch size `small` and |G_B|² at size `big`.

    `small_sq` is the mean over batches of size b of their gradient's squared norm, `big_sq` the
    squared norm of one batch of size B > b (McCandlish et al. 2018, eqs. A.2 and A.3).
    """
    if not 0 < small < big:
        raise ValueError(f"need 0 < small < big batch sizes, got {small} and {big}")
    grad_sq = (big * big_sq - small * small_sq) / (big - small)
    trace_cov = (small_sq - big_sq) / (1 / small - 1 / big)
    return grad_sq, trace_cov


class NoiseEstimate(NamedTuple):
    """Smoothed |G|², smoothed tr(Σ) and their ratio B_simple (NaN while |G|² is not positive)."""

    grad_sq: float
    trace_cov: float
    b_simple: float


class NoiseScale:
    """Exponential moving averages of |G|² and tr(Σ) across measurements, and B_simple.

    The averages are bias-corrected as in Adam (divided by 1 - decay^n after n measurements), so
    the first measurement is reported as measured and every smoothed value is a weighted mean of
    unbiased estimates. `state_dict()` holds only numbers, for checkpoints.
    """

    def __init__(self, decay: float = 0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.count = 0
        self.grad_sq = 0.0
        self.trace_cov = 0.0

    def update(self, small_sq: float, big_sq: float, small: int, big: int) -> NoiseEstimate:
        """Fold in one measurement (as `noise_estimates` takes it); return the smoothed values."""
        grad_sq, trace_cov = noise_estimates(small_sq, big_sq, small, big)
        self.count += 1
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.trace_cov = self.decay * self.trace_cov + (1 - self.decay) * trace_cov
        return self.estimate()

    def estimate(self) -> NoiseEstimate:
        """The smoothed |G|², tr(Σ) and B_simple so far (all NaN before any measurement)."""
        if self.count == 0:
            return NoiseEstimate(math.nan, math.nan, math.nan)
        correction = 1 - self.decay**self.count
        grad_sq, trace_cov = self.grad_sq / correction, self.trace_cov / correction
        # The unbiased |G|² can come out <= 0 when noise dominates: B_simple then has no value.
        b_simple = trace_cov / grad_sq if grad_sq > 0 else math.nan
        return NoiseEstimate(grad_sq, trace_cov, b_simple)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "count": self.count,
            "grad_sq": self.grad_sq,
            "trace_cov": self.trace_cov,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.count = int(state["count"])
        self.grad_sq = float(state["grad_sq"])
        self.trace_cov = float(state["trace_cov"])


@torch.enable_grad()
def gradient_norms(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    micro_batch: int,
    generators: Sequence[torch.Generator] = (),
) -> tuple[float, float]:
    """(|G_b|², |G_B|²) of one batch: the mean squared gradient norm of its micro-batches of
    `micro_batch` examples, and the squared norm of the whole batch's gradient.

    The whole batch's gradient is the mean of the equal-size micro-batch gradients (no extra
    pass). The model runs in its current mode, as the training step runs it, so in train mode
    batch norm normalises each micro-batch by its own statistics and the measured noise is that
    of batches of `micro_batch` (as with ghost batch norm of that size). Autocast, if wanted, is
    the caller's context. Parameters, `.grad`, buffers, modes and the random states (torch's
    global ones and `generators`) are as before the call, so it may run just before or after a
    training step's backward without changing the step.
    """
    size = len(inputs)
    if not 0 < micro_batch < size or size % micro_batch:
        raise ValueError(f"micro_batch {micro_batch} must divide the batch {size} and be smaller")
    params = _trainable(model)
    mean = [torch.zeros_like(p) for p in params]
    small_sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    with untouched(model, generators):
        for x, y in zip(inputs.split(micro_batch), labels.split(micro_batch), strict=True):
            grads = torch.autograd.grad(
                loss_fn(model(x), y), params, allow_unused=True, materialize_grads=True
            )
            small_sq += _squared_norm(grads)
            torch._foreach_add_(mean, grads)
    count = size // micro_batch
    torch._foreach_div_(mean, count)
    return small_sq.item() / count, _squared_norm(mean).item()


# --------------------------------------------------------------------------- Sharpness


@torch.enable_grad()
def top_hessian_eigenvalue(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    iterations: int,
    seed: int = 0,
    max_batch: int | None = None,
    generators: Sequence[torch.Generator] = (),
) -> float:
    """The largest eigenvalue of the Hessian of `loss_fn(model(inputs), labels)` with respect to
    the trainable parameters, by `iterations` steps of Lanczos on Hessian-vector products.

    The model runs in eval mode (batch norm uses its running statistics, dropout is off), so the
    Hessian is that of a fixed function of the parameters. The start vector is drawn on the CPU
    from a generator seeded with `seed`, the same on every device. The batch goes through the
    model `max_batch` examples at a time (all at once when None); each iteration costs one
    forward and two backward passes per chunk. Lanczos's top Ritz value is the algebraically
    largest eigenvalue of the Krylov space, so a large negative eigenvalue does not mask it.
    The model and the random states are left as they were (see `gradient_norms`).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    params = _trainable(model)
    size = len(inputs)
    step = max_batch or size
    chunks = list(zip(inputs.split(step), labels.split(step), strict=True))

    def hvp(vector: list[Tensor]) -> list[Tensor]:
        product = [torch.zeros_like(p) for p in params]
        for x, y in chunks:
            loss = loss_fn(model(x), y) * (len(x) / size)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True) if g is not None)
            if isinstance(dot, Tensor) and dot.requires_grad:
                parts = torch.autograd.grad(dot, params, allow_unused=True, materialize_grads=True)
                torch._foreach_add_(product, parts)
        return product

    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    torch._foreach_div_(vector, math.sqrt(_squared_norm(vector).item()))
    # Below this relative size the Krylov space is invariant and T's eigenvalues are exact.
    tolerance = torch.finfo(params[0].dtype).eps ** 0.5
    previous, beta = None, 0.0
    alphas: list[float] = []
    betas: list[float] = []
    with untouched(model, generators):
        model.eval()
        for i in range(iterations):
            residual = hvp(vector)
            alpha = _dot(residual, vector)
            alphas.append(alpha)
            if i == iterations - 1:
                break
            torch._foreach_add_(residual, vector, alpha=-alpha)
            if previous is not None:
                torch._foreach_add_(residual, previous, alpha=-beta)
            beta = math.sqrt(_squared_norm(residual).item())
            if beta <= tolerance * max(abs(a) for a in alphas):
                break
            betas.append(beta)
            previous, vector = vector, torch._foreach_div(residual, beta)
    diagonal = torch.tensor(alphas, dtype=torch.float64)
    off = torch.tensor(betas, dtype=torch.float64)
    tridiagonal = torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tridiagonal)[-1])


# --------------------------------------------------------------------------- Shared


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


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


def _squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Σ ||t||² over the tensors, as a float64 scalar on their device (no host sync)."""
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).double().sum().item()
