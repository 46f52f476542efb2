"""What both peers (bench/peers/plain_ddp.py, bench/peers/lightning_fit.py) share: the command line of the work
bench/compare_peers.py gives them (``work_arguments``), and the data they read: Fashion-MNIST from its IDX
files, with its own small reader as a user's script would have (not ddp_train's), the training split being
ddp_train's 80% so that every system of bench/compare_peers.py trains on the same samples."""

from __future__ import annotations

import argparse
import gzip

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # the published Fashion-MNIST training-set statistics (ddp_train uses the same)


def read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): a big-endian header of dimensions, then the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion(split: str, subset: int | None) -> TensorDataset:
    """uint8 images (N x 1 x 28 x 28) and labels; train is ddp_train's 80% (randperm with seed 42, last 80%)."""
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(read_idx(f"{ROOT}/{prefix}-images-idx3-ubyte.gz")[:subset].copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(f"{ROOT}/{prefix}-labels-idx1-ubyte.gz")[:subset].astype(np.int64))
    if split == "train":
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(42))
        keep = perm[round(0.2 * len(labels)):].sort().values
        images, labels = images[keep], labels[keep]
    return TensorDataset(images, labels)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """A uint8 batch to the normalised float channels_last batch the model takes."""
    return ((x.float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def work_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The command line both peers share: the work (epochs, subset, global batch, precision) compare_peers sets."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=None, help="only the first N train and test samples")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    return parser
