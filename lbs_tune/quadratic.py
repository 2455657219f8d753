"""The noisy quadratic model as a trial: dataset `nqm`, model `nqm`, task "nqm" (issue 24).

The problem is `lbs_tune.nqm`'s (Zhang et al. 2019), given in the trial config's `data.nqm`:

    L(theta) = 1/2 sum_i h_i theta_i^2,   gradient at batch size B: H theta + xi,  xi ~ N(0, C / B)

with C = diag(c) the per-example noise variances. A trial draws xi at every step from its own
generator (seeded from the trial seed's data-order seed; its state goes into checkpoints, so a
resumed trial draws the same noise); the model is theta alone (`lbs_tune.models.quadratic`),
started at theta0; the optimizer, its learning-rate rule and the loop are every other task's.
The batch's loss is 1/2 sum h theta^2 + xi . theta: its gradient is the noisy gradient above and
its mean over the noise is L(theta), so `train/loss` estimates L without bias. `val/loss` is
L(theta) itself, in float64; there is no test split and no accuracy.

An epoch is `data.samples` examples: the NQM has no training set (fresh noise every step, so a
batch may be of any size), and the epoch is only the unit of eval_every, checkpoint_every and
epochs. A learning rate past the stability limit is no mistake: its trial diverges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lbs_tune.config import KeyedError, NQMConfig, TrialConfig
from lbs_tune.nqm import Quadratic, problems, quadratic

# The metrics of a trial on the NQM that a target may be on.
LOSS_METRICS = ("val/loss", "train/loss")


# ============================================================================ The problem


def read_quadratic(config: TrialConfig) -> Quadratic:
    """The noisy quadratic of the config's `data.nqm` (checked by `check_quadratic`)."""
    return quadratic(**config.data.nqm.arguments())


def target_problem(problem: NQMConfig, metric: str, value: float) -> tuple[str, str] | None:
    """(key, message) if a target of `metric` at `value` cannot be a target on `problem`: a
    metric the NQM does not report, a loss at or below zero or at or above the initial loss."""
    if metric not in LOSS_METRICS:
        return "target.metric", f"the NQM reports {' and '.join(LOSS_METRICS)}; not {metric}"
    found = problems(**problem.arguments(), target=value)
    return ("target.value", found[0][1]) if found else None


def check_quadratic(config: TrialConfig) -> None:
    """KeyedError(key, message) for a trial config that the NQM cannot run: no `data.nqm`, a
    measurement or option it has no use for, a target it cannot have."""
    if config.data.nqm is None:
        raise KeyedError(
            "data.nqm",
            "dataset nqm needs its problem, e.g. data.nqm: {dim: 1000, power: 1.0} "
            "(see sweeps/nqm_tuned.yaml)",
        )
    if config.noise_scale is not None:
        raise KeyedError(
            "noise_scale",
            "the NQM's gradient noise is given (data.nqm.noise or noise_scale), not measured: "
            "remove noise_scale",
        )
    if isinstance(config.max_device_batch, int) and config.max_device_batch < config.batch_size:
        raise KeyedError(
            "max_device_batch",
            "the NQM draws a batch's noise at once, without micro-batches; remove max_device_batch",
        )
    if config.label_smoothing:
        raise KeyedError("label_smoothing", "the NQM has no labels to smooth; remove it")
    if config.target is not None:
        problem = target_problem(config.data.nqm, config.target.metric, config.target.value)
        if problem:
            raise KeyedError(*problem)


# ============================================================================ On the device


@dataclass
class QuadraticData:
    """The problem on the device: curvatures, noise standard deviations sqrt(c), the start."""

    h: Tensor  # (d,) float32, what the model's loss uses
    std: Tensor  # (d,) float32
    theta0: Tensor  # (d,) float32
    h64: Tensor  # (d,) float64, for the exact L(theta) of `val/loss`
    input_shape: tuple[int, ...]  # (d,)
    num_classes: int = 1
    channels_last: bool = False

    def start(self, model: nn.Module) -> None:
        """Set `model` (a `lbs_tune.models.quadratic.NoisyQuadratic`) to the problem's
        curvatures and start theta0."""
        with torch.no_grad():
            model.h.copy_(self.h)
            model.theta.copy_(self.theta0[None])


def quadratic_data(q: Quadratic, device: torch.device) -> QuadraticData:
    """`q` on `device`."""

    def tensor(values, dtype=torch.float32) -> Tensor:
        return torch.as_tensor(values, dtype=dtype, device=device)

    return QuadraticData(
        h=tensor(q.h),
        std=tensor(q.c**0.5),
        theta0=tensor(q.theta0),
        h64=tensor(q.h, torch.float64),
        input_shape=(len(q.h),),
    )


# ============================================================================ The task


class NoisyQuadraticTask:
    """The loop's `lbs_tune.tasks.Task` on the NQM: a step's batch is one draw of the batch's
    mean noise xi (1, d), N(0, C / B), with targets of B zeros (the loop weighs a batch's loss
    by its number of examples); the model's output is the batch's loss itself."""

    def __init__(self, config: TrialConfig, data: QuadraticData, order_seed: int) -> None:
        device = data.h.device
        self.data = data
        self.examples_per_step = config.batch_size
        self.epoch_examples = config.data.samples
        self.noise = torch.Generator(device=device).manual_seed(order_seed)
        self.generators = [self.noise]

    def batch(self, step: int, start: int, size: int) -> tuple[Tensor, Tensor]:
        # The noise of a batch of `size` (a batch schedule's own size at this step).
        std = self.data.std
        xi = torch.randn((1, *self.data.input_shape), generator=self.noise, device=std.device)
        return xi * (std / math.sqrt(size)), torch.zeros(size, device=std.device)

    def inputs(self, x: Tensor) -> Tensor:
        return x

    def forward(self, model: nn.Module, x: Tensor, chunk: int) -> Tensor:
        return model(x)

    def logits(self, outputs: Tensor) -> Tensor:
        return outputs

    def loss(self, logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return logits.mean()

    def scores(self, logits: Tensor, y: Tensor) -> tuple[int, int]:
        return 0, 0  # nothing to classify: the loop reports no train/accuracy

    def probe(self, n: int) -> tuple[Tensor, Tensor]:
        # Without noise: the sharpness is that of L itself, max h.
        zero = torch.zeros((1, *self.data.input_shape), device=self.data.std.device)
        return zero, zero.new_zeros(1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int) -> dict[str, float] | None:
        if split != "val":
            return None
        theta = model.theta.detach()[0].double()
        return {"loss": 0.5 * float(self.data.h64 @ theta.square())}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": {"noise": self.noise.get_state()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.set_state(state["sampler"]["noise"])
