"""The training state and the checkpoint's contents, restored without processes: built, saved, read back,
restored into fresh objects, compared; the on-disk keys are the checkpoint format's."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ddp_train.persistence.checkpoint import FORMAT, CheckpointError, try_load
from ddp_train.files import atomic_save
from ddp_train.config import load_config
from ddp_train.data import load_dataset
from ddp_train.distributed.context import DistContext
from ddp_train.training.engine import Batcher, StepOptions, grad_scaler, train_step
from ddp_train.training.learner import Learner
from ddp_train.models import build_model
from ddp_train.training.optim import Schedule, build_optimizer
from ddp_train.persistence.resume import restore
from ddp_train.seeding import seed_all
from ddp_train.persistence.meta import DatasetMeta
from ddp_train.persistence.state import TrainState, checkpoint_parts

from .helpers import TINY

# The keys of a checkpoint on disk: eval, predict, fine-tuning and resume read them by name.
CHECKPOINT_KEYS = {"format", "branch", "steps_per_epoch", "epoch", "step_in_epoch", "global_step", "model",
                   "optimizer", "scheduler", "scaler", "best_valid_loss", "best_step", "history", "config", "dataset",
                   "world_size", "partial", "rng", "epoch_lr", "sample_digest", "run_id",
                   "ema", "grad_norm", "early_stop"}
CPU = DistContext("single", 0, 0, 1, torch.device("cpu"))


def _parts(cfg, seed: int, steps_per_epoch: int):
    seed_all(seed)
    model = build_model(cfg.model.name, 10, 3, width=cfg.model.width)
    optimizer = build_optimizer(model, cfg.train)
    return model, optimizer, Schedule(optimizer, cfg.train, steps_per_epoch), grad_scaler(CPU.device, None)


def _step(model, optimizer, schedule, batch) -> None:
    train_step(model, *batch, optimizer, StepOptions(None))
    schedule.step_batch()


def _draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random()


def test_a_checkpoint_restores_into_fresh_objects(tmp_path):
    cfg = load_config(None, [*TINY, "data.synthetic_size=20"])
    dataset = load_dataset(cfg.data)
    steps_per_epoch = 5
    model, optimizer, schedule, scaler = _parts(cfg, 1, steps_per_epoch)
    seed_all(7)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    for _ in range(3):  # momentum buffers and a schedule that has moved
        _step(model, optimizer, schedule, batch)
    state = TrainState(steps_per_epoch, epoch=1, step_in_epoch=3, best_valid_loss=0.75, best_step=5,
                       history=[{"epoch": 1, "train_loss": 2.0, "valid_loss": 0.75}], epoch_lr=0.002, branch=1)
    state.gather(CPU, (12.5, 96))
    expected_draws = _draws()  # what a run continues with after this checkpoint
    path = tmp_path / "step-00000008-b1.pt"
    learner = Learner(model, model, optimizer, schedule, scaler, None, Batcher(CPU.device, False))
    atomic_save(checkpoint_parts(state, learner, cfg, DatasetMeta.of(dataset)).state_dict(), path)

    loaded, why = try_load(path)
    assert why == "" and loaded is not None
    assert set(loaded) == CHECKPOINT_KEYS
    assert loaded["format"] == FORMAT and loaded["global_step"] == 8 and loaded["partial"] == [(12.5, 96)]
    assert loaded["dataset"]["classes"] == dataset.classes and loaded["config"] == cfg.to_dict()

    fresh_model, fresh_optimizer, fresh_schedule, fresh_scaler = _parts(cfg, 2, steps_per_epoch)
    fresh = Learner(fresh_model, fresh_model, fresh_optimizer, fresh_schedule, fresh_scaler, None, Batcher(CPU.device, False))
    fresh_state = TrainState(steps_per_epoch)
    fresh_schedule, lines = restore(loaded, path, cfg, fresh, DatasetMeta.of(dataset), fresh_state)
    assert lines == []
    assert fresh_state.resume_rank(CPU) == (12.5, 96)

    after = _draws()
    assert all(np.array_equal(a, b) for a, b in zip(after, expected_draws)), "random states not restored"
    for field in ("epoch", "step_in_epoch", "best_valid_loss", "best_step", "history", "epoch_lr", "branch",
                  "world_size", "partial", "global_step", "steps_per_epoch"):
        assert getattr(fresh_state, field) == getattr(state, field), field
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh_model.state_dict().items())
    assert fresh_schedule.state_dict() == schedule.state_dict()
    assert fresh_schedule.lr == schedule.lr
    # The same next step from both: optimizer state (momentum) and schedule were restored, not just weights.
    _step(model, optimizer, schedule, batch)
    _step(fresh_model, fresh_optimizer, fresh_schedule, batch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh_model.state_dict().items())


def test_state_round_trip_and_refusals():
    state = TrainState(4, epoch=2, step_in_epoch=1, best_valid_loss=0.5, best_step=8, history=[{"epoch": 1}],
                       epoch_lr=0.1, world_size=2, partial=[(1.0, 3), (2.0, 4)], rng=[{}, {}])
    again = TrainState(99)
    again.load_state_dict(state.state_dict())
    assert again == state
    # Resumed on one process: rank 0 carries both ranks' running sums; the random states are left as seeded.
    before = torch.get_rng_state()
    assert again.resume_rank(CPU) == (3.0, 7)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(CheckpointError, match="newer ddp_train"):
        TrainState(4).load_state_dict({**state.state_dict(), "format": FORMAT + 1})
    with pytest.raises(CheckpointError, match="missing best_step"):
        TrainState(4).load_state_dict({k: v for k, v in state.state_dict().items() if k != "best_step"})


def test_the_registry_fills_every_checkpoint_key_once_and_loads_each_part_back():
    """Save and restore are one walk over one registry: each key of checkpoint.KEYS is filled by one part,
    in the declared order; a missing or doubled part is refused; loading hands each part its own entry."""
    from ddp_train.persistence.checkpoint import KEYS
    from ddp_train.persistence.parts import CheckpointParts, PartError, Recorded

    cfg = load_config(None, [*TINY, "data.synthetic_size=20"])
    dataset = load_dataset(cfg.data)
    model, optimizer, schedule, scaler = _parts(cfg, 1, 5)
    learner = Learner(model, model, optimizer, schedule, scaler, None, Batcher(CPU.device, False))
    state = TrainState(5, epoch=1, step_in_epoch=2)
    state.gather(CPU, (1.0, 4))
    contents = checkpoint_parts(state, learner, cfg, DatasetMeta.of(dataset)).state_dict()
    assert tuple(contents) == tuple(KEYS)
    assert DatasetMeta.from_dict(contents["dataset"]) == DatasetMeta.of(dataset)

    partial = CheckpointParts()
    partial.register(None, state)
    with pytest.raises(ValueError, match="differently from checkpoint.KEYS"):
        partial.state_dict()  # the model, optimizer, ... are not registered
    with pytest.raises(ValueError, match="registered twice"):
        partial.register(None, state)
    with pytest.raises(ValueError, match="not a checkpoint key"):
        partial.register("no_such_key", Recorded(1))

    fresh_model, fresh_optimizer, fresh_schedule, fresh_scaler = _parts(cfg, 2, 5)
    fresh = Learner(fresh_model, fresh_model, fresh_optimizer, fresh_schedule, fresh_scaler, None,
                    Batcher(CPU.device, False))
    fresh_state = TrainState(5)
    parts = checkpoint_parts(fresh_state, fresh, cfg, DatasetMeta.of(dataset))
    parts.load_state_dict(contents)
    assert fresh_state.global_step == 7 and fresh_state.partial == [(1.0, 4)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh_model.state_dict().items())
    broken = {**contents, "model": {"conv1.weight": torch.zeros(1)}}
    with pytest.raises(PartError) as refused:
        checkpoint_parts(TrainState(5), fresh, cfg, DatasetMeta.of(dataset)).load_state_dict(broken)
    assert refused.value.key == "model"
