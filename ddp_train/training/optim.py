"""Optimizer and learning-rate schedule from the train config."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (the seed recipe's optimizer), or AdamW with beta1 = ``train.momentum``."""
    # On CUDA the fused kernels update all parameters in a few launches instead of several per
    # tensor (the step of a 62-tensor ResNet-18 is otherwise launch-bound at high img/s).
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay,
                             **fused)


class Schedule:
    """One interface over per-step (cosine, onecycle) and per-epoch (step, plateau) schedules."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.kind = cfg.scheduler
        self.optimizer = optimizer
        total = cfg.epochs * steps_per_epoch
        self.sched: Any = None
        if self.kind == "step":
            self.sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_period, gamma=cfg.lr_decay)
        elif self.kind == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                                    patience=cfg.plateau_patience)
        elif self.kind == "cosine":
            warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

            self.sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif self.kind == "onecycle":
            # torch cycles momentum by default (0.95 -> 0.85 -> 0.95, overwriting train.momentum every
            # step); here only when asked, from train.momentum down by train.cycle_momentum and back.
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.lr, total_steps=total, cycle_momentum=cfg.cycle_momentum > 0,
                base_momentum=cfg.momentum - cfg.cycle_momentum, max_momentum=cfg.momentum)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step_batch(self) -> None:
        """After every optimizer step."""
        if self.kind in ("cosine", "onecycle"):
            self.sched.step()

    def step_epoch(self, valid_loss: float) -> None:
        """After every epoch's validation."""
        if self.kind == "step":
            self.sched.step()
        elif self.kind == "plateau":
            self.sched.step(valid_loss)

    def advance(self, global_step: int, epoch: int) -> None:
        """Move a new schedule to where a run ``global_step`` steps (``epoch`` epochs) in stands.

        Used when a resume accepts a schedule change: the old schedule's state describes another
        schedule. Per-step schedules are stepped (at most to their end); ``step`` is stepped once
        per epoch; ``plateau`` starts its patience afresh.
        """
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            if self.kind in ("cosine", "onecycle"):
                total = getattr(self.sched, "total_steps", None)
                for _ in range(min(global_step, total - 1) if total else global_step):
                    self.sched.step()
            elif self.kind == "step":
                for _ in range(epoch):
                    self.sched.step()

    def state_dict(self) -> dict[str, Any]:
        return self.sched.state_dict() if self.sched is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sched is not None:
            self.sched.load_state_dict(state)
