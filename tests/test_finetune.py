"""``model.init_from``: fine-tune a 10-class checkpoint into a 7-class model; wrong weights stop every rank."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ddp_train.persistence.checkpoint import load_checkpoint
from ddp_train.models import build_model
from ddp_train.persistence.weights import WeightsError, load_init_weights
from ddp_train.seeding import seed_all

from .helpers import TINY, assert_ok, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

@pytest.fixture(scope="module")
def pretrained(tiny_run):
    """A real 10-class run (the synthetic dataset): its checkpoints folder."""
    return tiny_run / "checkpoints"


@pytest.fixture(scope="module")
def seven_classes(tmp_path_factory):
    """An image_folder dataset of 7 classes, 6 tiny RGB PNGs each."""
    root = tmp_path_factory.mktemp("seven")
    rng = np.random.default_rng(0)
    for k in range(7):
        (root / "train" / f"class{k}").mkdir(parents=True)
        for i in range(6):
            img = np.clip(rng.normal(30 * k + 20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "train" / f"class{k}" / f"{i}.png")
    return root


def _finetune_args(root, init_from, out, name):
    # lr 1e-12: training moves no weight measurably, so the result shows what was loaded.
    return [*TINY, "model.name=resnet18", "model.width=64", "data.name=image_folder", f"data.root={root}", "data.image_size=16", "train.batch_size=8",
            "train.epochs=1", "train.lr=1.0e-12", f"model.init_from={init_from}", f"out_dir={out}", f"run_name={name}"]


def test_finetune_10_classes_into_7_under_torchrun(pretrained, seven_classes, tmp_path):
    res = run_cli(_finetune_args(seven_classes, pretrained / "model.pth", tmp_path, "seven"), nproc=2)
    assert_ok(res)
    line = f"model.init_from: loaded 120 tensors from {pretrained / 'model.pth'}; fc re-initialised for 7 classes " \
           f"(the weights have 10)"
    assert res.stdout.count(line) == 1, res.stdout  # said once (rank 0), loaded by both ranks
    assert "torchrun x2 on cpu" in res.stdout and "7 classes" in res.stdout

    source = torch.load(pretrained / "model.pth", weights_only=True)
    tuned = load_checkpoint(tmp_path / "seven" / "checkpoints" / "last.pt")
    assert tuned["dataset"]["classes"] == [f"class{k}" for k in range(7)]
    weights = tuned["model"]
    assert weights["fc.weight"].shape == (7, 512) and weights["fc.bias"].shape == (7,)
    for key, value in source.items():
        if key.startswith("fc.") or "running_" in key or "num_batches" in key:
            continue  # fc is new; BN statistics follow the new data
        assert torch.allclose(weights[key], value, atol=1e-6), key
    # fc is the fresh, seeded initialisation of a 7-class model (the same on every rank).
    seed_all(42)
    fresh = build_model("resnet18", 7, 3)
    assert torch.allclose(weights["fc.weight"], fresh.fc.weight, atol=1e-6)
    assert not torch.allclose(weights["conv1.weight"], fresh.conv1.weight, atol=1e-3)


def test_other_architecture_stops_every_rank_with_the_keys(seven_classes, tmp_path):
    # A torchvision ResNet-34 (7x7 ImageNet stem), saved from a DDP-wrapped model: prefixes are no excuse.
    state = {f"module.{k}": v for k, v in torchvision.models.resnet34(num_classes=7).state_dict().items()}
    torch.save(state, tmp_path / "resnet34.pth")
    start = time.monotonic()
    res = run_cli(_finetune_args(seven_classes, tmp_path / "resnet34.pth", tmp_path, "bad"), nproc=2, timeout=120)
    assert res.returncode != 0
    assert time.monotonic() - start < 60, "a rank waited instead of exiting"
    assert res.stderr.count("exitcode  : 2") + res.stderr.count("exitcode: 2") >= 1, res.stderr[-3000:]
    ours = [line for line in res.stderr.splitlines() if line.startswith("ddp_train: error:")]
    assert len(ours) == 1, res.stderr[-3000:]
    message = ours[0]
    assert message.startswith(f"ddp_train: error: model.init_from: {tmp_path / 'resnet34.pth'} does not fit resnet18 "
                              f"with 3 channels and 7 classes: ")
    assert "unexpected keys (" in message and "layer1.2.conv1.weight" in message
    assert "conv1.weight (64, 3, 7, 7) in the file, (64, 3, 3, 3) in the model" in message
    assert "missing keys" not in message  # ResNet-34 holds every ResNet-18 key
    assert "epoch" not in res.stdout  # stopped before training
    assert not (tmp_path / "bad" / "checkpoints" / "last.pt").exists()


def test_accepted_files_and_mismatches(pretrained, tmp_path):
    best = load_checkpoint(pretrained / "best.pt")["model"]

    def loads_exactly(path):
        seed_all(0)
        model = build_model("resnet18", 10, 3)
        line = load_init_weights(model, str(path))
        assert line == f"model.init_from: loaded {len(best)} tensors from {path}"
        assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())

    loads_exactly(pretrained / "best.pt")  # a full checkpoint: its "model"
    loads_exactly(pretrained / "model.pth")  # this project's weights
    torch.save({f"module._orig_mod.{k}": v for k, v in best.items()}, tmp_path / "ddp_compiled.pth")
    loads_exactly(tmp_path / "ddp_compiled.pth")  # DDP + torch.compile prefixes
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in best.items()}}, tmp_path / "wrapped.pt")
    loads_exactly(tmp_path / "wrapped.pt")

    partial = {k: v for k, v in best.items() if k != "layer4.1.bn2.weight"}
    partial["head.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pth")
    model = build_model("resnet18", 10, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as e:
        load_init_weights(model, str(tmp_path / "partial.pth"))
    assert "missing keys (1): layer4.1.bn2.weight; unexpected keys (1): head.weight" in str(e.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded

    one_channel = build_model("resnet18", 10, 1)  # e.g. Fashion-MNIST: only fc may differ
    with pytest.raises(WeightsError, match=r"conv1.weight \(64, 3, 3, 3\) in the file, \(64, 1, 3, 3\)"):
        load_init_weights(one_channel, str(pretrained / "model.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        load_init_weights(model, str(tmp_path / "nothing.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(WeightsError, match="cannot be read|damaged"):
        load_init_weights(model, str(tmp_path / "garbage.pth"))
