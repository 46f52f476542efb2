"""The seed recipe's train and evaluation transforms, on uint8 CHW tensors.

Train: Resize(1.25 x size) -> RandomResizedCrop(size, scale 0.64-1, ratio 1) -> horizontal
flip -> to float -> Normalize(dataset statistics) -> Cutout(1 hole, half the side); the crop may
instead be pad-and-crop and the cutout another size (data.crop, data.cutout).
Evaluation (validation and test): to float -> Normalize. The statistics come from the
dataset, since the seed recipe's CIFAR-10 numbers are wrong for other data (grayscale above all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

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
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], augment: bool,
                    crop: str = "resized", padding: int = 4, cutout: int | None = None) -> Transform:
    """The seed recipe's train transform at ``size`` (Resize 40 for 32x32); the evaluation one without ``augment``.

    ``crop="pad"`` replaces Resize + RandomResizedCrop by a random crop of the image padded with
    ``padding`` black pixels; ``cutout`` is the side of the zeroed square (None: half the side, 0: none).
    """
    if not augment:
        return eval_transform(mean, std)
    if crop == "resized":
        cropping = [v2.Resize(round(size * 1.25), antialias=True),
                    v2.RandomResizedCrop(size, scale=(0.64, 1.0), ratio=(1.0, 1.0), antialias=True)]
    else:
        cropping = [v2.RandomCrop(size, padding=padding)]
    side = cutout_side(size, cutout)
    return v2.Compose([
        *cropping,
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        *([Cutout(1, side)] if side else []),
    ])


def cutout_side(size: int, cutout: int | None) -> int:
    """data.cutout resolved: None is half the image side (the seed recipe's 16 px at 32x32)."""
    return size // 2 if cutout is None else cutout
