"""The train augmentation, batched on the device: crop, flip, normalise, cutout for a whole batch at once.

Same meaning as the per-sample transforms in :mod:`.transforms`:

- ``resized``: the seed recipe's Resize(1.25x) -> RandomResizedCrop(area 64-100%, square) is a
  square window of 0.8-1.0 x the image side at a uniformly random place, resampled to the image
  size. Here it is one bilinear ``grid_sample`` per batch, the flip folded into the same affine map.
- ``pad``: pad ``padding`` black pixels, take a random window of the image size (a gather).
- ``none``: no crop (data.augment off, random erasing or mixup on).
- cutout: a square of side ``cutout`` zeroed on the normalised image, centre uniform over the
  image, clipped at the borders (the seed recipe's Cutout).
- random erasing (:class:`~.transforms.Erasing`): torchvision's rectangle, its 10 tries drawn for every
  sample at once and the first that fits taken, zeroed on the normalised image.

The random parameters of an epoch are drawn for every sample of the split at once, from a
generator seeded by (seed, epoch) alone, and looked up by sample: a sample gets the same
augmentation whichever rank draws it, so results do not depend on the world size, and a resumed
epoch replays it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import Erasing

Params = dict[str, torch.Tensor]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's augmentation parameters (CPU; the same on every rank)."""
    state = np.random.SeedSequence([seed, epoch, 0xA06]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


@dataclass(frozen=True)
class BatchAugment:
    """Batched train augmentation for images of ``size`` x ``size``."""

    size: int
    crop: str = "resized"  # "resized", "pad" or "none"
    padding: int = 4
    cutout: int = 0  # side of the zeroed square; 0: none
    flip: bool = True
    erasing: Erasing | None = None  # random erasing (None: off)

    def draw(self, n: int, seed: int, epoch: int, device: torch.device) -> Params:
        """Random parameters for samples ``0..n-1`` of one epoch."""
        g = epoch_generator(seed, epoch)
        p: Params = {"flip": torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)}
        if self.crop == "resized":
            # Area fraction uniform in [0.64, 1] as in RandomResizedCrop(scale=(0.64, 1), ratio=1).
            p["side"] = torch.sqrt(torch.empty(n).uniform_(0.64, 1.0, generator=g))
            p["place"] = torch.rand(n, 2, generator=g)  # where the window sits in its free range (y, x)
        elif self.crop == "pad":
            p["offset"] = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)
        if self.cutout:
            p["centre"] = torch.randint(0, self.size, (n, 2), generator=g)
        if self.erasing is not None:  # drawn last: the parameters above stay those of a run without it
            p["erase"] = self._erase_boxes(n, g)
        return {k: v.to(device) for k, v in p.items()}

    def _erase_boxes(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(y0, y1, x0, x1) of each sample's erased rectangle (all zeros: none), as torchvision's get_params."""
        e, size = self.erasing, self.size
        assert e is not None
        erased = torch.rand(n, generator=g) < e.p
        area = size * size * torch.empty(n, 10).uniform_(e.min_area, e.max_area, generator=g)
        log_ratio = math.log(e.max_aspect)
        aspect = torch.exp(torch.empty(n, 10).uniform_(-log_ratio, log_ratio, generator=g))
        h, w = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < size) & (w < size)
        first = fits.int().argmax(1, keepdim=True)  # the first of the 10 tries that fits
        h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
        place = torch.rand(n, 2, generator=g)
        y = (place[:, 0] * (size - h + 1)).long().clamp(max=size - h)
        x = (place[:, 1] * (size - w + 1)).long().clamp(max=size - w)
        keep = (erased & fits.any(1)).long()[:, None]
        return torch.stack([y, y + h, x, x + w], 1) * keep

    def __call__(self, images: torch.Tensor, p: Params, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Augmented, normalised float32 batch from uint8 ``images`` (B, C, H, W) and their parameters."""
        if self.crop == "resized":
            x = self._resized_crop(images.float().mul_(1 / 255), p["side"], p["place"], p["flip"])
        elif self.crop == "pad":
            x = self._pad_crop(images, p["offset"], p["flip"]).float().mul_(1 / 255)
        else:
            x = images.float().mul_(1 / 255)
        x = (x - mean) / std
        if self.cutout:
            x = x * ~self._cutout_mask(p["centre"], x.shape[-2], x.shape[-1])
        if self.erasing is not None:
            x = x * ~box_mask(p["erase"], x.shape[-2], x.shape[-1])
        return x

    @staticmethod
    def _resized_crop(x: torch.Tensor, side: torch.Tensor, place: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # affine_grid maps output coordinates in [-1, 1] to input ones: scale by the window side,
        # shift its centre within [-(1 - side), 1 - side], mirror x for a flip.
        centre = (2 * place - 1) * (1 - side)[:, None]
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = side * torch.where(flip, -1.0, 1.0)
        theta[:, 1, 1] = side
        theta[:, 0, 2] = centre[:, 1]
        theta[:, 1, 2] = centre[:, 0]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _pad_crop(self, images: torch.Tensor, offset: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        padded = F.pad(images, (self.padding,) * 4)
        ar_h = torch.arange(h, device=images.device)
        ar_w = torch.arange(w, device=images.device)
        rows = offset[:, 0:1] + ar_h  # (B, H)
        cols = offset[:, 1:2] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
        batch = torch.arange(b, device=images.device)[:, None, None]
        # Advanced indexing around the channel slice gives (B, H, W, C): a channels_last NCHW view.
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def _cutout_mask(self, centre: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """True inside each sample's square [c - side//2, c + side//2), as Cutout clips it."""
        half = self.cutout // 2
        ys = torch.arange(h, device=centre.device)
        xs = torch.arange(w, device=centre.device)
        in_y = (ys >= centre[:, 0:1] - half) & (ys < centre[:, 0:1] + half)  # (B, H)
        in_x = (xs >= centre[:, 1:2] - half) & (xs < centre[:, 1:2] + half)  # (B, W)
        return (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)


def box_mask(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """True inside each sample's rectangle [y0, y1) x [x0, x1) (rows of ``boxes``), shape (B, 1, H, W)."""
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    in_y = (ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2])
    in_x = (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]
