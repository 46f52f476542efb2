"""Training throughput through ddp_train's own model, SyncBN, DDP wrapper, loaders and step.

    python bench/throughput.py [--steps 20] [key=value ...]                  # one process
    torchrun --nproc_per_node=2 bench/throughput.py [--steps 20] [key=value ...]

``key=value`` are ddp_train config overrides (train.batch_size is the global batch). Prints, on
rank 0: img/s (all ranks), the step time split into data wait and compute, model FLOPs per image
(torch.utils.flop_counter), MFU against a matmul peak measured on the same device and dtype, and
peak memory. The first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddp_train.config import load_config, validate_for_world
from ddp_train.data import build_data, load_dataset
from ddp_train.distributed import detect_launch, environ, init_distributed, shutdown
from ddp_train.engine import Batcher, autocast_dtype
from ddp_train.optim import build_optimizer
from ddp_train.trainer import build_training_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s on this device (per process), the MFU denominator."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("overrides", nargs="*", help="ddp_train config overrides")
    args = parser.parse_args()
    launch = detect_launch(environ())
    defaults = ["data.synthetic_size=5000", "data.num_workers=0"]
    cfg = load_config(None, [*defaults, *args.overrides])
    validate_for_world(cfg, launch.world_size)
    ctx = init_distributed(launch, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        dataset = load_dataset(cfg.data)
        data = build_data(dataset, cfg, ctx)
        model, model_without_ddp = build_training_model(cfg, dataset, ctx)
        optimizer = build_optimizer(model, cfg.train)
        batcher = Batcher(ctx.device, cfg.model.channels_last)
        amp = autocast_dtype(cfg.train.precision, ctx.device)
        per_rank = cfg.train.batch_size // ctx.world_size
        if len(data.train) < args.warmup + args.steps:
            raise SystemExit(f"only {len(data.train)} batches per epoch; raise data.synthetic_size or lower --steps")

        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        data.train.sampler.set_epoch(0)
        it = iter(data.train)
        data_s = compute_s = 0.0
        flops_per_image = 0.0
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            images, labels = batcher(*next(it))
            sync(ctx.device)
            t1 = time.perf_counter()
            if i == 0:  # count FLOPs of one training step (forward + backward) on this rank's batch
                with FlopCounterMode(display=False) as counter:
                    step(images, labels)
                flops_per_image = counter.get_total_flops() / per_rank
                continue
            step(images, labels)
            sync(ctx.device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                data_s += t1 - t0
                compute_s += t2 - t1
        totals = ctx.all_reduce_sum(torch.tensor([data_s, compute_s], dtype=torch.float64, device=ctx.device))
        data_s, compute_s = (float(v) / ctx.world_size for v in totals)  # mean over ranks
        peak = matmul_peak(ctx.device, amp or torch.float32)
        if ctx.device.type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f} GiB (CUDA, rank 0)"
        else:
            memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS, rank 0)"
        if ctx.is_main:
            step_s = (data_s + compute_s) / args.steps
            img_s = cfg.train.batch_size / step_s
            mfu = img_s * flops_per_image / (peak * ctx.world_size)
            print(f"device: {ctx.device} x{ctx.world_size} ({ctx.launcher}), threads/rank {torch.get_num_threads()}")
            print(f"model {cfg.model.name}, sync_bn {cfg.model.sync_bn}, channels_last {cfg.model.channels_last}, "
                  f"precision {'bf16' if amp else 'fp32'}, global batch {cfg.train.batch_size}")
            print(f"img/s (all ranks)        {img_s:10.1f}")
            print(f"step time                {1000 * step_s:10.1f} ms  (data {1000 * data_s / args.steps:.1f} ms, "
                  f"compute {1000 * compute_s / args.steps:.1f} ms)")
            print(f"train GFLOP/image        {flops_per_image / 1e9:10.3f}")
            print(f"matmul peak/rank         {peak / 1e12:10.3f} TFLOP/s")
            print(f"MFU                      {100 * mfu:10.1f} %")
            print(f"peak memory              {memory}")
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
