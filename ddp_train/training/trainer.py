"""The training run, on every rank: set up, loop over epochs, test.

:func:`train` tells it in order: :func:`set_up` (data, model, optimizer, schedule, and the state
a resume continues from), :func:`train_epochs` (train, validate and checkpoint each epoch, with
a :class:`StepHook` after every optimizer step), then :func:`finish` (test, hyperparameters).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..persistence.checkpoint import Checkpointer, branch_for_resume, find_weights_at, step_file
from ..config import Config, DistConfig, dump_yaml, flat_keys
from ..data import DataBundle, Dataset, build_data, load_dataset_agreed
from ..distributed.context import DistContext
from .engine import EpochStart, TrainResult, evaluate, precision_name, train_one_epoch
from .learner import Learner, build_learner
from ..resilience.preflight import check_agreement
from ..persistence.resume import load_resume_checkpoint, restore
from ..persistence.rundir import prepare_run_dir, release_run_dir, write_run_config
from ..seeding import set_determinism
from ..resilience.signals import Preempted, StopFlag, until_stopped
from ..persistence.meta import DatasetMeta
from ..persistence.state import RunCheckpoints, TrainState
from ..resilience.steptime import CLOCK
from ..resilience.stragglers import StragglerReport
from ..tracking import NullTracker, Tracker
from ..trackers import open_sinks
from ..config import tracker_names
from ..profiling import Measures
from ..resilience.watchdog import Watchdog

Weights = dict[str, torch.Tensor]


@dataclass
class Run:
    """What :func:`set_up` makes: what the epoch loop and the finish work on."""

    run_dir: Path
    dataset: Dataset
    data: DataBundle
    learner: Learner
    state: TrainState
    checkpoints: RunCheckpoints
    tracker: NullTracker  # rank 0's Tracker; a no-op elsewhere
    partial: tuple[float, int]  # this rank's running sums of an interrupted epoch; (0.0, 0) otherwise
    resumed_from: Path | None
    measures: Measures  # the profiler window, FLOPs per image, the peak for MFU (ddp_train/profiling.py)


def train(cfg: Config, ctx: DistContext, stop_flag: StopFlag | None = None) -> dict[str, Any]:
    """Train, validate every epoch, checkpoint, then test the best weights. Returns metrics.json's content.

    Raises :class:`Preempted` on every rank after a stop signal, once the checkpoint is written.
    The run folder's lock is held from before the first write until this returns or raises.
    """
    if stop_flag is None:  # the CLI passes one, installed before its slow set-up
        with StopFlag() as own:
            return train(cfg, ctx, own)
    set_determinism(cfg.train.deterministic)
    CLOCK.reset(armed=not cfg.train.compile)  # with compile, the watchdog's clock starts after the first step
    resume = cfg.resume or ("auto" if ctx.restart_count > 0 else None)  # a restarted job continues
    run_dir, lock, resume = prepare_run_dir(cfg, ctx, resume)
    run: Run | None = None
    try:
        run = set_up(cfg, ctx, run_dir, resume)
        stragglers = StragglerReport(ctx, cfg.dist.straggler_every_steps, cfg.dist.straggler_factor, run.tracker)
        with watch_for_hangs(cfg.dist, ctx, run_dir):
            best_weights = train_epochs(cfg, ctx, run, stop_flag, stragglers)
            return finish(cfg, ctx, run, best_weights, stop_flag)
    finally:
        if run is not None:
            run.measures.close()  # a profiler window left open by a stop or an error
            run.tracker.end()  # a stop or an error: the points logged so far reach the event file
        release_run_dir(lock, run_dir)


def watch_for_hangs(cfg: DistConfig, ctx: DistContext, run_dir: Path) -> contextlib.AbstractContextManager:
    """The hang watchdog over the training loop and the test (off with ``dist.hang_timeout_s: 0``, or when
    the ranks share no store: processes started by hand, as in the tests' ``spawn``)."""
    if not cfg.hang_timeout_s or (ctx.distributed and ctx.store_addr is None):
        return contextlib.nullcontext()
    # One process watches itself: it has nobody to heartbeat to (and under torchrun with
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, nobody hosts a store at MASTER_ADDR for a group of one).
    return Watchdog(ctx.rank, ctx.world_size, cfg.hang_timeout_s, run_dir,
                    ctx.store_addr if ctx.distributed else None, f"attempt{ctx.restart_count}")


