"""DRN-D-22 for semantic segmentation (Yu, Koltun & Funkhouser 2017, "Dilated Residual Networks").

The backbone follows the reference implementation, fyu/drn (drn.py, `drn_d_22`): channels
(16, 32, 64, 128, 256, 512, 512, 512) in eight levels of (1, 1, 2, 2, 2, 2, 1, 1) layers.
Levels 1-2 are a 7x7 stride-1 conv and conv-BN-ReLU layers in place of a max-pool (the D
variant's stem); levels 3-6 are basic residual blocks, levels 3 and 4 with stride 2, levels 5
and 6 at stride 1 with dilations 2 and 4; levels 7 and 8 are conv-BN-ReLU layers without
residual connections, dilations 2 and 1, which remove the gridding of the dilated levels. The
output stride is 8. Backbone: 15,880,752 parameters; with the reference's ImageNet head (a 1x1
conv to 1000 classes, 513,000 more) that is the 16.4M of fyu/drn's table.

The segmentation head is fyu/drn's `DRNSeg` (segment.py): a 1x1 conv to the classes, then
upsampling by 8 back to the input size. The reference upsamples with a frozen depthwise
transposed conv holding a bilinear kernel; here it is `F.interpolate(mode="bilinear")`, the
same map away from the border, without a frozen parameter. Convs are initialised N(0, 2 / (k^2 *
out_channels)) as in the reference (Kaiming fan-out), the head's bias is zero.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lbs_tune.models.common import conv3x3, image_channels, kaiming_init
from lbs_tune.models.resnet import BasicBlock

CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)
DRN_D_22_LAYERS = (1, 1, 2, 2, 2, 2, 1, 1)
OUTPUT_STRIDE = 8


def _conv_layers(
    in_channels: int, out_channels: int, convs: int, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """`convs` conv3x3-BN-ReLU layers; the first has `stride`, all have `dilation`."""
    layers: list[nn.Module] = []
    for index in range(convs):
        layers += [
            conv3x3(in_channels, out_channels, stride if index == 0 else 1, dilation),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


def _residual_level(
    in_channels: int, out_channels: int, blocks: int, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """`blocks` basic blocks with 1x1 conv shortcuts; the first has `stride`, all `dilation`."""
    layers = [BasicBlock(in_channels, out_channels, stride, "conv", (dilation, dilation))]
    layers += [
        BasicBlock(out_channels, out_channels, 1, "conv", (dilation, dilation))
        for _ in range(blocks - 1)
    ]
    return nn.Sequential(*layers)


def drn_d_backbone(
    in_channels: int, layers: Sequence[int] = DRN_D_22_LAYERS, channels: Sequence[int] = CHANNELS
) -> nn.Sequential:
    """The DRN-D levels 0-8 as named children `layer0` ... `layer8`: (N, C, H, W) images to
    (N, channels[-1], ceil(H / 8), ceil(W / 8)) features. Returns the uninitialised module."""
    stem = nn.Sequential(
        nn.Conv2d(in_channels, channels[0], 7, padding=3, bias=False),
        nn.BatchNorm2d(channels[0]),
        nn.ReLU(inplace=True),
    )
    levels = OrderedDict(
        layer0=stem,
        layer1=_conv_layers(channels[0], channels[0], layers[0]),
        layer2=_conv_layers(channels[0], channels[1], layers[1], stride=2),
        layer3=_residual_level(channels[1], channels[2], layers[2], stride=2),
        layer4=_residual_level(channels[2], channels[3], layers[3], stride=2),
        layer5=_residual_level(channels[3], channels[4], layers[4], dilation=2),
        layer6=_residual_level(channels[4], channels[5], layers[5], dilation=4),
        layer7=_conv_layers(channels[5], channels[6], layers[6], dilation=2),
        layer8=_conv_layers(channels[6], channels[7], layers[7]),
    )
    return nn.Sequential(levels)


class DRNSegmentation(nn.Module):
    """A DRN-D backbone, a 1x1 conv to `num_classes` and bilinear upsampling to the input size."""

    def __init__(self, num_classes: int, in_channels: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.base = drn_d_backbone(in_channels, layers)
        self.seg = nn.Conv2d(CHANNELS[-1], num_classes, 1)
        kaiming_init(self)
        nn.init.zeros_(self.seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits (N, num_classes, H, W) for images (N, C, H, W)."""
        logits = self.seg(self.base(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def drn_d_22(num_classes: int, input_shape: Sequence[int]) -> DRNSegmentation:
    """DRN-D-22 segmenting images `input_shape` (C, H, W) into `num_classes` classes."""
    return DRNSegmentation(num_classes, image_channels(input_shape), DRN_D_22_LAYERS)
