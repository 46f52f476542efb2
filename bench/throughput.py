"""Training throughput through ddp_train's own model, SyncBN, DDP wrapper, loaders and step.

    python bench/throughput.py [--steps 20] [key=value ...]                  # one process
    torchrun --nproc_per_node=2 bench/throughput.py [--steps 20] [key=value ...]

``key=value`` are ddp_train config overrides (train.batch_size is the global batch). Prints, on
rank 0: img/s (all ranks) of ddp_train's own training loop (engine.train_one_epoch, no host sync per
step), the step time split into data wait and compute (measured separately, synchronising), model FLOPs per image
(torch.utils.flop_counter), MFU against a matmul peak measured on the same device and dtype, and
peak memory. The first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddp_train.config import load_config, validate_for_world
from ddp_train.data import build_data, load_dataset
from ddp_train.distributed.context import detect_launch, environ, init_distributed, shutdown
from ddp_train.training.engine import (Batcher, StepOptions, autocast_dtype, grad_scaler, precision_name, train_one_epoch,
                                       train_step)
from ddp_train.training.learner import Learner, build_training_model
from ddp_train.training.optim import Schedule, build_optimizer


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
    parser.add_argument("--json", help="also write the figures to this JSON file (rank 0)")
    parser.add_argument("overrides", nargs="*", help="ddp_train config overrides")
    args = parser.parse_args()
    launch = detect_launch(environ())
    defaults = ["data.synthetic_size=5000", "data.num_workers=0", "train.scheduler=none"]
    cfg = load_config(None, [*defaults, *args.overrides])
    validate_for_world(cfg, launch.world_size)
    if cfg.train.precision == "fp64":
        parser.error("train.precision=fp64 is a verification mode, not a speed setting; time fp32, bf16 or fp16")
    ctx = init_distributed(launch, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        dataset = load_dataset(cfg.data)
        data = build_data(dataset, cfg, ctx)
        model, model_without_ddp = build_training_model(cfg, dataset, ctx)
        optimizer = build_optimizer(model, cfg.train)
        batcher = Batcher(ctx.device, cfg.model.channels_last)
        amp = autocast_dtype(cfg.train.precision, ctx.device)
        per_rank = cfg.train.batch_size // ctx.world_size
        if len(data.train) < max(args.warmup, args.steps) + 1:
            raise SystemExit(f"only {len(data.train)} batches per epoch; raise data.synthetic_size or lower --steps")

        scaler = grad_scaler(ctx.device, amp)
        schedule = Schedule(optimizer, cfg.train, len(data.train))
        learner = Learner(model, model_without_ddp, optimizer, schedule, scaler, amp, batcher)
        options = StepOptions(amp, scaler=scaler)  # no label smoothing, no accumulation: as before

        def loop(steps: int) -> float:
            """img/s of ``steps`` steps of ddp_train's own training loop (no host sync inside it)."""
            data.sampler.set_epoch(0)
            result = train_one_epoch(learner, data.train, ctx, options, progress=lambda it: itertools.islice(it, steps))
            return result.img_per_s

        # FLOPs of one forward + backward on this rank's batch, counted on the plain module (not
        # through DDP or torch.compile, which the counter cannot see into).
        data.sampler.set_epoch(0)
        images, labels = batcher(*next(iter(data.train)))
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                logits = model_without_ddp(images)
            F.cross_entropy(logits.float(), labels).backward()
        optimizer.zero_grad(set_to_none=True)
        flops_per_image = counter.get_total_flops() / per_rank

        loop(args.warmup)  # compilation, cudnn autotuning, allocator warm-up
        img_s = loop(args.steps)

        # The data / compute split: a few more steps, synchronised after each phase.
        split_steps = min(args.steps, 10)
        data.sampler.set_epoch(1)
        it = iter(data.train)
        data_s = compute_s = 0.0
        for _ in range(split_steps):
            t0 = time.perf_counter()
            images, labels = batcher(*next(it))
            sync(ctx.device)
            t1 = time.perf_counter()
            train_step(model, images, labels, optimizer, options)
            sync(ctx.device)
            data_s += t1 - t0
            compute_s += time.perf_counter() - t1
        totals = ctx.all_reduce_sum(torch.tensor([data_s, compute_s], dtype=torch.float64, device=ctx.device))
        data_s, compute_s = (float(v) / ctx.world_size / split_steps for v in totals)  # mean over ranks, per step
        peak = matmul_peak(ctx.device, amp or torch.float32)
        if ctx.device.type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated(ctx.device) / 2**30:.2f} GiB (CUDA, rank 0)"
        else:
            memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS, rank 0)"
        if ctx.is_main:
            mfu = img_s * flops_per_image / (peak * ctx.world_size)
            print(f"device: {ctx.device} x{ctx.world_size} ({ctx.launcher}), threads/rank {torch.get_num_threads()}")
            print(f"model {cfg.model.name}, sync_bn {cfg.model.sync_bn}, channels_last {cfg.model.channels_last}, "
                  f"precision {precision_name(amp)}, compile {cfg.train.compile}, "
                  f"device-resident data {data.device_resident}, global batch {cfg.train.batch_size}")
            print(f"img/s (all ranks)        {img_s:10.1f}  (ddp_train's training loop, {args.steps} steps)")
            print(f"step time, synchronised  {1000 * (data_s + compute_s):10.1f} ms  (data {1000 * data_s:.1f} ms, "
                  f"compute {1000 * compute_s:.1f} ms)")
            print(f"train GFLOP/image        {flops_per_image / 1e9:10.3f}")
            print(f"matmul peak/rank         {peak / 1e12:10.3f} TFLOP/s")
            print(f"MFU                      {100 * mfu:10.1f} %")
            print(f"peak memory              {memory}")
            if args.json:
                figures = {"img_per_s": img_s, "data_ms": 1000 * data_s, "compute_ms": 1000 * compute_s,
                           "gflop_per_image": flops_per_image / 1e9, "peak_tflops": peak / 1e12, "mfu": mfu,
                           "memory": memory, "device": str(ctx.device), "world_size": ctx.world_size,
                           "precision": precision_name(amp), "batch_size": cfg.train.batch_size,
                           "compile": cfg.train.compile, "device_resident": data.device_resident}
                Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
