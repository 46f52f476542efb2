"""Where a training run stands, and the checkpoint's parts put together in one place.

:class:`TrainState` is what a resume needs besides the model, optimizer, schedule and loss
scaler: position, best epoch, history, the interrupted epoch's running sums and every rank's
random state. :func:`checkpoint_parts` registers it with those four objects and what eval/predict
need (config, dataset metadata) in the one registry (:class:`~ddp_train.persistence.parts.CheckpointParts`)
whose keys are the on-disk format (:data:`~ddp_train.persistence.checkpoint.KEYS`).
:class:`RunCheckpoints` writes them during a run, all ranks together; ``resume.restore`` hands
them back through the same registry.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import FORMAT, REQUIRED, Checkpointer, CheckpointError, check_format
from ..config import Config
from ..distributed.context import DistContext
from ..errors import UserError
from ..training.learner import Learner
from .meta import DatasetMeta
from .parts import CheckpointParts, Recorded, Scaler
from ..seeding import get_rng_state, set_rng_state
from ..resilience.status import current as current_status


@dataclass
class TrainState:
    """The run's position and memory, the same on every rank (``partial`` and ``rng`` list every rank's)."""

    steps_per_epoch: int
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    best_valid_loss: float = math.inf
    best_step: int = -1  # global step at the end of the best epoch; -1 before the first
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch (metrics.json)
    epoch_lr: float | None = None  # the lr the current epoch started with (its record reports that one)
    branch: int = 0  # the checkpoint line this run writes (see checkpoint.branch_for_resume)
    world_size: int = 1  # of the run that gathered partial and rng
    partial: list[tuple[float, int]] = field(default_factory=list)  # per rank: (loss sum, samples) of the epoch so far
    rng: list[dict[str, Any]] = field(default_factory=list)  # per rank: seeding.get_rng_state()
    # Every global step's sample ids folded in (fold_digest); None: resumed from a checkpoint written without one.
    sample_digest: str | None = ""
    # The run the checkpoints belong to (runrecord: run.json), set once the run's start is accepted;
    # None in a checkpoint written before run ids.
    run_id: str | None = None

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def fold_samples(self, ids: np.ndarray) -> None:
        """Fold one global step's sample ids (the global batch's dataset indices, in global order) into
        :attr:`sample_digest`; an unknown digest (None) stays unknown."""
        if self.sample_digest is not None:
            self.sample_digest = fold_digest(self.sample_digest, ids)

    def gather(self, ctx: DistContext, partial: tuple[float, int]) -> None:
        """Collect every rank's running sums (this rank's: ``partial``) and random state, for a checkpoint.

        Collective: every rank calls it at the same step.
        """
        self.world_size = ctx.world_size
        self.partial = ctx.all_gather_object(partial)
        self.rng = ctx.all_gather_object(get_rng_state())

    def resume_rank(self, ctx: DistContext) -> tuple[float, int]:
        """Put this rank back where the checkpoint left it; returns its running sums for the current epoch.

        At the same world size each rank gets its own random state and sums back, so the run
        continues bit for bit. At another world size the random states stay as seeded per rank,
        and rank 0 carries all the sums (the epoch's mean loss stays exact).
        """
        if self.world_size == ctx.world_size:
            set_rng_state(self.rng[ctx.rank])
            loss_sum, samples = self.partial[ctx.rank]
            return loss_sum, samples
        if ctx.is_main:
            return sum(p[0] for p in self.partial), sum(p[1] for p in self.partial)
        return 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        """This state's checkpoint entries (top-level keys of the checkpoint: a flat part of the registry)."""
        return {
            "format": FORMAT, "branch": self.branch, "steps_per_epoch": self.steps_per_epoch, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_valid_loss": self.best_valid_loss, "best_step": self.best_step, "history": list(self.history),
            "world_size": self.world_size, "partial": self.partial, "rng": self.rng, "epoch_lr": self.epoch_lr,
            "sample_digest": self.sample_digest, "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the entries of :meth:`state_dict` (or of a whole checkpoint); CheckpointError when it is not
        a state this version can continue from (another format version, missing keys)."""
        own = self.state_dict()
        why = check_format(state, tuple(k for k in REQUIRED if k in own))
        if why:
            raise CheckpointError(f"training state: {why}")
        self.steps_per_epoch = int(state.get("steps_per_epoch", self.steps_per_epoch))  # both optional (REQUIRED)
        self.branch = int(state.get("branch", 0))
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.best_valid_loss, self.best_step = state["best_valid_loss"], state["best_step"]
        self.history = list(state["history"])
        self.epoch_lr = state["epoch_lr"]
        self.world_size = state["world_size"]
        self.partial = [tuple(p) for p in state["partial"]]  # type: ignore[misc]
        self.rng = list(state["rng"])
        self.sample_digest = state.get("sample_digest")  # None from checkpoints written before the digest
        self.run_id = state.get("run_id")  # None before run ids; the trainer sets this run's (runrecord)


def fold_digest(digest: str, ids: np.ndarray) -> str:
    """The running sample digest after one more global step: the first 16 hex digits of
    sha256(previous digest, the step's ids as little-endian int64). Equal digests mean the same samples
    in the same steps, in the same order; the first step folds into the empty digest ``""``."""
    h = hashlib.sha256(digest.encode("ascii"))
    h.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def checkpoint_parts(state: TrainState, learner: Learner, cfg: Config, meta: DatasetMeta) -> CheckpointParts:
    """The registry of everything a checkpoint holds, for saving (``state_dict``) and for a resume
    (``load_state_dict``): the state (flat), the bare model's weights, optimizer, schedule and scaler
    states, and the config and dataset metadata. Tensors and plain types only (``weights_only`` loads it)."""
    parts = CheckpointParts()
    parts.register(None, state)
    parts.register("model", learner.model_without_ddp)
    parts.register("optimizer", learner.optimizer)
    parts.register("scheduler", learner.schedule)
    parts.register("scaler", Scaler(learner.scaler))
    parts.register("config", Recorded(cfg.to_dict()))
    parts.register("dataset", Recorded(meta.to_dict()))
    # The recipe's extras (training/ema.py, clipping.py, stopping.py); None in the file while off.
    parts.register("ema", learner.ema or Recorded(None))
    parts.register("grad_norm", learner.grad_clip or Recorded(None))
    parts.register("early_stop", learner.early_stop or Recorded(None))
    return parts


@dataclass
class RunCheckpoints:
    """The run's checkpoints, written by rank 0. Collective: every rank calls :meth:`save` and :meth:`wait`."""

    ctx: DistContext
    checkpointer: Checkpointer
    cfg: Config
    meta: DatasetMeta
    learner: Learner

    @property
    def failed(self) -> bool:
        """A background write has failed (this rank's view; the trainer's StepHook agrees on it)."""
        return self.checkpointer.failed

    def save(self, state: TrainState, partial: tuple[float, int], improved: bool = False,
             background: bool = False) -> Path | None:
        """A full checkpoint of where the run stands; ``partial``: this rank's running sums of the epoch.

        In line (a stop checkpoint), nobody returns before rank 0 has written it (or all raise its
        error). In the background, a failure of the previous write is kept for the next step.
        """
        state.gather(self.ctx, partial)
        contents = checkpoint_parts(state, self.learner, self.cfg, self.meta).state_dict()
        current_status().checkpoint(state.global_step, self.checkpointer.last)  # progress, for launch scripts
        if not background:
            return self.ctx.run_agreed(self.checkpointer.save, contents, state.global_step, improved)
        try:
            return self.checkpointer.save(contents, state.global_step, improved, background=True)
        except UserError as e:  # the previous background write failed: reported at the next step
            self.checkpointer.fail(e)
            return None

    def wait(self) -> None:
        """Wait for rank 0's background write; if it failed, every rank stops with its one line."""
        self.ctx.run_agreed(self.checkpointer.wait)
