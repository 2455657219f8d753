"""VGG with batch norm, CIFAR variant (Simonyan & Zisserman 2015; Liu's pytorch-cifar head).

Configurations A (vgg11), B (vgg13), D (vgg16) and E (vgg19): 3x3 conv-BN-ReLU layers and five
2x2 max-pools, then global average pooling and Linear(512, num_classes). The pools round up
(`ceil_mode`) so 28x28 inputs reach 1x1 like 32x32 ones instead of shrinking to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lbs_tune.models.common import classifier, conv3x3, image_channels, kaiming_init

# Output channels of each conv layer in order; "M" is a 2x2 max-pool.
VGG_CONFIGS = {
    "vgg11": "64 M 128 M 256 256 M 512 512 M 512 512 M",
    "vgg13": "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
    "vgg16": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
    "vgg19": "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
}


class VGG(nn.Module):
    """The VGG configuration `name` for `in_channels`-channel images and `num_classes` classes."""

    def __init__(self, name: str, num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for item in VGG_CONFIGS[name].split():
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                width = int(item)
                layers += [
                    conv3x3(in_channels, width),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_channels = width
        self.features = nn.Sequential(*layers)
        self.head = classifier(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        return self.head(self.features(x))


def vgg(name: str, num_classes: int, input_shape: Sequence[int]) -> VGG:
    """The VGG configuration `name` (a key of VGG_CONFIGS) for images of shape `input_shape`."""
    return VGG(name, num_classes, image_channels(input_shape))
