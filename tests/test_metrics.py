"""Exact evaluation metrics at world sizes 1, 2 and 3 on a split of 25 samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddp_train.config import load_config
from ddp_train.data import build_data, load_dataset
from ddp_train.distributed.context import DistContext
from ddp_train.data.transforms import normalise_batch
from ddp_train.training.engine import Batcher, evaluate
from ddp_train.models import build_model

from .helpers import spawn

# synthetic_size 125 -> a test split of 25 samples: divisible by neither 2 nor 3.
OVERRIDES = ["data.synthetic_size=125", "train.batch_size=6", "data.num_workers=0"]


def _evaluate(rank, world, resident="auto"):
    cfg = load_config(None, [*OVERRIDES, f"data.device_resident={resident}"])
    ctx = DistContext("torchrun" if world > 1 else "single", rank, rank, world, torch.device("cpu"),
                      "gloo" if world > 1 else None)
    bundle = build_data(load_dataset(cfg.data), cfg, ctx)
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    result = evaluate(model, bundle.test, ctx, Batcher(ctx.device, False), None, 10)
    return result, len(bundle.test.dataset), sum(len(labels) for _, labels in bundle.test)


@pytest.mark.parametrize("resident", ["true", "false"])  # both input paths
def test_counts_and_metrics_equal_at_world_sizes_1_2_3(resident):
    single, n, _ = _evaluate(0, 1, resident)
    assert n == 25 and single.count == 25 and single.confusion.sum() == 25
    # An independent reference: every test sample through the model at once.
    cfg = load_config(None, OVERRIDES)
    ctx = DistContext("single", 0, 0, 1, torch.device("cpu"))
    test = build_data(load_dataset(cfg.data), cfg, ctx).test.dataset
    dataset = load_dataset(cfg.data)
    x = normalise_batch(torch.stack([test[i][0] for i in range(len(test))]),
                        torch.tensor(dataset.mean).view(1, -1, 1, 1), torch.tensor(dataset.std).view(1, -1, 1, 1))
    y = torch.tensor([test[i][1] for i in range(len(test))])
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    with torch.no_grad():
        logits = model(x)
    assert abs(torch.nn.functional.cross_entropy(logits, y).item() - single.loss) < 1e-5
    assert (logits.argmax(1) == y).float().mean().item() == single.acc
    for world in (2, 3):
        results = spawn(_evaluate, world, resident)
        shard_sizes = [r[2] for r in results]
        assert sum(shard_sizes) == 25 and max(shard_sizes) - min(shard_sizes) <= 1
        for result, _, _ in results:
            assert result.count == 25
            assert np.array_equal(result.confusion, single.confusion)
            assert result.acc == single.acc
            assert abs(result.loss - single.loss) < 1e-6
