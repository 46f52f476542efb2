"""Dataset sources: where the images come from, before any split or transform.

Every source yields CHW tensors (uint8; float32 in 0..1 for image files deeper than 8 bits,
see :mod:`.images`) and integer labels, and carries its class names, channel count, image size
and normalisation statistics, so the model and the transforms adapt to the data rather than to
a hard-coded CIFAR shape.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from . import synthetic
from .errors import DataError
from .images import GREY, image_mode, read_image


def check_labels(labels: np.ndarray, num_classes: int, where: object, dataset: str) -> None:
    """Refuse labels outside ``0..num_classes-1`` (a damaged file), naming the first one."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        more = f" ({len(bad)} labels out of range in all)" if len(bad) > 1 else ""
        raise DataError(f"data: {where} holds label {labels[i]} at index {i}{more}, but {dataset} has {num_classes} "
                        f"classes; the file is damaged, fetch it again")


@dataclass
class Source:
    """One split of a dataset: images in memory (uint8 NHWC) or as image file paths."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    channels: int = 3
    image_size: int | None = None  # files only: resize to this square size when loading

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as a C x H x W tensor: uint8, or float32 in 0..1 for a file deeper than 8 bits."""
        if self.images is not None:
            return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        assert self.paths is not None
        return read_image(self.paths[i], self.channels, self.image_size)

    def head(self, n: int | None) -> Source:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return Source(
            self.labels[:n],
            None if self.images is None else self.images[:n],
            None if self.paths is None else self.paths[:n],
            self.channels,
            self.image_size,
        )


