"""Data: sources, splits, samplers, augmentation seeding, and loading errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from ddp_train.config import load_config
from ddp_train.data import DataError, build_data, load_dataset
from ddp_train.data import synthetic
from ddp_train.data.datasets import read_idx
from ddp_train.data.loaders import split_indices
from ddp_train.distributed.context import DistContext

from .helpers import run_cli, spawn


def _ctx(rank: int = 0, world: int = 1) -> DistContext:
    return DistContext("torchrun" if world > 1 else "single", rank, rank, world, torch.device("cpu"),
                       "gloo" if world > 1 else None)


def test_synthetic_is_deterministic_and_prefix_stable():
    x1, y1 = synthetic.generate("train", 1500)
    x2, y2 = synthetic.generate("train", 1000)
    assert x1.shape == (1500, 32, 32, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1[:1000], x2) and np.array_equal(y1[:1000], y2)
    counts = np.bincount(y1, minlength=10)
    assert counts.min() > 100  # every class present, roughly balanced
    xt, _ = synthetic.generate("test", 100)
    assert not np.array_equal(xt, x1[:100])  # test images are not training images
    # Real images, not a constant fill (learnability itself is shown by the default run's accuracy).
    flat = x1.reshape(len(x1), -1).astype(np.float32)
    assert flat.std() > 30


def test_split_is_seeded_disjoint_and_complete():
    tr, va = split_indices(101, 0.2, seed=7)
    assert len(va) == 20 and len(tr) == 81
    assert not set(tr) & set(va) and sorted(set(tr) | set(va)) == list(range(101))
    tr2, va2 = split_indices(101, 0.2, seed=7)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(split_indices(101, 0.2, seed=8)[1], va)


def _rank_view(rank, world, cfg_overrides):
    """Run on a real gloo rank: seed the global RNGs differently per rank, then build the data."""
    torch.manual_seed(1000 + rank)
    np.random.seed(1000 + rank)
    cfg = load_config(None, cfg_overrides)
    ctx = _ctx(rank, world)
    bundle = build_data(load_dataset(cfg.data), cfg, ctx)
    epochs = {}
    for epoch in (0, 1):
        bundle.train.sampler.set_epoch(epoch)
        epochs[epoch] = [pos for _, pos in bundle.train.sampler]
    return {
        "train_idx": bundle.train.dataset.indices.tolist(),
        "valid_idx": bundle.valid.dataset.indices.tolist(),
        "epochs": epochs,
        "valid_shard": list(bundle.valid.sampler),
        "batches": len(bundle.train),
    }


def test_split_identical_across_ranks_and_samplers_disjoint():
    # The DataLoader path (the default on CPU is the device-resident one, whose tests are test_resident.py).
    overrides = ["data.synthetic_size=101", "train.batch_size=10", "data.num_workers=0", "data.device_resident=false"]
    views = spawn(_rank_view, 2, overrides)
    a, b = views
    assert a["train_idx"] == b["train_idx"] and a["valid_idx"] == b["valid_idx"]
    assert not set(a["train_idx"]) & set(a["valid_idx"])
    for epoch in (0, 1):
        assert not set(a["epochs"][epoch]) & set(b["epochs"][epoch])  # no sample on both ranks
    assert a["epochs"][0] != a["epochs"][1]  # reshuffled every epoch (set_epoch)
    # Validation shards partition the split exactly: no padding, nothing dropped.
    shards = a["valid_shard"] + b["valid_shard"]
    assert sorted(shards) == list(range(len(a["valid_idx"])))
    # Global batch k is the same samples at any world size.
    single = _rank_view(0, 1, overrides)
    assert single["batches"] == a["batches"] == 81 // 10
    for epoch in (0, 1):
        for k in range(single["batches"]):
            one = set(single["epochs"][epoch][k * 10 : (k + 1) * 10])
            two = set(a["epochs"][epoch][k * 5 : (k + 1) * 5]) | set(b["epochs"][epoch][k * 5 : (k + 1) * 5])
            assert one == two


def test_augmentation_seeded_per_sample_not_per_worker():
    cfg = load_config(None, ["data.synthetic_size=64", "train.batch_size=8", "data.augment=true",
                             "data.device_resident=false"])
    ds = load_dataset(cfg.data)
    batches = {}
    for workers in (0, 2):
        cfg.data.num_workers = workers
        loader = build_data(ds, cfg, _ctx()).train
        loader.sampler.set_epoch(3)
        batches[workers] = [x for x, _ in loader]
    assert all(torch.equal(p, q) for p, q in zip(batches[0], batches[2]))
    train = build_data(ds, cfg, _ctx()).train.dataset
    a, b = train[(0, 5)][0], train[(1, 5)][0]  # Samples: the augmented pixels and the cutout square
    assert not _same(a, b)  # another epoch, another augmentation
    assert _same(train[(0, 5)][0], a)  # same (epoch, sample): same augmentation
    assert not _same(train[(0, 5)][0], train[(0, 6)][0])
    state = torch.get_rng_state()
    train[(0, 7)]
    assert torch.equal(state, torch.get_rng_state())  # the process RNG is untouched


def _same(a, b) -> bool:
    return torch.equal(a.pixels, b.pixels) and torch.equal(a.holes, b.holes)


def test_validation_uses_the_evaluation_transform():
    cfg = load_config(None, ["data.synthetic_size=50", "train.batch_size=8", "data.augment=true",
                             "data.device_resident=false"])
    ds = load_dataset(cfg.data)
    bundle = build_data(ds, cfg, _ctx())
    valid = bundle.valid.dataset
    raw = torch.from_numpy(ds.train.images[valid.indices[0]]).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(ds.mean).view(3, 1, 1)) / torch.tensor(ds.std).view(3, 1, 1)
    first, _ = next(iter(bundle.valid))  # no augmentation: the image as it is, normalised
    assert torch.allclose(first[0], expected, atol=1e-6)


def test_fashion_mnist_from_idx_files(fashion_root):
    full = load_dataset(load_config(None, ["data.name=fashion_mnist"]).data)
    assert (len(full.train), len(full.test)) == (60000, 10000)
    assert full.train.images.shape == (60000, 28, 28, 1) and full.channels == 1 and full.image_size == 28
    assert full.classes[0] == "T-shirt/top" and full.classes[9] == "Ankle boot"
    assert sorted(np.unique(full.train.labels)) == list(range(10))
    small = load_dataset(load_config(None, ["data.name=fashion_mnist", "data.subset=500",
                                            f"data.root={fashion_root}"]).data)
    assert (len(small.train), len(small.test)) == (500, 500)
    assert np.array_equal(small.train.images, full.train.images[:500])
    assert abs(full.train.images[:5000].mean() / 255 - full.mean[0]) < 0.01


def test_idx_damaged_files(tmp_path):
    good = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in good.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + good.tobytes()))
    assert np.array_equal(read_idx(path), good)
    path.write_bytes(gzip.compress(header + good.tobytes()[:-5]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + good.tobytes()))
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_fashion_mnist_missing_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(load_config(None, ["data.name=fashion_mnist", f"data.root={tmp_path}"]).data)


def _write_images(folder, classes, n, mode="RGB", size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / c / f"{i}.png")


def test_image_folder(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog", "frog"], 4)
    _write_images(tmp_path / "test", ["cat", "dog", "frog"], 2)
    ds = load_dataset(load_config(None, ["data.name=image_folder", f"data.root={tmp_path}", "data.image_size=16"]).data)
    assert ds.classes == ["cat", "dog", "frog"] and ds.channels == 3 and ds.valid is None
    assert (len(ds.train), len(ds.test)) == (12, 6)
    assert ds.train.load(0).shape == (3, 16, 16) and ds.train.load(0).dtype == torch.uint8
    assert list(ds.train.labels) == [0] * 4 + [1] * 4 + [2] * 4
    cfg = load_config(None, ["data.name=image_folder", f"data.root={tmp_path}", "data.image_size=16",
                             "train.batch_size=4", "data.num_workers=0"])
    x, y = next(iter(build_data(ds, cfg, _ctx()).train))
    assert x.shape == (4, 3, 16, 16)


def test_image_folder_grayscale_val_and_errors(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], 3, mode="L")
    _write_images(tmp_path / "val", ["a", "b"], 1, mode="L")
    ds = load_dataset(load_config(None, ["data.name=image_folder", f"data.root={tmp_path}"]).data)
    assert ds.channels == 1 and len(ds.valid) == 2 and ds.test is None
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    # Found while measuring the statistics, before any training.
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_dataset(load_config(None, ["data.name=image_folder", f"data.root={tmp_path}"]).data)
    with pytest.raises(DataError, match="train/<class>/<images>"):
        load_dataset(load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'nowhere'}"]).data)


def test_cifar10_offline_messages(tmp_path):
    with pytest.raises(DataError, match="set data.download=true"):
        load_dataset(load_config(None, ["data.name=cifar10", f"data.root={tmp_path}"]).data)
    with pytest.raises(DataError, match="could not download CIFAR-10"):
        load_dataset(load_config(None, ["data.name=cifar10", f"data.root={tmp_path}", "data.download=true"]).data)


@pytest.mark.slow
def test_torchrun_data_error_stops_both_ranks_with_one_line(tmp_path):
    res = run_cli(["data.name=fashion_mnist", f"data.root={tmp_path}", f"out_dir={tmp_path}"], nproc=2, timeout=120)
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("ddp_train: error:")]
    assert len(ours) == 1 and "Fashion-MNIST file" in ours[0], res.stderr[-3000:]
