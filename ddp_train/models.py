"""ResNets for small images, built from torchvision's ResNet and BasicBlock/Bottleneck classes."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# name -> (block, blocks per stage). resnet10 is the shallowest BasicBlock ResNet (one block per
# stage); with a narrow model.width it is the fast default run's model.
ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def build_model(name: str, num_classes: int, in_channels: int = 3, zero_init_residual: bool = False,
                width: int = 64) -> nn.Module:
    """torchvision ResNet with a 3x3 stride-1 stem, no max-pool, and ``fc`` for ``num_classes``.

    The 7x7 stride-2 stem and max-pool shrink a 32x32 image to 8x8 before the first block; the
    small-image stem keeps the resolution. ``width`` is the first stage's channel count
    (torchvision's is 64; stages double it). Parameter names are torchvision's, so the weights
    load with a plain ``load_state_dict``.
    """
    if name not in ARCHS:
        raise ValueError(f"model.name: expected one of {', '.join(ARCHS)}, got {name!r}")
    block, layers = ARCHS[name]
    model = ResNet(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)  # type: ignore[arg-type]
    if width != 64:
        _rewiden(model, block, layers, width, num_classes)
    model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.maxpool = nn.Identity()
    if zero_init_residual:  # torchvision's constructor did this for the layers it built; these are new
        for m in model.modules():
            if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                nn.init.constant_(m.bn2.weight, 0)
    return model


def _rewiden(model: ResNet, block: type[nn.Module], layers: list[int], width: int, num_classes: int) -> None:
    """Rebuild the stages of ``model`` with ``width`` channels in the first (torchvision fixes 64)."""
    model.inplanes = width
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(block, width, layers[0])  # type: ignore[arg-type]
    model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)  # type: ignore[arg-type]
    model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)  # type: ignore[arg-type]
    model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)  # type: ignore[arg-type]
    model.fc = nn.Linear(8 * width * block.expansion, num_classes)  # type: ignore[attr-defined]
    for m in model.modules():  # torchvision's initialisation, for the new layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
