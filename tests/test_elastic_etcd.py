"""Elastic torchrun with the rendezvous outside the nodes: an etcd server (torchrun's ``etcd-v2`` backend).

With ``--rdzv-backend=c10d`` the rendezvous store is a TCP store inside the torchrun agent of the
node that bound the endpoint: when that node dies, every other agent loses the store and exits,
``--nnodes=1:2 --max-restarts`` notwithstanding. With ``etcd-v2`` the rendezvous lives in an etcd
server (started and stopped here, ``etcd --enable-v2``), so any node may die: the survivor forms a
new round at world size 1 and ``resume=auto`` (automatic on a torchrun restart) continues from the
newest checkpoint.

A lost "node" is a torchrun agent together with its worker: torchrun starts workers in sessions of
their own, so killing the agent alone would leave its worker training on as an orphan.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .agents import AgentGroup, children
from .helpers import ROOT, TINY, clean_env, free_port

ETCD = shutil.which("etcd")
MISSING = [name for name, ok in (("etcd (apt-get install etcd-server)", ETCD is not None),
                                 ("python-etcd (pip install -e '.[etcd]')", importlib.util.find_spec("etcd") is not None))
           if not ok]

EPOCHS = 4
STEPS_PER_EPOCH = 160 // 32  # synthetic_size=200: 160 training images, global batch 32
# A checkpoint after every step: the first appears seconds in, well before the run ends.
CONFIG = [*TINY, "data.augment=false", "train.precision=fp64", f"train.epochs={EPOCHS}", "checkpoint.every_steps=1",
          "dist.backend=gloo"]
# Quick failure detection for the test: a node that misses 3 heartbeats 1 s apart is dropped, and a
# round with fewer nodes than the maximum closes 10 s after the minimum joined (torchrun: 15 s and
# 30 s). The 10 s are also the two agents' window to form the first round together.
RDZV_CONF = "join_timeout=60,last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"


@pytest.fixture(scope="module")
def etcd_endpoint(tmp_path_factory) -> Iterator[str]:
    """A one-member etcd 3.4 cluster on free localhost ports with the v2 API on: its ``host:port``."""
    if MISSING:
        pytest.skip(f"not installed: {', '.join(MISSING)} (.ci/run installs both)")
    folder = tmp_path_factory.mktemp("etcd")
    client, peer = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    cmd = [str(ETCD), "--name=test", f"--data-dir={folder / 'data'}", "--enable-v2",  # torchrun speaks the v2 API
           f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
           f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=test={peer}"]
    with open(folder / "etcd.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_v2_api(server, client, folder / "etcd.log")
            yield client.removeprefix("http://")
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_for_v2_api(server: subprocess.Popen, url: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"etcd exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/keys/", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"etcd's v2 API did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")




def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


class Nodes(AgentGroup):
    """torchrun agents on this machine, each standing for a node: started, killed with their workers, logged."""

    def __init__(self, backend: str, endpoint: str, rdzv_id: str, folder: Path) -> None:
        self.folder = folder
        self.out = folder / "runs"
        self.cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
                    "--max-restarts=3", f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}",
                    f"--rdzv-id={rdzv_id}", f"--rdzv-conf={RDZV_CONF}", "-m", "ddp_train", *CONFIG,
                    f"out_dir={self.out}"]
        super().__init__()

    def start(self) -> subprocess.Popen:
        log = open(self.log(len(self.agents)), "w")  # a file, not a pipe: nothing blocks on a full pipe
        # A session of its own: the node is killed as a process group.
        agent = subprocess.Popen(self.cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        log.close()
        self.agents.append(agent)
        return agent

    def log(self, index: int) -> Path:
        return self.folder / f"agent{index}.log"

    def logs(self) -> str:
        return "\n".join(f"--- agent {i}:\n{self.log(i).read_text()[-3000:]}" for i in range(len(self.agents)))



def wait_for_step_checkpoint(nodes: Nodes, timeout: float = 180) -> None:
    """Until the run has written its first step checkpoint (the agents still running)."""
    deadline = time.monotonic() + timeout
    while not list(nodes.out.glob("*/checkpoints/step-*.pt")):
        if time.monotonic() > deadline or any(agent.poll() is not None for agent in nodes.agents):
            pytest.fail(f"no step checkpoint (agents: {[a.poll() for a in nodes.agents]})\n{nodes.logs()}")
        time.sleep(0.05)


def rank0_agent(nodes: Nodes) -> subprocess.Popen:
    """The agent whose worker is global rank 0 (it hosts the workers' store and writes the run folder)."""
    workers = {agent.pid: [environ(w) for w in children(agent.pid)] for agent in nodes.agents}
    assert all(env.get("WORLD_SIZE") == "2" for envs in workers.values() for env in envs), \
        f"the first round did not hold both nodes: {workers}\n{nodes.logs()}"
    [agent] = [a for a in nodes.agents if any(env.get("RANK") == "0" for env in workers[a.pid])]
    return agent


@pytest.mark.slow
def test_etcd_survivor_finishes_when_the_rank0_node_dies(etcd_endpoint, tmp_path):
    """2 nodes on etcd-v2; the node of global rank 0 dies after a checkpoint; the other finishes alone."""
    with Nodes("etcd-v2", etcd_endpoint, "etcd_kill", tmp_path) as nodes:
        nodes.start()
        nodes.start()
        wait_for_step_checkpoint(nodes)
        victim = rank0_agent(nodes)
        nodes.kill(victim)
        [survivor] = [a for a in nodes.agents if a is not victim]
        try:
            survivor.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survivor did not finish within 240 s\n{nodes.logs()}")
        log = nodes.log(nodes.agents.index(survivor)).read_text()
    assert survivor.returncode == 0, nodes.logs()
    resumed = re.search(r"resumed from epoch \d+ step \d+ \(global step (\d+)\), world size 2 -> 1", log)
    assert resumed and int(resumed.group(1)) >= 1, log[-3000:]  # continued from a checkpoint, not from scratch
    [run] = nodes.out.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1)) and metrics["test"]["count"] == 40
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["world_size"] == 1 and last["global_step"] == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.slow
def test_c10d_survivor_ends_with_the_store_host(tmp_path):
    """Why etcd: with c10d the rendezvous store is in the first agent; when its node dies the other ends too."""
    port = free_port()
    with Nodes("c10d", f"127.0.0.1:{port}", "c10d_kill", tmp_path) as nodes:
        host = nodes.start()
        _wait_for_listener(port, host, nodes)  # the first agent holds the store before the second starts
        nodes.start()
        wait_for_step_checkpoint(nodes)
        nodes.kill(host)
        [survivor] = nodes.agents[1:]
        try:
            survivor.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survivor neither finished nor failed within 120 s\n{nodes.logs()}")
    assert survivor.returncode != 0, nodes.logs()
    assert "The connection to the C10d store has failed" in nodes.log(1).read_text(), nodes.logs()
    assert not list(nodes.out.glob("*/metrics.json"))


