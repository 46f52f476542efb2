"""Optimizer and schedule: train.momentum is the momentum the optimizer uses; one-cycle momentum only on request."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddp_train.config import ConfigError, load_config
from ddp_train.training.optim import Schedule, build_optimizer

STEPS = 20  # one epoch of 20 steps: onecycle's lr peaks after step 5 (pct_start 0.3)


def _momentum(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return group["momentum"] if "momentum" in group else group["betas"][0]


def _train(overrides: list[str]) -> list[tuple[float, float]]:
    """(lr, momentum) the optimizer holds at each step of a short run, read from its param group."""
    cfg = load_config(None, ["train.epochs=1", *overrides])
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, cfg.train)
    schedule = Schedule(opt, cfg.train, STEPS)
    seen = []
    for _ in range(STEPS):
        seen.append((opt.param_groups[0]["lr"], _momentum(opt)))
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        schedule.step_batch()
    return seen


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_momentum_is_kept_under_the_default_onecycle_schedule(optimizer):
    """torch's OneCycleLR would overwrite it with 0.95 -> 0.85 -> 0.95 every step."""
    cfg = load_config(None, [])
    assert cfg.train.scheduler == "onecycle" and cfg.train.cycle_momentum == 0
    seen = _train([f"train.optimizer={optimizer}", "train.momentum=0.5"])
    assert {m for _, m in seen} == {0.5}
    lrs = [lr for lr, _ in seen]
    assert max(lrs) == pytest.approx(cfg.train.lr) and lrs[0] < cfg.train.lr / 5  # the lr does cycle


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cycle_momentum_goes_down_to_the_peak_lr_and_back(optimizer):
    seen = _train([f"train.optimizer={optimizer}", "train.momentum=0.9", "train.cycle_momentum=0.2"])
    lrs, moms = zip(*seen)
    peak = lrs.index(max(lrs))
    assert peak == 5
    assert moms[0] == pytest.approx(0.9) and moms[peak] == pytest.approx(0.7) and moms[-1] == pytest.approx(0.9, abs=0.01)
    assert all(a > b for a, b in zip(moms[:peak], moms[1:peak + 1]))  # down while the lr rises
    assert all(a < b for a, b in zip(moms[peak:-1], moms[peak + 1:]))  # back up while it falls


def test_adamw_beta1_is_train_momentum():
    opt = build_optimizer(nn.Linear(2, 2), load_config(None, ["train.optimizer=adamw", "train.momentum=0.8"]).train)
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)


@pytest.mark.parametrize("overrides, message", [
    (["train.momentum=0.5", "train.cycle_momentum=0.6"], r"train.cycle_momentum: expected a number in \[0, train.momentum\]"),
    (["train.cycle_momentum=-0.1"], r"train.cycle_momentum: expected a number in \[0, train.momentum\]"),
    (["train.scheduler=cosine", "train.cycle_momentum=0.1"], "train.cycle_momentum: expected 0 unless train.scheduler is onecycle"),
])
def test_cycle_momentum_out_of_range_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
