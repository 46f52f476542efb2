"""The model factory: ResNets with the small-image stem, torchvision-compatible (keys, initial weights, outputs)."""

from __future__ import annotations

import pytest
import torch

from ddp_train.models import ARCHS, build_model


@pytest.mark.parametrize("name", ARCHS)
def test_small_image_stem_and_classes(name):
    model = build_model(name, num_classes=7, in_channels=1)
    conv = model.conv1
    assert (conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias) == (1, (3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.fc.out_features == 7
    if name == "resnet18":
        model.eval()
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_state_dict_keys_are_torchvisions():
    import torchvision

    ours = build_model("resnet18", 10)
    theirs = torchvision.models.resnet18(num_classes=10)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_zero_init_residual():
    model = build_model("resnet18", 10, zero_init_residual=True)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    assert torch.count_nonzero(build_model("resnet18", 10).layer1[0].bn2.weight) > 0


def test_same_seed_same_init():
    torch.manual_seed(1)
    a = build_model("resnet18", 10).state_dict()
    torch.manual_seed(1)
    b = build_model("resnet18", 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _torchvision_builder(name, num_classes, in_channels, zero_init_residual, width):
    """The builder ddp_train used before it stopped importing torchvision (models.py up to 2026-12-04):
    torchvision's ResNet at width 64, stages rebuilt at ``width``, the small-image stem."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    block, layers = {"resnet10": (BasicBlock, [1, 1, 1, 1]), "resnet18": (BasicBlock, [2, 2, 2, 2]),
                     "resnet34": (BasicBlock, [3, 4, 6, 3]), "resnet50": (Bottleneck, [3, 4, 6, 3]),
                     "resnet101": (Bottleneck, [3, 4, 23, 3]), "resnet152": (Bottleneck, [3, 8, 36, 3])}[name]
    model = ResNet(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if width != 64:
        model.inplanes = width
        model.bn1 = nn.BatchNorm2d(width)
        model.layer1 = model._make_layer(block, width, layers[0])
        model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)
        model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)
        model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)
        model.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)
    return model


@pytest.mark.parametrize("name, in_channels, zero_init, width", [
    ("resnet10", 1, False, 16), ("resnet10", 3, True, 8), ("resnet18", 3, False, 64), ("resnet18", 1, True, 32),
    ("resnet34", 3, False, 16), ("resnet50", 3, True, 64), ("resnet50", 1, False, 16), ("resnet101", 3, False, 8),
])
def test_same_weights_and_outputs_as_the_torchvision_builder(name, in_channels, zero_init, width):
    """ddp_train's own ResNet replays torchvision's construction: the same seed, the same weights bit for bit
    (runs and checkpoints made before keep their meaning), and the same forward pass."""
    torch.manual_seed(7)
    ours = build_model(name, 10, in_channels, zero_init, width)
    torch.manual_seed(7)
    theirs = _torchvision_builder(name, 10, in_channels, zero_init, width)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, in_channels, 16, 16, dtype=torch.float64)
    ours.double().train(), theirs.double().train()
    assert torch.equal(ours(x), theirs(x))


def test_importing_the_package_does_not_import_torchvision():
    import subprocess
    import sys

    code = ("import sys, ddp_train.cli, ddp_train.training.trainer, ddp_train.models, ddp_train.data\n"
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