# --------------------------------------------------------------------------- set-up


def set_up(cfg: Config, ctx: DistContext, run_dir: Path, resume: str | None) -> Run:
    """Data, model, optimizer, schedule and state (from the checkpoint when resuming); then config.yaml and the tracker.

    Everything that can be wrong with the input is found here, on every rank together, before
    the first write.
    """
    dataset = load_dataset_agreed(cfg.data, ctx)
    check_agreement(cfg, ctx, dataset)  # same code, config and data on every rank, before any write
    data = ctx.run_agreed(build_data, dataset, cfg, ctx)
    steps_per_epoch = len(data.train)
    ckpt, resumed_from = load_resume_checkpoint(resume, run_dir, ctx) or (None, None)
    # A resumed run takes its weights from the checkpoint: model.init_from is not read again.
    learner = build_learner(cfg, ctx, dataset, steps_per_epoch, cfg.model.init_from if ckpt is None else None)
    state, partial, lines = TrainState(steps_per_epoch), (0.0, 0), []
    if ckpt is not None:
        # Checked on every rank before anything is written: a refused resume leaves config.yaml as it was.
        state, partial, lines = continue_from(ckpt, resumed_from, cfg, ctx, learner, data, run_dir)
    state.run_id = write_run_config(cfg, ctx, run_dir, None if ckpt is None else (resumed_from, ckpt))
    tracker = open_tracker(cfg, ctx, run_dir, data, learner, state, None if ckpt is None else ckpt["global_step"])
    for line in lines:
        tracker.info(line)
    checkpointer = Checkpointer(run_dir / "checkpoints", ctx.is_main, cfg.checkpoint.keep, state.branch)
    measures = Measures(cfg.track, ctx, run_dir, learner.model_without_ddp,
                        (dataset.channels, dataset.image_size, dataset.image_size),
                        learner.amp_dtype in (torch.bfloat16, torch.float16))
    return Run(run_dir, dataset, data, learner, state, RunCheckpoints(ctx, checkpointer, cfg, DatasetMeta.of(dataset), learner),
               tracker, partial, resumed_from, measures)


def continue_from(ckpt: dict[str, Any], path: Path, cfg: Config, ctx: DistContext, learner: Learner, data: DataBundle,
                  run_dir: Path) -> tuple[TrainState, tuple[float, int], list[str]]:
    """Load the checkpoint into ``learner`` (every rank agreeing that it fits) and into a new state.

    Returns the state, this rank's running sums of the interrupted epoch and the lines to log
    (accepted config changes, then where the run resumes). An accepted config change that alters
    the schedule replaces ``learner.schedule``.
    """
    state = TrainState(len(data.train))
    learner.schedule, lines = ctx.run_agreed(restore, ckpt, path, cfg, learner, DatasetMeta.of(data.dataset), state)
    partial = state.resume_rank(ctx)
    # Going back to an older checkpoint starts a branch, so the newer files are neither overwritten nor pruned.
    state.branch = ctx.broadcast_object(branch_for_resume(run_dir / "checkpoints", path, ckpt)
                                        if ctx.is_main else None)
    return state, partial, [*lines, _resumed_line(ckpt, state, ctx)]


def open_tracker(cfg: Config, ctx: DistContext, run_dir: Path, data: DataBundle, learner: Learner,
                 state: TrainState, resumed_step: int | None) -> NullTracker:
    """Rank 0's Tracker (a no-op elsewhere), continuing ``state.history``; logs the config and the run's header line."""
    # Purged from step resumed_step + 1: the points of the checkpoint's own step were logged before it was
    # written, and the resumed run does not log them again.
    purge = None if resumed_step is None else resumed_step + 1
    tracker = (Tracker(run_dir, "tensorboard" in tracker_names(cfg.track), purge,
                       open_sinks(cfg.track, run_dir, _hparams(cfg))) if ctx.is_main else NullTracker())
    tracker.history = state.history  # the same list: epochs appended by the loop are logged and checkpointed
    if ctx.data_parallel:
        tracker.info(f"{torch.cuda.device_count()} GPUs visible without torchrun: using nn.DataParallel. "
                     f"torchrun --nproc_per_node={torch.cuda.device_count()} -m ddp_train is faster.")
    tracker.log_config(dump_yaml(cfg))
    dataset = data.dataset
    tracker.info(
        f"run {run_dir} | {ctx.launcher} x{ctx.world_size} on {ctx.device} | {dataset.name}: "
        f"{len(data.train.dataset)} train / {len(data.valid.dataset)} valid / "
        f"{len(data.test.dataset) if data.test else 0} test, {len(dataset.classes)} classes | {cfg.model.name} | "
        f"{precision_name(learner.amp_dtype)}{' + compile' if cfg.train.compile else ''} | "
        f"{'device-resident data' if data.device_resident else f'{cfg.data.num_workers} loader workers'} "
        f"({data.input_path}) | "
        f"global batch {cfg.train.batch_size}"
    )
    return tracker


