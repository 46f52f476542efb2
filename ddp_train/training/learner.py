"""The model being trained and what steps it: built for this run's ranks, device and precision.

:func:`build_training_model` makes the model identical on every rank (optionally from
``model.init_from``), then converts it for SyncBN, moves it to the device in the run's dtype and
layout, and wraps it (DDP, DataParallel, ``torch.compile``); :func:`build_learner` adds the
optimizer, the learning-rate schedule and the loss scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import Config
from ..data import Dataset
from ..distributed.context import DistContext
from .clipping import GradClip
from .ema import ModelEma, Weights, evaluated_weights_of
from .engine import Batcher, StepOptions, autocast_dtype, grad_scaler, param_dtype
from ..models import build_model
from .optim import Schedule, build_optimizer
from .stopping import EarlyStopping
from ..seeding import rank_seed, seed_all
from ..resilience.steptime import instrument_ddp
from ..distributed.syncbn import convert_sync_batchnorm


@dataclass
class Learner:
    """The model being trained and what steps it: with the state, the contents of a checkpoint."""

    model: nn.Module  # what the loop calls: DDP-, DataParallel- or compile-wrapped
    model_without_ddp: nn.Module  # the bare module: checkpoints and evaluation
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    batcher: Batcher
    # The recipe's extras, each a checkpoint part (None: off): train.ema_decay, train.clip_grad_norm,
    # train.early_stop_patience.
    ema: ModelEma | None = None
    grad_clip: GradClip | None = None
    early_stop: EarlyStopping | None = None

    def step_options(self, cfg: Config) -> StepOptions:
        """How :func:`~ddp_train.training.engine.train_step` runs for this learner under ``cfg.train``."""
        return StepOptions(self.amp_dtype, cfg.train.label_smoothing, self.scaler, cfg.train.micro_batch_size,
                           self.grad_clip)

    @property
    def evaluates_ema(self) -> bool:
        """Validation, "best" selection, the test and model.pth use the EMA weights (train.eval_weights: ema)."""
        return self.ema is not None and self.ema.evaluated

    def evaluated_model(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The bare model holding the evaluated weights for the duration (the trained ones put back after)."""
        return self.ema.applied() if self.ema is not None and self.evaluates_ema else contextlib.nullcontext(
            self.model_without_ddp)

    def evaluated_weights(self) -> Weights:
        """A private copy of the evaluated weights (the EMA copy or the trained ones), e.g. the best epoch's."""
        return evaluated_weights_of(self.model_without_ddp, self.ema)


def build_learner(cfg: Config, ctx: DistContext, dataset: Dataset, steps_per_epoch: int,
                  init_from: str | None) -> Learner:
    """The model (identical on every rank), its optimizer, schedule and loss scaler; then per-rank seeds."""
    amp_dtype = ctx.run_agreed(autocast_dtype, cfg.train.precision, ctx.device)  # fp16 on CPU is refused
    model, model_without_ddp = build_training_model(cfg, dataset, ctx, init_from)
    seed_all(rank_seed(cfg.train.seed, ctx.rank))  # from here on, randomness differs per rank
    optimizer = build_optimizer(model, cfg.train)
    t = cfg.train
    ema = (ModelEma(model_without_ddp, t.ema_decay, t.ema_every_steps, t.ema_warmup, t.eval_weights == "ema")
           if t.ema_decay > 0 else None)
    return Learner(model, model_without_ddp, optimizer, Schedule(optimizer, cfg.train, steps_per_epoch),
                   grad_scaler(ctx.device, amp_dtype), amp_dtype, Batcher(ctx.device, cfg.model.channels_last),
                   ema, GradClip(t.clip_grad_norm) if t.clip_grad_norm is not None else None,
                   EarlyStopping(t.early_stop_patience, t.early_stop_min_delta, t.early_stop_metric)
                   if t.early_stop_patience > 0 else None)


def build_training_model(cfg: Config, dataset: Dataset, ctx: DistContext,
                         init_from: str | None = None) -> tuple[nn.Module, nn.Module]:
    """(model to train, the same model without DDP/DataParallel wrapping), started from ``init_from`` if given."""
    seed_all(cfg.train.seed)  # identical initialisation on every rank
    model = build_model(cfg.model.name, len(dataset.classes), dataset.channels, cfg.model.zero_init_residual,
                        cfg.model.width)
    if init_from:  # fine-tuning: every rank loads the same file, before SyncBN and DDP
        from ..persistence.weights import apply_init_from

        apply_init_from(model, init_from, ctx,
                        f"{cfg.model.name} with {dataset.channels} channels and {len(dataset.classes)} classes")
    if cfg.model.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device, ctx.local_group)
    # fp64: parameters and buffers (SyncBN's too) in float64, before DDP sees them.
    model = model.to(ctx.device, param_dtype(cfg.train.precision))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    bucket_cap_mb=cfg.dist.bucket_cap_mb, gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
                    # Accumulation's no_sync fails under static_graph (torch issue 143580): off then.
                    static_graph=cfg.dist.static_graph and cfg.train.micro_batch_size is None)
        if cfg.dist.straggler_every_steps and not cfg.train.compile:  # hooks would break compile's graphs
            instrument_ddp(model)
    elif ctx.data_parallel:
        model = nn.DataParallel(model)
    if cfg.train.compile:
        # Compiling the DDP wrapper (not the bare module) lets dynamo split the graph at bucket
        # boundaries so gradient all-reduces still overlap the backward pass. Checkpoints keep
        # using model_without_ddp, whose keys carry no _orig_mod. prefix.
        model = torch.compile(model)  # type: ignore[assignment]
    return model, model_without_ddp
