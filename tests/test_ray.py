"""launch/ray_train.py on a local Ray cluster (started by the driver, 2 CPU workers): a worker killed mid-run
is restarted by Ray, the run resumes from the run folder's newest checkpoint and completes, reports to Ray,
and ends with the weights of the uninterrupted run (fp64; that run under torchrun: one Ray cluster start,
about a minute on 2 cores, is the cost of this file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .helpers import ROOT, TINY, assert_ok, clean_env, last_weights, rel_diff, run_cli

pytest.importorskip("ray.train", reason="Ray Train is not installed (pip install -e '.[ray]')")

pytestmark = pytest.mark.slow  # starts a Ray cluster

# 512 train images at batch 32: 16 steps an epoch, a checkpoint every 4 steps, 6 epochs. Long enough that
# the kill lands mid-run (right after the first checkpoint), short enough for the suite.
FP64 = [*TINY, "data.synthetic_size=640", "train.epochs=6", "train.precision=fp64", "train.lr=0.05",
        "checkpoint.every_steps=4"]
DRIVER_S = 400


class Driver:
    """``python launch/ray_train.py`` in a session of its own, its output lines kept with the time each arrived."""

    def __init__(self, tmp: Path, run_name: str) -> None:
        self.pid_dir = tmp / f"pids-{run_name}"
        self.pid_dir.mkdir()
        self.run_dir = tmp / "runs" / run_name
        cmd = [sys.executable, "launch/ray_train.py", "--workers", "2", "--num-cpus", "3", "--max-failures", "1",
               "--storage", str(tmp / "ray"), "--pid-dir", str(self.pid_dir),
               *FP64, f"out_dir={tmp / 'runs'}", f"run_name={run_name}"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(RAY_DEDUP_LOGS="0"), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait(self) -> int:
        try:
            code = self.proc.wait(timeout=DRIVER_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the driver's session: its Ray cluster goes with it
            raise AssertionError("the Ray driver did not end in time:\n" + self.output[-4000:])
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def pids(self, rank: int) -> list[int]:
        """The processes that have run ``rank``, in the order they started."""
        files = sorted(self.pid_dir.glob(f"rank{rank}-pid*"), key=lambda p: float(p.read_text()))
        return [int(p.name.split("pid")[1]) for p in files]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The same training under torchrun (2 gloo ranks): Ray's group is the same 2 ranks, so the same weights."""
    out = tmp_path_factory.mktemp("ray_ref")
    assert_ok(run_cli([*FP64, f"out_dir={out}", "run_name=whole"], nproc=2))
    return out / "whole"


def test_ray_restarts_a_killed_worker_and_the_run_resumes_completes_and_reports(uninterrupted, tmp_path):
    """TorchTrainer with 2 workers; ddp_train forms no group of its own (it joins Ray's). SIGKILL of rank 0's
    worker process after the first checkpoint: Ray restarts the group once, resume=auto continues from the
    newest checkpoint (rank 0's stale run-folder lock taken over), the run finishes, Ray gets the test metrics
    and a Checkpoint of the run's checkpoints/, and the final weights equal the uninterrupted run's."""
    driver = Driver(tmp_path, "killed")
    ckpts = driver.run_dir / "checkpoints"
    deadline = time.monotonic() + DRIVER_S
    while not (driver.pids(0) and any(ckpts.glob("step-*.pt"))):
        assert driver.proc.poll() is None and time.monotonic() < deadline, driver.output[-4000:]
        time.sleep(0.05)
    victim = driver.pids(0)[0]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    code = driver.wait()
    assert code == 0, driver.output[-4000:]
    assert driver.pids(0)[0] == victim and len(driver.pids(0)) == 2, "Ray started rank 0 again, once"
    assert len(driver.pids(1)) == 2, "Ray restarts the whole group"
    resumed = [(t, line) for t, line in driver.lines if "resumed from epoch" in line]
    assert resumed, driver.output[-4000:]
    restarted_at = float(sorted(driver.pid_dir.glob("rank0-pid*"), key=lambda p: float(p.read_text()))[1].read_text())
    print(f"kill -> new worker started {restarted_at - killed_at:.1f} s; kill -> resumed {resumed[0][0] - killed_at:.1f} s")
    # What Ray gets: the test metrics of the finished run, and one Checkpoint of its checkpoints/.
    metrics = json.loads((driver.run_dir / "metrics.json").read_text())
    assert "| external x2 on cpu |" in driver.output
    finished = [line for _, line in driver.lines if line.startswith("ray_train: finished:")]
    assert finished and f"'test_acc': {metrics['test']['acc']}" in finished[0], driver.output[-4000:]
    reported = list((tmp_path / "ray" / "killed").glob("checkpoint_*/last.pt"))
    assert len(reported) == 1, "Ray's copy of the run's checkpoints"
    diff = rel_diff(last_weights(driver.run_dir), last_weights(uninterrupted))
    assert diff < 1e-9, f"killed and resumed under Ray vs uninterrupted: weights differ by {diff}"