def _resumed_line(ckpt: dict[str, Any], state: TrainState, ctx: DistContext) -> str:
    return (f"resumed from epoch {state.epoch + 1} step {state.step_in_epoch} (global step {ckpt['global_step']})"
            + (f", world size {ckpt['world_size']} -> {ctx.world_size}" if ckpt["world_size"] != ctx.world_size else "")
            + (f"; writing branch b{state.branch} (step-<n>-b{state.branch}.pt)"
               if state.branch != ckpt.get("branch", 0) else ""))


# --------------------------------------------------------------------------- the epoch loop


@dataclass
class StepHook:
    """Runs on every rank after each optimizer step: the logged loss, the stop check, the mid-epoch checkpoint.

    Its collectives run on every rank at the same steps; only rank 0's tracker writes.
    """

    cfg: Config
    ctx: DistContext
    state: TrainState
    checkpoints: RunCheckpoints
    tracker: NullTracker
    stop_flag: StopFlag
    stragglers: StragglerReport
    batch_ids: Callable[[int], np.ndarray]  # the sample ids of the epoch's global step k (DataBundle.global_batch_ids)
    measures: Measures | None = None  # its profiler window is told of every step

    def __call__(self, done: int, loss: torch.Tensor, loss_sum: torch.Tensor, samples: int) -> None:
        """``done`` steps of the epoch so far; ``loss_sum``/``samples``: this rank's running sums."""
        self.state.step_in_epoch = done
        self.state.fold_samples(self.batch_ids(done - 1))
        CLOCK.step_done(self.state.global_step)
        with CLOCK.phase_of("sync"):
            self._after_step(loss, loss_sum, samples)
        if self.measures is not None and self.measures.window is not None:  # the step's span ends after its sync
            self.measures.window.at(self.state.global_step)

    def _after_step(self, loss: torch.Tensor, loss_sum: torch.Tensor, samples: int) -> None:
        state, ctx = self.state, self.ctx
        done, global_step = state.step_in_epoch, state.global_step
        self.stragglers(global_step)
        if global_step % self.cfg.train.log_every_steps == 0:
            mean = ctx.all_reduce_sum(loss.clone()) / ctx.world_size
            self.tracker.scalar("train/loss", float(mean.item()), global_step)
            clip = self.checkpoints.learner.grad_clip  # the learner the checkpoints hold is the one training
            if clip is not None and clip.last is not None:  # the same on every rank: no all-reduce
                self.tracker.scalar("train/grad_norm", float(clip.last.item()), global_step)
        # One small all-reduce: a stop signal on any rank, or a failed write (background checkpoint, metrics.json,
        # TensorBoard) on rank 0.
        stop, write_failed = ctx.any_each([self.stop_flag.signum is not None,
                                           self.checkpoints.failed or self.tracker.failed])
        if write_failed:
            self.checkpoints.wait()  # raises rank 0's error on every rank
            ctx.run_agreed(self.tracker.check)  # or the tracker's
        every = self.cfg.checkpoint.every_steps
        if stop or (every and global_step % every == 0 and done < state.steps_per_epoch):
            path = self.checkpoints.save(state, (float(loss_sum.item()), samples), background=not stop)
            if stop:
                raise Preempted(self.stop_flag.name or "a signal to another rank", str(path))


