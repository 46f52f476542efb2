"""The seed recipe's train and evaluation transforms, on uint8 CHW tensors.

Train: Resize(1.25 x size) -> RandomResizedCrop(size, scale 0.64-1, ratio 1) -> horizontal
flip -> to float -> Normalize(dataset statistics) -> Cutout(1 hole, half the side); the crop may
instead be pad-and-crop and the cutout another size (data.crop, data.cutout).
Evaluation (validation and test): to float -> Normalize. The statistics come from the
dataset, since the seed recipe's CIFAR-10 numbers are wrong for other data (grayscale above all).

The DataLoader path splits this in two (:func:`sample_transform`, :func:`normalise_batch`): the
loader workers do only what must be done per sample (the random crop and flip, and drawing the
cutout square), on uint8; the rank turns the whole batch to float, normalises it and zeroes the
squares, once per batch, on its device. Same random numbers, same values as the per-sample
:func:`train_transform`, bit for bit (tested); a quarter of the bytes between worker and rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..config import DataConfig

Transform = Callable[[torch.Tensor], torch.Tensor]


class Cutout:
    """Zero ``n_holes`` squares of side ``length`` at uniformly random centres, clipped at the borders.

    Applied to the normalised tensor, as in the seed recipe. Uses torch's RNG, which the
    dataset seeds per sample.
    """

    def __init__(self, n_holes: int, length: int) -> None:
        self.n_holes, self.length = n_holes, length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        img = img.clone()
        for _ in range(self.n_holes):
            cy = int(torch.randint(0, h, ()).item())
            cx = int(torch.randint(0, w, ()).item())
            y0, y1 = max(cy - self.length // 2, 0), min(cy + self.length // 2, h)
            x0, x1 = max(cx - self.length // 2, 0), min(cx + self.length // 2, w)
            img[..., y0:y1, x0:x1] = 0
        return img

    def __repr__(self) -> str:
        return f"Cutout(n_holes={self.n_holes}, length={self.length})"


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> Transform:
    """ToTensor + Normalize (images arrive already at the model's size)."""
    from torchvision.transforms import v2  # here, not at the top: torchvision costs 1.4 s at start-up

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], augment: bool,
                    crop: str = "resized", padding: int = 4, cutout: int | None = None) -> Transform:
    """The seed recipe's train transform at ``size`` (Resize 40 for 32x32); the evaluation one without ``augment``.

    ``crop="pad"`` replaces Resize + RandomResizedCrop by a random crop of the image padded with
    ``padding`` black pixels; ``cutout`` is the side of the zeroed square (None: half the side, 0: none).
    """
    if not augment:
        return eval_transform(mean, std)
    from torchvision.transforms import v2

    side = cutout_side(size, cutout)
    return v2.Compose([
        *_cropping(size, crop, padding),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        *([Cutout(1, side)] if side else []),
    ])


def cutout_side(size: int, cutout: int | None) -> int:
    """data.cutout resolved: None is half the image side (the seed recipe's 16 px at 32x32)."""
    return size // 2 if cutout is None else cutout


class Sample(NamedTuple):
    """A training image as the loader workers hand it over: its pixels (integer, unnormalised) and the
    cutout squares to zero once the rank has normalised it (rows of y0, y1, x0, x1). The DataLoader
    collates a batch of them into one ``Sample`` of stacked tensors."""

    pixels: torch.Tensor
    holes: torch.Tensor


