"""Splits, samplers and DataLoaders: what each rank reads, in which order, with which randomness.

- The train/valid split is a permutation drawn from ``train.seed`` alone: identical on every
  rank, disjoint, independent of the world size.
- Training: ``DistributedSampler`` (same permutation on every rank, seeded by seed + epoch,
  strided across ranks) with ``drop_last`` on the sampler and the loader, so global batch k
  holds the same samples at any world size.
- Evaluation: a strided shard with no padding, so every sample is counted exactly once.
- Augmentation randomness is a function of (seed, epoch, sample): never repeated across ranks,
  workers or epochs, and unchanged by the world size or the number of loader workers.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util
import random
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .datasets import Source
from .mixing import Mixing, partner_positions
from .transforms import Image, MixPair, Transform, collate, normalise_batch

if TYPE_CHECKING:
    from ..distributed.context import DistContext


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) index arrays over ``range(n)``, drawn with a generator seeded by ``seed`` only."""
    n_valid = min(max(1, round(n * valid_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class SplitDataset(torch.utils.data.Dataset):
    """A transformed view of ``source`` restricted to ``indices`` (integer images: see :class:`Normalised`).

    Keys are plain positions (evaluation) or ``(epoch, position)`` pairs from
    :class:`EpochDistributedSampler`, in which case the transform runs under a torch RNG seeded
    for that sample and epoch, leaving the process's own RNG untouched.
    """

    def __init__(self, source: Source, indices: np.ndarray, transform: Transform | None, seed: int = 0) -> None:
        self.source, self.indices, self.transform, self.seed = source, indices, transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[Image, int | torch.Tensor]:
        if isinstance(key, tuple) and len(key) == 3:  # (epoch, position, partner's position): mixup/cutmix
            epoch, pos, partner = key
            (image, label), (other, other_label) = self[epoch, pos], self[epoch, partner]
            return MixPair(image, other), torch.tensor([label, other_label])
        if isinstance(key, tuple):
            epoch, pos = key
            index = int(self.indices[pos])
            image = self.source.load(index)
            if self.transform is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, index))
                    image = self.transform(image)
        else:
            index = int(self.indices[key])
            image = self.source.load(index)
            if self.transform is not None:
                image = self.transform(image)
        return image, int(self.source.labels[index])

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]


class EpochDistributedSampler(DistributedSampler):
    """DistributedSampler whose items carry the epoch, for per-sample augmentation seeds.

    The epoch's global order (:meth:`epoch_order`) is DistributedSampler's: a permutation seeded by
    seed + epoch, cut to a multiple of the world size; rank r reads its positions r, r + W, r + 2W, ...
    Global batch k of B samples is therefore positions ``k*B .. (k+1)*B - 1`` of that order at any
    world size, and every rank can name it (:meth:`global_batch`) without asking the others.

    ``skip`` drops the first items of the epoch's order: resuming after k global batches sets
    it to k x the per-rank batch, and the rest of the epoch is the same samples as uninterrupted.
    """

    skip: int = 0
    _order: tuple[int, np.ndarray] | None = None  # (epoch, its order): drawn once per epoch
    # Mixup/cutmix: items then carry their partner's position too, (epoch, position, partner).
    mixing: Mixing | None = None

    def epoch_order(self) -> np.ndarray:
        """Dataset positions of the current epoch, every rank's, in global order (training is drop_last)."""
        if not self.drop_last:  # padding would repeat samples; the training loaders never ask for it
            raise ValueError("EpochDistributedSampler needs drop_last=True")
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.dataset)  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).numpy() if self.shuffle else np.arange(n)
            self._order = (self.epoch, order[:self.total_size])
        return self._order[1]

    def global_batch(self, step: int, batch_size: int) -> np.ndarray:
        """Dataset positions of the epoch's global batch ``step`` (0-based) of ``batch_size`` (the global batch)."""
        return self.epoch_order()[step * batch_size:(step + 1) * batch_size]

    def __iter__(self) -> Iterator[tuple[int, ...]]:  # type: ignore[override]
        # This rank's share of the one global order the digest (global_batch) also reads.
        order = self.epoch_order()
        share = order[self.rank::self.num_replicas].tolist()
        if self.mixing is None:
            for n in range(self.skip, len(share)):
                yield (self.epoch, share[n])
            return
        items = range(self.skip, len(share))
        partners = partner_positions(self.mixing, order, self.epoch, self.rank, self.num_replicas, items).tolist()
        for n, partner in zip(items, partners):
            yield (self.epoch, share[n], partner)

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


