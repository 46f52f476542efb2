"""The training run: set up, loop over epochs, checkpoint, test. Runs on every rank."""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import FORMAT, Checkpointer, atomic_write_text, branch_for_resume, step_file, try_load
from .config import Config, UserError, dump_yaml
from .data import DataBundle, Dataset, build_data, load_dataset
from .distributed import DistContext
from .engine import Batcher, autocast_dtype, evaluate, grad_scaler, param_dtype, precision_name, train_one_epoch
from .models import build_model
from .optim import Schedule, build_optimizer
from .resume import load_resume_checkpoint, restore
from .runlock import RunLock
from .seeding import get_rng_state, rank_seed, seed_all, set_determinism, set_rng_state
from .signals import Preempted, StopFlag
from .syncbn import convert_sync_batchnorm
from .tracking import NullTracker, Tracker


def attempt(fn: Any, *args: Any) -> tuple[Any, UserError | None]:
    """(fn(*args), None), or (None, the UserError it raised): for :meth:`DistContext.agree`."""
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
        dataset, error = attempt(load_dataset, cfg.data) if first else (None, None)
        ctx.agree(error)
        if not first:
            dataset, error = attempt(load_dataset, cfg.data)
        ctx.agree(error)
        return dataset
    dataset, error = attempt(load_dataset, cfg.data)
    ctx.agree(error)
    return dataset


def prepare_run_dir(cfg: Config, ctx: DistContext, resume: str | None) -> tuple[Path, RunLock | None]:
    """Rank 0 names and creates the run folder and takes its lock, before anything else is written.

    The lock (``<run>/.lock``, see :mod:`ddp_train.runlock`) makes a second run that targets the
    same folder stop here with one line; creating it also proves ``out_dir`` writable. Returns
    the folder and, on rank 0, the lock to release when the run ends.
    """
    name = cfg.run_name
    if name is None and ctx.run_id:
        name = f"{cfg.data.name}-{cfg.model.name}-{ctx.run_id}"  # the same folder after a torchrun restart
    elif name is None and resume == "auto":
        name = ""  # reported below: auto needs to know which folder to continue
    elif name is None:
        name = f"{cfg.data.name}-{cfg.model.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    name = ctx.broadcast_object(name)  # ranks may start a second apart: rank 0's timestamp wins
    run_dir = Path(cfg.out_dir) / name
    error: UserError | None = None
    lock: RunLock | None = None
    if ctx.is_main:
        try:
            if not name:
                raise UserError("resume=auto: set run_name to the run folder to continue")
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir, ctx.job_id).acquire()
            held = (run_dir / "checkpoints" / "last.pt").exists() or any((run_dir / "checkpoints").glob("step-*.pt"))
            if held and resume is None:
                raise UserError(f"run folder {run_dir} already holds a run (checkpoints/); continue it with "
                                f"resume=auto, or choose another run_name")
            if lock.took_over:
                print(f"ddp_train: {lock.took_over}", file=sys.stderr, flush=True)
        except OSError as e:
            error = UserError(f"out_dir: cannot write the run folder {run_dir}: {e.strerror or e}; "
                              f"choose a writable out_dir")
        except UserError as e:
            error = e
        if error is not None and lock is not None:
            lock.release()
            lock = None
    ctx.agree(error)
    return run_dir, lock


def write_run_config(cfg: Config, ctx: DistContext, run_dir: Path) -> None:
    """Rank 0 writes ``config.yaml`` (once the resume, if any, is known to fit); all ranks agree on the outcome."""
    error: UserError | None = None
    if ctx.is_main:
        try:
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        except OSError as e:
            error = UserError(f"out_dir: cannot write {run_dir / 'config.yaml'}: {e.strerror or e}; "
                              f"choose a writable out_dir")
    ctx.agree(error)


def find_best_weights(step: int, branch: int, folders: list[Path]) -> dict[str, torch.Tensor] | None:
    """The model of the checkpoint written at global ``step`` (the best epoch), from ``best.pt`` or a step file.

    The run's own branch is looked at first: another branch may hold a different checkpoint at
    the same step.
    """
    for folder in folders:
        names = ["best.pt", step_file(folder, step, branch).name, step_file(folder, step).name]
        names += sorted(p.name for p in folder.glob(f"step-{step:08d}-b*.pt"))
        for name in dict.fromkeys(names):
            if (folder / name).exists():
                state, _ = try_load(folder / name)
                if state is not None and state["global_step"] == step:
                    return state["model"]
    return None