class CutoutSquares:
    """Draws :class:`Cutout`'s squares (the same random numbers, in the same order) without applying them."""

    def __init__(self, n_holes: int, length: int) -> None:
        self.n_holes, self.length = n_holes, length

    def __call__(self, img: torch.Tensor) -> Sample:
        h, w = img.shape[-2:]
        holes = torch.zeros(self.n_holes, 4, dtype=torch.int64)
        for k in range(self.n_holes):
            cy = int(torch.randint(0, h, ()).item())
            cx = int(torch.randint(0, w, ()).item())
            holes[k] = torch.tensor([max(cy - self.length // 2, 0), min(cy + self.length // 2, h),
                                     max(cx - self.length // 2, 0), min(cx + self.length // 2, w)])
        return Sample(img, holes)


@dataclass(frozen=True)
class Erasing:
    """Random erasing (torchvision's RandomErasing, value 0 on the normalised image): with probability ``p``,
    a rectangle of ``min_area``-``max_area`` of the image with an aspect ratio (h/w) log-uniform in
    [1/``max_aspect``, ``max_aspect``]; 10 tries to fit one, else none (torchvision's ``get_params``)."""

    p: float
    min_area: float
    max_area: float
    max_aspect: float

    def box(self, h: int, w: int) -> torch.Tensor:
        """(y0, y1, x0, x1) to zero, with torch's RNG (seeded per sample); all zeros (empty) when not erased."""
        if torch.rand(1).item() >= self.p:
            return torch.zeros(4, dtype=torch.int64)
        log_ratio = (-math.log(self.max_aspect), math.log(self.max_aspect))
        for _ in range(10):
            area = h * w * torch.empty(1).uniform_(self.min_area, self.max_area).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                y = int(torch.randint(0, h - eh + 1, (1,)).item())
                x = int(torch.randint(0, w - ew + 1, (1,)).item())
                return torch.tensor([y, y + eh, x, x + ew])
        return torch.zeros(4, dtype=torch.int64)


class Holes:
    """Draws the rectangles the rank zeroes after normalising: :class:`CutoutSquares`' (its numbers, in its
    order), then random erasing's (an empty row when not erased, so that every sample has as many rows)."""

    def __init__(self, cutout: CutoutSquares | None, erasing: Erasing) -> None:
        self.cutout, self.erasing = cutout, erasing

    def __call__(self, img: torch.Tensor) -> Sample:
        holes = self.cutout(img).holes if self.cutout else torch.zeros(0, 4, dtype=torch.int64)
        return Sample(img, torch.cat([holes, self.erasing.box(*img.shape[-2:])[None]]))


def erasing_of(d: DataConfig) -> Erasing | None:
    """data.random_erase and its shape keys (None: off)."""
    return Erasing(d.random_erase, d.erase_min_area, d.erase_max_area, d.erase_max_aspect) if d.random_erase else None


def sample_transform(size: int, d: DataConfig) -> Transform | None:
    """The per-sample part of :func:`train_transform` for images of ``size`` (None: nothing to do per sample):
    with data.augment crop and flip on the integer image, then data.auto_augment (ta_wide: TrivialAugmentWide,
    ra: RandAugment), and the cutout squares and erased rectangle drawn, for :func:`normalise_batch` to apply."""
    erasing = erasing_of(d)
    if not d.augment and d.auto_augment == "none" and erasing is None:
        return None  # before importing torchvision (1.4 s)
    from torchvision.transforms import v2

    side = cutout_side(size, d.cutout) if d.augment else 0
    parts: list[Transform] = [*_cropping(size, d.crop, d.crop_padding), v2.RandomHorizontalFlip()] if d.augment else []
    if d.auto_augment == "ta_wide":
        parts.append(v2.TrivialAugmentWide())
    elif d.auto_augment == "ra":
        parts.append(v2.RandAugment(num_ops=d.ra_num_ops, magnitude=d.ra_magnitude))
    if erasing is not None:
        parts.append(Holes(CutoutSquares(1, side) if side else None, erasing))
    elif side:
        parts.append(CutoutSquares(1, side))
    return v2.Compose(parts) if parts else None


def _cropping(size: int, crop: str, padding: int) -> list[Transform]:
    """data.crop's transforms: resize 1.25x + random-resized-crop of 64-100% of the area, or pad-and-crop."""
    from torchvision.transforms import v2

    if crop == "resized":
        return [v2.Resize(round(size * 1.25), antialias=True),
                v2.RandomResizedCrop(size, scale=(0.64, 1.0), ratio=(1.0, 1.0), antialias=True)]
    return [v2.RandomCrop(size, padding=padding)]


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """Integer pixels as float32 in 0..1 (scaled by the type's maximum, as ``v2.ToDtype(scale=True)``); floats kept."""
    if pixels.is_floating_point():
        return pixels
    return pixels.to(torch.float32).mul_(1.0 / torch.iinfo(pixels.dtype).max)


class MixPair(NamedTuple):
    """A training sample and its mixup/cutmix partner (:mod:`.mixing`), each a tensor or :class:`Sample`;
    the labels come as a pair too."""

    first: torch.Tensor | Sample
    second: torch.Tensor | Sample


Image = torch.Tensor | Sample | MixPair


def _pixels(img: Image) -> list[torch.Tensor]:
    if isinstance(img, MixPair):
        return _pixels(img.first) + _pixels(img.second)
    return [img.pixels if isinstance(img, Sample) else img]


def _unit_float(img: Image) -> Image:
    if isinstance(img, MixPair):
        return MixPair(_unit_float(img.first), _unit_float(img.second))
    return Sample(to_unit_float(img.pixels), img.holes) if isinstance(img, Sample) else to_unit_float(img)


def collate(batch: list[tuple[Image, int | torch.Tensor]]) -> list:
    """The DataLoader's default collation, after giving every image of the batch one dtype: a folder may mix
    8-bit files (uint8) with deeper ones (float32 in 0..1); the uint8 ones are then scaled as the rank would."""
    dtypes = {pixels.dtype for img, _ in batch for pixels in _pixels(img)}
    if len(dtypes) > 1:
        batch = [(_unit_float(img), y) for img, y in batch]
    return torch.utils.data.default_collate(batch)


def normalise_batch(batch: torch.Tensor | Sample, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A collated batch of integer images (or :class:`Sample`) as normalised float32, on ``mean``'s device.

    The same operations as :func:`eval_transform` / :func:`train_transform` per sample (to float scaled
    by the integer type's maximum, subtract, divide, then zero the cutout squares), so the same values.
    """
    pixels, holes = (batch.pixels, batch.holes) if isinstance(batch, Sample) else (batch, None)
    x = to_unit_float(pixels.to(mean.device, non_blocking=True))
    x = x.sub_(mean).div_(std)
    if holes is not None:
        for i, rows in enumerate(holes.tolist()):
            for y0, y1, x0, x1 in rows:
                x[i, :, y0:y1, x0:x1] = 0
    return x
