"""Mixup and CutMix (torchvision's v2.MixUp/CutMix, timm's Mixup), independent of the world size.

Everything random about a step's mixing comes from one generator seeded by (seed, epoch, global
step): the pairing, a permutation of the step's global batch (global position p is mixed with
position ``perm[p]``), whether the step mixes at all (``prob``), mixup or cutmix (``switch_prob``),
lambda ~ Beta(alpha, alpha) and cutmix's box. One lambda and one box per global batch, as the anchors
draw one per batch.

A rank holds only its slice of the global batch (positions r, r + W, ...), and a partner may sit on
another rank. Rather than gather images across ranks (a collective per step, the size of the
batch), each rank builds its samples' partners itself: a partner's augmentation is a function of
(seed, epoch, sample) alone (:mod:`.loaders`, :mod:`.batch_augment`), so the rank that loads it as a
partner gets the same pixels, bit for bit, as the rank that trains on it. The cost is a second
load and augmentation of each sample; nothing crosses ranks, and the mixed batch is the same at
any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..config import DataConfig


class Draw(NamedTuple):
    """One step's mixing: ``lam`` of the sample's own image (1.0: not mixed), and cutmix's box (y0, y1, x0, x1)."""

    lam: float
    box: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Mixing:
    """Mixup/CutMix of a run (``global_batch`` samples a step, ``num_classes`` targets)."""

    mixup_alpha: float
    cutmix_alpha: float
    prob: float
    switch_prob: float
    num_classes: int
    global_batch: int
    seed: int

    @classmethod
    def from_config(cls, d: DataConfig, num_classes: int, global_batch: int, seed: int) -> Mixing | None:
        """The run's mixing, or None when data.mixup_alpha and data.cutmix_alpha are both 0."""
        if d.mixup_alpha == 0 and d.cutmix_alpha == 0:
            return None
        return cls(d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.mix_switch_prob, num_classes, global_batch, seed)

    def _rng(self, epoch: int, step: int) -> np.random.Generator:
        # numpy's Generator: Beta draws that are the same on every platform and rank.
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, step, 0x313C])))

    def pairing(self, epoch: int, step: int) -> np.ndarray:
        """The partner of each position of global batch ``step`` (a permutation of 0..global_batch-1)."""
        return self._rng(epoch, step).permutation(self.global_batch)

    def draw(self, epoch: int, step: int, h: int, w: int) -> Draw:
        """Lambda and box of global batch ``step`` for images of ``h`` x ``w``."""
        rng = self._rng(epoch, step)
        rng.permutation(self.global_batch)  # the pairing: drawn first, so that both draws share one stream
        if rng.random() >= self.prob:
            return Draw(1.0, None)
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not cutmix:
            return Draw(lam, None)
        # timm's rand_bbox: a box of sqrt(1 - lam) of each side around a uniform centre, clipped at the
        # borders; lambda then becomes the kept area exactly (timm's and torchvision's correction).
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
        x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
        return Draw(1.0 - (y1 - y0) * (x1 - x0) / (h * w), (y0, y1, x0, x1))

    def mix(self, x: torch.Tensor, partner: torch.Tensor, y: torch.Tensor, partner_y: torch.Tensor,
            epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of global batch ``step`` mixed with its partners: (images, soft targets (B, K)).

        Elementwise products and sums only (no fused multiply-add), so each sample's values do not
        depend on the batch it is computed in. Label smoothing is the loss's (on these targets)."""
        lam, box = self.draw(epoch, step, x.shape[-2], x.shape[-1])
        if box is None:
            x = x * lam + partner * (1.0 - lam)
        else:
            y0, y1, x0, x1 = box
            x = x.clone()
            x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        hot = torch.nn.functional.one_hot(y, self.num_classes).to(torch.float32)
        partner_hot = torch.nn.functional.one_hot(partner_y, self.num_classes).to(torch.float32)
        return x, hot * lam + partner_hot * (1.0 - lam)


def partner_positions(mixing: Mixing, order: np.ndarray, epoch: int, rank: int, world_size: int,
                      items: range) -> np.ndarray:
    """Dataset positions of the partners of this rank's items ``items`` in epoch ``epoch``.

    ``order`` is the epoch's global order of dataset positions (``EpochDistributedSampler.epoch_order``);
    item n of rank r (n counts this rank's share ``order[r::W]`` from the start of the epoch) is global
    position ``g = n * W + r``, in global batch ``s = g // B`` at offset ``g - s * B``; its partner is
    ``order[s * B + perm_s[g - s * B]]``. Items of an incomplete last batch, which no loader reads, are
    their own partners.
    """
    b = mixing.global_batch
    out = np.empty(len(items), dtype=np.int64)
    perms: dict[int, np.ndarray] = {}
    for k, n in enumerate(items):
        g = n * world_size + rank
        s = g // b
        if (s + 1) * b > len(order):
            out[k] = order[g]
            continue
        if s not in perms:
            perms[s] = mixing.pairing(epoch, s)
        out[k] = order[s * b + perms[s][g - s * b]]
    return out
