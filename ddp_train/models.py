"""ResNets for small images: a 3x3 stride-1 stem, no max-pool, ``width`` channels in the first stage.

The blocks and the network are torchvision's design (He et al. 2015, the "V1.5" Bottleneck that
strides in its 3x3 convolution) with torchvision's module names, so weights load into and from
torchvision's ResNets with a plain ``load_state_dict``. They are written here rather than imported
because importing torchvision costs about 1.4 CPU-seconds per process at every start (measured on
the project's 2-core machine), for three small classes.

Construction replays torchvision's own, layer for layer and initialiser for initialiser (a
width-64 network with a 7x7 stem first, then the narrower stages and the small-image stem), so a
seed gives the same initial weights as the torchvision-based builder it replaces, bit for bit
(tests/test_model.py compares them).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-10/18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        # Attribute order is torchvision's: it fixes modules() order, and so the initialisation order.
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]

# name -> (block, blocks per stage). resnet10 is the shallowest BasicBlock ResNet (one block per
# stage); with a narrow model.width it is the fast default run's model.
ARCHS: dict[str, tuple[Block, list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


class ResNet(nn.Module):
    """Stem, four stages (strides 1, 2, 2, 2; channels width x 1, 2, 4, 8), global average pool, ``fc``."""

    def __init__(self, block: Block, layers: list[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)  # replaced: see build_model
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._stages(block, layers, width)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        self.reinit()

    def _stages(self, block: Block, layers: list[int], width: int) -> None:
        self.inplanes = width
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:  # made before the block: RNG order
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        stage: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def reinit(self) -> None:
        """He-normal convolutions (fan out), BN weight 1 and bias 0, in module order."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, num_classes: int, in_channels: int = 3, zero_init_residual: bool = False,
                width: int = 64) -> nn.Module:
    """A ResNet with a 3x3 stride-1 stem, no max-pool, and ``fc`` for ``num_classes``.

    The 7x7 stride-2 stem and max-pool shrink a 32x32 image to 8x8 before the first block; the
    small-image stem keeps the resolution. ``width`` is the first stage's channel count
    (torchvision's is 64; stages double it). Parameter names are torchvision's, so the weights
    load with a plain ``load_state_dict``.
    """
    if name not in ARCHS:
        raise ValueError(f"model.name: expected one of {', '.join(ARCHS)}, got {name!r}")
    block, layers = ARCHS[name]
    model = ResNet(block, layers, num_classes)
    if width != 64:  # the stages rebuilt narrower, as the builder this replaces did (the same random draws)
        model.bn1 = nn.BatchNorm2d(width)
        model._stages(block, layers, width)
        model.fc = nn.Linear(8 * width * block.expansion, num_classes)
        model.reinit()
    model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    if zero_init_residual:  # each block's last BN starts at 0: the block starts as the identity
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)
    return model
