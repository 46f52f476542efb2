"""Continuing a run: choose the checkpoint, prove it fits the configured run, restore it.

Nothing here writes a file. The trainer writes ``config.yaml`` and its first checkpoint only
after :func:`restore` has succeeded on every rank, so a refused resume leaves the run folder as
it was.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import CheckpointError, newest_valid, try_load
from ..config import Config, ConfigError, allowed_changes, diff_configs
from ..distributed.context import DistContext
from ..training.optim import Schedule, build_optimizer
from .meta import DatasetMeta
from .parts import PartError
from .runrecord import check_same_run

if TYPE_CHECKING:  # only for annotations: importing them here would load the models and data at import
    from ..training.learner import Learner
    from .state import TrainState

# Config keys whose change, once accepted with resume_allow, rebuilds the schedule at the resumed step.
SCHEDULE_KEYS = ("train.epochs", "train.lr", "train.scheduler", "train.lr_period", "train.lr_decay",
                 "train.plateau_patience", "train.warmup_epochs", "train.cycle_momentum", "train.batch_size",
                 "data.subset", "data.synthetic_size", "data.valid_fraction")
# Optimizer hyperparameters a resume takes from the config when their change is accepted.
HYPER_KEYS = ("train.lr", "train.momentum", "train.nesterov", "train.weight_decay")


def load_resume_checkpoint(resume: str | None, run_dir: Path, ctx: DistContext) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to continue from and its path (same on every rank), or None to start fresh.

    Rank 0 chooses (:func:`choose_checkpoint`) and broadcasts the path; every other rank then
    loads it. Loads use ``weights_only=True``: a crafted pickle is refused, never run.
    """
    if resume is None:
        return None
    found = ctx.run_agreed(choose_checkpoint, resume, run_dir, on_this_rank=ctx.is_main)
    chosen = ctx.broadcast_object(str(found[0]) if found is not None else None)
    if chosen is None:
        return None
    state = ctx.run_agreed(_read_chosen, Path(chosen), ctx.rank, on_this_rank=not ctx.is_main)
    if found is not None:
        state = found[1]
    assert state is not None
    return state, Path(chosen)


