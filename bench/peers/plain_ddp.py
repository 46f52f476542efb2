"""A plain DDP training script, as PyTorch's DDP tutorial teaches it: the peer ddp_train is timed against.

    torchrun --standalone --nproc_per_node=2 bench/peers/plain_ddp.py [--epochs 2] [--subset N]

Fashion-MNIST from its IDX files, the same 48,000 training samples as ddp_train (its 80% split drawn
with seed 42), ddp_train's narrow ResNet-10 (width 16) with plain BatchNorm, DDP over gloo,
DistributedSampler, a DataLoader with 2 workers over uint8 tensors (each rank normalises whole
batches), channels_last, bf16 autocast, SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a
per-step one-cycle lr up to 0.2, global batch 256. At the end the test set is evaluated, sharded
across the ranks, and rank 0 prints ``test | acc A | count N``.
"""

from __future__ import annotations

import argparse
import gzip

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ddp_train.models import build_model

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


def evaluate(model: torch.nn.Module, rank: int, world: int, subset: int | None, dtype: torch.dtype | None) -> None:
    """Test accuracy over this rank's shard (every rank runs it), counts summed across the ranks."""
    test = fashion("test", subset)
    shard = torch.utils.data.Subset(test, range(rank, len(test), world))
    counts = torch.zeros(2, dtype=torch.int64)  # correct, seen
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for x, y in DataLoader(shard, batch_size=256):
            counts += torch.tensor([(model(normalise(x)).argmax(1) == y).sum().item(), len(y)])
    dist.all_reduce(counts)
    if rank == 0:
        print(f"test | acc {counts[0].item() / counts[1].item():.4f} | count {counts[1].item()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=None, help="only the first N train and test samples")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # rank, world size and rendezvous from torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    train = fashion("train", args.subset)
    sampler = DistributedSampler(train, shuffle=True, seed=42)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, num_workers=2, drop_last=True)
    torch.manual_seed(42)
    model = build_model("resnet10", 10, in_channels=1, width=16).to(memory_format=torch.channels_last)
    model = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=args.epochs * len(loader),
                                                    cycle_momentum=False)
    if rank == 0:
        print(f"train | {len(train)} samples | {world} ranks | {len(loader)} steps per epoch", flush=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(normalise(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if rank == 0:
            print(f"epoch {epoch + 1} | last loss {loss.item():.4f}", flush=True)
    evaluate(model.module, rank, world, args.subset, dtype)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
