"""Device-resident data: uint8 images held on the training device, batched there without a DataLoader.

For in-memory datasets the seed recipe's DataLoader (a worker process per few hundred images per
second, a host-to-device copy per batch) starves a GPU. Here each split's images are copied to
the device once, and every batch is a gather, the batched augmentation of
:mod:`.batch_augment`, and a normalisation, all on the device.

The order is the DataLoader path's own: the training sampler *is* an
:class:`~.loaders.EpochDistributedSampler` (so ``set_epoch`` and ``skip`` work, and a rank reads
the same samples in the same order as through the DataLoader), evaluation reads the same strided
shard. Only the augmentation's random numbers differ from the per-sample path.

Batches are fp32 on both paths; under ``train.precision: fp64`` the engine's Batcher casts them,
so that without augmentation the two paths feed an fp64 model the same values bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .batch_augment import BatchAugment, Params
from .loaders import EpochDistributedSampler, SplitDataset
from .mixing import Mixing, partner_positions


class DeviceImages:
    """One source's images (uint8, N x C x H x W) and labels on ``device``, with its normalisation."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> None:
        # NHWC in memory, viewed as NCHW: a channels_last tensor, which the gathers below keep.
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().mul_(1 / 255) - self.mean) / self.std


def nbytes(images: np.ndarray | None) -> int:
    return 0 if images is None else int(images.nbytes)


class ResidentTrainLoader:
    """This rank's training batches for one epoch at a time (set the epoch on ``sampler`` first)."""

    def __init__(self, split: SplitDataset, store: DeviceImages, per_rank_batch: int, rank: int, world_size: int,
                 seed: int, augment: BatchAugment | None) -> None:
        self.dataset = split
        self.store, self.batch_size, self.seed, self.augment = store, per_rank_batch, seed, augment
        self.mixing: Mixing | None = None  # mixup/cutmix (set by the builder)
        self.sampler = EpochDistributedSampler(range(len(split)), num_replicas=world_size, rank=rank, shuffle=True,
                                               seed=seed, drop_last=True)
        self.source_index = torch.from_numpy(np.asarray(split.indices, dtype=np.int64)).to(store.images.device)
        self._params: tuple[int, Params] | None = None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _epoch_params(self, epoch: int) -> Params | None:
        if self.augment is None:
            return None
        if self._params is None or self._params[0] != epoch:
            self._params = (epoch, self.augment.draw(len(self.dataset), self.seed, epoch, self.store.images.device))
        return self._params[1]

    def _batch(self, pos: torch.Tensor, params: Params | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented, normalised images at dataset positions ``pos``, and their labels."""
        index = self.source_index[pos]
        images = self.store.images[index]
        if params is None:
            return self.store.normalise(images), self.store.labels[index]
        assert self.augment is not None
        x = self.augment(images, {name: v[pos] for name, v in params.items()}, self.store.mean, self.store.std)
        return x, self.store.labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, skip, device = self.sampler.epoch, self.sampler.skip, self.store.images.device
        positions = torch.tensor([item[1] for item in self.sampler], dtype=torch.int64)
        positions = positions.to(device, non_blocking=True)  # one copy per epoch
        partners = None
        if self.mixing is not None:  # each sample's partner, augmented here as its own rank does (mixing.py)
            items = range(skip, skip + len(positions))
            partners = torch.from_numpy(partner_positions(self.mixing, self.sampler.epoch_order(), epoch,
                                                          self.sampler.rank, self.sampler.num_replicas, items))
            partners = partners.to(device, non_blocking=True)
        params = self._epoch_params(epoch)
        b = self.batch_size
        for k in range(len(self)):
            x, y = self._batch(positions[k * b:(k + 1) * b], params)
            if self.mixing is None or partners is None:
                yield x, y
                continue
            other, other_y = self._batch(partners[k * b:(k + 1) * b], params)
            yield self.mixing.mix(x, other, y, other_y, epoch, skip // b + k)


class ResidentEvalLoader:
    """This rank's strided shard of an evaluation split (every sample on exactly one rank), in order."""

    def __init__(self, split: SplitDataset, store: DeviceImages, per_rank_batch: int, rank: int,
                 world_size: int) -> None:
        self.dataset, self.store, self.batch_size = split, store, per_rank_batch
        index = np.asarray(split.indices, dtype=np.int64)[rank::world_size]
        self.index = torch.from_numpy(index).to(store.images.device)

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.index), self.batch_size):
            index = self.index[start:start + self.batch_size]
            yield self.store.normalise(self.store.images[index]), self.store.labels[index]
