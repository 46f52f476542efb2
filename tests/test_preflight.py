"""Preflight agreement between ranks (ddp_train/resilience/preflight.py), and launch/multinode.sh's two early
stops: a loopback HEAD_ADDR, and a rendezvous that times out (ddp_train/resilience/launch_agent.py)."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp_train.config import load_config
from ddp_train.data import load_dataset
from ddp_train.distributed.context import DistContext
from ddp_train.resilience.preflight import (NODE_LOCAL_KEYS, PACKAGE_DIR, PreflightError, check_agreement, differences,
                                            fingerprint, mismatch_message)

from .helpers import FASHION_ROOT, ROOT, TINY, clean_env, free_port, spawn

MULTINODE = ROOT / "launch" / "multinode.sh"
HOST = socket.gethostname()
SMALL = [*TINY, "data.synthetic_size=40"]  # the preflight needs a loaded dataset, not a trainable one
FASHION = [*TINY, "data.name=fashion_mnist", "data.subset=200"]
CHANGED = 7  # the training label changed in the copy (inside data.subset)


def _fp(overrides: list[str], rank: int = 0, node: str = "node 0, host a", **kw):
    cfg = load_config(None, overrides)
    return fingerprint(cfg, load_dataset(cfg.data), rank, node, **kw)


@pytest.fixture(scope="module")
def changed_fashion(tmp_path_factory) -> Path:
    """A Fashion-MNIST folder equal to the installed one but for training label CHANGED (images: links)."""
    if not (FASHION_ROOT / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
    root = tmp_path_factory.mktemp("fashion_changed")
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (root / name).symlink_to(FASHION_ROOT / name)
    data = bytearray(gzip.decompress((FASHION_ROOT / "train-labels-idx1-ubyte.gz").read_bytes()))
    data[8 + CHANGED] = (data[8 + CHANGED] + 1) % 10  # IDX: 8 header bytes, then one byte per label
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(data)))
    return root


# --------------------------------------------------------------------------- the comparison


def test_same_code_config_and_data_agree_whatever_the_node_local_keys():
    ref = _fp(SMALL)
    other = _fp([*SMALL, "data.root=/mnt/elsewhere", "data.num_workers=5", "data.download=true"], 1, "node 1, host b")
    assert {"data.root", "data.num_workers", "data.download"} <= set(NODE_LOCAL_KEYS)
    assert differences(other, ref) == []
    assert mismatch_message([ref, other, dataclasses.replace(other, rank=2)]) is None


def test_a_config_difference_is_named():
    ref, other = _fp([*SMALL, "train.lr=0.1"]), _fp([*SMALL, "train.lr=0.2"], 1, "node 1, host b")
    assert differences(other, ref) == ["config: train.lr 0.2 vs rank 0's 0.1"]
    message = mismatch_message([ref, other])
    assert message is not None and "\n" not in message
    assert "rank 1 (node 1, host b): config: train.lr 0.2 vs rank 0's 0.1" in message
    assert "rank 0 (node 0, host a)" in message and "give every node the same arguments" in message


def test_a_source_difference_names_the_files(tmp_path):
    package = tmp_path / "ddp_train"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert differences(_fp(SMALL, package_dir=package), _fp(SMALL)) == []  # a copy is the same source
    with open(package / "training" / "trainer.py", "a") as f:
        f.write("# edited on one node\n")
    (package / "extra.py").write_text("")
    found = differences(_fp(SMALL, 1, package_dir=package), _fp(SMALL))
    assert found == ["source: ddp_train/training/trainer.py differs, ddp_train/extra.py only here"]


def test_a_torch_difference_is_named():
    ref = _fp(SMALL)
    other = dataclasses.replace(ref, rank=1, torch="2.11.0")  # another torch cannot be installed beside this one
    assert differences(other, ref) == [f"torch 2.11.0 vs rank 0's {torch.__version__}"]
    assert "install the same torch on every node" in mismatch_message([ref, other])


def test_a_changed_label_is_named_and_ranks_are_grouped_by_node(changed_fashion):
    ref = _fp(FASHION, 0, "node 0, host a")
    same = _fp(FASHION, 1, "node 0, host a")
    changed = [_fp([*FASHION, f"data.root={changed_fashion}"], r, "node 1, host b") for r in (2, 3)]
    found = differences(changed[0], ref)
    assert len(found) == 1 and found[0].startswith("dataset: train labels hash ")
    assert ref.dataset["train size"] == changed[0].dataset["train size"] == 200
    message = mismatch_message([ref, same, *changed])
    assert message is not None and "ranks 2-3 (node 1, host b): dataset: train labels hash" in message
    assert "rank 1" not in message and "give every node the same data" in message


def _two_ranks(rank: int, world: int) -> tuple[str, str, bool]:
    cfg = load_config(None, [*SMALL, f"train.lr={0.1 if rank == 0 else 0.3}"])  # rank 1's differs
    ctx = DistContext("torchrun", rank, rank, world, torch.device("cpu"), "gloo")
    try:
        check_agreement(cfg, ctx, load_dataset(cfg.data))
    except PreflightError as e:
        return type(e).__name__, str(e), bool(getattr(e, "report", True))
    return "agreed", "", False


def test_every_rank_stops_and_one_reports():
    results = spawn(_two_ranks, 2)
    assert [r[0] for r in results] == ["PreflightError", "PreflightError"]
    assert [r[2] for r in results] == [True, False]  # printed once, by rank 0
    assert results[0][1] == results[1][1]
    assert f"rank 1 (host {HOST}): config: train.lr 0.3 vs rank 0's 0.1" in results[0][1]


# --------------------------------------------------------------------------- launch/multinode.sh


def _multinode(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MULTINODE), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=clean_env(PYTHON=sys.executable, NPROC_PER_NODE="1", **env))


@pytest.mark.parametrize("node, nnodes, head", [("0", "2", "127.0.0.1"), ("1", "2", "localhost"),
                                                ("1", "3", "::1"), ("0", "2", "127.1.2.3")])
def test_a_loopback_head_address_is_refused(node, nnodes, head):
    res = _multinode(node, nnodes, head, str(free_port()), timeout=30)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and f"HEAD_ADDR {head} is a loopback address" in res.stderr
    assert "other machines cannot reach" in res.stderr and "ALLOW_LOOPBACK=1" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_a_node_alone_times_out_naming_how_many_joined(backend):
    port = free_port()
    start = time.monotonic()
    res = _multinode("0", "2", "127.0.0.1", str(port), *SMALL, RDZV_TIMEOUT="2", RDZV_BACKEND=backend,
                     ALLOW_LOOPBACK="1")
    took = time.monotonic() - start
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"ddp_train: rendezvous timed out after 2 s: 1 of 2 nodes joined at 127.0.0.1:{port}; start the other "
        f"nodes, or check HEAD_ADDR, PORT and the firewall")
    assert "Traceback" not in res.stderr
    assert took < 60, f"{took:.0f} s"


@pytest.mark.slow
def test_a_node_without_its_head_node_says_so():
    port = free_port()
    res = _multinode("1", "2", "127.0.0.1", str(port), *SMALL, RDZV_TIMEOUT="2", ALLOW_LOOPBACK="1")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"ddp_train: rendezvous timed out after 2 s: this node could not reach the head node at 127.0.0.1:{port}; "
        f"start node 0 there, or check HEAD_ADDR, PORT and the firewall")
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_node_whose_data_differs_stops_the_job_with_one_line(changed_fashion, tmp_path):
    """Two nodes on this machine, node 1 reading a copy of Fashion-MNIST with one training label changed."""
    port, out = free_port(), tmp_path / "runs"
    env = clean_env(PYTHON=sys.executable, NPROC_PER_NODE="1", ALLOW_LOOPBACK="1")
    roots = {0: FASHION_ROOT, 1: changed_fashion}
    nodes = {rank: subprocess.Popen([str(MULTINODE), str(rank), "2", "127.0.0.1", str(port), *FASHION,
                                     f"data.root={roots[rank]}", f"out_dir={out}", "run_name=r"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)}
    results = {}
    try:
        for rank, node in nodes.items():
            stdout, stderr = node.communicate(timeout=180)
            results[rank] = (node.returncode, stdout, stderr)
    finally:
        for node in nodes.values():
            if node.poll() is None:
                node.kill()
                node.wait()
    report = "\n".join(results[0][1:])
    assert [results[0][0], results[1][0]] == [2, 2], report[-3000:] + "\n".join(results[1][1:])[-3000:]
    lines = [line for r in (0, 1) for line in "\n".join(results[r][1:]).splitlines() if "preflight:" in line]
    assert len(lines) == 1, lines  # one line for the job, from rank 0 on node 0
    assert lines[0].startswith("ddp_train: error: preflight: ")
    assert f"rank 1 (node 1, host {HOST}): dataset: train labels hash" in lines[0]
    assert not (out / "r").exists()  # stopped before anything was written to the run folder
