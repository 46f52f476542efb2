"""Elastic training stays the same training: ``launch/multinode.sh`` with ``NNODES=1:2`` (c10d on 127.0.0.1).

Two torchrun agents on this machine stand for two nodes. A lost node is its agent and its
worker, both SIGKILLed (torchrun starts workers in sessions of their own: killing the agent alone
would leave its worker training on as an orphan). The c10d store lives in the first agent, so the
second one is the node that dies.

- scale down: the survivor's collective fails, it says so in one line, torchrun restarts it at
  world size 1 and it resumes from the newest checkpoint; the final fp64 weights equal the
  uninterrupted 2-rank run's;
- scale up: a second node joins a 1-node job; torchrun stops the worker with SIGTERM, it writes a
  stop checkpoint at the next step boundary and the group resumes at world size 2 from exactly that
  step; the final fp64 weights equal an uninterrupted 1-rank run's.

Both runs use a short hang watchdog (``dist.hang_timeout_s=10``): it must not fire while the
membership changes. The global batch is the same at every world size (``train.batch_size`` is
global), so are the sample order (the sample digest) and the schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from .agents import AgentGroup, children
from .helpers import (ROOT, TINY, assert_ok, clean_env, free_port, last_weights, rel_diff, run_cli,
                      without_exit_barrier_race)
from .slurm_cluster import SlurmCluster, missing_packages

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 160 // 32  # synthetic_size=200: 160 training images, global batch 32
# fp64: equal to 1e-8 across world sizes (the global batch is the same, only the summation order differs).
# A checkpoint after every step: the newest one is the step a node was lost at, or the one before.
CONFIG = [*TINY, "data.augment=false", "train.precision=fp64", "checkpoint.every_steps=1", "dist.backend=gloo",
          "dist.hang_timeout_s=10"]
# Fast membership changes for the test: a node that misses 3 heartbeats 1 s apart is dropped; a round
# with fewer than the maximum of nodes closes 10 s after the minimum joined (torchrun: 30 s), which is
# also the window in which the two agents of the scale-down test form their first round together.
RDZV_CONF = "--rdzv-conf=join_timeout=60,last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"
# torchrun waits this long after its SIGTERM before it SIGKILLs a worker (LocalElasticAgent._stop_workers).
TORCHRUN_GRACE_S = 30
RESUMED = re.compile(r"resumed from epoch \d+ step \d+ \(global step (\d+)\), world size (\d+) -> (\d+)")




class Nodes(AgentGroup):
    """``launch/multinode.sh`` agents on this machine, one worker each: started, logged, killed with their workers."""

    def __init__(self, folder: Path, epochs: int) -> None:
        self.folder, self.out, self.port = folder, folder / "runs", free_port()
        self.args = [*CONFIG, f"train.epochs={epochs}", f"out_dir={self.out}"]
        self.env = clean_env(PYTHON=sys.executable, NPROC_PER_NODE="1", ALLOW_LOOPBACK="1", RDZV_BACKEND="c10d",
                             RDZV_ID=f"elastic{self.port}", TORCHRUN_ARGS=RDZV_CONF)
        super().__init__()

    def start(self) -> subprocess.Popen:
        index = len(self.agents)
        with open(self.log_path(index), "w") as log:  # a file: nothing blocks on a full pipe
            agent = subprocess.Popen([str(ROOT / "launch" / "multinode.sh"), str(index), "1:2", "127.0.0.1",
                                      str(self.port), *self.args], cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.agents.append(agent)
        return agent

    def log_path(self, index: int) -> Path:
        return self.folder / f"node{index}.log"

    def log(self, index: int) -> str:
        return self.log_path(index).read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- node {i}:\n{self.log(i)[-4000:]}" for i in range(len(self.agents)))

    def wait_listening(self, timeout: float = 60) -> None:
        """Until the first agent holds the c10d store (the second would otherwise try to host it too)."""
        self.wait_for(lambda: _listening(self.port), timeout, "the first agent to open the c10d store")

    def wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``done`` until true; the time.time() it became true. Fails with the logs on timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or all(agent.poll() is not None for agent in self.agents):
                pytest.fail(f"no {what} within {timeout:.0f} s (agents: {[a.poll() for a in self.agents]})\n"
                            f"{self.logs()}")
            time.sleep(0.02)
        return time.time()

    def newest_step(self) -> int:
        steps = [int(p.stem.split("-")[1]) for p in self.out.glob("*/checkpoints/step-*.pt")]
        return max(steps, default=0)

    def finish(self, timeout: float) -> list[int]:
        """Wait for every agent still running; their exit codes."""
        deadline = time.monotonic() + timeout
        for agent in self.agents:
            try:
                agent.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the agents did not finish within {timeout:.0f} s\n{self.logs()}")
        return [a.returncode for a in self.agents]

    def run_dir(self) -> Path:
        [run] = [p for p in self.out.iterdir() if p.is_dir()]
        return run



def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    print(f"{label}: {time.monotonic() - start:.1f} s")


def reference(out: Path, epochs: int, world: int) -> Path:
    """The uninterrupted run at ``world`` ranks (torchrun --standalone, or one plain process)."""
    with timed(f"uninterrupted {world}-rank run"):
        res = run_cli([*CONFIG, f"train.epochs={epochs}", f"out_dir={out}", "run_name=ref"],
                      nproc=world if world > 1 else 0)
    assert_ok(res)
    return out / "ref"


DOWN_EPOCHS, KILL_AFTER = 8, 8  # the scale-down runs: 40 steps, a node lost after global step 8


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory) -> Path:
    return reference(tmp_path_factory.mktemp("ref2"), DOWN_EPOCHS, world=2)


def start_two_nodes(nodes: Nodes) -> tuple[subprocess.Popen, subprocess.Popen]:
    """The first agent (it hosts the c10d store), then the second; returns both once global step KILL_AFTER is
    checkpointed."""
    first = nodes.start()
    nodes.wait_listening()
    second = nodes.start()
    nodes.wait_for(lambda: nodes.newest_step() >= KILL_AFTER, 180, f"checkpoint of global step {KILL_AFTER}")
    return first, second


def assert_same_training(run: Path, ref: Path, total_steps: int, world_size: int) -> None:
    """Same weights (fp64, 1e-8), same samples in the same steps (the digest of every epoch), same end."""
    diff = rel_diff(last_weights(run), last_weights(ref))
    print(f"final weights: largest relative difference {diff:.2e}")
    assert diff < 1e-8
    last, ref_last = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (run, ref))
    assert last["global_step"] == total_steps and last["world_size"] == world_size
    assert last["sample_digest"] and last["sample_digest"] == ref_last["sample_digest"]
    history, ref_history = (json.loads((r / "metrics.json").read_text())["history"] for r in (run, ref))
    assert [h["epoch"] for h in history] == [h["epoch"] for h in ref_history]
    digests = [h.get("sample_digest") for h in history]
    assert all(digests) and digests == [h.get("sample_digest") for h in ref_history]


def assert_no_hang_report(nodes: Nodes, run: Path) -> None:
    """The hang watchdog (dist.hang_timeout_s=10) did not fire while the group changed."""
    fired = [i for i in range(len(nodes.agents)) if "ddp_train: hang:" in nodes.log(i)]
    assert not fired and not (run / "hang").exists(), nodes.logs()


def test_scale_down_survivor_finishes_the_same_training(tmp_path, two_rank_reference):
    """2 nodes; the second (agent and worker) is SIGKILLed after global step 8; the first finishes alone."""
    epochs, kill_after = DOWN_EPOCHS, KILL_AFTER
    with Nodes(tmp_path, epochs) as nodes:
        survivor, victim = start_two_nodes(nodes)
        killed_at = time.time()
        nodes.kill(victim)
        resumed_at = nodes.wait_for(lambda: RESUMED.search(nodes.log(0)) is not None, 180, "resume")
        nodes.finish(timeout=240)
        ended_at = time.time()
        log, run = nodes.log(0), nodes.run_dir()
    print(f"scale down: killed after global step {kill_after}; kill -> resumed line {resumed_at - killed_at:.1f} s, "
          f"kill -> finished {ended_at - killed_at:.1f} s")
    assert survivor.returncode == 0, nodes.logs()
    runs = re.findall(r"\| torchrun x(\d) on cpu \|", log)
    assert runs[:2] == ["2", "1"], nodes.logs()  # the first round held both nodes; then the survivor alone
    # The loss of the peer: one line, not a traceback.
    lost = [line for line in log.splitlines() if line.startswith("ddp_train:") and " lost " in line]
    assert len(lost) == 1 and re.fullmatch(
        # The nodes share this machine: the survivor notices the loss in a shared-memory collective (localcomm).
        r"ddp_train: rank 0: lost (the rank at 127\.0\.0\.1:\d+ \(its process|rank 1 \(its process, pid \d+ on this "
        r"machine,) ended: a crash, a kill or a lost node\) "
        r"after global step (\d+); torchrun restarts the group with the nodes left \(restart 1 of 3\) and it "
        r"resumes from the newest checkpoint in the run folder", lost[0]), nodes.logs()
    lost_step = int(re.search(r"after global step (\d+)", lost[0]).group(1))
    assert "Traceback" not in log, log[-4000:]
    resumed = RESUMED.search(log)
    assert resumed and resumed.group(2, 3) == ("2", "1")
    # From the newest checkpoint: the step the survivor was at, or one it redoes from.
    assert kill_after <= int(resumed.group(1)) <= lost_step, log[-4000:]
    assert_no_hang_report(nodes, run)
    assert_same_training(run, two_rank_reference, epochs * STEPS_PER_EPOCH, world_size=1)


def test_frozen_node_is_found_by_the_hang_watchdog_and_left_behind(tmp_path, two_rank_reference):
    """A node that stops without closing its connections (SIGSTOP: as a hung machine or a cut network) leaves
    the survivor blocked in a collective, where gloo waits dist.timeout_s. The hang watchdog ends it after
    dist.hang_timeout_s (exit 3), torchrun restarts it without the frozen node, and it finishes the same training."""
    with Nodes(tmp_path, DOWN_EPOCHS) as nodes:
        survivor, frozen = start_two_nodes(nodes)
        frozen_at = time.time()
        for pid in [*children(frozen.pid), frozen.pid]:
            os.kill(pid, signal.SIGSTOP)
        resumed_at = nodes.wait_for(lambda: RESUMED.search(nodes.log(0)) is not None, 180, "resume")
        try:
            survivor.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survivor did not finish within 240 s\n{nodes.logs()}")
        ended_at = time.time()
        log, run = nodes.log(0), nodes.run_dir()
    print(f"frozen node: SIGSTOP -> resumed line {resumed_at - frozen_at:.1f} s, "
          f"-> finished {ended_at - frozen_at:.1f} s")
    assert survivor.returncode == 0, nodes.logs()
    hang = [line for line in log.splitlines() if line.startswith("ddp_train: hang:")]
    assert len(hang) == 1 and "rank 1 (" in hang[0] and "not responding" in hang[0], nodes.logs()
    resumed = RESUMED.search(log)
    assert resumed and resumed.group(2, 3) == ("2", "1") and int(resumed.group(1)) >= KILL_AFTER, log[-4000:]
    assert_same_training(run, two_rank_reference, DOWN_EPOCHS * STEPS_PER_EPOCH, world_size=1)


def test_scale_up_joining_node_continues_the_same_training(tmp_path):
    """1 node; a second joins after the first checkpoint; the group stops with a checkpoint and resumes at 2."""
    epochs = 20  # long enough that the second node joins well before the end
    with Nodes(tmp_path, epochs) as nodes:
        nodes.start()
        nodes.wait_for(lambda: nodes.newest_step() >= 1, 180, "first checkpoint")
        joined_at = time.time()
        nodes.start()
        term_at = nodes.wait_for(lambda: "closing signal SIGTERM" in nodes.log(0), 120, "SIGTERM to the worker")
        stopped_at = nodes.wait_for(lambda: "ddp_train: stopped by SIGTERM" in nodes.log(0), TORCHRUN_GRACE_S,
                                    "stop checkpoint")
        # The stop checkpoint is the newest step file (named last.pt in the line when it came at an epoch end).
        stop_step = nodes.newest_step()
        resumed_at = nodes.wait_for(lambda: any(RESUMED.search(nodes.log(i)) for i in (0, 1)), 180, "resume")
        codes = nodes.finish(timeout=300)
        ended_at = time.time()
        logs = [nodes.log(0), nodes.log(1)]
        run = nodes.run_dir()
    assert re.search(r"ddp_train: stopped by SIGTERM; checkpoint \S+; continue with resume=auto", logs[0]), nodes.logs()
    print(f"scale up: second node started -> SIGTERM {term_at - joined_at:.1f} s, SIGTERM -> stop checkpoint "
          f"{stopped_at - term_at:.1f} s (torchrun's grace: {TORCHRUN_GRACE_S} s), second node started -> resumed "
          f"line {resumed_at - joined_at:.1f} s, -> finished {ended_at - joined_at:.1f} s; stopped at global step "
          f"{stop_step} of {epochs * STEPS_PER_EPOCH}")
    assert codes == [0, 0], nodes.logs()
    assert stopped_at - term_at < TORCHRUN_GRACE_S and "forcefully exiting" not in logs[0], nodes.logs()
    assert 1 <= stop_step < epochs * STEPS_PER_EPOCH
    # Alone first (world size 1), then both; the group resumed from exactly the stop checkpoint's step.
    runs = re.findall(r"\| torchrun x(\d) on cpu \|", "".join(logs))
    assert runs == ["1", "2"], nodes.logs()
    resumed = [m for log in logs for m in RESUMED.finditer(log)]
    assert len(resumed) == 1 and resumed[0].groups() == (str(stop_step), "1", "2"), nodes.logs()
    # No worker of the re-formed group refused the run folder or failed: no torchrun restart was spent.
    assert not any("failed (exitcode" in log or "Traceback" in without_exit_barrier_race(log) for log in logs), nodes.logs()
    assert_no_hang_report(nodes, run)
    assert_same_training(run, reference(tmp_path / "ref1", epochs, world=1), epochs * STEPS_PER_EPOCH, world_size=2)


def test_multinode_sh_refuses_an_elastic_static_rendezvous():
    res = subprocess.run([str(ROOT / "launch" / "multinode.sh"), "0", "1:2", "10.0.0.1"], cwd=ROOT,
                         env=clean_env(PYTHON=sys.executable, NPROC_PER_NODE="1"), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
    assert res.stderr.splitlines() == ["multinode.sh: NNODES 1:2 (elastic) needs RDZV_BACKEND=c10d or etcd-v2: the "
                                       "static rendezvous waits for a fixed number of nodes"]


SLURM_MISSING = missing_packages()


def test_slurm_sbatch_elastic_job_on_the_nodes_it_got(tmp_path):
    """``NNODES_RANGE=1:2 sbatch --nodes=1-2 --no-kill``: torchrun gets --nnodes=1:2 and the restarts, the step
    --no-kill --wait=0; on this one-node cluster the job runs on 1 node and finishes."""
    if SLURM_MISSING:
        pytest.skip(f"SLURM packages not installed (missing {', '.join(SLURM_MISSING)}; .ci/run installs them)")
    # A round below the maximum of nodes closes 1 s after the minimum joined (torchrun: 30 s).
    env = clean_env(PYTHON=sys.executable, NNODES_RANGE="1:2", TORCHRUN_ARGS="--rdzv-conf=last_call_timeout=1")
    with SlurmCluster() as cluster:
        job = cluster.sbatch("--job-name=elastic", "--nodes=1-2", "--no-kill", "--cpus-per-task=1",
                             f"--chdir={tmp_path}", str(ROOT / "launch" / "slurm.sbatch"), *CONFIG, "train.epochs=1",
                             f"out_dir={tmp_path / 'runs'}", env={**cluster.env(), **env}, cwd=tmp_path)
        info = cluster.wait(job, 300)
        log = (tmp_path / f"elastic-{job}.out").read_text(errors="replace")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", log[-4000:]
    assert "nnodes=1:2 nproc_per_node=1" in log and "torchrun x1 on cpu" in log, log[-4000:]
    assert json.loads((tmp_path / "runs" / f"elastic-{job}" / "metrics.json").read_text())["test"]["count"] == 40


def test_slurm_sbatch_refuses_a_bad_nnodes_range(tmp_path):
    conf = tmp_path / "no-cluster.conf"  # srun and scontrol fail at once should the script get that far
    conf.write_text("# not a cluster\n")
    for bad in ("2:3", "0:2", "1-2"):
        res = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), *CONFIG], cwd=tmp_path, timeout=60,
                             env=clean_env(SLURM_CONF=str(conf), SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1",
                                           NPROC_PER_NODE="1", PYTHON=sys.executable, NNODES_RANGE=bad),
                             capture_output=True, text=True)
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stdout + res.stderr
        assert res.stderr.rstrip().endswith(f"error: NNODES_RANGE={bad}: expected MIN:MAX with 1 <= MIN <= 1 "
                                            f"(the job's nodes) <= MAX"), res.stderr
