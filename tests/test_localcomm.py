"""Shared-memory collectives between the ranks of one machine (ddp_train.distributed.localcomm), in real processes.

What CPU SyncBN and the per-step agreements rely on: every rank gets every rank's values, the sums are
the same bits on every rank, nothing is left in /dev/shm, messages too large for a slot are said to not
fit (the callers then use gloo), and a rank waiting for a peer that died stops instead of hanging.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from ddp_train.distributed.localcomm import SLOT_BYTES, PeerGone, open_local_group

from .helpers import spawn


def _collectives(rank: int, world: int) -> dict:
    before = set(os.listdir("/dev/shm"))
    group = open_local_group(rank, world, timeout_s=60.0)
    assert group is not None
    dist.barrier()  # every rank has finished opening (rank 0 unlinked the file)
    out: dict = {"leftover": sorted(set(os.listdir("/dev/shm")) - before)}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.int64):
        # Values that differ per rank and per element, in a 2-D shape.
        mine = (torch.arange(6, dtype=torch.float64).view(2, 3) + 10 * rank + 0.1).to(dtype)
        out[f"gather {dtype}"] = group.all_gather(mine)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        # Numbers and tensors laid end to end (SyncBN's [count, mean, var]), bf16 written through torch.
        parts = [float(rank + 1), torch.full((2,), rank + 0.5, dtype=dtype), 7.5, torch.arange(3, dtype=dtype)]
        out[f"parts {dtype}"] = group.all_gather_parts(parts, dtype)
    # Sums whose order matters in floating point: the result must still be the same on every rank.
    g = torch.Generator().manual_seed(rank)
    out["sum"] = group.all_reduce_sum(torch.randn(1000, generator=g, dtype=torch.float32) * 1e6)
    out["many"] = [group.all_reduce_sum(torch.tensor([float(rank + k)]))[0].item() for k in range(200)]
    out["fits"] = (group.fits(torch.zeros(SLOT_BYTES // 8, dtype=torch.float64)),
                   group.fits(torch.zeros(SLOT_BYTES // 8 + 1, dtype=torch.float64)))
    out["count"] = group.collectives
    group.close()
    return out


def test_gather_and_sum_across_three_ranks():
    results = spawn(_collectives, 3)
    for rank, res in enumerate(results):
        assert res["leftover"] == []  # the mapped file is unlinked once every rank has it
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.int64):
            got = res[f"gather {dtype}"]
            assert got.dtype == dtype and got.shape == (3, 2, 3)
            for r in range(3):
                expected = (torch.arange(6, dtype=torch.float64).view(2, 3) + 10 * r + 0.1).to(dtype)
                assert torch.equal(got[r], expected), (rank, dtype, r)
            if dtype != torch.int64:
                rows = res[f"parts {dtype}"]
                assert rows.dtype == dtype and rows.tolist() == [[r + 1, r + 0.5, r + 0.5, 7.5, 0, 1, 2]
                                                                 for r in range(3)], (rank, dtype, rows)
        assert res["many"] == [float(3 * k + 3) for k in range(200)]  # (0+k) + (1+k) + (2+k)
        assert res["fits"] == (True, False)
        assert res["count"] == 4 + 3 + 1 + 200
    # The same bits everywhere, and the sum in rank order.
    expected = sum((torch.randn(1000, generator=torch.Generator().manual_seed(r), dtype=torch.float32) * 1e6
                    for r in range(3)), torch.zeros(1000))
    for res in results:
        assert torch.equal(res["sum"], results[0]["sum"])
    assert torch.equal(results[0]["sum"], expected)


def _peer_dies(rank: int, world: int) -> dict:
    group = open_local_group(rank, world, timeout_s=60.0)
    assert group is not None
    group.all_gather(torch.ones(4))  # one collective together
    if rank == 1:
        os._exit(0)  # gone without a word, as a killed process would be
    start = time.monotonic()
    try:
        group.all_gather(torch.ones(4))
    except PeerGone as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None}


def _spawn_with_a_dying_peer() -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from .helpers import _entry

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(2, f"file://{tmp}/pg", _peer_dies, (), f"{tmp}/result"), nprocs=2,
                                 join=False, start_method="spawn")
        while not ctx.join(timeout=120):
            pass
        return torch.load(f"{tmp}/result.0", weights_only=False)


def test_a_peer_that_dies_ends_the_wait():
    res = _spawn_with_a_dying_peer()
    assert res["error"] is not None, "the wait for a dead peer did not end"
    assert "rank 1" in res["error"] and "ended" in res["error"]
