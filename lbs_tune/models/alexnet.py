"""AlexNet (Krizhevsky et al. 2012), the common CIFAR variant, from torchvision's builder.

The variant of bearpaw/pytorch-classification (models/cifar/alexnet.py, 2.47M parameters in its
README), copied widely as "AlexNet for CIFAR-10": torchvision's five conv layers (64, 192, 384,
256, 256 channels; kernels 11, 5, 3, 3, 3) with the first conv padded by 5, 2x2 max-pools instead
of 3x3 stride-2 ones, and one linear layer on the flattened features in place of the two
4096-wide dropout layers. A 32x32 image reaches 256 x 1 x 1 features: 2,472,266 parameters for
10 classes. Other sizes of at least 29x29 work, with the linear layer sized to the features.
PyTorch's default initialisation, as both torchvision and bearpaw keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from lbs_tune.models.common import conv_length, image_channels

if TYPE_CHECKING:
    import torchvision.models

# Indices of the max-pools in torchvision's AlexNet.features.
_POOLS = (2, 5, 12)


def alexnet(num_classes: int, input_shape: Sequence[int]) -> torchvision.models.AlexNet:
    """The CIFAR AlexNet for images `input_shape` (C, H, W), H and W >= 29; untrained."""
    channels, height, width = image_channels(input_shape), *input_shape[1:]

    def feature_size(size: int) -> int:
        size = conv_length(size, 11, stride=4, padding=5)
        for _ in _POOLS:
            size = conv_length(size, 2, stride=2)
        return size

    if min(feature_size(height), feature_size(width)) < 1:
        raise ValueError(f"alexnet needs images of at least 29x29, got {tuple(input_shape)}")
    import torchvision.models  # here: importing torchvision takes seconds

    model = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(channels, 64, 11, stride=4, padding=5)
    for index in _POOLS:
        model.features[index] = nn.MaxPool2d(2)
    model.avgpool = nn.Identity()
    features = 256 * feature_size(height) * feature_size(width)
    model.classifier = nn.Linear(features, num_classes)
    return model