def build_training_model(cfg: Config, dataset: Dataset, ctx: DistContext,
                         init_from: str | None = None) -> tuple[nn.Module, nn.Module]:
    """(model to train, the same model without DDP/DataParallel wrapping), started from ``init_from`` if given."""
    seed_all(cfg.train.seed)  # identical initialisation on every rank
    model = build_model(cfg.model.name, len(dataset.classes), dataset.channels, cfg.model.zero_init_residual,
                        cfg.model.width)
    if init_from:  # fine-tuning: every rank loads the same file, before SyncBN and DDP
        from .pretrained import apply_init_from

        apply_init_from(model, init_from, ctx,
                        f"{cfg.model.name} with {dataset.channels} channels and {len(dataset.classes)} classes")
    if cfg.model.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    # fp64: parameters and buffers (SyncBN's too) in float64, before DDP sees them.
    model = model.to(ctx.device, param_dtype(cfg.train.precision))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    bucket_cap_mb=cfg.dist.bucket_cap_mb, gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
                    static_graph=cfg.dist.static_graph)
    elif ctx.data_parallel:
        model = nn.DataParallel(model)
    if cfg.train.compile:
        # Compiling the DDP wrapper (not the bare module) lets dynamo split the graph at bucket
        # boundaries so gradient all-reduces still overlap the backward pass. Checkpoints keep
        # using model_without_ddp, whose keys carry no _orig_mod. prefix.
        model = torch.compile(model)  # type: ignore[assignment]
    return model, model_without_ddp


def train(cfg: Config, ctx: DistContext, stop_flag: StopFlag | None = None) -> dict[str, Any]:
    """Train, validate every epoch, checkpoint, then test the best weights. Returns metrics.json's content.

    Raises :class:`Preempted` on every rank after a stop signal, once the checkpoint is written.
    The run folder's lock is held from before the first write until this returns or raises.
    """
    set_determinism(cfg.train.deterministic)
    resume = cfg.resume or ("auto" if ctx.restart_count > 0 else None)  # a restarted job continues
    run_dir, lock = prepare_run_dir(cfg, ctx, resume)
    try:
        return _train(cfg, ctx, stop_flag, run_dir, resume)
    finally:
        if lock is not None:
            lock.release()
            # A run refused before its first write leaves no empty folder behind (rmdir fails on any other).
            for folder in (run_dir / "checkpoints", run_dir):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _wait_agreed(checkpointer: Checkpointer, ctx: DistContext) -> None:
    """Wait for rank 0's background checkpoint write; if it failed, every rank stops with its one line."""
    _, error = attempt(checkpointer.wait)
    ctx.agree(error)