def train_epochs(cfg: Config, ctx: DistContext, run: Run, stop_flag: StopFlag,
                 stragglers: StragglerReport) -> Weights | None:
    """Train, validate and checkpoint each epoch, from where ``run.state`` stands, to ``train.epochs``.

    Returns the best epoch's weights when ``train.test_weights`` is best and that epoch ran here
    (not before a resume). Raises :class:`Preempted` after a stop signal, its checkpoint written.
    """
    state, learner, tracker = run.state, run.learner, run.tracker
    partial, best_weights = run.partial, None
    early = learner.early_stop
    if run.measures.window is not None:  # a window from the first step starts now
        run.measures.window.at(state.global_step)
    while state.epoch < cfg.train.epochs and not (early is not None and early.stop):  # a resumed early stop stays
        epoch_start = time.perf_counter()
        if state.step_in_epoch == 0:  # an interrupted epoch keeps the lr it started with
            state.epoch_lr = learner.schedule.lr
        batch_ids = functools.partial(run.data.global_batch_ids, batch_size=cfg.train.batch_size)
        result = train_epoch(cfg, ctx, run, StepHook(cfg, ctx, state, run.checkpoints, tracker, stop_flag, stragglers,
                                                     batch_ids, run.measures), partial)
        # The previous checkpoint has had a whole epoch to reach the disk. Waiting here also keeps
        # the writer thread from running while evaluation loaders fork worker processes.
        run.checkpoints.wait()
        eval_start = time.perf_counter()
        with learner.evaluated_model() as evaluated:  # the EMA weights with train.eval_weights: ema
            valid = evaluate(evaluated, run.data.valid, ctx, learner.batcher, learner.amp_dtype,
                             len(run.dataset.classes))
        eval_s = time.perf_counter() - eval_start
        learner.schedule.step_epoch(valid.loss)
        improved = valid.loss <= state.best_valid_loss  # the seed recipe saves on "<=", not "<"
        if improved:
            tracker.info(f"Validation loss decreased ({state.best_valid_loss:.6f} --> {valid.loss:.6f}).  "
                         f"Saving model ...")
            state.best_valid_loss, state.best_step = valid.loss, (state.epoch + 1) * state.steps_per_epoch
            if cfg.train.test_weights == "best":
                best_weights = learner.evaluated_weights()
        record = {
            "epoch": state.epoch + 1, "train_loss": result.loss, "valid_loss": valid.loss, "valid_acc": valid.acc,
            "lr": state.epoch_lr, "img_per_s": result.img_per_s, "epoch_s": time.perf_counter() - epoch_start,
            "sample_digest": state.sample_digest,
        }
        record.update(recipe_record(learner, valid.loss, valid.acc, state.epoch + 1))
        state.history.append(record)
        state.epoch, state.step_in_epoch, state.epoch_lr, partial = state.epoch + 1, 0, learner.schedule.lr, (0.0, 0)
        saved = run.checkpoints.save(state, partial, improved, background=True)  # written while the next epoch trains
        tracker.log_epoch(record, state.global_step, run.measures.figures(ctx, result.img_per_s))
        # What an epoch costs besides its training steps and validation forward passes (set-up,
        # checkpoint, logging); validation itself is logged next to it.
        tracker.scalar("time/epoch_overhead_s", time.perf_counter() - epoch_start - result.seconds - eval_s,
                       state.global_step)
        tracker.scalar("time/valid_s", eval_s, state.global_step)
        # One all-reduce for both: a signal during validation, and the early stop (the same metric on every
        # rank; agreed all the same, so no rank can leave the others waiting).
        signalled, stop_early = ctx.any_each([stop_flag.signum is not None, early is not None and early.stop])
        if signalled:  # stop after validation, at the epoch's end
            run.checkpoints.wait()
            raise Preempted(stop_flag.name or "a signal to another rank", str(saved or run.checkpoints.checkpointer.last))
        if stop_early:
            tracker.info(f"{record.get('stopped') or 'early stop: another rank stopped'}; testing")
            break
    run.checkpoints.wait()  # the last epoch's checkpoint is on disk before testing and returning
    return best_weights


def recipe_record(learner: Learner, valid_loss: float, valid_acc: float, epoch: int) -> dict[str, Any]:
    """The epoch record's entries of the recipe's extras: ``grad_norm`` (the epoch's mean norm before clipping)
    and ``stopped`` (why the run stops after this epoch); counts the epoch for early stopping."""
    entries: dict[str, Any] = {}
    if learner.grad_clip is not None:
        entries["grad_norm"] = learner.grad_clip.take_epoch()
    early = learner.early_stop
    if early is not None and early.update(valid_loss if early.metric == "valid_loss" else valid_acc, epoch):
        entries["stopped"] = early.reason
    return entries