def choose_checkpoint(resume: str, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``resume=auto``: the most recently written readable step file of the run (skipping damaged ones with
    one line each), or None when there is none; else the file ``resume`` names. CheckpointError when unusable,
    or when it is another run's and ``run_dir`` already holds a run (:func:`~ddp_train.persistence.runrecord.check_same_run`)."""
    if resume == "auto":
        return newest_valid(run_dir / "checkpoints", report=lambda line: print(line, file=sys.stderr))
    if Path(resume).is_dir():
        raise CheckpointError(f"resume: {resume} is a directory, expected a checkpoint file (e.g. "
                              f"<run>/checkpoints/last.pt), or resume=auto")
    if not Path(resume).is_file():
        raise CheckpointError(f"resume: {resume} does not exist; pass an existing checkpoint or resume=auto")
    state, why = try_load(Path(resume))
    if state is None:
        raise CheckpointError(f"resume: {resume} is {why}")
    check_same_run(run_dir, Path(resume), state)  # a run folder holds one run
    return Path(resume), state


def _read_chosen(path: Path, rank: int) -> dict[str, Any]:
    state, why = try_load(path)
    if state is None:
        raise CheckpointError(f"rank {rank}: cannot read {path}: {why}")
    return state


def check_config(ckpt: dict[str, Any], path: Path, cfg: Config) -> tuple[list[str], list[str]]:
    """(accepted changes that alter the training, neutral changes); raises ConfigError for unaccepted ones.

    The error lists one ``key: old -> new`` line per refused key and says how to go on.
    """
    changing, neutral = diff_configs(ckpt["config"], cfg)
    allowed = allowed_changes(cfg)
    refused = [c for c in changing if allowed is not None and c.split(":", 1)[0] not in allowed]
    if refused:
        keys = ",".join(c.split(":", 1)[0] for c in refused)
        raise ConfigError(
            f"resume: the config differs from the checkpoint's ({path}) in keys that change the training:\n  "
            + "\n  ".join(refused)
            + f"\nresume with the checkpoint's values (drop these overrides), or accept the change with "
              f"resume_allow={keys} (see docs/checkpoints-and-resume.md: \"Changing a run's config\")")
    return changing, neutral


def check_fit(ckpt: dict[str, Any], path: Path, cfg: Config, meta: DatasetMeta, learner: Learner,
              fresh_optimizer: bool) -> None:
    """Raise CheckpointError (one line) when the checkpoint cannot be loaded into the configured run
    (whose data is ``meta``); nothing is loaded here."""
    from .weights import describe_mismatch

    model, optimizer = learner.model_without_ddp, learner.optimizer
    what = f"resume: {path} does not fit the configured run"
    saved = DatasetMeta.from_dict(ckpt["dataset"])
    why = saved.misfit(meta.classes, meta.channels) if saved else "it has no complete dataset metadata"
    if why:
        raise CheckpointError(f"{what}: {why}; resume with the data it was trained on")
    problem = describe_mismatch(model.state_dict(), ckpt["model"])
    if problem:
        model_cfg = ckpt["config"].get("model", {})
        raise CheckpointError(f"{what}: its weights ({model_cfg.get('name', '?')}, width {model_cfg.get('width', 64)}) "
                              f"do not fit {cfg.model.name} (width {cfg.model.width}): {problem}")
    if fresh_optimizer:
        return
    saved_opt, own = ckpt["optimizer"], optimizer.state_dict()
    if not isinstance(saved_opt, dict) or "param_groups" not in saved_opt or "state" not in saved_opt:
        raise CheckpointError(f"{what}: its optimizer state is not an optimizer's state_dict")
    sizes = [len(g["params"]) for g in saved_opt["param_groups"]]
    own_sizes = [len(g["params"]) for g in own["param_groups"]]
    if sizes != own_sizes:
        raise CheckpointError(f"{what}: its optimizer holds {sizes} parameters per group, the model has {own_sizes}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    own_keys = _state_keys(optimizer)
    for index, entry in saved_opt["state"].items():
        if not 0 <= int(index) < len(params):
            raise CheckpointError(f"{what}: its optimizer state names parameter {index}, the model has {len(params)}")
        if own_keys and set(entry) - own_keys - {"step"}:
            raise CheckpointError(f"{what}: its optimizer state has {sorted(entry)}, a {cfg.train.optimizer} optimizer "
                                  f"keeps {sorted(own_keys)}; was it trained with another train.optimizer?")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[int(index)].shape:
                raise CheckpointError(f"{what}: its optimizer state {key} of parameter {index} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(params[int(index)].shape)}")


def _state_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    """The per-parameter state keys this optimizer keeps (e.g. momentum_buffer, exp_avg/exp_avg_sq)."""
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer"}
    if isinstance(optimizer, torch.optim.AdamW):
        return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    return set()


def restore(ckpt: dict[str, Any], path: Path, cfg: Config, learner: Learner, meta: DatasetMeta,
            state: TrainState) -> tuple[Schedule, list[str]]:
    """Check, then load the checkpoint through the registry of its parts (``state.checkpoint_parts``):
    the learner's bare model, optimizer, schedule and scaler, and ``state`` (a fresh TrainState of this
    run's steps per epoch, which it keeps).

    Returns the schedule to use (rebuilt when an accepted change touches it; ``learner.schedule`` is
    left for the caller to replace) and the lines to log. Raises ConfigError/CheckpointError, with
    nothing loaded that matters (the caller stops).
    """
    from .state import checkpoint_parts

    steps_per_epoch = state.steps_per_epoch
    changing, neutral = check_config(ckpt, path, cfg)
    changed = {c.split(":", 1)[0] for c in changing}
    fresh_optimizer = "train.optimizer" in changed
    check_fit(ckpt, path, cfg, meta, learner, fresh_optimizer)
    saved_spe = ckpt.get("steps_per_epoch", steps_per_epoch)
    if saved_spe != steps_per_epoch and ckpt["step_in_epoch"]:
        raise CheckpointError(f"resume: the accepted changes make {steps_per_epoch} steps per epoch instead of "
                              f"{saved_spe}, which only works from an epoch-end checkpoint; {path} is at step "
                              f"{ckpt['step_in_epoch']} of epoch {ckpt['epoch'] + 1}")
    lines = []
    if neutral:
        lines.append("resume: config changes that do not alter the training: " + "; ".join(neutral))
    if changing:
        lines.append("resume: accepted config changes (resume_allow): " + "; ".join(changing))
    rebuild = bool(changed & set(SCHEDULE_KEYS + HYPER_KEYS)) or fresh_optimizer
    skip = ("optimizer",) * fresh_optimizer + ("scheduler",) * rebuild
    try:
        checkpoint_parts(state, learner, cfg, meta).load_state_dict(ckpt, skip=skip)
    except PartError as e:
        if e.key == "scheduler":
            raise CheckpointError(f"resume: {path}: its scheduler state does not load ({e}); "
                                  f"accept a schedule change with resume_allow=train.scheduler") from None
        raise CheckpointError(f"resume: {path} does not load into the configured run: {e}") from None
    state.steps_per_epoch = steps_per_epoch  # this run's: another one is accepted only at an epoch end (above)
    if fresh_optimizer:
        lines.append(f"resume: train.optimizer changed: the {cfg.train.optimizer} optimizer starts with empty state")
    if not rebuild:
        return learner.schedule, lines
    optimizer = learner.optimizer
    if changed & set(HYPER_KEYS):  # the loaded param groups hold the old values: take the config's
        fresh = build_optimizer(learner.model_without_ddp, cfg.train).param_groups
        for group, new in zip(optimizer.param_groups, fresh):
            group.update({k: v for k, v in new.items() if k != "params"})
    # The new schedule, advanced to where the resumed run stands: under one-cycle with more
    # epochs, the lr jumps to where the longer cycle is at this step.
    for group in optimizer.param_groups:  # a new scheduler takes its base lr from the group, not the old one's
        group.pop("initial_lr", None)
        group["lr"] = cfg.train.lr
    schedule = Schedule(optimizer, cfg.train, steps_per_epoch)
    schedule.advance(state.global_step, state.epoch)
    lines.append(f"resume: schedule rebuilt for the new config at global step {state.global_step} (lr {schedule.lr:.5g})")
    return schedule, lines
