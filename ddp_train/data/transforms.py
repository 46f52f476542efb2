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

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

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


def sample_transform(size: int, augment: bool, crop: str = "resized", padding: int = 4,
                     cutout: int | None = None) -> Transform | None:
    """The per-sample part of :func:`train_transform` (None: nothing to do per sample): crop and flip on the
    integer image, and the cutout squares drawn, for :func:`normalise_batch` to apply."""
    if not augment:
        return None
    from torchvision.transforms import v2

    side = cutout_side(size, cutout)
    return v2.Compose([*_cropping(size, crop, padding), v2.RandomHorizontalFlip(),
                       *([CutoutSquares(1, side)] if side else [])])


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


def collate(batch: list[tuple[torch.Tensor | Sample, int]]) -> list:
    """The DataLoader's default collation, after giving every image of the batch one dtype: a folder may mix
    8-bit files (uint8) with deeper ones (float32 in 0..1); the uint8 ones are then scaled as the rank would."""
    dtypes = {(b[0].pixels if isinstance(b[0], Sample) else b[0]).dtype for b in batch}
    if len(dtypes) > 1:
        batch = [(Sample(to_unit_float(img.pixels), img.holes) if isinstance(img, Sample) else to_unit_float(img), y)
                 for img, y in batch]
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
