"""The training run: set up, loop over epochs, checkpoint, test. Runs on every rank."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import Checkpointer, atomic_write_text
from .config import Config, UserError, dump_yaml
from .data import DataBundle, Dataset, build_data, load_dataset
from .distributed import DistContext
from .engine import Batcher, autocast_dtype, evaluate, train_one_epoch
from .models import build_model
from .optim import Schedule, build_optimizer
from .seeding import rank_seed, seed_all, set_determinism
from .syncbn import convert_sync_batchnorm
from .tracking import NullTracker, Tracker


def _attempt(fn: Any, *args: Any) -> tuple[Any, UserError | None]:
    try:
        return fn(*args), None
    except UserError as e:
        return None, e


def load_dataset_agreed(cfg: Config, ctx: DistContext) -> Dataset:
    """Every rank loads the data; a failure on any rank stops all of them with its message.

    With ``data.download`` the first rank of each node downloads while the others wait, so
    two processes never write the same files.
    """
    if cfg.data.download and ctx.distributed:
        first = ctx.local_rank == 0
        dataset, error = _attempt(load_dataset, cfg.data) if first else (None, None)
        ctx.agree(error)
        if not first:
            dataset, error = _attempt(load_dataset, cfg.data)
        ctx.agree(error)
        return dataset
    dataset, error = _attempt(load_dataset, cfg.data)
    ctx.agree(error)
    return dataset


def prepare_run_dir(cfg: Config, ctx: DistContext) -> Path:
    """Rank 0 names and creates the run folder and proves it writable, before any training."""
    name = cfg.run_name or f"{cfg.data.name}-{cfg.model.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    name = ctx.broadcast_object(name)  # ranks may start a second apart: rank 0's timestamp wins
    run_dir = Path(cfg.out_dir) / name
    error: UserError | None = None
    if ctx.is_main:
        try:
            if (run_dir / "checkpoints" / "last.pt").exists():
                raise UserError(f"run folder {run_dir} already holds a run (checkpoints/last.pt); "
                                f"choose another run_name, or move the old run away")
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            # The config is the test write: an unwritable or full out_dir fails here, not after an hour.
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        except OSError as e:
            error = UserError(f"out_dir: cannot write the run folder {run_dir}: {e.strerror or e}; "
                              f"choose a writable out_dir")
        except UserError as e:
            error = e
    ctx.agree(error)
    return run_dir


def build_training_model(cfg: Config, dataset: Dataset, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """(model to train, the same model without DDP/DataParallel wrapping)."""
    seed_all(cfg.train.seed)  # identical initialisation on every rank
    model = build_model(cfg.model.name, len(dataset.classes), dataset.channels, cfg.model.zero_init_residual)
    if cfg.model.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    model = model.to(ctx.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    elif ctx.data_parallel:
        model = nn.DataParallel(model)
    return model, model_without_ddp


def train(cfg: Config, ctx: DistContext) -> dict[str, Any]:
    """Train, validate every epoch, checkpoint, then test the best weights. Returns metrics.json's content."""
    set_determinism(cfg.train.deterministic)
    run_dir = prepare_run_dir(cfg, ctx)
    tracker = Tracker(run_dir) if ctx.is_main else NullTracker()
    if ctx.data_parallel:
        tracker.info(f"{torch.cuda.device_count()} GPUs visible without torchrun: using nn.DataParallel. "
                     f"torchrun --nproc_per_node={torch.cuda.device_count()} -m ddp_train is faster.")
    dataset = load_dataset_agreed(cfg, ctx)
    data, error = _attempt(build_data, dataset, cfg, ctx)
    ctx.agree(error)
    assert isinstance(data, DataBundle)

    model, model_without_ddp = build_training_model(cfg, dataset, ctx)
    seed_all(rank_seed(cfg.train.seed, ctx.rank))  # from here on, randomness differs per rank
    optimizer = build_optimizer(model, cfg.train)
    schedule = Schedule(optimizer, cfg.train, steps_per_epoch=len(data.train))
    amp_dtype = autocast_dtype(cfg.train.precision, ctx.device)
    batcher = Batcher(ctx.device, cfg.model.channels_last)
    checkpointer = Checkpointer(run_dir / "checkpoints", enabled=ctx.is_main)
    num_classes = len(dataset.classes)

    tracker.log_config(dump_yaml(cfg))
    tracker.info(
        f"run {run_dir} | {ctx.launcher} x{ctx.world_size} on {ctx.device} | {dataset.name}: "
        f"{len(data.train.dataset)} train / {len(data.valid.dataset)} valid / "
        f"{len(data.test.dataset) if data.test else 0} test, {num_classes} classes | {cfg.model.name} | "
        f"{'bf16' if amp_dtype is not None else 'fp32'} | global batch {cfg.train.batch_size}"
    )

    best_loss = float("inf")
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    for epoch in range(cfg.train.epochs):
        data.train.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        epoch_start = time.perf_counter()
        lr = schedule.lr

        def on_step(i: int, loss: torch.Tensor, base: int = step) -> None:
            # A collective, so it runs on every rank; only rank 0's tracker writes.
            if (base + i) % cfg.train.log_every_steps == 0:
                mean = ctx.all_reduce_sum(loss.clone()) / ctx.world_size
                tracker.scalar("train/loss", float(mean.item()), base + i)

        result = train_one_epoch(
            model, data.train, optimizer, schedule, ctx, batcher, amp_dtype, cfg.train.label_smoothing,
            on_step, lambda it: tracker.progress(it, len(data.train), f"epoch {epoch + 1}/{cfg.train.epochs}"),
        )
        step += result.steps
        valid = evaluate(model_without_ddp, data.valid, ctx, batcher, amp_dtype, num_classes)
        schedule.step_epoch(valid.loss)

        improved = valid.loss <= best_loss  # the notebook saves on "<="
        if improved:
            tracker.info(f"Validation loss decreased ({best_loss:.6f} --> {valid.loss:.6f}).  Saving model ...")
            best_loss = valid.loss
            best_state = {k: v.detach().clone() for k, v in model_without_ddp.state_dict().items()}
        record = {
            "epoch": epoch + 1, "train_loss": result.loss, "valid_loss": valid.loss, "valid_acc": valid.acc,
            "lr": lr, "img_per_s": result.img_per_s, "epoch_s": time.perf_counter() - epoch_start,
        }
        checkpointer.save(
            {
                "format": 1,
                "epoch": epoch + 1,
                "step": step,
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "best_valid_loss": best_loss,
                "history": tracker.history + [record],
                "config": cfg.to_dict(),
                "dataset": dataset_meta(dataset),
            },
            improved,
        )
        ctx.barrier()  # nobody runs ahead while rank 0 writes
        tracker.log_epoch(record, step)

    test_metrics: dict[str, Any] | None = None
    if data.test is not None:
        if best_state is not None:
            model_without_ddp.load_state_dict(best_state)
        test = evaluate(model_without_ddp, data.test, ctx, batcher, amp_dtype, num_classes)
        test_metrics = test.to_dict(dataset.classes)
        tracker.log_test(test_metrics)
    else:
        tracker.info("no test split (image_folder without test/): skipping the test evaluation")

    final = {"best_valid_loss": best_loss, "final_valid_acc": tracker.history[-1]["valid_acc"] if tracker.history else 0.0}
    if test_metrics is not None:
        final.update({"test_loss": test_metrics["loss"], "test_acc": test_metrics["acc"]})
    tracker.log_hparams(_hparams(cfg), {f"hparam/{k}": float(v) for k, v in final.items()})
    tracker.close()
    return {"history": tracker.history, "test": test_metrics, "run_dir": str(run_dir)}


def dataset_meta(dataset: Dataset) -> dict[str, Any]:
    """What eval/predict need to rebuild the model and its input transform from a checkpoint alone."""
    return {
        "name": dataset.name, "classes": list(dataset.classes), "channels": dataset.channels,
        "image_size": dataset.image_size, "mean": list(dataset.mean), "std": list(dataset.std),
    }


def _hparams(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, (int, float, str, bool)):
                    flat[f"{section}.{key}"] = value
    return flat
