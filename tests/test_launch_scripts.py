"""launch/local.sh and launch/multinode.sh without a scheduler, and shellcheck on launch/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import ROOT, TINY, assert_ok, clean_env, free_port

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

LAUNCH = ROOT / "launch"
CONFIG = [*TINY, "data.augment=false"]


def _run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(PYTHON=sys.executable, **env), capture_output=True, text=True,
                          timeout=timeout)


def _weights(run: Path) -> list[dict[str, torch.Tensor]]:
    ckpt = run / "checkpoints"
    return [torch.load(ckpt / "model.pth", weights_only=True),
            torch.load(ckpt / "last.pt", weights_only=True)["model"]]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """``launch/local.sh``: no GPUs here, so 2 CPU workers (torchrun --standalone)."""
    out = tmp_path_factory.mktemp("launch")
    res = _run([str(LAUNCH / "local.sh"), *CONFIG, f"out_dir={out}", "run_name=local"])
    return out, res


def test_local_sh_two_cpu_workers(local_run):
    out, res = local_run
    assert_ok(res)
    assert "torchrun x2 on cpu" in res.stdout
    assert (out / "local" / "checkpoints" / "last.pt").exists()


def test_two_nodes_on_one_machine_equal_one_node(local_run):
    """Two ``multinode.sh`` agents, one worker each, rendezvous on 127.0.0.1 = the 2-worker local run."""
    out, local = local_run
    assert_ok(local)
    port = free_port()
    args = [*CONFIG, f"out_dir={out}", "run_name=two_nodes"]
    env = clean_env(PYTHON=sys.executable, NPROC_PER_NODE="1", ALLOW_LOOPBACK="1")  # both "nodes" are this machine
    nodes = [subprocess.Popen([str(LAUNCH / "multinode.sh"), str(rank), "2", "127.0.0.1", str(port), *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]  # the non-head node first: it waits for the head
    results = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=300)
            results.append((node.returncode, stdout, stderr))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    (rc1, out1, err1), (rc0, out0, err0) = results
    assert rc0 == 0 and rc1 == 0, f"node 0: {rc0}\n{out0[-2000:]}{err0[-3000:]}\nnode 1: {rc1}\n{out1[-2000:]}{err1[-3000:]}"
    assert "node 0 of 2, 1 process(es), rendezvous static on 127.0.0.1" in out0
    assert "torchrun x2 on cpu" in out0 and "torchrun x2" not in out1  # global rank 0 is on node 0
    for got, want in zip(_weights(out / "two_nodes"), _weights(out / "local")):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), "2 nodes x 1 worker differs from 1 node x 2 workers"


def test_multinode_sh_rejects_bad_arguments():
    res = _run([str(LAUNCH / "multinode.sh"), "2", "2", "127.0.0.1"])
    assert res.returncode == 2 and "NODE_RANK 2 must be below NNODES 2" in res.stderr
    res = _run([str(LAUNCH / "multinode.sh"), "0"])
    assert res.returncode == 2 and "NODE_RANK NNODES HEAD_ADDR" in res.stderr


def test_shellcheck_launch_scripts():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    # The shell scripts only: launch/ also holds Python drivers (ray_train.py) and YAML manifests.
    scripts = sorted(p for p in LAUNCH.iterdir() if p.is_file() and p.suffix in {".sh", ".sbatch"})
    assert {p.name for p in scripts} >= {"slurm.sbatch", "local.sh", "multinode.sh"}
    res = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
