"""Stop signals in every phase, under torchrun with 2 ranks: every rank exits 75, and ``resume=auto`` finishes
the run exactly as an uninterrupted one.

- training: SIGTERM to rank 0 alone (not to torchrun), three times over: the other rank must exit 75 too,
  not be killed by the SIGTERM torchrun sends the rest of the group once one worker has exited;
- validation and test: rank 0 signals itself after the phase's first batch (tests/phase_entry.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp_train.errors import EXIT_CHECKPOINTED

from .agents import worker_pid
from .helpers import ROOT, TINY, assert_ok, clean_env, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

PHASE_ENTRY = str(ROOT / "tests" / "phase_entry.py")


def _torchrun(args: list[str], entry: list[str], **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_codes(stderr: str) -> dict[int, int]:
    """Each failed worker's exit code, from torchrun's failure table (workers that exited 0 are not listed)."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}


def test_worker_codes_reads_torchrun_failure_tables():
    table = ("[0]:\n  time      : 2026-12-04_17:00:00\n  host      : h\n  rank      : 1 (local_rank: 1)\n"
             "  exitcode  : -15 (pid: 12)\n  error_file: <N/A>\n  traceback : Signal 15 (SIGTERM) received by PID 12\n"
             "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-04_17:00:00\n  host      : h\n"
             "  rank      : 0 (local_rank: 0)\n  exitcode  : 75 (pid: 11)\n")
    assert worker_codes(table) == {1: -15, 0: 75}


def _history(run: Path) -> list[dict]:
    rows = json.loads((run / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k not in ("epoch_s", "img_per_s")} for r in rows]  # timings differ


def _assert_same_run(run: Path, ref: Path) -> None:
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(run) == _history(ref)
    assert json.loads((run / "metrics.json").read_text())["test"] == json.loads((ref / "metrics.json").read_text())["test"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """An uninterrupted run of TINY (2 epochs) on 2 ranks."""
    out = tmp_path_factory.mktemp("phases")
    assert_ok(run_cli([*TINY, f"out_dir={out}", "run_name=ref"], nproc=2))
    return out / "ref"


def test_sigterm_to_rank_0_alone_ends_every_rank_with_75(tmp_path):
    args = [*TINY, "data.synthetic_size=4000", "train.epochs=5", "checkpoint.every_steps=3"]
    for attempt in range(3):  # the exits race: a rank still on its way out when torchrun stops the rest
        run = tmp_path / f"r{attempt}"
        proc = _torchrun([*args, f"out_dir={tmp_path}", f"run_name=r{attempt}"], ["-m", "ddp_train"])
        deadline = time.monotonic() + 180
        while not list((run / "checkpoints").glob("step-*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.1)
        os.kill(worker_pid(proc.pid, 0), signal.SIGTERM)
        out, err = _finish(proc)
        assert worker_codes(err) == {0: EXIT_CHECKPOINTED, 1: EXIT_CHECKPOINTED}, (attempt, err[-4000:])
        assert re.search(r"ddp_train: stopped by SIGTERM; checkpoint \S+; continue with resume=auto", err), err[-3000:]


@pytest.mark.parametrize("phase", ["valid", "test"])
def test_a_stop_signal_while_evaluating_stops_with_75_and_resume_finishes_the_run(ref, tmp_path, phase):
    args = [*TINY, f"out_dir={tmp_path}", "run_name=r"]
    proc = _torchrun(args, [PHASE_ENTRY], SIGNAL_PHASE=phase)
    out, err = _finish(proc)
    assert worker_codes(err) == {0: EXIT_CHECKPOINTED, 1: EXIT_CHECKPOINTED}, err[-4000:]
    stop = [line for line in err.splitlines() if line.startswith("ddp_train: stopped by SIGTERM")]
    assert len(stop) == 1, err[-4000:]
    if phase == "valid":  # after the first epoch's validation, with that epoch's checkpoint
        assert "checkpoint" in stop[0] and "step-00000005.pt" in stop[0], stop[0]
        assert len(json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]) == 1
    else:  # the training is complete: its last checkpoint; the test runs again on resume
        assert "step-00000010.pt" in stop[0] and "the test runs again" in stop[0], stop[0]
        assert json.loads((tmp_path / "r" / "metrics.json").read_text()).get("test") is None
    res = run_cli([*args, "resume=auto"], nproc=2)
    assert_ok(res)
    _assert_same_run(tmp_path / "r", ref)
