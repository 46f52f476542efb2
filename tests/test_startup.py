"""Start-up: the launch variables checked with one line each; a rendezvous that waits says so, ends on a
stop signal within seconds and at ``dist.timeout_s`` with one line; workers whose torchrun agent died end.

Real processes: ``python -m ddp_train`` with RANK/WORLD_SIZE set by hand (the other ranks never
start), and real torchrun agents killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ddp_train.distributed.context import LaunchError, detect_launch
from ddp_train.errors import EXIT_CHECKPOINTED, EXIT_USER_ERROR

from .agents import children
from .helpers import ROOT, TINY, clean_env, free_port

ADDR = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}

# (environment, what the one line must name)
BAD_ENVS = [
    ({"RANK": "3", "WORLD_SIZE": "2", **ADDR}, "RANK=3"),
    ({"RANK": "-1", "WORLD_SIZE": "2", **ADDR}, "RANK=-1"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}, "MASTER_PORT=0"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **ADDR}, "LOCAL_RANK=2"),
]


@pytest.mark.parametrize("env, named", BAD_ENVS, ids=[named for _, named in BAD_ENVS])
def test_detect_launch_refuses_bad_values(env, named):
    with pytest.raises(LaunchError, match=re.escape(named)):
        detect_launch(env)


def test_detect_launch_accepts_a_single_rank_without_an_address():
    info = detect_launch({"RANK": "0", "WORLD_SIZE": "1"})
    assert (info.launcher, info.rank, info.world_size) == ("torchrun", 0, 1)


@pytest.mark.parametrize("env, named", BAD_ENVS, ids=[named for _, named in BAD_ENVS])
def test_bad_launch_variables_end_with_one_line(tmp_path, env, named):
    # A timeout well below dist.timeout_s: a rank that waits for peers instead of refusing fails here.
    res = subprocess.run([sys.executable, "-m", "ddp_train", *TINY, f"out_dir={tmp_path / 'runs'}"], cwd=ROOT,
                         env=clean_env(**env), capture_output=True, text=True, timeout=90)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == EXIT_USER_ERROR, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("ddp_train: error: ") and named in lines[0], res.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


class LoneRank:
    """``python -m ddp_train`` as rank ``rank`` of ``world`` ranks, the others never started; stderr read as it comes."""

    def __init__(self, tmp_path: Path, rank: int = 0, world: int = 2, args: tuple[str, ...] = ()) -> None:
        self.port, self.out = free_port(), tmp_path / "runs"
        env = clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(self.port))
        self.proc = subprocess.Popen([sys.executable, "-m", "ddp_train", *TINY, f"out_dir={self.out}", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_for_line(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0].rstrip("\n")
            if self.proc.poll() is not None:
                self._reader.join(5)
                found = [line for line in self.lines if text in line]
                assert found, f"the process ended ({self.proc.returncode}) without saying {text!r}: {self.stderr}"
                return found[0].rstrip("\n")
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r} within {timeout} s: {self.stderr}")

    def end(self, timeout: float = 60) -> int:
        """The exit code; fails (and kills the process) when it does not end within ``timeout`` seconds."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_waiting_rendezvous_says_so_and_a_stop_signal_ends_it(tmp_path, sig):
    lone = LoneRank(tmp_path)
    try:
        line = lone.wait_for_line("waiting for")
        assert line == (f"ddp_train: rank 0 waiting for 1 of 2 ranks (rank 1) at 127.0.0.1:{lone.port} "
                        f"(dist.timeout_s=600)"), lone.stderr
        lone.proc.send_signal(sig)
        code = lone.end(timeout=60)  # dist.timeout_s is 600: an ignored signal fails here
    finally:
        if lone.proc.poll() is None:
            lone.proc.kill()
    assert code == EXIT_CHECKPOINTED, lone.stderr
    stop = lone.wait_for_line(f"stopped by {sig.name}")
    assert stop.startswith(f"ddp_train: stopped by {sig.name} while waiting for 1 of 2 ranks"), stop
    assert "nothing to save" in stop and "resume=auto" in stop, stop
    assert "Traceback" not in lone.stderr and not lone.out.exists()


