"""DenseNet-121 (Huang et al. 2017) for CIFAR-sized images, from torchvision's builder.

The CIFAR change follows kuangliu/pytorch-cifar (models/densenet.py, DenseNet121): the 7x7
stride-2 stem conv becomes a 3x3 stride-1 conv of 64 channels and the max-pool goes, so 32x32
inputs pass the three transitions to 4x4. torchvision's stem batch norm and ReLU stay (kuangliu's
stem has none): 6,956,426 parameters for 10 classes, kuangliu's 6,956,298 plus that batch norm's
128. Growth rate 32, blocks (6, 12, 24, 16), bottleneck width 4 x 32, compression 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from lbs_tune.models.common import cifar_stem_conv, image_channels

if TYPE_CHECKING:
    import torchvision.models


def densenet121(num_classes: int, input_shape: Sequence[int]) -> torchvision.models.DenseNet:
    """torchvision's DenseNet-121 for images `input_shape` with the CIFAR stem; untrained."""
    import torchvision.models  # here: importing torchvision takes seconds

    model = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    stem = model.features
    stem.conv0 = cifar_stem_conv(image_channels(input_shape), stem.conv0.out_channels)
    stem.pool0 = nn.Identity()
    return model
