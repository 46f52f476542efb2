"""ResNets for small images, built from torchvision (no ResNet code of our own)."""

from __future__ import annotations

import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_model(name: str, num_classes: int, in_channels: int = 3, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet with a 3x3 stride-1 stem, no max-pool, and ``fc`` for ``num_classes``.

    The 7x7 stride-2 stem and max-pool shrink a 32x32 image to 8x8 before the first block; the
    small-image stem keeps the resolution. Parameter names are torchvision's, so the weights
    load with a plain ``load_state_dict``.
    """
    if name not in ARCHS:
        raise ValueError(f"model.name: expected one of {', '.join(ARCHS)}, got {name!r}")
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes,
                                              zero_init_residual=zero_init_residual)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.maxpool = nn.Identity()
    return model
