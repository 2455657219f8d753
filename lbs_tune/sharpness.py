"""Sharpness, measured inside a trial: the largest eigenvalue of the Hessian of the training
loss on a fixed batch, as the step computes the loss (train mode, the dropout draws of one
step), by Lanczos on Hessian-vector products; for Adam(W) also that of P⁻¹H with P Adam's
preconditioner (`adam_preconditioner`, Cohen et al. 2022). The optimizer's stability limit to
compare them with is `lbs_tune.rules.stability_limit`. The model is left exactly as it was
(`lbs_tune.measuring.untouched`). Torch only, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lbs_tune.measuring import (
    LossFn,
    dot,
    seed_torch,
    squared_norm,
    trainable_params,
    untouched,
)


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
    preconditioner: Sequence[Tensor] | None = None,
) -> float:
    """The largest eigenvalue of the Hessian H of `loss_fn(model(inputs), labels)` with respect
    to the trainable parameters, by `iterations` steps of Lanczos on Hessian-vector products;
    with a `preconditioner` P (positive, one tensor per parameter, a diagonal) that of P⁻¹H,
    found as that of the symmetric P^-1/2 H P^-1/2, which has the same eigenvalues.

    The model runs in its current modes, so in train mode the loss is the one a training step
    descends: batch norm normalises each chunk of `max_batch` examples by its own statistics,
    as a step normalises each of its micro-batches, and dropout is on. Every product replays
    the same random draws (torch's generator seeded with `seed`, `generators` reset), so the
    Hessian is that of one fixed function. The start vector is drawn on the CPU from a generator
    seeded with `seed`, the same on every device. The batch goes through the model `max_batch`
    examples at a time (all at once when None); each iteration costs one forward and two
    backward passes per chunk. Lanczos's top Ritz value is the algebraically largest eigenvalue
    of the Krylov space, so a large negative eigenvalue does not mask it. The model and the
    random states are left as they were (see `noise_moments`).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    params = trainable_params(model)
    size = len(inputs)
    step = max_batch or size
    chunks = list(zip(inputs.split(step), labels.split(step), strict=True))
    scale = None if preconditioner is None else [p.rsqrt() for p in preconditioner]
    starts = [(g, g.get_state()) for g in generators]

    def hvp(vector: list[Tensor]) -> list[Tensor]:
        seed_torch(seed)
        for g, state in starts:
            g.set_state(state)
        if scale is not None:
            vector = torch._foreach_mul(vector, scale)
        product = [torch.zeros_like(p) for p in params]
        for x, y in chunks:
            loss = loss_fn(model(x), y) * (len(x) / size)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True) if g is not None)
            if isinstance(dot, Tensor) and dot.requires_grad:
                parts = torch.autograd.grad(dot, params, allow_unused=True, materialize_grads=True)
                torch._foreach_add_(product, parts)
        if scale is not None:
            torch._foreach_mul_(product, scale)
        return product

    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    torch._foreach_div_(vector, math.sqrt(squared_norm(vector).item()))
    # Below this relative size the Krylov space is invariant and T's eigenvalues are exact.
    tolerance = torch.finfo(params[0].dtype).eps ** 0.5
    previous, beta = None, 0.0
    alphas: list[float] = []
    betas: list[float] = []
    with untouched(model, generators):
        for i in range(iterations):
            residual = hvp(vector)
            alpha = dot(residual, vector)
            alphas.append(alpha)
            if i == iterations - 1:
                break
            torch._foreach_add_(residual, vector, alpha=-alpha)
            if previous is not None:
                torch._foreach_add_(residual, previous, alpha=-beta)
            beta = math.sqrt(squared_norm(residual).item())
            if beta <= tolerance * max(abs(a) for a in alphas):
                break
            betas.append(beta)
            previous, vector = vector, torch._foreach_div(residual, beta)
    diagonal = torch.tensor(alphas, dtype=torch.float64)
    off = torch.tensor(betas, dtype=torch.float64)
    tridiagonal = torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tridiagonal)[-1])


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> list[Tensor] | None:
    """Adam(W)'s preconditioner P for `params` from `optimizer`'s state, as its next update
    applies it: θ ← θ − lr·P⁻¹m with P = (1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε), m and v the moment
    estimates after t steps (PyTorch's bias corrections; Cohen et al. 2022 fold the first
    moment's into P too). None before the first step (no second moment yet)."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    found = []
    for p in params:
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            return None
        steps = float(state["step"])
        beta1, beta2 = groups[id(p)]["betas"]
        root = (state["exp_avg_sq"] / (1 - beta2**steps)).sqrt()
        found.append((1 - beta1**steps) * (root + groups[id(p)]["eps"]))
    return found
