"""The hang watchdog (``dist.hang_timeout_s``): a stuck rank is named, live ranks leave their stacks.

Real torchrun jobs on CPU/gloo. The stuck rank is either frozen (SIGSTOP: it runs no code at all,
so only the store's heartbeats can tell) or asleep inside its data loading (tests/slow_entry.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddp_train.persistence.checkpoint import looks_whole
from ddp_train.errors import EXIT_HANG

from .agents import worker_pid
from .helpers import ROOT, TINY, assert_ok, clean_env, run_cli

SLOW_ENTRY = str(ROOT / "tests" / "slow_entry.py")
# Long enough that the job is still training when a test acts on it, and the default dist.timeout_s
# raised past the watchdog's: what ends these jobs must be the watchdog, not gloo's timeout.
LONG = [*TINY, "data.synthetic_size=4000", "train.epochs=5", "checkpoint.every_steps=5", "dist.timeout_s=300"]


def _torchrun(args: list[str], entry: list[str], **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)




def _hang_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ddp_train: hang:")]


@pytest.mark.slow
def test_a_frozen_rank_is_named_and_the_job_ends(tmp_path):
    timeout = 15
    proc = _torchrun([*LONG, f"out_dir={tmp_path}", "run_name=r", f"dist.hang_timeout_s={timeout}"],
                     ["-m", "ddp_train"])
    frozen = None
    try:
        ckpts = tmp_path / "r" / "checkpoints"
        deadline = time.monotonic() + 120
        while not list(ckpts.glob("step-*.pt")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert list(ckpts.glob("step-*.pt")), "no checkpoint was written"
        frozen = worker_pid(proc.pid, 1)
        os.kill(frozen, signal.SIGSTOP)
        start = time.monotonic()
        out, err = proc.communicate(timeout=timeout + 30 + 30)  # fails (TimeoutExpired) when the job hangs
        ended_after = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(f"frozen rank: the job ended {ended_after:.1f} s after SIGSTOP (dist.hang_timeout_s={timeout})")
    assert ended_after < timeout + 30, err[-3000:]
    assert proc.returncode != 0
    lines = _hang_lines(err)
    assert len(lines) == 1, err[-3000:]  # one summary line, from one process
    assert "stopped making progress: rank 1 " in lines[0] and "not responding" in lines[0], lines[0]
    assert "rank 0 at global step" in lines[0] and "exitcode  : 3" in err
    stacks = tmp_path / "r" / "hang"
    assert (stacks / "rank0.txt").read_text().startswith("rank 0 of 2")
    assert not (stacks / "rank1.txt").exists()  # a frozen process writes nothing
    assert all(looks_whole(p) for p in ckpts.glob("step-*.pt"))
    torch.load(ckpts / "last.pt", weights_only=False)  # the last good checkpoint reads back


@pytest.mark.slow
def test_a_rank_stuck_in_data_loading_is_named_with_its_stack(tmp_path):
    proc = _torchrun([*LONG, f"out_dir={tmp_path}", "run_name=r", "dist.hang_timeout_s=8"], [SLOW_ENTRY],
                     STUCK_DATA_AFTER="6")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    lines = _hang_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "stopped making progress: rank 1 " in lines[0] and "in data loading" in lines[0], lines[0]
    assert "not waiting for other ranks" in lines[0]
    assert "rank 0 at global step 6" in lines[0] and "waiting for other ranks" in lines[0]
    stack = (tmp_path / "r" / "hang" / "rank1.txt").read_text()
    assert "in _sleep_in_data_loading" in stack and "slow_entry.py" in stack
    assert (tmp_path / "r" / "hang" / "rank0.txt").exists()


@pytest.mark.slow
def test_one_process_stuck_exits_with_the_hang_code(tmp_path):
    res = subprocess.run([sys.executable, SLOW_ENTRY, *TINY, f"out_dir={tmp_path}", "run_name=r",
                          "dist.hang_timeout_s=3"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=clean_env(SLOW_RANK="0", STUCK_DATA_AFTER="2"))
    assert res.returncode == EXIT_HANG, res.stderr[-3000:]
    lines = _hang_lines(res.stderr)
    assert len(lines) == 1 and "rank 0 " in lines[0] and "data loading" in lines[0], res.stderr[-3000:]
    assert "in _sleep_in_data_loading" in (tmp_path / "r" / "hang" / "rank0.txt").read_text()


@pytest.mark.slow
def test_a_short_timeout_does_not_fire_on_a_healthy_run(tmp_path):
    # Epoch ends, validation, checkpoints and the test evaluation all count as progress.
    res = run_cli([*TINY, "train.epochs=3", "checkpoint.every_steps=2", f"out_dir={tmp_path}", "run_name=r",
                   "dist.hang_timeout_s=3"], nproc=2, timeout=180)
    assert_ok(res)
    assert not (tmp_path / "r" / "hang").exists()
