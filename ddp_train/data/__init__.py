"""Data: sources, transforms, splits and per-rank loaders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from torch.utils.data import DataLoader

from ..config import Config
from ..distributed import DistContext
from .datasets import DataError, Dataset, load_dataset
from .loaders import SplitDataset, eval_loader, split_indices, train_loader
from .transforms import eval_transform, train_transform

__all__ = ["DataBundle", "DataError", "Dataset", "build_data", "load_dataset"]


@dataclass
class DataBundle:
    """What the training loop needs from the data."""

    dataset: Dataset
    train: DataLoader
    valid: DataLoader
    test: DataLoader | None

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


def build_splits(dataset: Dataset, cfg: Config) -> tuple[SplitDataset, SplitDataset, SplitDataset | None]:
    """Train / valid / test views with their transforms (valid and test get the evaluation transform)."""
    d = dataset
    evaluation = eval_transform(d.mean, d.std)
    training = train_transform(d.image_size, d.mean, d.std, cfg.data.augment)
    if d.valid is not None:
        train = SplitDataset(d.train, np.arange(len(d.train)), training, cfg.train.seed)
        valid = SplitDataset(d.valid, np.arange(len(d.valid)), evaluation)
    else:
        train_idx, valid_idx = split_indices(len(d.train), cfg.data.valid_fraction, cfg.train.seed)
        train = SplitDataset(d.train, train_idx, training, cfg.train.seed)
        valid = SplitDataset(d.train, valid_idx, evaluation)
    test = SplitDataset(d.test, np.arange(len(d.test)), evaluation) if d.test is not None and len(d.test) else None
    return train, valid, test


def build_data(dataset: Dataset, cfg: Config, ctx: DistContext) -> DataBundle:
    """Per-rank loaders over ``dataset``; the per-rank batch is the global batch / world size."""
    train, valid, test = build_splits(dataset, cfg)
    per_rank = cfg.train.batch_size // ctx.world_size
    pin = ctx.device.type == "cuda"
    workers = cfg.data.num_workers
    # In-memory evaluation needs only a float conversion; worker processes would cost more than they save.
    eval_workers = workers if dataset.train.paths is not None else 0
    return DataBundle(
        dataset,
        train_loader(train, per_rank, ctx.rank, ctx.world_size, cfg.train.seed, workers, pin),
        eval_loader(valid, per_rank, ctx.rank, ctx.world_size, eval_workers, pin),
        eval_loader(test, per_rank, ctx.rank, ctx.world_size, eval_workers, pin) if test is not None else None,
    )