def _train(cfg: Config, ctx: DistContext, stop_flag: StopFlag | None, run_dir: Path,
           resume: str | None) -> dict[str, Any]:
    dataset = load_dataset_agreed(cfg, ctx)
    data, error = attempt(build_data, dataset, cfg, ctx)
    ctx.agree(error)
    assert isinstance(data, DataBundle)

    resumed = load_resume_checkpoint(resume, run_dir, ctx)
    ckpt = resumed[0] if resumed else None
    amp_dtype, error = attempt(autocast_dtype, cfg.train.precision, ctx.device)  # fp16 on CPU is refused
    ctx.agree(error)
    # A resumed run takes its weights from the checkpoint: model.init_from is not read again.
    model, model_without_ddp = build_training_model(cfg, dataset, ctx, None if ckpt else cfg.model.init_from)
    seed_all(rank_seed(cfg.train.seed, ctx.rank))  # from here on, randomness differs per rank
    optimizer = build_optimizer(model, cfg.train)
    steps_per_epoch = len(data.train)
    schedule = Schedule(optimizer, cfg.train, steps_per_epoch)
    scaler = grad_scaler(ctx.device, amp_dtype)
    batcher = Batcher(ctx.device, cfg.model.channels_last)
    num_classes = len(dataset.classes)
    sampler = data.sampler
    per_rank_batch = cfg.train.batch_size // ctx.world_size

    epoch, step_in_epoch, best_loss, best_step, history = 0, 0, float("inf"), -1, []
    partial = (0.0, 0)
    epoch_lr: float | None = None  # the lr an interrupted epoch started with (its metrics report that)
    branch, resume_lines = 0, []
    if resumed is not None:
        # Checked on every rank before anything is written: a refused resume leaves config.yaml as it was.
        restored, error = attempt(restore, resumed[0], resumed[1], cfg, model_without_ddp, optimizer, schedule,
                                  scaler, dataset.classes, dataset.channels, steps_per_epoch)
        ctx.agree(error)
        schedule, resume_lines = restored
        epoch, step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        best_loss, best_step, history = ckpt["best_valid_loss"], ckpt["best_step"], list(ckpt["history"])
        epoch_lr = ckpt["epoch_lr"] if step_in_epoch else None
        if ckpt["world_size"] == ctx.world_size:
            set_rng_state(ckpt["rng"][ctx.rank])
            partial = tuple(ckpt["partial"][ctx.rank])  # type: ignore[assignment]
        elif ctx.is_main:  # another world size: the epoch's running sums go to rank 0
            partial = (sum(p[0] for p in ckpt["partial"]), sum(p[1] for p in ckpt["partial"]))
        # Going back to an older checkpoint starts a branch, so the newer files are neither overwritten nor pruned.
        branch = ctx.broadcast_object(branch_for_resume(run_dir / "checkpoints", resumed[1], ckpt)
                                      if ctx.is_main else None)
    write_run_config(cfg, ctx, run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", ctx.is_main, cfg.checkpoint.keep, branch)

    tracker = Tracker(run_dir, purge_step=ckpt["global_step"] if ckpt else None) if ctx.is_main else NullTracker()
    tracker.history = history
    if ctx.data_parallel:
        tracker.info(f"{torch.cuda.device_count()} GPUs visible without torchrun: using nn.DataParallel. "
                     f"torchrun --nproc_per_node={torch.cuda.device_count()} -m ddp_train is faster.")
    tracker.log_config(dump_yaml(cfg))
    tracker.info(
        f"run {run_dir} | {ctx.launcher} x{ctx.world_size} on {ctx.device} | {dataset.name}: "
        f"{len(data.train.dataset)} train / {len(data.valid.dataset)} valid / "
        f"{len(data.test.dataset) if data.test else 0} test, {num_classes} classes | {cfg.model.name} | "
        f"{precision_name(amp_dtype)}{' + compile' if cfg.train.compile else ''} | "
        f"{'device-resident data' if data.device_resident else f'{cfg.data.num_workers} loader workers'} | "
        f"global batch {cfg.train.batch_size}"
    )
    if ckpt is not None:
        for line in resume_lines:
            tracker.info(line)
        tracker.info(f"resumed from epoch {epoch + 1} step {step_in_epoch} (global step {ckpt['global_step']})"
                     + (f", world size {ckpt['world_size']} -> {ctx.world_size}" if ckpt["world_size"] != ctx.world_size else "")
                     + (f"; writing branch b{branch} (step-<n>-b{branch}.pt)" if branch != ckpt.get("branch", 0) else ""))

    def save(epoch: int, step_in_epoch: int, partial: tuple[float, int], lr: float, improved: bool = False,
             background: bool = False) -> Path:
        """A full checkpoint; collective (every rank contributes its random state and running sums)."""
        global_step = epoch * steps_per_epoch + step_in_epoch
        partials = ctx.all_gather_object(partial)
        rngs = ctx.all_gather_object(get_rng_state())
        state = {
            "format": FORMAT, "branch": checkpointer.branch, "steps_per_epoch": steps_per_epoch, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "best_valid_loss": best_loss, "best_step": best_step,
            "history": list(tracker.history), "config": cfg.to_dict(), "dataset": dataset_meta(dataset),
            "world_size": ctx.world_size, "partial": partials, "rng": rngs, "epoch_lr": lr,
        }
        path, error = attempt(checkpointer.save, state, global_step, improved, background)
        if not background:
            ctx.agree(error)  # a stop checkpoint: nobody exits before rank 0 has written it (or failed to)
        elif error is not None:  # the previous background write failed: reported at the next step
            checkpointer.fail(error)
        return path

    best_state: dict[str, torch.Tensor] | None = None
    with contextlib.nullcontext(stop_flag) if stop_flag is not None else StopFlag() as stop_flag:
        while epoch < cfg.train.epochs:
            sampler.set_epoch(epoch)
            sampler.skip = step_in_epoch * per_rank_batch
            epoch_start = time.perf_counter()
            lr = epoch_lr if epoch_lr is not None else schedule.lr
            epoch_lr = None

            def on_step(done: int, loss: torch.Tensor, loss_sum: torch.Tensor, samples: int, e: int = epoch) -> None:
                # Collectives: these run on every rank; only rank 0's tracker writes.
                global_step = e * steps_per_epoch + done
                if global_step % cfg.train.log_every_steps == 0:
                    mean = ctx.all_reduce_sum(loss.clone()) / ctx.world_size
                    tracker.scalar("train/loss", float(mean.item()), global_step)
                # One small all-reduce: a stop signal on any rank, or a failed background checkpoint write.
                stop, write_failed = ctx.any_each([stop_flag.signum is not None, checkpointer.failed])
                if write_failed:
                    _wait_agreed(checkpointer, ctx)
                every = cfg.checkpoint.every_steps
                if stop or (every and global_step % every == 0 and done < steps_per_epoch):
                    path = save(e, done, (float(loss_sum.item()), samples), lr, background=not stop)
                    if stop:
                        raise Preempted(stop_flag.name or "a signal to another rank", str(path))

            result = train_one_epoch(
                model, data.train, optimizer, schedule, ctx, batcher, amp_dtype, cfg.train.label_smoothing,
                scaler, on_step, lambda it, e=epoch: tracker.progress(it, len(data.train), f"epoch {e + 1}/{cfg.train.epochs}"),
                start_step=step_in_epoch, start_partial=partial,
            )
            # The previous checkpoint has had a whole epoch to reach the disk. Waiting here also keeps
            # the writer thread from running while evaluation loaders fork worker processes.
            _wait_agreed(checkpointer, ctx)
            eval_start = time.perf_counter()
            valid = evaluate(model_without_ddp, data.valid, ctx, batcher, amp_dtype, num_classes)
            eval_s = time.perf_counter() - eval_start
            schedule.step_epoch(valid.loss)
            improved = valid.loss <= best_loss  # the notebook saves on "<="
            if improved:
                tracker.info(f"Validation loss decreased ({best_loss:.6f} --> {valid.loss:.6f}).  Saving model ...")
                best_loss, best_step = valid.loss, (epoch + 1) * steps_per_epoch
                if cfg.train.test_weights == "best":
                    best_state = {k: v.detach().clone() for k, v in model_without_ddp.state_dict().items()}
            record = {
                "epoch": epoch + 1, "train_loss": result.loss, "valid_loss": valid.loss, "valid_acc": valid.acc,
                "lr": lr, "img_per_s": result.img_per_s, "epoch_s": time.perf_counter() - epoch_start,
            }
            tracker.history.append(record)
            epoch, step_in_epoch, partial = epoch + 1, 0, (0.0, 0)
            save(epoch, 0, partial, schedule.lr, improved, background=True)  # written while the next epoch trains
            tracker.log_epoch(record, epoch * steps_per_epoch)
            # What an epoch costs besides its training steps and validation forward passes (set-up,
            # checkpoint, logging); validation itself is logged next to it.
            tracker.scalar("time/epoch_overhead_s", time.perf_counter() - epoch_start - result.seconds - eval_s,
                           epoch * steps_per_epoch)
            tracker.scalar("time/valid_s", eval_s, epoch * steps_per_epoch)
            if ctx.any(stop_flag.signum is not None):  # a signal during validation: stop at the boundary
                _wait_agreed(checkpointer, ctx)
                raise Preempted(stop_flag.name or "a signal to another rank", str(checkpointer.last))
        _wait_agreed(checkpointer, ctx)  # the last epoch's checkpoint is on disk before testing and returning

    test_metrics: dict[str, Any] | None = None
    if data.test is not None:
        # The best epoch may have come before a resume: its weights are then in a checkpoint file.
        if cfg.train.test_weights == "best" and best_state is None and resumed is not None and best_step >= 0:
            best_state = find_best_weights(best_step, branch, [checkpointer.folder, resumed[1].parent])
            if best_state is None:
                tracker.info(f"best weights (global step {best_step}) not found; testing the final weights")
        if best_state is not None:
            model_without_ddp.load_state_dict(best_state)
        test = evaluate(model_without_ddp, data.test, ctx, batcher, amp_dtype, num_classes)
        test_metrics = {**test.to_dict(dataset.classes), "weights": "final" if best_state is None else "best"}
        tracker.log_test(test_metrics)
    else:
        tracker.info("no test split (image_folder without test/): skipping the test evaluation")

    final = {"best_valid_loss": best_loss,
             "final_valid_acc": tracker.history[-1]["valid_acc"] if tracker.history else 0.0}
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
