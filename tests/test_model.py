"""The model factory: torchvision ResNets with the small-image stem."""

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