class ShardSampler(Sampler[int]):
    """Positions ``rank, rank + world, ...``: every sample on exactly one rank, no padding."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """numpy and random in each loader worker, distinct per (seed, rank, worker); stop signals ignored.

    torchrun and SLURM signal whole process groups: a loader worker that died of the SIGTERM meant
    for its rank would crash the rank before it could write its stop checkpoint. Workers end with
    their rank instead.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    state = np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0]
    np.random.seed(state)
    random.seed(int(state))


def _kill_workers_at_exit() -> None:
    """SIGKILL this process's daemonic children (its loader workers) as it exits.

    Python's multiprocessing ends daemonic children at exit with SIGTERM and then joins them;
    our workers ignore SIGTERM (above), and when an exception left their DataLoader alive (a
    crash, a worker's error) that join waited forever, and the rank never exited. They are
    killed instead: at exit there is nothing left for them to do.
    """
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        # DataLoader's SIGCHLD handler reports a worker killed by a signal as an error: not these.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in workers:
            child.kill()


# multiprocessing.util registers its exit handler when first imported (above); atexit runs
# handlers last-in first-out, so this one runs before that join.
atexit.register(_kill_workers_at_exit)


class Normalised:
    """A DataLoader of integer images whose batches the rank turns to normalised float32 on ``device``.

    Per sample, the workers only decode and augment; the float conversion and normalisation run once
    per batch here (:func:`~.transforms.normalise_batch`), after a copy of the uint8 batch, a quarter
    of the float one's bytes. ``sampler``, ``dataset`` and ``len`` are the DataLoader's.
    """

    def __init__(self, loader: DataLoader, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> None:
        self.loader = loader
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler

    @property
    def dataset(self) -> SplitDataset:
        return self.loader.dataset  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.loader.sampler
        mixing = sampler.mixing if isinstance(sampler, EpochDistributedSampler) else None  # set by the builder
        if mixing is None:
            for images, labels in self.loader:
                yield normalise_batch(images, self.mean, self.std), labels
            return
        assert isinstance(sampler, EpochDistributedSampler) and self.loader.batch_size
        epoch, step = sampler.epoch, sampler.skip // self.loader.batch_size  # resumed: skip is whole batches
        for images, labels in self.loader:
            x, partner = (normalise_batch(part, self.mean, self.std) for part in images)
            labels = labels.to(self.mean.device)
            yield mixing.mix(x, partner, labels[:, 0], labels[:, 1], epoch, step)
            step += 1


Stats = tuple[tuple[float, ...], tuple[float, ...], torch.device]  # mean, std and the device batches go to


def train_loader(ds: SplitDataset, per_rank_batch: int, ctx: DistContext, seed: int,
                 num_workers: int, pin_memory: bool, stats: Stats) -> Normalised:
    """Shuffled, sharded (``ctx.rank``'s shard of ``ctx.world_size``), full batches only; call
    ``loader.sampler.set_epoch(e)`` every epoch (and set ``loader.sampler.mixing`` for mixup/cutmix)."""
    rank, world_size = ctx.rank, ctx.world_size
    sampler = EpochDistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return Normalised(DataLoader(
        ds, batch_size=per_rank_batch, sampler=sampler, drop_last=True, num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(_seed_worker, seed, rank),
        generator=torch.Generator().manual_seed((seed * 1000 + rank) % 2**64),  # any train.seed up to 2**63-1
    ), *stats)


def eval_loader(ds: SplitDataset, per_rank_batch: int, rank: int, world_size: int, num_workers: int,
                pin_memory: bool, stats: Stats) -> Normalised:
    """This rank's exact shard of an evaluation split, in order."""
    return Normalised(DataLoader(
        ds, batch_size=per_rank_batch, sampler=ShardSampler(len(ds), rank, world_size), num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory, worker_init_fn=functools.partial(_seed_worker, 0, rank),
    ), *stats)
