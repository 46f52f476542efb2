"""Device-resident data (run here on the CPU device): the DataLoader path's order, world-size invariant
augmentation with the notebook's meaning, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddp_train.config import ConfigError, load_config
from ddp_train.data import build_data, load_dataset
from ddp_train.data.batch_augment import BatchAugment
from ddp_train.distributed.context import DistContext

from .helpers import TINY, assert_ok, last_weights, rel_diff, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

SMALL = ["data.synthetic_size=300", "train.batch_size=32", "data.num_workers=0"]


def _ctx(rank: int = 0, world: int = 1) -> DistContext:
    return DistContext("torchrun" if world > 1 else "single", rank, rank, world, torch.device("cpu"),
                       "gloo" if world > 1 else None)


def _bundle(overrides: list[str], rank: int = 0, world: int = 1):
    cfg = load_config(None, [*SMALL, *overrides])
    return build_data(load_dataset(cfg.data), cfg, _ctx(rank, world))


def _epoch(bundle, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    bundle.train.sampler.set_epoch(epoch)
    bundle.train.sampler.skip = skip
    return list(bundle.train)


@pytest.mark.parametrize("world", [1, 2])
def test_same_samples_and_images_as_the_dataloader_path(world):
    """Augmentation off: every rank's batches equal the DataLoader's, bit for bit."""
    for rank in range(world):
        resident = _bundle(["data.device_resident=true"], rank, world)
        loader = _bundle(["data.device_resident=false"], rank, world)
        assert resident.device_resident and not loader.device_resident
        assert len(resident.train) == len(loader.train)
        for (x, y), (x2, y2) in zip(_epoch(resident, 3), _epoch(loader, 3), strict=True):
            assert torch.equal(y, y2)
            assert torch.equal(x, x2)
        for split in ("valid", "test"):
            got = list(getattr(resident, split))
            want = list(getattr(loader, split))
            assert len(got) == len(want)
            for (x, y), (x2, y2) in zip(got, want, strict=True):
                assert torch.equal(y, y2) and torch.equal(x, x2)


@pytest.mark.parametrize("crop", ["resized", "pad"])
def test_augmented_batches_do_not_depend_on_the_world_size(crop):
    """Global batch k at world size 1 is rank 0's and rank 1's batch k interleaved, augmentation included."""
    aug = ["data.device_resident=true", "data.augment=true", f"data.crop={crop}"]
    one = _epoch(_bundle(aug), 2)
    ranks = [_epoch(_bundle(aug, r, 2), 2) for r in range(2)]
    for k, (x, y) in enumerate(one):
        for r in range(2):
            assert torch.equal(y[r::2], ranks[r][k][1])
            assert torch.equal(x[r::2], ranks[r][k][0])
    # Another epoch draws other augmentations for the same samples.
    again = _epoch(_bundle(aug), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))
    assert not torch.equal(one[0][0], _epoch(_bundle(aug), 3)[0][0])


def test_skip_resumes_the_epoch_at_the_next_batch():
    bundle = _bundle(["data.device_resident=true", "data.augment=true"])
    full = _epoch(bundle, 1)
    rest = _epoch(bundle, 1, skip=3 * 32)
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], rest, strict=True))


def _images(n: int = 64, size: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


ZERO, ONE = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)


def test_pad_crop_is_a_window_of_the_padded_image_flipped_or_not():
    aug = BatchAugment(20, "pad", padding=4, cutout=0)
    x = _images()
    p = aug.draw(len(x), seed=1, epoch=0, device=torch.device("cpu"))
    out = aug(x, p, ZERO, ONE) * 255
    padded = F.pad(x, (4, 4, 4, 4)).float()
    assert set(p["offset"].unique().tolist()) <= set(range(9)) and 0.3 < p["flip"].float().mean() < 0.7
    for i in range(len(x)):
        oy, ox = p["offset"][i].tolist()
        want = padded[i, :, oy:oy + 20, ox:ox + 20]
        want = want.flip(-1) if p["flip"][i] else want
        assert torch.allclose(out[i], want, atol=1e-4), i


def test_resized_crop_is_a_scaled_window():
    aug = BatchAugment(20, "resized", cutout=0)
    x = _images(4)
    f = x.float() / 255
    # Whole image, no flip: the identity. Flipped: the mirror image.
    full = {"side": torch.ones(4), "place": torch.rand(4, 2), "flip": torch.tensor([False, True, False, True])}
    out = aug(x, full, ZERO, ONE)
    assert torch.allclose(out[0], f[0], atol=1e-5) and torch.allclose(out[1], f[1].flip(-1), atol=1e-5)
    # 80% of the side, centred: the window [2, 18) resized to 20 (border pixels aside: interpolate
    # clamps at the window's edge, the crop reads the image beyond it).
    centred = {"side": torch.full((4,), 0.8), "place": torch.full((4, 2), 0.5), "flip": torch.zeros(4, dtype=torch.bool)}
    out = aug(x, centred, ZERO, ONE)
    want = F.interpolate(f[:, :, 2:18, 2:18], size=20, mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1], atol=1e-5)
    # The drawn area fraction follows RandomResizedCrop's scale=(0.64, 1).
    p = aug.draw(20000, seed=0, epoch=0, device=torch.device("cpu"))
    area = p["side"] ** 2
    assert area.min() >= 0.64 and area.max() <= 1.0 and abs(area.mean().item() - 0.82) < 0.01


def test_cutout_zeroes_the_clipped_square_after_normalisation():
    aug = BatchAugment(20, "pad", padding=0, cutout=8)
    x = torch.full((3, 1, 20, 20), 200, dtype=torch.uint8)
    p = {"offset": torch.zeros(3, 2, dtype=torch.long), "flip": torch.zeros(3, dtype=torch.bool),
         "centre": torch.tensor([[10, 10], [0, 0], [19, 5]])}
    mean, std = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)
    out = aug(x, p, mean, std)
    zero = out == 0
    assert zero[0, 0, 6:14, 6:14].all() and zero[0].sum() == 64  # [c - 4, c + 4) in both directions
    assert zero[1, 0, 0:4, 0:4].all() and zero[1].sum() == 16  # clipped at the corner
    assert zero[2, 0, 15:20, 1:9].all() and zero[2].sum() == 5 * 8
    assert torch.allclose(out[~zero], torch.tensor((200 / 255 - 0.5) / 0.25))


def test_device_resident_true_refused_for_image_folder():
    with pytest.raises(ConfigError, match="data.device_resident"):
        load_config(None, ["data.name=image_folder", "data.root=/tmp", "data.device_resident=true"])


# --------------------------------------------------------------------------- through the CLI

CFG = [*TINY, "data.device_resident=true", "data.augment=true", "checkpoint.every_steps=2", "checkpoint.keep=100"]
# fp64 equivalence runs (agreement that cannot depend on the CPU's rounding): resnet10 at width 16,
# 160 images, 2 epochs of 4 SGD steps at lr 0.05, channels_last unless a test says otherwise.
FP64 = [*CFG, "data.synthetic_size=160", "train.precision=fp64", "train.lr=0.05", "model.name=resnet10",
        "model.width=16", "model.channels_last=true"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resident")
    assert_ok(run_cli([*CFG, f"out_dir={out}", "run_name=ref"], nproc=2))
    return out / "ref"


@pytest.fixture(scope="module")
def ref64(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resident64")
    assert_ok(run_cli([*FP64, f"out_dir={out}", "run_name=ref"], nproc=2))
    return out / "ref"


@pytest.mark.parametrize("fixture, cfg", [("ref", CFG), ("ref64", FP64)], ids=["fp32", "fp64"])
def test_resident_resume_mid_epoch_is_exact(fixture, cfg, request, tmp_path):
    ref = request.getfixturevalue(fixture)
    res = run_cli([*cfg, f"out_dir={tmp_path}", "run_name=r", f"resume={ref / 'checkpoints' / 'step-00000006.pt'}"],
                  nproc=2)
    assert_ok(res)
    assert "device-resident data" in res.stdout
    a, b = _weights(tmp_path / "r"), _weights(ref)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    hist = [json.loads((run / "metrics.json").read_text())["history"] for run in (tmp_path / "r", ref)]
    assert [h["valid_loss"] for h in hist[0]] == [h["valid_loss"] for h in hist[1]]


def test_resident_one_process_follows_two_ranks(ref64, tmp_path):
    """World-size invariant augmentation: 1 process (contiguous) reproduces the 2-rank run (SyncBN,
    channels_last) in fp64. Measured: 8e-14 relative (the largest over the weights and BN statistics)."""
    res = run_cli([*FP64, "model.channels_last=false", f"out_dir={tmp_path}", "run_name=one"])
    assert_ok(res)
    assert "device-resident data" in res.stdout and "| fp64 |" in res.stdout
    a, b = last_weights(tmp_path / "one"), last_weights(ref64)
    assert b["fc.weight"].dtype == torch.float64
    assert rel_diff(a, b) < 1e-9, rel_diff(a, b)


def test_resident_and_dataloader_train_the_same_model(tmp_path):
    """Augmentation off, one process, fp64: the two input paths train the same model (measured: bit for bit)."""
    base = [*TINY, "train.epochs=1", "train.precision=fp64", "train.lr=0.05", "model.name=resnet10", "model.width=16",
            "model.channels_last=true", f"out_dir={tmp_path}"]
    assert_ok(run_cli([*base, "data.device_resident=true", "run_name=res"]))
    assert_ok(run_cli([*base, "data.device_resident=false", "run_name=dl"]))
    a, b = last_weights(tmp_path / "res"), last_weights(tmp_path / "dl")
    assert b["fc.weight"].dtype == torch.float64
    assert rel_diff(a, b) < 1e-9, rel_diff(a, b)


@pytest.mark.parametrize("resident", ["true", "false"])
def test_fewer_samples_than_one_global_batch_is_refused_on_both_paths(resident):
    # subset 40 -> 32 training samples: exactly one batch of 32; subset 30 -> 24: none.
    assert len(_bundle([f"data.device_resident={resident}", "data.subset=40"]).train) == 1
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        _bundle([f"data.device_resident={resident}", "data.subset=30"])
