"""ResNets for CIFAR-sized images: the CIFAR ResNets, and ResNet-18/34/50 without the ImageNet stem.

`cifar_resnet(depth)`: He et al. (2016), section 4.2. A 3x3 stem of 16 channels, three stages
of n = (depth - 2) / 6 basic blocks with 16, 32 and 64 channels, global pooling and a linear
layer. Shortcuts are option A: parameter-free identity, stride-2 subsampled and zero-padded in
channels when the shape changes, so ResNet-20 has 0.27M parameters as in the paper.

`resnet18`: the usual CIFAR variant of ResNet-18 (3x3 stem of 64 channels, no max-pool, basic
blocks [2, 2, 2, 2] with 64..512 channels, 1x1 conv + batch norm shortcuts): 11.17M parameters.

`torchvision_resnet(depth)`: torchvision's ResNet-34 or ResNet-50 with the same CIFAR change
(kuangliu/pytorch-cifar, models/resnet.py): the 7x7 stride-2 stem conv becomes a 3x3 stride-1
conv and the max-pool goes, so 32x32 inputs reach the last stage at 4x4. 21.28M and 23.52M
parameters for 10 classes, as kuangliu's ResNet34 and ResNet50.

`BasicBlock` also takes dilations, for the dilated residual networks of `drn`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lbs_tune.models.common import (
    cifar_stem_conv,
    classifier,
    conv3x3,
    image_channels,
    kaiming_init,
    residual_stages,
)

if TYPE_CHECKING:
    import torchvision.models

Shortcut = Literal["pad", "conv"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride` and zero-pad the new channels, no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (He et al. 2016).

    `dilation` gives the dilation of each of the two convs (Yu et al. 2017's dilated blocks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        shortcut: Shortcut,
        dilation: tuple[int, int] = (1, 1),
    ):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride, dilation[0])
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, dilation=dilation[1])
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, stages of basic blocks, global pooling and a linear classifier."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
        shortcut: Shortcut,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        block = partial(BasicBlock, shortcut=shortcut)
        self.stages = residual_stages(block, widths[0], widths, depths)
        self.head = classifier(widths[-1], num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        return self.head(self.stages(self.stem(x)))


def cifar_resnet(depth: int, num_classes: int, input_shape: Sequence[int]) -> ResNet:
    """The CIFAR ResNet of He et al. with `depth` = 6n + 2 layers, for images `input_shape`."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"a CIFAR ResNet needs depth 6n + 2 with n >= 1, got {depth}")
    blocks = (depth - 2) // 6
    return ResNet(image_channels(input_shape), (16, 32, 64), (blocks,) * 3, num_classes, "pad")


def resnet18(num_classes: int, input_shape: Sequence[int]) -> ResNet:
    """The CIFAR ResNet-18 (no max-pool, 1x1 projection shortcuts) for images `input_shape`."""
    widths = (64, 128, 256, 512)
    return ResNet(image_channels(input_shape), widths, (2, 2, 2, 2), num_classes, "conv")


def torchvision_resnet(
    depth: Literal[34, 50], num_classes: int, input_shape: Sequence[int]
) -> torchvision.models.ResNet:
    """torchvision's ResNet-`depth` (34 or 50) for images `input_shape`, with a 3x3 stride-1
    stem conv and no max-pool (kuangliu/pytorch-cifar's CIFAR change); untrained weights."""
    import torchvision.models  # here: importing torchvision takes seconds

    build = {34: torchvision.models.resnet34, 50: torchvision.models.resnet50}[depth]
    model = build(weights=None, num_classes=num_classes)
    model.conv1 = cifar_stem_conv(image_channels(input_shape), model.conv1.out_channels)
    model.maxpool = nn.Identity()
    return model
