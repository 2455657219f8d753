"""The gradient noise scale, measured inside a trial (the sharpness is `lbs_tune.sharpness`).
Torch only, no I/O.

Gradient noise scale (McCandlish et al. 2018, "An empirical model of large-batch training").
With G the gradient of the training loss, Σ the covariance of the per-example gradients and H the
loss's Hessian, B_simple = tr(Σ)/|G|² and the Hessian-weighted B_noise = tr(HΣ)/(GᵀHG) (their
eq. 2.8) are the batch sizes at which a step's gradient noise is as large as its signal. Each
measured step draws a batch of its own, n examples from the measurement's generator (the
training stream never sees it), and takes every example's gradient g_j (`torch.func`: vmap of
grad, each example a batch of one); with ḡ their mean,
    tr(Σ) = Σ_j |g_j − ḡ|² / (n − 1),          |G|² = |ḡ|² − tr(Σ)/n,
both unbiased (`gradient_moments`). With H' the Hessian on a second batch, drawn independently,
and the first m ≤ n examples of the first,
    tr(HΣ) = n / ((n − 1) m) · Σ_{j≤m} (g_j − ḡ)ᵀ H' (g_j − ḡ),     GᵀHG = ḡᵀH'ḡ − tr(HΣ)/n,
unbiased too (`hessian_moments`): for a matrix A independent of the g_j, E[(g_j − ḡ)ᵀA(g_j − ḡ)]
= (n − 1)/n · tr(AΣ) and E[ḡᵀAḡ] = GᵀAG + tr(AΣ)/n, and E[H'] = H. Each costs one
Hessian-vector product per example used. `NoiseScale` averages the four over a window of
consecutive steps and takes the ratios of the averages, as McCandlish et al. do (their App. A).

Batch norm on batch statistics (train mode) couples the examples of a batch: an example's
gradient on its own is not defined. The measurement then gives every example a weight w_i in
the loss and in batch norm's statistics, and takes the infinitesimal jackknife (Jaeckel 1972):
the derivative of the batch's gradient G(w) along the weights of a group of `micro_batch`
examples, by forward-mode differentiation (a pass of the batch per group, batched), as the
group's mean gradient u_k = G + (n/size)·dG/dw_k; without batch norm u_k is exactly its mean
gradient, and the estimators above take the u_k with Σ/size for their covariance. The u_k are
the first-order (influence-function) terms of the batch's gradient, so their covariance is that
of a step's gradient over batches of n, to leading order in 1/n: B_simple of batch norm over n
examples (a ghost batch norm weights the statistics of its ghost batches). A step that
normalises fewer examples (batch 16, micro-batches) has more noise, from its statistics. On a
small batch-norm net (tests) tr(Σ) so measured is within 1-3% of n times the variance of the
gradients of independent batches of n, whatever `micro_batch`; leaving examples out of the
batch (the delete-one jackknife) or taking each example's loss through the batch's statistics
counts the examples' interactions through the statistics again (+12-14% there), and freezing
the statistics counts noise along directions that batch norm makes the loss flat in (a bias
before a batch norm, whose gradient is exactly zero, gets some; +20% on an MLP).

Every measurement leaves the model exactly as it found it: parameters, `.grad`, buffers (batch
norm's running statistics), train/eval modes and every random state, so a trial's trajectory is
bit-identical with the measurements on or off. Dropout and other random layers draw from
torch's generator seeded by the caller's `seed` (the measurement's own stream), the second
batch's (H') by a seed of its own derived from it, so that its masks are independent too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lbs_tune.measuring import (
    LossFn,
    child_seed,
    dot,
    seed_torch,
    squared_norm,
    trainable_params,
    untouched,
)

# Groups whose influence one batched forward-mode pass takes (memory: that many passes' worth).
TANGENTS_AT_ONCE = 16


# --------------------------------------------------------------------------- Gradient noise scale


def gradient_moments(
    square_sum: float, mean_sq: float, units: int, size: int = 1
) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from `units` independent unit gradients u_k, each the mean of
    `size` examples' (an example's own gradient: size 1), so of covariance Σ/size:
    `square_sum` = Σ_k |u_k|² and `mean_sq` = |ū|², the squared norm of their mean."""
    if units < 2 or size < 1:
        raise ValueError(f"need at least 2 units of at least 1 example, got {units} of {size}")
    trace_cov = size * (square_sum - units * mean_sq) / (units - 1)
    return mean_sq - trace_cov / (units * size), trace_cov