def _wait_for_listener(port: int, agent: subprocess.Popen, nodes: Nodes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"the first agent did not open the c10d store on port {port}\n{nodes.logs()}")


@pytest.mark.slow
def test_multinode_sh_with_etcd(etcd_endpoint, tmp_path):
    """launch/multinode.sh with RDZV_BACKEND=etcd-v2: two nodes meet through etcd and train together."""
    env = clean_env(PYTHON=sys.executable, NPROC_PER_NODE="1", ALLOW_LOOPBACK="1", RDZV_BACKEND="etcd-v2",
                    RDZV_ENDPOINT=etcd_endpoint, RDZV_ID="etcd_multinode", RDZV_TIMEOUT="120")
    args = [*TINY, "data.augment=false", "train.epochs=1", f"out_dir={tmp_path}", "run_name=two"]
    nodes = [subprocess.Popen([str(ROOT / "launch" / "multinode.sh"), str(rank), "2", "127.0.0.1", *args], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert all("rendezvous etcd-v2" in o for o in outputs)
    assert sum("torchrun x2 on cpu" in o for o in outputs) == 1  # one world of 2, reported by its rank 0
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]["count"] == 40


def test_multinode_sh_etcd_needs_an_endpoint():
    env = clean_env(PYTHON=sys.executable, NPROC_PER_NODE="1", RDZV_BACKEND="etcd-v2")
    res = subprocess.run([str(ROOT / "launch" / "multinode.sh"), "0", "2", "10.0.0.1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        "multinode.sh: RDZV_BACKEND=etcd-v2 needs RDZV_ENDPOINT=HOST:PORT, the client address of an etcd server "
        "started with --enable-v2"]