@pytest.mark.slow
def test_a_rendezvous_that_times_out_names_who_did_not_join(tmp_path):
    lone = LoneRank(tmp_path, world=3, args=("dist.timeout_s=5", "train.batch_size=48"))
    code = lone.end(timeout=120)
    errors = [line for line in lone.lines if line.startswith("ddp_train: error:")]
    assert code == EXIT_USER_ERROR, lone.stderr
    assert len(errors) == 1 and "Traceback" not in lone.stderr, lone.stderr
    assert (f"rendezvous timed out after 5 s (dist.timeout_s): 1 of 3 ranks joined at 127.0.0.1:{lone.port}; "
            f"missing: rank 1, rank 2") in errors[0], errors[0]
    assert all(line.startswith("ddp_train: ") for line in lone.lines), lone.stderr


@pytest.mark.slow
def test_a_rank_whose_store_host_never_starts_waits_stops_and_times_out(tmp_path):
    lone = LoneRank(tmp_path, rank=1)
    try:
        line = lone.wait_for_line("waiting for")
        assert line == (f"ddp_train: rank 1 waiting for rank 0, which hosts the rendezvous store at "
                        f"127.0.0.1:{lone.port} (dist.timeout_s=600)"), lone.stderr
        lone.proc.send_signal(signal.SIGTERM)
        assert lone.end(timeout=60) == EXIT_CHECKPOINTED, lone.stderr
    finally:
        if lone.proc.poll() is None:
            lone.proc.kill()
    assert "Traceback" not in lone.stderr
    lone = LoneRank(tmp_path, rank=1, args=("dist.timeout_s=5",))
    assert lone.end(timeout=120) == EXIT_USER_ERROR, lone.stderr
    errors = [line for line in lone.lines if line.startswith("ddp_train: error:")]
    assert len(errors) == 1 and "Traceback" not in lone.stderr, lone.stderr
    assert f"rank 1 could not reach the rendezvous store at 127.0.0.1:{lone.port}" in errors[0], errors[0]


# --------------------------------------------------------------------------- orphaned workers


def _alive(pid: int) -> bool:
    """Running (not ended, not a zombie waiting for a parent that reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_workers_whose_agent_died_stop_with_one_line(tmp_path):
    # Long enough (minutes) that workers left running would still be running when the test gives up on them.
    args = [*TINY, "data.synthetic_size=4000", "train.epochs=50", "checkpoint.every_steps=3", f"out_dir={tmp_path}",
            "run_name=r"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddp_train",
           *args]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        # Training, well past start-up. (The agent's store dying under a store operation in flight, such as
        # the hang watchdog's first connection, still makes C++ print a warning with a stack dump.)
        while not list((tmp_path / "r" / "checkpoints").glob("step-*.pt")):
            assert agent.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(agent.pid, signal.SIGKILL)  # the agent alone: its workers lead sessions of their own
        agent.wait()
        deadline = time.monotonic() + 90  # generous: not a measure of how fast, only that they end
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [w for w in workers if _alive(w)]
    finally:
        for pid in workers:  # each leads its own session, with its loader workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    out, err = agent.communicate(timeout=60)  # the pipes close when the orphans (which hold them) end
    assert left == [], f"workers {left} still running 90 s after their agent died"
    for rank in (0, 1):
        lines = [line for line in err.splitlines() if line.startswith(f"ddp_train: rank {rank}: the torchrun agent")]
        assert len(lines) == 1, err[-3000:]
        assert f"(pid {agent.pid}) died; stopping" in lines[0] and "resume=auto" in lines[0], lines[0]
    assert "sendBytes" not in err and "Exception raised from" not in err, err[-3000:]
    assert not (tmp_path / "r" / "metrics.json").exists()
