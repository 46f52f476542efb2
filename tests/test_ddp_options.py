"""The DDP knobs in dist.* reach the DDP wrapper, and training steps run with them (2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddp_train.config import load_config
from ddp_train.data import load_dataset
from ddp_train.distributed.context import DistContext
from ddp_train.training.learner import build_training_model

from .helpers import spawn

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'


def _build_and_step(rank, world, overrides):
    cfg = load_config(None, ["data.synthetic_size=40", "train.precision=fp32", *overrides])
    ctx = DistContext("torchrun", rank, rank, world, torch.device("cpu"), "gloo")
    model, plain = build_training_model(cfg, load_dataset(cfg.data), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):  # static_graph needs more than one iteration to take effect
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (model.bucket_bytes_cap, model.gradient_as_bucket_view, model.static_graph,
            {k: v.clone() for k, v in plain.state_dict().items()})


def test_ddp_options_reach_the_wrapper_and_train():
    on = spawn(_build_and_step, 2, ["dist.bucket_cap_mb=1"])  # the defaults: bucket views and a static graph
    assert on[0][:3] == (1024 * 1024, True, True)
    off = spawn(_build_and_step, 2, ["dist.gradient_as_bucket_view=false", "dist.static_graph=false"])
    assert off[0][:3] == (25 * 1024 * 1024, False, False)
    # Same data, same maths: the knobs change how gradients travel, not what they are.
    for k, v in on[0][3].items():
        assert torch.allclose(v, off[0][3][k], atol=1e-6), k
        assert torch.equal(v, on[1][3][k])  # ranks hold the same weights
