"""SyncBN on CPU/gloo: 2 ranks x batch B must equal 1 process x batch 2B."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_train.models import build_model
from ddp_train.syncbn import CPUSyncBatchNorm, convert_sync_batchnorm

from .helpers import spawn

B, STEPS = 4, 3


def _data():
    g = torch.Generator().manual_seed(0)
    # Shifted and scaled so the batch statistics matter.
    return torch.randn(2 * B, 3, 16, 16, generator=g) * 2 + 0.5, torch.randint(0, 10, (2 * B,), generator=g)


def _train(model, x, y, wrapped=None, steps=STEPS):
    """Forward output and gradients of the first step, weights and running stats after STEPS steps."""
    run = wrapped or model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = grads = None
    for step in range(steps):
        logits = run(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out = logits.detach().clone()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return out, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _rank(rank, world, sync, steps=STEPS):
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    if sync:
        model = convert_sync_batchnorm(model, torch.device("cpu"))
        assert any(isinstance(m, CPUSyncBatchNorm) for m in model.modules())
    x, y = _data()
    shard = slice(rank * B, (rank + 1) * B)
    return _train(model, x[shard], y[shard], DDP(model), steps)


def _single(steps=STEPS):
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    x, y = _data()
    return _train(model, x, y, steps=steps)


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_ranks_with_syncbn_equal_one_process_with_double_batch():
    ref_out, ref_grads, ref_state = _single()
    results = spawn(_rank, 2, True)
    out = torch.cat([r[0] for r in results])
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-5), (out - ref_out).abs().max()
    for r in results:
        assert _max_diff(r[1], ref_grads) < 2e-5
        assert _max_diff(r[2], ref_state) < 2e-5  # weights and running statistics after 3 steps
    # Without SyncBN each rank normalises by its own half batch: measurably different.
    plain = spawn(_rank, 2, False)
    out_plain = torch.cat([r[0] for r in plain])
    assert (out_plain - ref_out).abs().max() > 1e-2
    assert _max_diff(plain[0][1], ref_grads) > 1e-3


def test_single_process_and_eval_are_plain_batchnorm():
    torch.manual_seed(0)
    ref = build_model("resnet18", 10)
    torch.manual_seed(0)
    conv = CPUSyncBatchNorm.convert(build_model("resnet18", 10))
    x, _ = _data()
    assert torch.equal(ref(x), conv(x))  # no process group: plain BN
    ref.eval(), conv.eval()
    assert torch.equal(ref(x), conv(x))
    assert list(ref.state_dict()) == list(conv.state_dict())
