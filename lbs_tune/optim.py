"""Optimizers: SGD and AdamW from torch, LARS and LAMB for large batches, with weight-decay groups.

The learning rate is a placeholder (0.0) here: the training loop writes `group["lr"]` into every
param group before each step, a number, or for a step captured in a CUDA graph one device tensor
that it fills before each replay. Every optimizer's `state_dict()` holds only tensors, numbers,
strings, lists and dicts, so checkpoints load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lbs_tune.config import OptimizerConfig


def param_groups(model: torch.nn.Module, config: OptimizerConfig) -> list[dict]:
    """Trainable parameters of `model` as named param groups, without the learning rate.

    One group "decay" when `config.decay_norm_and_bias` is true; otherwise the tensors with
    ndim <= 1 (norm weights and biases) go to a "no_decay" group with weight decay 0, which
    also skips LARS/LAMB's trust ratio (`trust_ratio` False). Empty groups are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = {"name": "decay", "weight_decay": config.weight_decay, "trust_ratio": True}
    if config.decay_norm_and_bias:
        return [{**decay, "params": params}]
    no_decay = {"name": "no_decay", "weight_decay": 0.0, "trust_ratio": False}
    groups = [
        {**decay, "params": [p for p in params if p.ndim > 1]},
        {**no_decay, "params": [p for p in params if p.ndim <= 1]},
    ]
    return [group for group in groups if group["params"]]


def capture_problem(config: OptimizerConfig) -> str | None:
    """Why a step of this optimizer cannot be captured in a CUDA graph, or None if it can."""
    if config.name == "lamb":
        return "LAMB's bias correction uses a step count kept on the host"
    return None


def state_copies(config: OptimizerConfig) -> int:
    """Tensors of state the optimizer keeps per parameter, each the parameter's size: Adam's two
    moments (AdamW, LAMB), LARS's momentum, SGD's momentum when it has one."""
    if config.name in ("adamw", "lamb"):
        return 2
    return 1 if config.name == "lars" or config.momentum > 0 else 0