def hessian_moments(
    quad_sum: float, m: int, mean_quad: float, units: int, size: int = 1
) -> tuple[float, float]:
    """Unbiased (GᵀHG, tr(HΣ)) from the unit gradients of `gradient_moments` and a Hessian H'
    independent of them: `quad_sum` = Σ_{k≤m} (u_k − ū)ᵀH'(u_k − ū) over m of the units,
    `mean_quad` = ūᵀH'ū."""
    if units < 2 or not 0 < m <= units:
        raise ValueError(f"need 0 < m <= units and units >= 2, got m={m}, units={units}")
    trace_hcov = size * quad_sum * units / ((units - 1) * m)
    return mean_quad - trace_hcov / (units * size), trace_hcov


class NoiseMoments(NamedTuple):
    """The unbiased estimates of one measured step (NaN: not measured)."""

    grad_sq: float  # |G|²
    trace_cov: float  # tr(Σ)
    grad_hgrad: float = math.nan  # GᵀHG
    trace_hcov: float = math.nan  # tr(HΣ)


class NoiseEstimate(NamedTuple):
    """A window's averages of the moments, B_simple = tr(Σ)/|G|² and B_noise = tr(HΣ)/(GᵀHG)
    (each NaN while its denominator is not positive: noise has swamped the signal)."""

    moments: NoiseMoments
    b_simple: float
    b_noise: float

    def metrics(self) -> dict[str, float]:
        """The report's metrics (`lbs_tune.names.METRICS`)."""
        m = self.moments
        return {
            "noise/grad_sq": m.grad_sq,
            "noise/trace_cov": m.trace_cov,
            "noise/b_simple": self.b_simple,
            "noise/grad_hgrad": m.grad_hgrad,
            "noise/trace_hcov": m.trace_hcov,
            "noise/b_noise": self.b_noise,
        }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