def train_epoch(cfg: Config, ctx: DistContext, run: Run, on_step: StepHook, partial: tuple[float, int]) -> TrainResult:
    """The training steps of epoch ``run.state.epoch``, from ``run.state.step_in_epoch`` (a resumed epoch)
    with this rank's running sums ``partial``."""
    state, learner, loader = run.state, run.learner, run.data.train
    run.data.sampler.set_epoch(state.epoch)
    run.data.sampler.skip = state.step_in_epoch * cfg.train.per_rank_batch(ctx.world_size)
    progress = functools.partial(run.tracker.progress, total=len(loader),
                                 desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}")
    return train_one_epoch(learner, loader, ctx, learner.step_options(cfg), on_step, progress,
                           EpochStart(state.step_in_epoch, partial))


# --------------------------------------------------------------------------- finish


def finish(cfg: Config, ctx: DistContext, run: Run, best_weights: Weights | None,
           stop_flag: StopFlag) -> dict[str, Any]:
    """Test, log the hyperparameters with the final metrics, close the tracker; returns metrics.json's content."""
    state, tracker = run.state, run.tracker
    test_metrics: dict[str, Any] | None = None
    if run.data.test is not None:
        test_metrics = run_test(cfg, ctx, run, best_weights, stop_flag)
    else:
        tracker.info("no test split (image_folder without test/): skipping the test evaluation")
    final = {"best_valid_loss": state.best_valid_loss,
             "final_valid_acc": state.history[-1]["valid_acc"] if state.history else 0.0}
    if test_metrics is not None:
        final.update({"test_loss": test_metrics["loss"], "test_acc": test_metrics["acc"]})
    tracker.log_hparams(_hparams(cfg), {f"hparam/{k}": float(v) for k, v in final.items()})
    ctx.run_agreed(tracker.close)  # a failed write of rank 0's tracker ends every rank with its line
    return {"history": state.history, "test": test_metrics, "run_dir": str(run.run_dir)}


def run_test(cfg: Config, ctx: DistContext, run: Run, best_weights: Weights | None,
             stop_flag: StopFlag) -> dict[str, Any]:
    """Evaluate the test split with the best weights (``train.test_weights: best``, when found) or the final ones.

    A stop signal ends the evaluation at the signalled rank's next batch, and the run with
    :class:`Preempted`: the training's last checkpoint is already on disk, and ``resume=auto`` tests again.
    """
    state, learner = run.state, run.learner
    # The best epoch may have come before a resume: its weights are then in a checkpoint file.
    best_seen_before = cfg.train.test_weights == "best" and best_weights is None and state.best_step >= 0
    if best_seen_before and run.resumed_from is not None:
        folders = [run.checkpoints.checkpointer.folder, run.resumed_from.parent]
        best_weights = find_weights_at(state.best_step, state.branch, folders)
        if best_weights is None:
            run.tracker.info(f"best weights (global step {state.best_step}) not found; testing the final weights")
    if best_weights is not None:
        learner.model_without_ddp.load_state_dict(best_weights)
    elif learner.ema is not None and learner.evaluates_ema:  # the final EMA weights (the training is over)
        learner.model_without_ddp.load_state_dict(learner.ema.weights)
    assert run.data.test is not None
    result = evaluate(learner.model_without_ddp, until_stopped(run.data.test, stop_flag), ctx, learner.batcher,
                      learner.amp_dtype, len(run.dataset.classes))
    if ctx.any(stop_flag.signum is not None):  # the metrics of a partial pass are not kept
        # The training's last checkpoint: its step file when this run wrote it (last.pt links to it either way).
        last = step_file(run.checkpoints.checkpointer.folder, state.global_step, state.branch)
        raise Preempted(stop_flag.name or "a signal to another rank",
                        str(last if last.exists() else run.checkpoints.checkpointer.last),
                        "the training is complete; the test runs again")
    which = ("final" if best_weights is None else "best") + (" EMA" if learner.evaluates_ema else "")
    metrics = {**result.to_dict(run.dataset.classes), "weights": which}
    run.tracker.log_test(metrics)
    return metrics


def _hparams(cfg: Config) -> dict[str, Any]:
    """The section keys (``train.lr``, ...) with scalar values, for TensorBoard's hparams."""
    return {key: value for key, value in flat_keys(cfg.to_dict()).items()
            if "." in key and isinstance(value, (int, float, str, bool))}