def build_optimizer(
    model: torch.nn.Module, config: OptimizerConfig, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimizer `config.name` over `model`'s trainable parameters, with lr 0.0 in each group.

    Groups come from `param_groups`. SGD uses nesterov only when momentum > 0; LARS ignores
    `nesterov` (the paper's update has none); LAMB ignores `momentum` and `nesterov`. AdamW and
    LAMB take `config.resolved_eps`. `capturable` (CUDA only, not LAMB: `capture_problem`)
    builds the variant whose step a CUDA graph can replay with `group["lr"]` a device tensor:
    SGD's fused kernel, AdamW's capturable path (its step count on the device); LARS as is.
    """
    groups = param_groups(model, config)
    if config.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=0.0,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            foreach=not capturable,
            fused=capturable,
        )
    if config.name == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=0.0,
            betas=config.betas,
            eps=config.resolved_eps,
            foreach=True,
            capturable=capturable,
        )
    if config.name == "lars":
        return LARS(groups, momentum=config.momentum, trust_coefficient=config.trust_coefficient)
    return LAMB(groups, betas=config.betas, eps=config.resolved_eps)


def set_hyperparameters(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> None:
    """Write `config`'s betas and eps into every param group of an AdamW or LAMB `optimizer`,
    keeping its state: a trial whose batch changes mid-run moves them (`rules.moved_optimizer`)
    from the next step on. Other optimizers have neither; nothing changes for them. A step
    captured in a CUDA graph holds them as constants: capture it again after this."""
    if config.name not in ("adamw", "lamb"):
        return
    for group in optimizer.param_groups:
        group.update(betas=tuple(config.betas), eps=config.resolved_eps)


# The keys of a param group that choose an implementation, not the math.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` keeping `optimizer`'s own implementation, whichever
    built the state (eager or captured): its param groups' `IMPLEMENTATION_KEYS`, and AdamW's step
    count on the host, or on the parameter's device when capturable."""
    optimizer.load_state_dict(state)
    own = {k: v for k, v in optimizer.defaults.items() if k in IMPLEMENTATION_KEYS}
    for group in optimizer.param_groups:
        group.update(own)
    on_device = own.get("capturable") or own.get("fused")
    for param, param_state in optimizer.state.items():
        step = param_state.get("step")
        if isinstance(step, Tensor):
            device = param.device if on_device else "cpu"
            param_state["step"] = step.to(device=device, dtype=torch.float32)


def _trust_ratios(
    param_norms: list[Tensor],
    update_norms: list[Tensor],
    denominators: list[Tensor],
    coefficient: float,
) -> list[Tensor]:
    """coefficient * ||w|| / denominator per tensor, 1.0 where ||w|| or the update's norm is 0."""
    # torch.where, not a Python `if`, so that no value is copied to the host.
    return [
        torch.where((w > 0) & (u > 0), coefficient * w / d, 1.0)
        for w, u, d in zip(param_norms, update_norms, denominators, strict=True)
    ]


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """Shared `step` of LARS and LAMB: gathers each group's parameters that have a gradient."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, {"lr": 0.0, "weight_decay": 0.0, "trust_ratio": True, **defaults})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                self._update(group, params, grads, [self.state[p] for p in params])
        return loss

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]):
        raise NotImplementedError


class LARS(_LayerwiseOptimizer):
    """LARS, You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", Alg. 1.

    Per tensor l with learning rate γ, momentum m, weight decay β and trust coefficient η:
        λ = η ||w|| / (||g|| + β ||w||)      (1.0 when ||w|| or ||g|| is 0)
        v ← m v + γ λ (g + β w)
        w ← w - v
    Groups with `trust_ratio` False use λ = 1: plain momentum SGD, for biases and norm weights.
    """

    def __init__(self, params, momentum: float = 0.9, trust_coefficient: float = 0.001):
        super().__init__(params, {"momentum": momentum, "trust_coefficient": trust_coefficient})

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]):
        for state, p in zip(states, params, strict=True):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
        buffers = [state["momentum_buffer"] for state in states]
        decay = group["weight_decay"]
        updates = torch._foreach_add(grads, params, alpha=decay)
        if group["trust_ratio"]:
            param_norms = torch._foreach_norm(params)
            grad_norms = torch._foreach_norm(grads)
            denominators = torch._foreach_add(grad_norms, param_norms, alpha=decay)
            coefficient = group["trust_coefficient"]
            ratios = _trust_ratios(param_norms, grad_norms, denominators, coefficient)
            torch._foreach_mul_(updates, ratios)
        # The paper's form puts γ inside the buffer, so an LR change acts only on new gradients.
        # γ multiplies (not `alpha=`), so that it may be a device tensor (a captured step).
        torch._foreach_mul_(updates, group["lr"])
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, updates)
        torch._foreach_sub_(params, buffers)


class LAMB(_LayerwiseOptimizer):
    """LAMB, You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2.

    Per tensor with learning rate η, betas β1, β2, weight decay λ and step t:
        m ← β1 m + (1 - β1) g,   v ← β2 v + (1 - β2) g²
        r = (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + ε) + λ w
        w ← w - η ||w|| / ||r|| · r      (ratio 1.0 when ||w|| or ||r|| is 0; φ = identity)
    Groups with `trust_ratio` False use ratio 1: plain Adam, for biases and norm weights.
    """

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6):
        super().__init__(params, {"betas": betas, "eps": eps})

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]):
        for state, p in zip(states, params, strict=True):
            if not state:
                # A Python int step: bias corrections are host floats, no device round trip.
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        beta1, beta2 = group["betas"]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        updates = torch._foreach_div(exp_avgs, [1 - beta1 ** state["step"] for state in states])
        denominators = torch._foreach_div(
            exp_avg_sqs, [1 - beta2 ** state["step"] for state in states]
        )
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_div_(updates, denominators)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        if group["trust_ratio"]:
            param_norms = torch._foreach_norm(params)
            update_norms = torch._foreach_norm(updates)
            torch._foreach_mul_(
                updates, _trust_ratios(param_norms, update_norms, update_norms, 1.0)
            )
        torch._foreach_add_(params, updates, alpha=-group["lr"])
