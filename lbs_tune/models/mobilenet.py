"""MobileNetV2 (Sandler et al. 2018) for CIFAR-sized images, from torchvision's builder.

The CIFAR change follows kuangliu/pytorch-cifar (models/mobilenetv2.py): the first conv has
stride 1 instead of 2, and so has the first block of the second group (24 channels), so the
network downsamples 8x, not 32x, and 32x32 inputs reach the last conv at 4x4. The rest is
torchvision's (its width multiplier 1, dropout 0.2 before the classifier, its initialisation):
2,236,682 parameters for 10 classes. Strides change no parameter count, so this is torchvision's
3,504,872 less the 1000-way classifier's 1,281,000 plus the 10-way one's 12,810. (kuangliu's own
MobileNetV2, 2.30M, adds 1x1 conv shortcuts that the paper and torchvision do not have.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lbs_tune.models.common import cifar_stem_conv, image_channels

if TYPE_CHECKING:
    import torchvision.models

# (expansion t, channels c, blocks n, first stride s) of the paper's table 2, with the CIFAR
# stride 1 in the second row where the paper has 2.
CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def mobilenet_v2(num_classes: int, input_shape: Sequence[int]) -> torchvision.models.MobileNetV2:
    """torchvision's MobileNetV2 for images `input_shape` with the CIFAR strides; untrained."""
    import torchvision.models  # here: importing torchvision takes seconds

    model = torchvision.models.mobilenet_v2(
        weights=None, num_classes=num_classes, inverted_residual_setting=CIFAR_SETTING
    )
    first = model.features[0]  # conv-BN-ReLU6; its conv has stride 2
    first[0] = cifar_stem_conv(image_channels(input_shape), first[0].out_channels)
    return model
