"""Pieces shared by the convolutional families: shape checks, convs, residual stages, head, init."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn


def image_channels(input_shape: Sequence[int]) -> int:
    """The channel count C of an image input shape (C, H, W); ValueError for other shapes."""
    if len(input_shape) != 3:
        raise ValueError(f"an image model needs an input shape (C, H, W), got {tuple(input_shape)}")
    return input_shape[0]


def conv_length(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """The output length of a convolution or pooling along one axis of length `size`."""
    return (size + 2 * padding - kernel) // stride + 1


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """A 3x3 "same" convolution without bias (a batch norm follows and cancels any bias)."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        bias=False,
    )


def cifar_stem_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The 3x3 stride-1 stem conv that CIFAR variants put in place of ImageNet's strided stem.

    Kaiming-normal (fan-out, ReLU) initialised, as torchvision initialises the conv it replaces.
    """
    conv = conv3x3(in_channels, out_channels)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def residual_stages(
    block: Callable[[int, int, int], nn.Module],
    in_channels: int,
    widths: Sequence[int],
    depths: Sequence[int],
) -> nn.Sequential:
    """Stages of `depths[i]` blocks of width `widths[i]`, built by `block(in, out, stride)`.

    The first block of each stage changes the width; every stage after the first halves the
    resolution with stride 2 in its first block. Returns the stages as one `nn.Sequential`.
    """
    stages = []
    for index, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        blocks = [block(in_channels, width, 1 if index == 0 else 2)]
        blocks += [block(width, width, 1) for _ in range(depth - 1)]
        stages.append(nn.Sequential(*blocks))
        in_channels = width
    return nn.Sequential(*stages)


def classifier(features: int, num_classes: int) -> nn.Sequential:
    """Global average pooling, flatten and a linear layer: (N, features, H, W) -> (N, classes)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, num_classes))


def kaiming_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-out, ReLU) init of every Conv2d in `model`, as torchvision and He et al.

    Batch norms keep PyTorch's weight 1, bias 0 and linear layers PyTorch's default. Returns
    `model`, changed in place.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model
