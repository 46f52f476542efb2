"""Data: sources, transforms, splits and per-rank loaders."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..config import Config, ConfigError, DataConfig
from ..distributed.context import DistContext
from .batch_augment import BatchAugment
from .datasets import DataError, Dataset, load_dataset
from .loaders import EpochDistributedSampler, SplitDataset, eval_loader, split_indices, train_loader
from .resident import DeviceImages, ResidentEvalLoader, ResidentTrainLoader, nbytes
from .mixing import Mixing
from .transforms import cutout_side, erasing_of, sample_transform

__all__ = ["DataBundle", "DataError", "Dataset", "build_data", "load_dataset", "load_dataset_agreed"]


class Batches(Sized, Iterable, Protocol):
    """What the loop needs from a loader: (images, labels) batches, their count, and the split."""

    dataset: SplitDataset


@dataclass
class DataBundle:
    """What the training loop needs from the data."""

    dataset: Dataset
    train: Batches  # a (Normalised) DataLoader or a ResidentTrainLoader; both carry an EpochDistributedSampler
    valid: Batches
    test: Batches | None
    device_resident: bool = False
    input_path: str = ""  # why this input path, in words (data.device_resident's resolution)

    @property
    def sampler(self) -> EpochDistributedSampler:
        return self.train.sampler  # type: ignore[attr-defined]

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    def global_batch_ids(self, step: int, batch_size: int) -> np.ndarray:
        """Source dataset indices of the current epoch's global batch ``step`` (the sample digest's input):
        the same on every rank and at any world size, computed here without communication."""
        return self.train.dataset.indices[self.sampler.global_batch(step, batch_size)]


def load_dataset_agreed(cfg: DataConfig, ctx: DistContext) -> Dataset:
    """Every rank loads the data; a failure on any rank stops all of them with its message.

    With ``data.download`` the first rank of each node downloads while the others wait, so
    two processes never write the same files.
    """
    if not (cfg.download and ctx.distributed):
        return ctx.run_agreed(load_dataset, cfg)
    first = ctx.local_rank == 0
    downloaded = ctx.run_agreed(load_dataset, cfg, on_this_rank=first)
    from_disk = ctx.run_agreed(load_dataset, cfg, on_this_rank=not first)  # the node's copy, now complete
    return downloaded if first else from_disk


def build_splits(dataset: Dataset, cfg: Config) -> tuple[SplitDataset, SplitDataset, SplitDataset | None]:
    """Train / valid / test views with their per-sample transforms (training's augmentation; none for valid and
    test): their images stay integers, normalised per batch by the loaders."""
    d = dataset
    evaluation = None
    training = sample_transform(d.image_size, cfg.data)
    if d.valid is not None:
        train = SplitDataset(d.train, np.arange(len(d.train)), training, cfg.train.seed)
        valid = SplitDataset(d.valid, np.arange(len(d.valid)), evaluation)
    else:
        train_idx, valid_idx = split_indices(len(d.train), cfg.data.valid_fraction, cfg.train.seed)
        train = SplitDataset(d.train, train_idx, training, cfg.train.seed)
        valid = SplitDataset(d.train, valid_idx, evaluation)
    test = SplitDataset(d.test, np.arange(len(d.test)), evaluation) if d.test is not None and len(d.test) else None
    return train, valid, test


def use_device_resident(dataset: Dataset, cfg: DataConfig, device: torch.device) -> tuple[bool, str]:
    """data.device_resident resolved, and the reason in words (for the run's first line).

    auto: on whenever the dataset is in memory (synthetic, Fashion-MNIST, CIFAR-10) and fits: on CPU
    it always fits, since the images already are in this process's memory and the resident loader
    uses them without a copy; on CUDA when they take under a quarter of the free GPU memory. Off for
    image files (image_folder), which the DataLoader's workers decode.
    """
    sources = [s for s in (dataset.train, dataset.valid, dataset.test) if s is not None]
    in_memory = all(s.images is not None for s in sources)
    size = sum(nbytes(s.images) for s in sources if s.images is not None)
    setting = cfg.device_resident
    if setting is False:
        return False, "data.device_resident=false"
    if not in_memory:
        if setting is True:
            raise DataError(f"data.device_resident=true needs an in-memory dataset, and {dataset.name} reads "
                            f"image files; set data.device_resident=auto or false")
        return False, "auto: image files"
    if setting is True:  # config.validate refused data.auto_augment with it
        return True, "data.device_resident=true"
    if cfg.auto_augment != "none":  # per-sample PIL-style operations: the loader workers' (docs/recipes.md)
        return False, f"auto: data.auto_augment={cfg.auto_augment} runs in the DataLoader's workers"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size >= free // 4:
            return False, f"auto: {size / 2**20:.0f} MB of images, over a quarter of the free GPU memory"
    return True, f"auto: {size / 2**20:.0f} MB of images in memory"


def build_data(dataset: Dataset, cfg: Config, ctx: DistContext) -> DataBundle:
    """Per-rank loaders over ``dataset``; the per-rank batch is the global batch / world size."""
    train, valid, test = build_splits(dataset, cfg)
    per_rank = cfg.train.per_rank_batch(ctx.world_size)
    if len(train) // ctx.world_size < per_rank:  # both input paths drop the last partial batch
        raise ConfigError(f"train.batch_size: the training split has {len(train)} samples, fewer than one global "
                          f"batch; lower train.batch_size or raise data.subset")
    resident, why = use_device_resident(dataset, cfg.data, ctx.device)
    if resident:
        return _resident(dataset, cfg, ctx, (train, valid, test), per_rank, why)
    pin = ctx.device.type == "cuda"
    workers = cfg.data.num_workers
    # In-memory evaluation needs only a float conversion; worker processes would cost more than they save.
    eval_workers = workers if dataset.train.paths is not None else 0
    stats = (dataset.mean, dataset.std, ctx.device)
    loader = train_loader(train, per_rank, ctx, cfg.train.seed, workers, pin, stats)
    loader.sampler.mixing = Mixing.from_config(cfg.data, len(dataset.classes), cfg.train.batch_size,  # type: ignore
                                               cfg.train.seed)
    return DataBundle(
        dataset,
        loader,
        eval_loader(valid, per_rank, ctx.rank, ctx.world_size, eval_workers, pin, stats),
        eval_loader(test, per_rank, ctx.rank, ctx.world_size, eval_workers, pin, stats) if test is not None else None,
        input_path=why,
    )


def _resident(dataset: Dataset, cfg: Config, ctx: DistContext,
              splits: tuple[SplitDataset, SplitDataset, SplitDataset | None], per_rank: int, why: str) -> DataBundle:
    """The device-resident bundle over ``splits`` (train, valid, test) as :func:`build_splits` makes them."""
    train, valid, test = splits
    stores: dict[int, DeviceImages] = {}  # one device copy per source (train and valid share one)

    def store(split: SplitDataset) -> DeviceImages:
        key = id(split.source)
        if key not in stores:
            assert split.source.images is not None
            stores[key] = DeviceImages(split.source.images, split.source.labels, dataset.mean, dataset.std, ctx.device)
        return stores[key]

    d = cfg.data
    augment = None
    if d.augment or d.random_erase:
        augment = BatchAugment(dataset.image_size, d.crop if d.augment else "none", d.crop_padding,
                               cutout_side(dataset.image_size, d.cutout) if d.augment else 0, flip=d.augment,
                               erasing=erasing_of(d))
    loader = ResidentTrainLoader(train, store(train), per_rank, ctx.rank, ctx.world_size, cfg.train.seed, augment)
    loader.mixing = Mixing.from_config(d, len(dataset.classes), cfg.train.batch_size, cfg.train.seed)
    return DataBundle(
        dataset,
        loader,
        ResidentEvalLoader(valid, store(valid), per_rank, ctx.rank, ctx.world_size),
        ResidentEvalLoader(test, store(test), per_rank, ctx.rank, ctx.world_size) if test is not None else None,
        device_resident=True,
        input_path=why,
    )
