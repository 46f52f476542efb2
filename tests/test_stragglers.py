"""Stragglers: a rank persistently slower than the others is named, with data or compute.

The rule on real numbers, then real 2-rank torchrun jobs where rank 1 is made slow: its main
thread on a core shared with CPU hogs (compute), or its batches delayed (data).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddp_train.resilience.stragglers import slow_ranks

from .helpers import ROOT, TINY, clean_env

SLOW_ENTRY = str(ROOT / "tests" / "slow_entry.py")
# 50 steps an epoch, windows of 5 steps: a slow rank shows within the first dozen steps.
RUN = [*TINY, "data.synthetic_size=2000", "train.epochs=1", "dist.straggler_every_steps=5"]


def test_the_rule_names_the_slow_rank_and_kind():
    # rank 2's compute is 3x the others' median; rank 1's data is slow but below the factor.
    table = [[0.100, 0.250], [0.140, 0.125], [0.100, 0.600]]  # binary fractions: exact medians
    assert slow_ranks(table, 1.5) == {(2, "compute"): (0.600, 0.1875)}
    assert slow_ranks(table, 1.3) == {(1, "data"): (0.140, 0.100), (2, "compute"): (0.600, 0.1875)}
    # Two ranks: each is compared with the other; a tiny absolute gap is not worth a line.
    assert slow_ranks([[0.001, 0.020], [0.004, 0.020]], 1.5) == {}
    assert slow_ranks([[0.0, 0.020], [0.0, 0.050]], 1.5) == {(1, "compute"): (0.050, 0.020)}
    assert slow_ranks([[0.0, 0.020]], 1.5) == {}  # one rank: nobody to compare with


def _run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SLOW_ENTRY, *RUN,
           *args, f"out_dir={tmp_path}", "run_name=r"]
    res = subprocess.run(cmd, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _straggler_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("straggler: rank")]


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores: one per rank")
def test_a_rank_on_a_busy_core_is_named_for_compute(tmp_path):
    # Rank 1's main thread shares core 1 with three CPU hogs; rank 0's has core 0. A loader worker
    # per rank keeps batches ready, so the busy core shows in compute, not in data.
    res = _run(tmp_path, "data.num_workers=1", PIN_RANKS="1", HOG_CORE="1", HOGS="3")
    lines = _straggler_lines(res.stdout)
    assert lines, res.stdout[-3000:]
    assert lines[0].startswith("straggler: rank 1 ") and "in compute:" in lines[0], lines
    # TensorBoard has every rank's figures at every window.
    events = EventAccumulator(str(tmp_path / "r" / "tb"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("ranks/")}
    assert set(steps) == {f"ranks/{kind}_s/rank{r}" for kind in ("data", "compute") for r in (0, 1)}
    assert steps["ranks/compute_s/rank1"] == list(range(5, 51, 5))
    slow = [e.value for e in events.Scalars("ranks/compute_s/rank1")]
    fast = [e.value for e in events.Scalars("ranks/compute_s/rank0")]
    assert sorted(slow)[len(slow) // 2] > 1.5 * sorted(fast)[len(fast) // 2]


@pytest.mark.slow
def test_a_rank_with_slow_batches_is_named_for_data(tmp_path):
    res = _run(tmp_path, SLOW_DATA_S="0.05")
    lines = _straggler_lines(res.stdout)
    assert lines and lines[0].startswith("straggler: rank 1 ") and "in data:" in lines[0], res.stdout[-3000:]
    assert not [line for line in lines if "rank 0" in line]
