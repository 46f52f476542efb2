"""Where the time and memory go (ddp_train/profiling.py, docs/tracking.md): the torch.profiler window, peak memory
per rank, FLOPs per image and MFU.

- The window traces exactly global steps A-B, each ``ProfilerStep#<step>`` span holding that step's own work, into
  a gzipped Chrome trace read back here; a window the run leaves early writes nothing, and off it is not made.
- Through the CLI on 2 gloo ranks: only the chosen rank writes a trace, in the run folder, with the step's gradient
  all-reduce inside its span; the epoch line and TensorBoard have each rank's peak memory and the MFU.
- FLOPs per image against a count by hand; peak memory against a real allocation.
"""

from __future__ import annotations

import gzip
import json
import mmap
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ddp_train.config import TrackConfig
from ddp_train.distributed.context import DistContext
from ddp_train.profiling import ProfileWindow, peak_memory_mb, profile_window_for, train_flops_per_image

from .helpers import TINY, assert_ok, run_cli


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a Chrome trace (``.json`` or ``.json.gz``) as Perfetto or TensorBoard read them."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def step_spans(events: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """Global step -> (start, end) in microseconds of its ``ProfilerStep#<step>`` span."""
    return {int(e["name"].split("#")[1]): (e["ts"], e["ts"] + e["dur"])
            for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")}


def _ctx(rank: int) -> DistContext:
    return DistContext(launcher="single", rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))


def test_the_window_traces_exactly_its_steps_each_span_holding_that_steps_work(tmp_path):
    out = tmp_path / "profile" / "rank0.steps3-5.pt.trace.json.gz"
    window = ProfileWindow(3, 5, out)
    model = nn.Linear(16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    window.at(0)  # the run starts with 0 steps done
    for step in range(1, 9):
        with torch.profiler.record_function(f"work of step {step}"):
            optimizer.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            optimizer.step()
        window.at(step)
        assert out.exists() == (step >= 5)  # written when the window's last step is done, not before
    events = read_trace(out)
    spans = step_spans(events)
    assert sorted(spans) == [3, 4, 5]
    work = {int(e["name"].rsplit(" ", 1)[1]): e for e in events
            if e.get("ph") == "X" and str(e.get("name", "")).startswith("work of step")}
    assert sorted(work) == [3, 4, 5]  # nothing of the steps outside the window
    for step, event in work.items():
        start, end = spans[step]
        assert start <= event["ts"] and event["ts"] + event["dur"] <= end, (step, spans, event)
    assert any(e.get("name") == "aten::addmm" for e in events)  # the model's ops, with their shapes
    window.at(12)  # done: a later step never starts another window
    assert window.profiler is None and [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_window_the_run_leaves_early_writes_nothing_and_off_or_another_rank_makes_none(tmp_path):
    window = ProfileWindow(2, 6, tmp_path / "profile" / "t.pt.trace.json.gz")
    for step in range(0, 4):
        window.at(step)
    assert window.profiler is not None
    window.close()  # a stop signal or an error at step 4
    assert window.profiler is None and not (tmp_path / "profile").exists()

    assert profile_window_for(TrackConfig(), _ctx(0), tmp_path) is None  # off by default
    chosen = TrackConfig(profile_steps="4-7", profile_ranks="1")
    assert profile_window_for(chosen, _ctx(0), tmp_path) is None
    window = profile_window_for(chosen, _ctx(1), tmp_path)
    assert (window.first, window.last) == (4, 7)
    assert window.out == tmp_path / "profile" / "rank1.steps4-7.pt.trace.json.gz"
    one = profile_window_for(TrackConfig(profile_steps="9", profile_ranks="all"), _ctx(0), tmp_path)
    assert (one.first, one.last) == (9, 9)


def test_flops_per_image_are_three_forwards_counted_by_hand():
    # Conv 1->4, 3x3, padding 1 on 8x8: 2*4*1*9*64 FLOPs; linear 256->10: 2*256*10 (no biases: FlopCounterMode
    # counts the matmuls). Training: forward + backward (two matmuls per layer) = 3x the forward.
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 10, bias=False)).double()
    model.train()
    flops = train_flops_per_image(model, (1, 8, 8), torch.float64, torch.device("cpu"))
    assert flops == 3 * (2 * 4 * 1 * 9 * 64 + 2 * 256 * 10)
    assert model.training  # left as it was


def _resident_mb() -> float:
    """This process's resident set size now (VmRSS), in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_peak_memory_on_cpu_is_the_processs_peak_resident_size():
    # The block is a fresh anonymous mapping, every page written: new resident pages whatever the
    # allocator holds (CI once saw a 300 MiB numpy array reuse freed, still-resident heap: VmRSS
    # did not move). Compared with the resident size now, not with the peak before: the process may
    # already have freed memory since an earlier, higher peak.
    resident_before = _resident_mb()
    block = mmap.mmap(-1, 300 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1  # touch every page
    resident_with_block = _resident_mb()
    after = peak_memory_mb(torch.device("cpu"))
    block.close()
    assert resident_with_block - resident_before >= 250, (resident_before, resident_with_block)
    assert after >= resident_with_block - 1, (after, resident_with_block)  # the peak includes the block
    assert peak_memory_mb(torch.device("cpu")) >= after  # a peak never goes down


@pytest.mark.slow
def test_two_ranks_trace_the_chosen_rank_in_the_run_folder_and_report_memory_and_mfu(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    res = run_cli([*TINY, f"out_dir={tmp_path}", "run_name=r", "track.profile_steps=2-3", "track.profile_ranks=1",
                   "track.peak_tflops=0.04"], nproc=2)
    assert_ok(res)
    traces = sorted(p.name for p in (run / "profile").iterdir())
    assert traces == ["rank1.steps2-3.pt.trace.json.gz"]  # rank 1 only, as chosen
    events = read_trace(run / "profile" / traces[0])
    spans = step_spans(events)
    assert sorted(spans) == [2, 3]
    # Each step's gradient all-reduce (DDP's gloo bucket) lies in its own span: the span is the whole step.
    reduces = [e for e in events if e.get("ph") == "X" and "allreduce" in str(e.get("name", "")).lower()]
    for step, (start, end) in spans.items():
        assert any(start <= e["ts"] <= end for e in reduces), (step, sorted({e["name"] for e in reduces}))

    # The epoch line: the larger peak of the 2 ranks, the achieved GFLOP/s and MFU = achieved / (2 x 0.04 TFLOP/s).
    lines = [line for line in res.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, res.stdout[-3000:]
    for line in lines:
        figures = re.search(r"\| peak mem (\d+) MB \(max of 2 ranks\) \| ([\d.]+) GFLOP/s \| MFU ([\d.]+)%$", line)
        assert figures, line
        assert float(figures.group(3)) == pytest.approx(float(figures.group(2)) / 80 * 100, abs=0.15), line
    board = EventAccumulator(str(run / "tb"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"memory/peak_mb/rank0", "memory/peak_mb/rank1", "throughput/gflop_per_s", "throughput/mfu"} <= tags
    for rank in (0, 1):
        assert all(e.value > 50 for e in board.Scalars(f"memory/peak_mb/rank{rank}"))  # a Python with torch
    for mfu, gflops in zip(board.Scalars("throughput/mfu"), board.Scalars("throughput/gflop_per_s")):
        assert mfu.value == pytest.approx(gflops.value / (2 * 0.04 * 1000), rel=1e-5)  # float32 in event files
