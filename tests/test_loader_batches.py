"""The DataLoader path normalises whole batches in the rank (issue: per-sample float work in the workers
cost more CPU than a plain script). The split must not change a value: each batch equals the seed
recipe's per-sample transform (crop, flip, to float, normalise, cutout) under the same per-sample seeds,
bit for bit, and a batch mixing 8-bit and deeper images is scaled the same way."""

from __future__ import annotations

import torch

from ddp_train.config import load_config
from ddp_train.data import build_splits, load_dataset
from ddp_train.data.loaders import eval_loader, sample_seed, train_loader
from ddp_train.distributed.context import DistContext
from ddp_train.data.transforms import Sample, collate, eval_transform, normalise_batch, train_transform

CPU = torch.device("cpu")


def _splits(*overrides: str):
    cfg = load_config(None, ["data.synthetic_size=120", "data.augment=true", *overrides])
    dataset = load_dataset(cfg.data)
    return cfg, dataset, build_splits(dataset, cfg)


def _reference(split, keys, transform) -> torch.Tensor:
    """The per-sample transform of the old path, sample by sample under the same seeds."""
    out = []
    for epoch, pos in keys:
        index = int(split.indices[pos])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(split.seed, epoch, index))
            out.append(transform(split.source.load(index)))
    return torch.stack(out)


def _check_training_batches(crop: str, cutout: str, workers: int) -> None:
    cfg, d, (train, _, _) = _splits(f"data.crop={crop}", f"data.cutout={cutout}")
    rank_1_of_2 = DistContext("torchrun", 1, 1, 2, CPU)  # only its rank and world size are read
    loader = train_loader(train, 8, rank_1_of_2, cfg.train.seed, workers, False, (d.mean, d.std, CPU))
    loader.sampler.set_epoch(3)
    keys = list(loader.sampler)
    per_sample = train_transform(d.image_size, d.mean, d.std, True, crop, cfg.data.crop_padding,
                                 None if cutout == "null" else int(cutout))
    for k, (images, _) in enumerate(loader):
        assert images.dtype == torch.float32
        assert torch.equal(images, _reference(train, keys[8 * k:8 * (k + 1)], per_sample)), (crop, cutout, k)
        if k == 2:
            break


def test_training_batches_equal_the_per_sample_transform():
    _check_training_batches("resized", "null", workers=0)  # resize-crop, flip, cutout of half the side
    _check_training_batches("pad", "5", workers=2)  # pad-crop, an odd cutout, in worker processes
    _check_training_batches("pad", "0", workers=0)  # no cutout


def test_evaluation_batches_equal_the_per_sample_transform():
    _, d, (_, valid, _) = _splits()
    loader = eval_loader(valid, 7, 0, 1, 0, False, (d.mean, d.std, CPU))
    images, _ = next(iter(loader))
    ref = torch.stack([eval_transform(d.mean, d.std)(valid.source.load(int(valid.indices[i]))) for i in range(7)])
    assert torch.equal(images, ref)


def test_a_batch_mixing_8_bit_and_deeper_images():
    mean, std = torch.tensor([0.5]).view(1, -1, 1, 1), torch.tensor([0.25]).view(1, -1, 1, 1)
    eight = torch.arange(16, dtype=torch.uint8).view(1, 4, 4) * 16
    deep = torch.linspace(0, 1, 16).view(1, 4, 4)  # a 16-bit file as the reader gives it
    holes = torch.tensor([[1, 3, 0, 2]])
    batch = collate([(Sample(eight, holes), 0), (Sample(deep, holes), 1)])
    x = normalise_batch(batch[0], mean, std)
    assert torch.equal(x[0], eval_transform([0.5], [0.25])(eight).masked_fill(_mask(holes), 0))
    assert torch.equal(x[1], ((deep - 0.5) / 0.25).masked_fill(_mask(holes), 0))


def _mask(holes: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    for y0, y1, x0, x1 in holes.tolist():
        m[:, y0:y1, x0:x1] = True
    return m
