"""Shared test helpers: run the real CLI (python or torchrun) and real gloo process groups."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Tiny, fast, exact settings shared by the end-to-end tests.
TINY = [
    "data.synthetic_size=200", "data.num_workers=0", "train.batch_size=32", "train.epochs=2",
    "train.precision=fp32", "train.optimizer=sgd", "train.lr=0.002", "train.scheduler=cosine", "model.channels_last=false",
    # A narrow one-block-per-stage ResNet: what the tests prove (sampling, SyncBN, resume, files)
    # does not depend on the model's size, and it keeps the suite fast on any CPU.
    "model.name=resnet10", "model.width=8",
]


# A 1-epoch run on 125 synthetic images: 100 train / 25 valid / 25 test (25: divisible by neither 2 nor 3).
# ResNet-18 here: the fine-tuning tests load torchvision's own ResNets into it.
TINY_125 = [*TINY, "data.synthetic_size=125", "train.epochs=1", "model.name=resnet18", "model.width=64"]


# torchrun's agents meet once more after their workers ended (the "exit barrier", on the rendezvous
# store that the first node's agent hosts). That agent may end, and close the store, before another
# agent's wait has returned: the other agent then logs "Error waiting on exit barrier" with torch's
# traceback and still exits 0 (torch 2.14, elastic/agent/server/api.py). A race inside torchrun
# between nodes that finished, not a failure of the run: the multi-node tests drop that one record.
_EXIT_BARRIER = re.compile(r"^([EW]\d{4} [\d:.]+ +\d+ \S+/elastic/agent/server/api\.py:\d+\]) Error waiting on exit barrier",
                           re.M)


def without_exit_barrier_race(log: str) -> str:
    """LOG less the lines of torchrun's own "Error waiting on exit barrier" record (each starts with its prefix)."""
    for prefix in {m.group(1) for m in _EXIT_BARRIER.finditer(log)}:
        log = "".join(line for line in log.splitlines(keepends=True) if not line.startswith(prefix))
    return log


def assert_ok(res: subprocess.CompletedProcess) -> None:
    """The command succeeded; otherwise show the end of its output."""
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]


def run_cli_without(module: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m ddp_train ARGS`` in a process where ``import MODULE`` fails (an optional extra not installed)."""
    code = (f"import sys; sys.modules[{module!r}] = None  # import {module} -> ImportError\n"
            "from ddp_train.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without launcher variables (tests choose the launcher themselves)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], nproc: int = 0, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    """``python -m ddp_train ARGS`` (nproc=0) or ``torchrun --standalone --nproc_per_node=N -m ddp_train ARGS``."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ddp_train", *args]
    else:
        cmd = [sys.executable, "-m", "ddp_train", *args]
    return subprocess.run(cmd, cwd=kw.pop("cwd", ROOT), env=kw.pop("env", clean_env()), capture_output=True,
                          text=True, timeout=timeout, **kw)


def _entry(rank: int, world: int, init: str, fn: Callable, args: tuple, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, f"{out}.{rank}")
    finally:
        import gc

        gc.collect()  # DDP objects (and their comm hooks) go now, not during interpreter shutdown (SIGABRT)
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` real gloo processes; return each rank's result."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/pg"
        out = f"{tmp}/result"
        mp.start_processes(_entry, args=(world, init, fn, args, out), nprocs=world, join=True, start_method="spawn")
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest relative L2 difference ||a[k] - b[k]|| / ||b[k]|| over the floating-point entries of two
    state dicts (weights and BN statistics): the measure of the fp64 equivalence tests."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm())
               for k in b if b[k].is_floating_point() and b[k].norm() > 0)


def last_weights(run: Path) -> dict[str, Any]:
    """The model of a run folder's last checkpoint."""
    import torch

    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
