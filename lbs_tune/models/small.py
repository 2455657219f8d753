"""Small models for MNIST-sized problems: LeNet-5, an MLP and the MNIST-1D ConvBase.

They keep PyTorch's default initialisation, as the LeNet and MNIST-1D reference code does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lbs_tune.models.common import conv_length, image_channels


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max-pooling: conv6-5x5, pool, conv16-5x5, pool, fc120, fc84, fc.

    LeNet-5 was built for 32x32 inputs: smaller images (MNIST's 28x28) get the 2-pixel zero
    padding in the first conv that LeNet-5 applied, so both reach 16x5x5 features. The flatten
    size is computed from `input_shape` (C, H, W), so other sizes work too.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int]) -> None:
        super().__init__()
        channels, height, width = image_channels(input_shape), *input_shape[1:]
        padding = 2 if min(height, width) < 32 else 0

        def feature_size(size: int) -> int:
            size = conv_length(conv_length(size, 5, padding=padding), 2, stride=2)
            return conv_length(conv_length(size, 5), 2, stride=2)

        if min(feature_size(height), feature_size(width)) < 1:
            raise ValueError(f"lenet needs images of at least 12x12, got {tuple(input_shape)}")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * feature_size(height) * feature_size(width), 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        return self.classifier(self.features(x))


def mlp(num_classes: int, input_shape: Sequence[int], hidden: int = 256) -> nn.Sequential:
    """Flatten, then Linear-ReLU-Linear-ReLU-Linear with `hidden` units, for any `input_shape`.

    On MNIST-1D (input (40,), 10 classes) this is the 40-256-256-10 network. Returns the model.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class CNN1d(nn.Module):
    """ConvBase of the MNIST-1D paper (Greydanus 2020): three strided Conv1d of 25 channels.

    Kernels 5, 3, 3 with stride 2 and padding 1 as in the reference code, ReLU after each, then
    a linear layer on the flattened features (25 x 5 = 125 for length 40). Takes an input shape
    (L,) or (C, L); inputs (N, L) are read as one channel, (N, 1, L).
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], channels: int = 25) -> None:
        super().__init__()
        if len(input_shape) not in (1, 2):
            raise ValueError(f"cnn1d needs an input shape (L,) or (C, L), got {tuple(input_shape)}")
        in_channels = input_shape[0] if len(input_shape) == 2 else 1
        length = input_shape[-1]
        layers: list[nn.Module] = []
        for kernel in (5, 3, 3):
            layers += [nn.Conv1d(in_channels, channels, kernel, 2, 1), nn.ReLU(inplace=True)]
            in_channels, length = channels, conv_length(length, kernel, 2, 1)
        if length < 1:
            raise ValueError(f"cnn1d needs sequences of at least 3 values, got {input_shape[-1]}")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for sequences (N, L) or (N, C, L)."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.linear(self.features(x))
