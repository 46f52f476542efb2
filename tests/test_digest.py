"""The sample digest: every global step's sample ids folded into one short hex string, kept in the
checkpoint (``sample_digest``) and in each epoch's record (metrics.json history).

Equal digests mean the same samples in the same global steps: at any world size, across a
resume in the middle of an epoch, and across a resume at another world size. The runs are the
real CLI under torchrun (gloo, CPU); the expected digests are recomputed here from torch's own
DistributedSampler, independently of the sampler code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from ddp_train.data.loaders import EpochDistributedSampler, split_indices
from ddp_train.persistence.state import TrainState

from .helpers import TINY, assert_ok, run_cli

# 200 synthetic images: 160 train / 40 valid; 2 epochs of 5 global steps of 32; checkpoints every 2 steps.
CFG = [*TINY, "data.augment=false", "checkpoint.every_steps=2", "checkpoint.keep=100"]
N, BATCH, STEPS_PER_EPOCH, EPOCHS = 200, 32, 5, 2


def _expected(seed: int, epochs: int = EPOCHS) -> list[str]:
    """The digest after each global step, recomputed: torch's sampler at world size 1, the train split's
    dataset indices, sha256(previous digest + the step's ids as little-endian int64), first 16 hex digits."""
    train, _ = split_indices(N, 0.2, seed)
    digest, out = "", []
    for epoch in range(epochs):
        sampler = DistributedSampler(range(len(train)), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))
        for k in range(STEPS_PER_EPOCH):
            ids = train[order[k * BATCH:(k + 1) * BATCH]].astype("<i8")
            digest = hashlib.sha256(digest.encode() + ids.tobytes()).hexdigest()[:16]
            out.append(digest)
    return out


def _digests(run: Path) -> list[str]:
    """Each epoch's digest from metrics.json, then the last checkpoint's."""
    history = json.loads((run / "metrics.json").read_text())["history"]
    return [r["sample_digest"] for r in history] + [_ckpt_digest(run / "checkpoints" / "last.pt")]


def _ckpt_digest(path: Path) -> str:
    return torch.load(path, weights_only=True)["sample_digest"]


# --------------------------------------------------------------------------- without processes


@pytest.mark.parametrize("n", [160, 103])
def test_global_batches_are_the_ranks_batches_interleaved_at_any_world_size(n):
    """Global batch k (what the digest folds) is the ranks' k-th batches, interleaved, at any world size;
    each rank reads what torch's DistributedSampler gives it."""
    global_batch = 8
    for epoch in (0, 3):
        seen = []
        for world in (1, 2, 4):
            per_rank = global_batch // world
            shards = []
            for rank in range(world):
                ours = EpochDistributedSampler(range(n), world, rank, shuffle=True, seed=7, drop_last=True)
                torchs = DistributedSampler(range(n), world, rank, shuffle=True, seed=7, drop_last=True)
                ours.set_epoch(epoch)
                torchs.set_epoch(epoch)
                shard = [i for _, i in ours]
                assert shard == list(torchs)
                shards.append(shard)
            steps = len(shards[0]) // per_rank
            batches = [ours.global_batch(k, global_batch).tolist() for k in range(steps)]
            for k in range(steps):
                interleaved = [shards[j % world][k * per_rank + j // world] for j in range(global_batch)]
                assert batches[k] == interleaved, (world, k)
            seen.append(batches)
        assert seen[0] == seen[1] == seen[2]  # the same global batches at 1, 2 and 4 ranks
        assert len(seen[0]) == n // global_batch


def test_digest_folds_every_step_in_order_and_stays_unknown_for_older_checkpoints():
    a, b = TrainState(5), TrainState(5)
    a.fold_samples(np.array([3, 1, 4]))
    a.fold_samples(np.array([1, 5]))
    b.fold_samples(np.array([1, 5]))
    b.fold_samples(np.array([3, 1, 4]))
    assert len(a.sample_digest) == 16 and a.sample_digest != b.sample_digest  # the order of steps counts
    again = TrainState(5)
    again.load_state_dict(a.state_dict())
    assert again.sample_digest == a.sample_digest
    # A checkpoint written before the digest existed: unknown, and it stays unknown (never a wrong value).
    old = {k: v for k, v in a.state_dict().items() if k != "sample_digest"}
    again.load_state_dict(old)
    assert again.sample_digest is None
    again.fold_samples(np.array([9]))
    assert again.sample_digest is None


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """The uninterrupted run on 2 ranks."""
    out = tmp_path_factory.mktemp("digest")
    assert_ok(run_cli([*CFG, f"out_dir={out}", "run_name=ref"], nproc=2))
    return out / "ref"


@pytest.mark.slow
def test_digest_is_every_global_step_and_the_same_on_one_process(ref, tmp_path):
    expected = _expected(42)
    ends = [expected[STEPS_PER_EPOCH - 1], expected[-1]]
    assert _digests(ref) == [*ends, expected[-1]]
    assert _ckpt_digest(ref / "checkpoints" / "step-00000006.pt") == expected[5]  # mid-epoch
    res = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=one"])
    assert_ok(res)
    assert _digests(tmp_path / "one") == _digests(ref)
    assert f"| samples {ends[0]}" in res.stdout  # the console's epoch line


@pytest.mark.slow
@pytest.mark.parametrize("step, nproc", [
    (6, 2),  # in the middle of the second epoch, same world size
    (2, 0),  # in the middle of the first epoch, on 1 process instead of 2
])
def test_digest_continues_across_a_resume(ref, tmp_path, step, nproc):
    res = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=r", f"resume={ref / 'checkpoints' / f'step-{step:08d}.pt'}"],
                  nproc=nproc)
    assert_ok(res)
    assert f"(global step {step})" in res.stdout
    assert _digests(tmp_path / "r") == _digests(ref)


@pytest.mark.slow
def test_another_seed_another_digest(ref, tmp_path):
    assert_ok(run_cli([*CFG, "train.seed=7", "train.epochs=1", f"out_dir={tmp_path}", "run_name=s"]))
    digest = _digests(tmp_path / "s")[0]
    assert digest == _expected(7, 1)[-1]
    assert digest != _digests(ref)[0]


@pytest.mark.slow
def test_device_resident_path_has_the_same_digest(ref, tmp_path):
    """The device-resident loader reads the same sampler: the same samples, so the same digest."""
    assert_ok(run_cli([*CFG, "data.device_resident=true", f"out_dir={tmp_path}", "run_name=d"]))
    assert _digests(tmp_path / "d") == _digests(ref)
