"""Learning-rate rules: scaling with batch size, gradual warmup, decay. Pure functions of the step.

The rule: a base LR is tuned at a base batch size; for batch size B with k = B / base_batch_size the
peak LR is base (`none`), base x k (`linear`, Goyal et al. 2017) or base x sqrt(k) (`sqrt`,
Krizhevsky 2014; Hoffer et al. 2017). `sde` is the square-root scaling rule of Malladi et al. 2022
("On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS) for Adam: the LR times
sqrt(k) and, as well, 1 - beta1 and 1 - beta2 times k and eps over sqrt(k) (`moved_optimizer`).
Warmup raises the LR linearly per step over `warmup_epochs` from the base LR (or from zero) to
the peak; then the peak is held (`constant`) or decayed (`step`, `cosine`, `linear` to zero, or
`poly`: peak x (1 - progress)^power, power 2 in the LARS paper, You et al. 2017) over the rest of
the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lbs_tune.config import KeyedError, LRConfig, OptimizerConfig
from lbs_tune.nqm import sgd_stability_factor


def peak_lr(rule: LRConfig, batch_size: int) -> float:
    """The scaled LR for this batch size: base x {1, k, sqrt(k), sqrt(k)} for `none`, `linear`,
    `sqrt` and `sde`, with k = B / base_batch_size."""
    k = batch_size / rule.base_batch_size
    factor = {"none": 1.0, "linear": k, "sqrt": math.sqrt(k), "sde": math.sqrt(k)}[rule.scaling]
    return rule.base * factor


def sde_moved(
    betas: tuple[float, float], eps: float, k: float
) -> tuple[tuple[float, float], float]:
    """Adam's betas and eps for a batch k times the one they were tuned at, by Malladi et al.'s
    square-root scaling rule: beta_i -> 1 - k (1 - beta_i), eps -> eps / sqrt(k).

    Returns (betas, eps). The rule has no cap: ValueError where a moved beta leaves (0, 1), that
    is where k (1 - beta_i) >= 1 (k >= 10 for beta1 = 0.9), a batch beyond the rule's reach.
    """
    moved = tuple(1.0 - k * (1.0 - beta) for beta in betas)
    for i, (beta, new) in enumerate(zip(betas, moved, strict=True)):
        # 1 - beta is inexact in binary (0.1 is 0.0999...98): a beta within rounding of 0 is 0.
        if new < 1e-12:
            raise ValueError(
                f"the SDE rule moves beta{i + 1} {beta} to 1 - {k:g} x {1 - beta:.6g} = "
                f"{round(new, 9):g}, outside (0, 1); it reaches batches under "
                f"{1 / (1 - beta):.6g} x the base"
            )
    return (moved[0], moved[1]), eps / math.sqrt(k)


def moved_optimizer(optimizer: OptimizerConfig, rule: LRConfig, batch_size: int) -> OptimizerConfig:
    """`optimizer` as a trial of `batch_size` trains with it: with `rule.scaling` "sde", betas and
    eps moved by `sde_moved` for k = batch_size / rule.base_batch_size (eps resolved to the
    optimizer's default first); unchanged for the other rules, which move the LR alone.

    KeyedError ("lr.scaling") for "sde" with an optimizer other than AdamW, or at a batch size
    that moves a beta out of (0, 1), naming the largest batch the rule reaches and the fixes.
    """
    if rule.scaling != "sde":
        return optimizer
    if optimizer.name != "adamw":
        raise KeyedError(
            "lr.scaling",
            f"lr.scaling sde is Adam's rule (Malladi et al. 2022); optimizer.name is "
            f"{optimizer.name}: use adamw, or lr.scaling linear or sqrt",
        )
    k = batch_size / rule.base_batch_size
    try:
        betas, eps = sde_moved(optimizer.betas, optimizer.resolved_eps, k)
    except ValueError as error:
        raise KeyedError(
            "lr.scaling",
            f"lr.scaling sde at batch_size {batch_size} (k = {k:g} x lr.base_batch_size "
            f"{rule.base_batch_size}): {error}; use a smaller batch, a larger "
            "lr.base_batch_size, optimizer.betas closer to 1, or lr.scaling sqrt",
        ) from None
    return optimizer.model_copy(update={"betas": betas, "eps": eps})


def warmup_steps(rule: LRConfig, steps_per_epoch: int) -> int:
    """Steps of warmup: `warmup_epochs` worth of steps, rounded to the nearest step."""
    return round(rule.warmup_epochs * steps_per_epoch)


def lr_at(
    step: int, rule: LRConfig, batch_size: int, total_steps: int, steps_per_epoch: int
) -> float:
    """The LR used by the update of 0-based `step` out of `total_steps`.

    Warmup (steps 0..W-1) rises linearly and reaches the peak at its last step W-1:
    start + (peak - start) x (step + 1) / W. Decay then runs over steps W..total_steps-1 with
    progress p = (step - W) / (total_steps - W), so no step trains with an LR of zero.
    """
    peak = peak_lr(rule, batch_size)
    warm = min(warmup_steps(rule, steps_per_epoch), total_steps)
    if step < warm:
        start = 0.0 if rule.warmup_from == "zero" else min(rule.base, peak)
        return start + (peak - start) * (step + 1) / warm
    if rule.decay == "constant":
        return peak
    if rule.decay == "step":
        passed = sum(step >= m * total_steps for m in rule.milestones)
        return peak * rule.gamma**passed
    progress = (step - warm) / max(1, total_steps - warm)
    if rule.decay == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if rule.decay == "poly":
        return peak * (1.0 - progress) ** rule.power
    return peak * (1.0 - progress)


def stability_limit(
    optimizer: str,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
) -> float | None:
    """The largest curvature the optimizer `optimizer` ("sgd", "adamw", ...) at learning rate `lr`
    is stable on: above it the iterates grow along the top eigenvector (the edge of stability,
    Cohen et al. 2021); None where there is no such line (LARS, LAMB: layer-wise trust ratios).

    On a quadratic of curvature λ, PyTorch's SGD is stable for lr·λ < 2 without momentum,
    lr·λ < 2(1 + β) with heavy-ball momentum β, and lr·λ < 2(1 + β)/(1 + 2β) with Nesterov's
    (its update g + β·buf), as `build_optimizer` uses it: Nesterov only with β > 0. The limit of
    Adam(W) is on the preconditioned sharpness λ_max(P⁻¹H), P its frozen preconditioner:
    2(1 + β₁)/((1 − β₁)·lr) (Cohen et al. 2022, "Adaptive gradient methods at the edge of
    stability"). Weight decay's own curvature (its coefficient) is left out.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if optimizer == "adamw":
        beta = betas[0]
        return 2 * (1 + beta) / ((1 - beta) * lr)
    if optimizer != "sgd":
        return None
    return sgd_stability_factor(momentum, nesterov) / lr


def scheduled_lrs(schedule: Sequence[tuple[int, int]], rule: LRConfig) -> tuple[float, ...]:
    """Each entry's peak learning rate under `rule` (`peak_lr` of its batch size) of a batch
    schedule (lbs_tune.branching): the LR moved at each switch as it would be for a constant
    batch of that size."""
    return tuple(peak_lr(rule, batch) for _, batch in schedule)
