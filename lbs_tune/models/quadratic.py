"""The noisy quadratic model's model: its parameter theta and nothing else (`lbs_tune.quadratic`).

theta is one row (1, d), so the optimizer puts it in its weight-decay group (parameters of one
dimension, norm weights and biases, are exempt by default): weight decay pulls theta to 0 as
`lbs_tune.nqm`'s exact answer has it. The curvatures h are a buffer, set with theta0 by the
problem (`QuadraticData.start`); built here, theta is 0 and h is 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NoisyQuadratic(nn.Module):
    """L(theta) = 1/2 sum h theta^2 plus the linear noise term of each row of its input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(1, dim))
        self.register_buffer("h", torch.ones(dim))

    def forward(self, noise: Tensor) -> Tensor:
        """The loss 1/2 sum h theta^2 + xi . theta of each row xi of `noise` (n, d): (n,).
        Elementwise products and sums only, so autocast leaves it in float32."""
        quadratic = 0.5 * (self.h * self.theta[0].square()).sum()
        return quadratic + (noise * self.theta).sum(-1)


def nqm(num_classes: int, input_shape: tuple[int, ...]) -> NoisyQuadratic:
    """The NQM's model for inputs of shape (d,), the noise of a batch; `num_classes` is unused
    (its output is the batch's loss)."""
    if len(input_shape) != 1:
        raise ValueError(f"the NQM takes an input shape (d,), not {input_shape}")
    return NoisyQuadratic(input_shape[0])