@dataclass
class Dataset:
    """The splits a dataset provides, and what the model and transforms need to know."""

    name: str
    classes: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Source
    valid: Source | None  # a dataset's own validation split (image_folder val/); else drawn from train
    test: Source | None


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of NHWC images: uint8, or float64 already on the 0-1 scale."""
    x = images.reshape(-1, images.shape[-1])
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x
    return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-3)) for v in x.std(0))


# --------------------------------------------------------------------------- synthetic


def _synthetic(cfg: DataConfig) -> Dataset:
    n_train = cfg.synthetic_size if cfg.subset is None else min(cfg.subset, cfg.synthetic_size)
    n_test = max(cfg.synthetic_size // 5, 1)
    n_test = n_test if cfg.subset is None else min(cfg.subset, n_test)
    xtr, ytr = synthetic.generate("train", n_train)
    xte, yte = synthetic.generate("test", n_test)
    # Statistics from a fixed prefix, so they do not change with data.subset (generated again only
    # when the training set is shorter than the prefix).
    prefix = xtr[:1000] if len(xtr) >= 1000 else synthetic.generate("train", 1000)[0]
    mean, std = _stats(prefix)
    return Dataset("synthetic", list(synthetic.CLASSES), 3, synthetic.SIZE, mean, std,
                   Source(ytr, xtr), None, Source(yte, xte))


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; the file is damaged, fetch it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise DataError(f"{path} is truncated: header says {shape} ({expected} bytes), file holds "
                        f"{len(data) - header}; fetch it again")
    # A writable copy: torch warns about (and must not write into) read-only buffers.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _check_not_swapped(counts: dict[str, tuple[Path, int]]) -> None:
    """Refuse a training file smaller than the test file: Fashion-MNIST's are 60,000 and 10,000 images, and
    swapped names would otherwise train on the test set and report accuracy on the training set."""
    (train_path, n_train), (test_path, n_test) = counts["train"], counts["test"]
    if n_train < n_test:
        raise DataError(f"{train_path} holds {n_train} images and {test_path} {n_test}: the train and test files "
                        f"look swapped (Fashion-MNIST trains on 60000 and tests on 10000); give each file its "
                        f"standard name ({', '.join(FASHION_FILES['train'] + FASHION_FILES['test'])})")


def _fashion_mnist(cfg: DataConfig) -> Dataset:
    root = Path(cfg.root or FASHION_ROOT)
    splits, counts = {}, {}
    for split, (img_name, lbl_name) in FASHION_FILES.items():
        img_path, lbl_path = root / img_name, root / lbl_name
        for p in (img_path, lbl_path):
            if not p.is_file():
                raise DataError(
                    f"Fashion-MNIST file {p} not found; set data.root to the folder with the four IDX .gz "
                    f"files, or install them with: apt-get install dataset-fashion-mnist"
                )
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{img_path} and {lbl_path} do not match (images {images.shape}, labels {labels.shape})")
        check_labels(labels, len(FASHION_CLASSES), lbl_path, "fashion_mnist")
        counts[split] = (img_path, len(images))
        n = cfg.subset
        splits[split] = Source(labels[:n].astype(np.int64), images[:n, :, :, None])
    _check_not_swapped(counts)
    # Published statistics of the Fashion-MNIST training set.
    return Dataset("fashion_mnist", FASHION_CLASSES, 1, 28, (0.2860,), (0.3530,),
                   splits["train"], None, splits["test"])


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_MEAN = (0.4914, 0.4823, 0.4465)  # the seed recipe's Normalize statistics
CIFAR_STD = (0.2023, 0.1920, 0.2210)


def _cifar10(cfg: DataConfig) -> Dataset:
    import torchvision

    root = cfg.root or os.path.join("data", "cifar10")
    splits = {}
    for split in ("train", "test"):
        try:
            ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=cfg.download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DataError(
                f"CIFAR-10 not found in {root} ({e}); set data.download=true to fetch it (needs network), "
                f"or data.root to a folder holding cifar-10-batches-py"
            ) from None
        except OSError as e:  # URLError and socket errors are OSErrors
            raise DataError(
                f"could not download CIFAR-10 into {root}: {e}; without network, copy cifar-10-batches-py "
                f"into {root} (or set data.root) and keep data.download=false"
            ) from None
        n = cfg.subset
        labels = np.asarray(ds.targets, dtype=np.int64)
        check_labels(labels, len(ds.classes), f"{root} ({split} split)", "cifar10")
        splits[split] = Source(labels[:n], np.asarray(ds.data)[:n])
        classes = list(ds.classes)
    return Dataset("cifar10", classes, 3, 32, CIFAR_MEAN, CIFAR_STD, splits["train"], None, splits["test"])


# --------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, image paths, labels) of ``folder``/<class>/**; ``classes`` None: train/, which defines them,
    where a class folder without images is refused (it would be a class the model can never learn)."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    defines = classes is None
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise DataError(f"{folder} has class folders not in train/: {sorted(set(found) - set(classes))}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        d = folder / name
        if not d.is_dir():
            continue
        before = len(paths)
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                paths.append(str(p))
                labels.append(label)
        if len(paths) == before and defines:
            raise DataError(f"image_folder: class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add images to it or remove it")
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _image_folder(cfg: DataConfig) -> Dataset:
    root = Path(cfg.root or "")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"image_folder: {train_dir} not found; data.root must hold train/<class>/<images> "
                        f"(and optionally val/ and test/ with the same class folders)")
    classes, paths, labels = _scan(train_dir, None)
    if len(classes) < 2 or not paths:
        raise DataError(f"image_folder: {train_dir} needs at least two class folders with images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); found {len(classes)} classes, {len(paths)} images")
    channels = 1 if image_mode(paths[0]) in GREY else 3
    size = cfg.image_size

    def source(folder: Path) -> Source | None:
        if not folder.is_dir():
            return None
        _, p, y = _scan(folder, classes)
        src = Source(y, paths=p, channels=channels, image_size=size)
        return src.head(cfg.subset)

    train = Source(labels, paths=paths, channels=channels, image_size=size).head(cfg.subset)
    # Statistics from up to 500 evenly spread training images.
    pick = np.linspace(0, len(train) - 1, num=min(500, len(train))).astype(int)
    images = [train.load(int(i)).permute(1, 2, 0).numpy() for i in pick]
    if any(im.dtype != np.uint8 for im in images):  # deeper than 8 bits: all on the 0-1 scale, in float64
        images = [im.astype(np.float64) / 255.0 if im.dtype == np.uint8 else im.astype(np.float64) for im in images]
    mean, std = _stats(np.stack(images))
    return Dataset("image_folder", classes, channels, size, mean, std, train,
                   source(root / "val"), source(root / "test"))


_LOADERS = {"synthetic": _synthetic, "fashion_mnist": _fashion_mnist, "cifar10": _cifar10, "image_folder": _image_folder}


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset named by ``cfg.name``, truncated by ``cfg.subset``. Raises DataError."""
    return _LOADERS[cfg.name](cfg)
