"""The checkpoint writer: background writes are private snapshots, in order, and their errors surface."""

from __future__ import annotations

import os

import pytest
import torch

from ddp_train.persistence.checkpoint import CheckpointWriteError, Checkpointer, load_checkpoint


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4_000_000,), value)}, "optimizer": {"state": {0: {"m": torch.zeros(3)}}},
            "history": [{"epoch": 1}], "partial": [(0.5, 3)]}


def test_background_save_writes_a_snapshot_not_the_live_tensors(tmp_path):
    ck = Checkpointer(tmp_path, enabled=True, keep=2)
    state = _state(1.0)
    path = ck.save(state, 5, improved=True, background=True)
    state["model"]["w"].fill_(7.0)  # training goes on and changes the weights in place
    state["optimizer"]["state"][0]["m"].add_(1)
    ck.wait()
    saved = load_checkpoint(path)
    assert torch.equal(saved["model"]["w"], torch.full((4_000_000,), 1.0))
    assert torch.equal(saved["optimizer"]["state"][0]["m"], torch.zeros(3))
    assert saved["partial"] == [(0.5, 3)]
    assert os.path.samefile(ck.last, path) and os.path.samefile(ck.best, path)
    assert torch.equal(load_checkpoint(ck.weights)["w"], torch.full((4_000_000,), 1.0))


def test_background_saves_stay_in_order_and_prune(tmp_path):
    ck = Checkpointer(tmp_path, enabled=True, keep=2)
    for step in range(1, 5):
        ck.save(_state(float(step)), step, background=True)
    ck.wait()
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000003.pt", "step-00000004.pt"]
    assert torch.equal(load_checkpoint(ck.last)["model"]["w"], torch.full((4_000_000,), 4.0))


def test_a_failed_background_write_is_raised_by_the_next_wait(tmp_path):
    ck = Checkpointer(tmp_path / "missing", enabled=True)  # the folder does not exist: the write fails
    ck.save(_state(1.0), 1, background=True)
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*step-00000001.pt: No such file or directory"):
        ck.wait()
    assert not ck.failed
    ck.wait()  # reported once
