"""Precision and compilation: fp16's loss scaler, fp16 refused on CPU, torch.compile, testing the final weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ddp_train.config import load_config
from ddp_train.distributed.context import DistContext
from ddp_train.training.engine import Batcher, StepOptions, grad_scaler, train_one_epoch
from ddp_train.training.learner import Learner
from ddp_train.training.optim import Schedule

from .helpers import TINY, assert_ok, rel_diff, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'


def test_fp16_on_cpu_is_refused_with_one_line_on_every_rank(tmp_path):
    res = run_cli([*TINY, f"out_dir={tmp_path}", "train.precision=fp16"], nproc=2, timeout=120)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "train.precision: fp16 on CPU" in line]
    assert len(lines) == 1, res.stderr[-2000:]
    assert "use bf16" in lines[0]


def test_fp16_scaler_skips_overflowing_steps_and_keeps_its_state():
    """The training step with fp16 autocast (on a small model, where CPU fp16 is quick enough)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    cfg = load_config(None, ["train.optimizer=sgd", "train.lr=0.1", "train.scheduler=none"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = DistContext("single", 0, 0, 1, torch.device("cpu"))
    scaler = grad_scaler(ctx.device, torch.float16)
    assert scaler.is_enabled() and not grad_scaler(ctx.device, torch.bfloat16).is_enabled()
    x = torch.randn(8, 3, 2, 2)
    y = torch.randint(0, 4, (8,))
    # Inputs this large overflow fp16 in the backward pass of the scaled loss: the step is skipped.
    batches = [(x * 6e4, y)]
    before = [p.detach().clone() for p in model.parameters()]
    options = StepOptions(torch.float16, scaler=scaler)
    learner = Learner(model, model, optimizer, Schedule(optimizer, cfg.train, 1), scaler, torch.float16,
                      Batcher(ctx.device, False))
    train_one_epoch(learner, batches, ctx, options)
    assert scaler.get_scale() == 2.0**15  # backed off from 2**16
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    learner.schedule = Schedule(optimizer, cfg.train, 1)  # a new one, as before: one step per epoch
    train_one_epoch(learner, [(x, y)], ctx, options)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a finite step is taken
    restored = grad_scaler(ctx.device, torch.float16)
    restored.load_state_dict(scaler.state_dict())  # what a checkpoint's "scaler" entry restores
    assert restored.state_dict() == scaler.state_dict()


def test_compiled_run_trains_like_eager_and_saves_plain_keys(tmp_path):
    # fp64: compiled kernels fuse and reorder float ops, so fp32 agreement would depend on the CPU.
    base = [*TINY, "train.epochs=1", "data.synthetic_size=100", "train.precision=fp64", f"out_dir={tmp_path}"]
    compiled = run_cli([*base, "train.compile=true", "run_name=c"], timeout=400)
    assert_ok(compiled)
    assert "fp64 + compile" in compiled.stdout
    assert_ok(run_cli([*base, "run_name=e"]))
    c = torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)["model"]
    e = torch.load(tmp_path / "e" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert c.keys() == e.keys() and not any("_orig_mod" in k for k in c)
    assert c["conv1.weight"].dtype == torch.float64
    assert rel_diff(c, e) < 1e-9
    losses = [json.loads((tmp_path / r / "metrics.json").read_text())["history"][0]["train_loss"] for r in "ce"]
    assert abs(losses[0] - losses[1]) < 1e-9


def test_test_weights_final_tests_the_last_model(tmp_path):
    res = run_cli([*TINY, f"out_dir={tmp_path}", "run_name=f", "train.test_weights=final"])
    assert_ok(res)
    test = json.loads((tmp_path / "f" / "metrics.json").read_text())["test"]
    assert test["weights"] == "final" and "final weights" in res.stdout
    ev = run_cli(["eval", "--checkpoint", str(tmp_path / "f" / "checkpoints" / "last.pt"), "--json"])
    assert_ok(ev)
    report = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert report["acc"] == test["acc"] and abs(report["loss"] - test["loss"]) < 1e-9
