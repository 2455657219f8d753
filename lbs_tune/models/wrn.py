"""Wide ResNets (Zagoruyko & Komodakis 2016), named `wrnD_K` for depth D and width factor K.

Pre-activation blocks BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 in three stages of
n = (D - 4) / 6 blocks with 16K, 32K and 64K channels after a 3x3 stem of 16 channels, then
BN-ReLU, global pooling and a linear layer. A 1x1 conv shortcut is used where the shape changes.
No dropout by default. WRN-28-10 has 36.5M parameters for 10 classes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lbs_tune.models.common import (
    classifier,
    conv3x3,
    image_channels,
    kaiming_init,
    residual_stages,
)


class WideBlock(nn.Module):
    """A pre-activation basic block with optional dropout between its two convolutions."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        same_shape = stride == 1 and in_channels == out_channels
        self.shortcut = (
            None if same_shape else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        # The projection reads the pre-activated input, as in the reference implementation.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-`depth`-`width` for `in_channels`-channel images and `num_classes` classes."""

    def __init__(
        self, depth: int, width: int, num_classes: int, in_channels: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_wrn(depth, width)
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = conv3x3(in_channels, 16)
        block = partial(WideBlock, dropout=dropout)
        self.stages = residual_stages(block, 16, widths, ((depth - 4) // 6,) * 3)
        self.final = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self.head = classifier(widths[-1], num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        return self.head(self.final(self.stages(self.stem(x))))


def check_wrn(depth: int, width: int) -> None:
    """ValueError unless `depth` = 6n + 4 with n >= 1 and `width` >= 1."""
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(
            f"a wide ResNet wrnD_K needs depth D = 6n + 4 with n >= 1 and width K >= 1 "
            f"(e.g. wrn16_4, wrn28_10), got depth {depth} and width {width}"
        )


def parse_wrn_name(name: str) -> tuple[int, int] | None:
    """(depth, width) for a name `wrnD_K`, None for a name of another form."""
    match = re.fullmatch(r"wrn(\d+)_(\d+)", name)
    return None if match is None else (int(match[1]), int(match[2]))


def wide_resnet(depth: int, width: int, num_classes: int, input_shape: Sequence[int]) -> WideResNet:
    """WRN-`depth`-`width` without dropout for images of shape `input_shape` (C, H, W)."""
    return WideResNet(depth, width, num_classes, image_channels(input_shape))