class NoiseScale:
    """Which steps measure the noise scale, and the window averages of their moments.

    Windows of `window` consecutive steps start every `interval` steps (at step 0, interval,
    ...; a window is at most `interval` long); the last one ends at the budget's last step.
    `by_examples` (a batch schedule, whose steps are not of one size): a window starts at step 0
    and wherever the loop calls `open` (the step after one that crossed a multiple of the
    interval in examples), `window` steps long, but no longer than to the next start: a window
    still open there ends, and `open` returns its estimate.
    `generator` is the measurement's own random stream (batches, augmentation, dropout) on
    `device`, seeded from the trial's `seed` apart from the trial's other streams.
    `state_dict()` holds numbers and the generator's state, for checkpoints.
    """

    def __init__(
        self,
        interval: int,
        window: int,
        budget: int,
        seed: int,
        device: torch.device,
        by_examples: bool = False,
    ):
        if interval < 1 or window < 1:
            raise ValueError(f"need interval and window >= 1, got {interval} and {window}")
        self.interval, self.budget, self.by_examples = interval, budget, by_examples
        self.span = window if by_examples else min(window, interval)
        # A child of the trial seed's SeedSequence: independent of the init, order and augment
        # seeds that the loop derives from it.
        self.generator = torch.Generator(device).manual_seed(child_seed(seed, 1))
        self.count = 0
        self.sums = [0.0] * len(NoiseMoments._fields)
        self.left = self.span if by_examples else 0  # steps left in the open window (by examples)

    def due(self, step: int) -> bool:
        """Whether 0-based step `step` is measured (before its update)."""
        if self.by_examples:
            return self.left > 0
        return step % self.interval < self.span

    def open(self) -> NoiseEstimate | None:
        """By examples: the next step starts a window; the estimate of one still open (it
        ends here), else None."""
        if not self.by_examples:
            return None
        cut = self._close() if self.count else None
        self.left = self.span
        return cut

    def seed(self) -> int:
        """A seed for torch's generator during one measurement (dropout), from the stream."""
        device = self.generator.device
        return int(torch.randint(2**62, (), generator=self.generator, device=device))

    def add(self, step: int, moments: NoiseMoments) -> NoiseEstimate | None:
        """Fold in the moments of step `step`; at a window's last step return its estimate."""
        self.count += 1
        self.sums = [s + v for s, v in zip(self.sums, moments, strict=True)]
        if self.by_examples:
            self.left = 0 if step == self.budget - 1 else self.left - 1
            ends = self.left == 0
        else:
            ends = step % self.interval == self.span - 1 or step == self.budget - 1
        return self._close() if ends else None

    def _close(self) -> NoiseEstimate:
        """The open window's estimate; the window's sums start again."""
        mean = NoiseMoments(*(s / self.count for s in self.sums))
        self.count, self.sums = 0, [0.0] * len(self.sums)
        return NoiseEstimate(
            mean, _ratio(mean.trace_cov, mean.grad_sq), _ratio(mean.trace_hcov, mean.grad_hgrad)
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sums": list(self.sums),
            "rng": self.generator.get_state(),
            "left": self.left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.sums = [float(s) for s in state["sums"]]
        self.left = int(state.get("left", 0))
        self.generator.set_state(state["rng"])
        if "left" not in state and self.by_examples:
            # A checkpoint of a schedule's trial from before windows followed examples: its open
            # window, counted in steps, cannot go on; it is dropped, not folded into the next.
            self.count, self.sums = 0, [0.0] * len(self.sums)


@torch.enable_grad()
def noise_moments(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    micro_batch: int | None,
    seed: int,
    hessian_batch: tuple[Tensor, Tensor] | None = None,
    hessian_units: int = 0,
    generators: Sequence[torch.Generator] = (),
) -> NoiseMoments:
    """The unbiased |G|², tr(Σ) and, with a `hessian_batch` (inputs, labels) drawn independently
    of `inputs`, GᵀHG and tr(HΣ) from the first `hessian_units` units (module docstring).

    The model runs in its current modes, as the training step runs it (train mode: batch norm
    on batch statistics, dropout on). Without batch norm on batch statistics the units are the
    examples, their gradients taken `micro_batch` at a time (a memory bound: the result does not
    depend on it; None: all at once). With it, the units are groups of `micro_batch` examples
    (dividing the batch, smaller than it; None: at most 16 groups), one forward-mode pass of the
    batch each (module docstring). Torch's generator is seeded with `seed` for the measurement
    (dropout). Autocast, if wanted, is the caller's context. The model, `.grad`, buffers, modes
    and the random states (torch's and `generators`) are left as they were.
    """
    n = len(inputs)
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
    if hessian_units and hessian_batch is None:
        raise ValueError("hessian_units needs a hessian_batch")
    params = trainable_params(model)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    square_sum = torch.zeros((), dtype=torch.float64, device=params[0].device)
    kept: list[list[Tensor]] = []  # the first `hessian_units` units, one list per unit
    with untouched(model, generators):
        if normalises_across_examples(model):
            size = micro_batch or next((d for d in range(1, n) if n % d == 0 and n // d <= 16), 1)
            units = _influence_values(
                model, inputs, labels, loss_fn, params, size, seed, generators
            )
        else:
            size = 1
            seed_torch(seed)
            units = _example_gradients(model, inputs, labels, loss_fn, params, micro_batch or n)
        count = 0
        for values in units:
            count += len(values[0])
            for t, v in zip(total, values, strict=True):
                t.add_(v.sum(0))
            square_sum += torch.stack([v.square().sum() for v in values]).double().sum()
            for j in range(min(len(values[0]), hessian_units - len(kept))):
                kept.append([v[j] for v in values])
        mean = [(t / count).to(p.dtype) for t, p in zip(total, params, strict=True)]
        grad_sq, trace_cov = gradient_moments(
            square_sum.item(), squared_norm(mean).item(), count, size
        )
        if not kept:
            return NoiseMoments(grad_sq, trace_cov)
        # The second batch's dropout masks are drawn apart from the first's: with `seed` both
        # passes would draw the same masks for their first examples, and H' would not be
        # independent of the g_j (tr(HΣ) came out 1.8x too large on a dropout model).
        product = hessian_products(model, *hessian_batch, loss_fn, params, child_seed(seed, 1))
        quad_sum = 0.0
        for unit in kept:
            deviation = torch._foreach_sub(unit, mean)
            quad_sum += dot(deviation, product(deviation))
        grad_hgrad, trace_hcov = hessian_moments(
            quad_sum, len(kept), dot(mean, product(mean)), count, size
        )
    return NoiseMoments(grad_sq, trace_cov, grad_hgrad, trace_hcov)


def normalises_across_examples(model: nn.Module) -> bool:
    """Whether an example's output depends on the other examples of its batch: a batch norm on
    batch statistics (train mode, or no running statistics)."""
    return any(_batch_statistics(m) for m in model.modules())


def _batch_statistics(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats)


def _example_gradients(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    params: list[nn.Parameter],
    chunk: int,
) -> Iterator[list[Tensor]]:
    """Per chunk of `chunk` examples, each parameter's per-example gradients (chunk, *shape), by
    `torch.func` vmap of grad over examples, each a batch of one (dropout draws a mask per
    example from torch's generator)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    weights = {name: p.detach() for name, p in zip(names, params, strict=True)}

    def example_loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        outputs = torch.func.functional_call(model, weights, (x.unsqueeze(0),))
        return loss_fn(outputs, y.unsqueeze(0))

    per_example = torch.func.vmap(
        torch.func.grad(example_loss), in_dims=(None, 0, 0), randomness="different"
    )
    for x, y in zip(inputs.split(chunk), labels.split(chunk), strict=True):
        grads = per_example(weights, x, y)
        yield [grads[name] for name in names]


def _influence_values(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    params: list[nn.Parameter],
    size: int,
    seed: int,
    generators: Sequence[torch.Generator],
) -> Iterator[list[Tensor]]:
    """Per group of `size` consecutive examples (K groups), the group's gradient by the
    infinitesimal jackknife, u_k = G + (n/size)·dG/dw_k, each a list of (1, *shape) tensors.

    Every example i carries a weight w_i in the loss, Σ w_i ℓ_i / Σ w_i with ℓ_i its own loss
    (`loss_fn` on it alone), and in batch norm's statistics (`_weighted_norm`); G(w) is the
    gradient, G = G(1) the batch's, and dG/dw_k its derivative along the group's weights, by
    forward-mode differentiation of the gradient (`torch.func` jvp of grad), vmapped over
    `TANGENTS_AT_ONCE` groups at a time. Without batch norm u_k is the group's mean gradient
    exactly. Every pass replays the same random draws (torch seeded with `seed`, `generators`
    reset), so dropout's masks are the same for every group and for G.
    """
    n = len(inputs)
    if n % size or size >= n:
        raise ValueError(f"micro_batch {size} must divide the batch {n} and be smaller")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    values = {name: p.detach() for name, p in zip(names, params, strict=True)}
    starts = [(g, g.get_state()) for g in generators]
    weights: dict[str, Tensor] = {}  # what the weighted batch norms read: {"w": the weights}

    def example_loss(output: Tensor, label: Tensor) -> Tensor:
        return loss_fn(output.unsqueeze(0), label.unsqueeze(0))

    def loss(values: dict[str, Tensor], w: Tensor) -> Tensor:
        weights["w"] = w
        outputs = torch.func.functional_call(model, values, (inputs,))
        return (w * torch.func.vmap(example_loss)(outputs, labels)).sum() / w.sum()

    def gradient(w: Tensor) -> dict[str, Tensor]:
        return torch.func.grad(loss)(values, w)

    def replay() -> None:
        seed_torch(seed)
        for g, state in starts:
            g.set_state(state)

    ones = torch.ones(n, device=inputs.device, dtype=params[0].dtype)
    groups = n // size
    tangents = torch.zeros(groups, n, device=inputs.device, dtype=ones.dtype)
    tangents.view(groups, groups, size).diagonal(dim1=0, dim2=1).fill_(1)

    def slope(tangent: Tensor) -> dict[str, Tensor]:
        return torch.func.jvp(gradient, (ones,), (tangent,))[1]

    # One random draw for all the tangents of a call: each differentiates the same function.
    slopes = torch.func.vmap(slope, randomness="same")
    with _weighted_statistics(model, weights):
        replay()
        whole = gradient(ones)
        for start in range(0, groups, TANGENTS_AT_ONCE):
            replay()
            found = slopes(tangents[start : start + TANGENTS_AT_ONCE])
            for k in range(len(found[names[0]])):
                yield [(whole[name] + (n / size) * found[name][k]).unsqueeze(0) for name in names]


@contextlib.contextmanager
def _weighted_statistics(model: nn.Module, weights: dict[str, Tensor]) -> Iterator[None]:
    """Inside, every batch norm on batch statistics computes them with the example weights
    `weights["w"]` (`_weighted_norm`), and leaves its running statistics alone."""
    norms = [m for m in model.modules() if _batch_statistics(m)]
    for m in norms:
        m.forward = lambda x, m=m: _weighted_norm(m, x, weights["w"])
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def _weighted_norm(module: _BatchNorm, x: Tensor, weights: Tensor) -> Tensor:
    """`module`'s output on batch-statistics for `x` (N, C, *) with each example weighted by
    `weights` (N,) in the statistics of its batch, or of its ghost batch for a ghost batch norm
    (consecutive chunks of `ghost_batch_size`, the remainder one more): 0 leaves it out."""
    size = getattr(module, "ghost_batch_size", len(x))
    dims = [0, *range(2, x.dim())]
    parts = []
    for part, weight in zip(x.split(size), weights.split(size), strict=True):
        weight = weight.view(-1, *[1] * (x.dim() - 1))
        total = weight.sum() * part[0, 0].numel()
        mean = (weight * part).sum(dims, keepdim=True) / total
        var = (weight * (part - mean).square()).sum(dims, keepdim=True) / total
        parts.append((part - mean) * torch.rsqrt(var + module.eps))
    out = torch.cat(parts)
    channel = (1, -1, *[1] * (x.dim() - 2))
    if module.weight is not None:
        out = out * module.weight.view(channel)
    if module.bias is not None:
        out = out + module.bias.view(channel)
    return out


def hessian_products(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: LossFn,
    params: list[nn.Parameter],
    seed: int,
) -> Callable[[list[Tensor]], list[Tensor]]:
    """v -> H v for the Hessian of `loss_fn(model(inputs), labels)`: one forward and backward
    (torch seeded with `seed`, so dropout's masks are drawn once), one more backward per product."""
    seed_torch(seed)
    grads = torch.autograd.grad(
        loss_fn(model(inputs), labels), params, create_graph=True, allow_unused=True
    )

    def product(vector: list[Tensor]) -> list[Tensor]:
        dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True) if g is not None)
        if not isinstance(dot, Tensor) or not dot.requires_grad:  # the loss is linear
            return [torch.zeros_like(p) for p in params]
        return list(
            torch.autograd.grad(
                dot, params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
        )

    return product
