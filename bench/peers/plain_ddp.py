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


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ddp_train.models import build_model
from fashion_data import fashion, normalise, work_arguments  # beside this script


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
    parser = work_arguments(__doc__)
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
