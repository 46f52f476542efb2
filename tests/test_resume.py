"""Never lose a run: exact resume, stop signals, elastic restarts, damaged checkpoints, failing ranks.

All through the real CLI under torchrun (gloo, CPU). The reference is one uninterrupted run;
every interrupted-and-resumed run must end with bit-identical weights (same world size).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers import ROOT, TINY, assert_ok, clean_env, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

# Augmentation on: the exactness must not depend on it being off.
CFG = TINY + ["data.augment=true", "checkpoint.every_steps=2", "checkpoint.keep=100"]
STEPS_PER_EPOCH = 5  # 160 training samples / global batch 32


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def _history(run: Path) -> list[dict]:
    rows = json.loads((run / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k not in ("epoch_s", "img_per_s")} for r in rows]  # timings differ


def _assert_same_run(run: Path, ref: Path) -> None:
    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run in {different[:5]}"
    assert _history(run) == _history(ref)
    assert json.loads((run / "metrics.json").read_text())["test"] == json.loads((ref / "metrics.json").read_text())["test"]



@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume")
    assert_ok(run_cli([*CFG, f"out_dir={out}", "run_name=ref"], nproc=2))
    return out / "ref"


@pytest.mark.parametrize("step, extra", [
    (5, ["data.num_workers=2"]),  # at the epoch boundary, with loader workers the reference did not have
    (6, []),                      # in the middle of the second epoch
])
def test_resume_from_any_step_is_exact(ref, tmp_path, step, extra):
    ckpt = ref / "checkpoints" / f"step-{step:08d}.pt"
    res = run_cli([*CFG, *extra, f"out_dir={tmp_path}", "run_name=r", f"resume={ckpt}"], nproc=2)
    assert_ok(res)
    epoch, in_epoch = divmod(step, STEPS_PER_EPOCH)
    assert f"resumed from epoch {epoch + 1} step {in_epoch} (global step {step})" in res.stdout
    _assert_same_run(tmp_path / "r", ref)


def test_resume_on_another_world_size_is_close(tmp_path):
    """2 ranks -> 1 process mid-epoch: the same global batches, so the same run up to rounding.

    In fp64 (resnet10, width 16), so that rounding cannot matter on any CPU: in fp32 a flipped ReLU
    sign makes the difference machine-dependent. Measured: 2e-14 relative (the largest over weights and
    BN statistics); 0.6 with the 2 ranks' SyncBN broken (per-rank statistics).
    """
    from .helpers import rel_diff

    cfg = [*CFG, "data.synthetic_size=160", "train.precision=fp64", "train.lr=0.05", "model.name=resnet10",
           "model.width=16"]  # 2 epochs of 4 steps
    assert_ok(run_cli([*cfg, f"out_dir={tmp_path}", "run_name=ref"], nproc=2))
    ref = tmp_path / "ref"
    res = run_cli([*cfg, f"out_dir={tmp_path}", "run_name=r", f"resume={ref / 'checkpoints' / 'step-00000006.pt'}"])
    assert_ok(res)
    assert "world size 2 -> 1" in res.stdout and "resumed from epoch 2 step 2" in res.stdout
    a, b = _weights(tmp_path / "r"), _weights(ref)
    assert b["fc.weight"].dtype == torch.float64
    assert rel_diff(a, b) < 1e-9, rel_diff(a, b)


def _start(args: list[str], nproc: int = 2, extra_torchrun: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *extra_torchrun, "-m", "ddp_train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before " + str(path)
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_checkpoints_then_resume_auto_finishes_exactly(ref, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # With loader workers: torchrun signals whole process groups, and a worker that dies of the
    # SIGTERM meant for its rank must not take the rank down before its checkpoint.
    args = [*CFG, "data.num_workers=2", f"out_dir={tmp_path}", "run_name=r"]
    proc = _start(args)
    _wait_for(tmp_path / "r" / "checkpoints" / "step-00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to every worker
    out, err = proc.communicate(timeout=120)
    assert "ddp_train: stopped by SIGTERM; checkpoint" in err, err[-3000:]
    assert "exitcode  : 75" in err or "exitcode: 75" in err or proc.returncode != 0
    assert not (tmp_path / "r" / "metrics.json").exists() or len(_history(tmp_path / "r")) < 2

    res = run_cli([*args, "resume=auto"], nproc=2)
    assert_ok(res)
    assert "resumed from epoch" in res.stdout
    _assert_same_run(tmp_path / "r", ref)
    # TensorBoard continues the same curves: no step logged twice across the two processes.
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("train/loss", "valid/acc", "lr"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [e.step for e in acc.Scalars("valid/acc")] == [5, 10]


def test_sigkill_one_worker_torchrun_restarts_and_ends_exactly(ref, tmp_path):
    args = [*CFG, f"out_dir={tmp_path}", "run_name=r"]
    proc = _start(args, extra_torchrun=("--max-restarts=1",))
    _wait_for(tmp_path / "r" / "checkpoints" / "step-00000002.pt", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # no chance to save anything
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "resumed from epoch" in out
    _assert_same_run(tmp_path / "r", ref)


def _copy_checkpoints(ref: Path, run: Path, steps: list[int]) -> Path:
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    for step in steps:
        shutil.copy(ref / "checkpoints" / f"step-{step:08d}.pt", folder)
    shutil.copy(ref / "checkpoints" / "best.pt", folder)  # the best epoch's weights, for the final test
    return folder


def test_damaged_newest_checkpoints_fall_back_to_the_previous_good_one(ref, tmp_path):
    folder = _copy_checkpoints(ref, tmp_path / "r", [4, 5, 6, 8])
    data = (folder / "step-00000006.pt").read_bytes()
    (folder / "step-00000008.pt").write_bytes(os.urandom(4096))          # garbage
    (folder / "step-00000006.pt").write_bytes(data[: len(data) // 2])     # truncated
    (folder / "step-00000005.pt").write_bytes(b"")                        # empty
    res = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=r", "resume=auto"], nproc=2)
    assert_ok(res)
    for step in (8, 6, 5):
        assert sum(f"step-{step:08d}.pt is damaged" in line for line in res.stderr.splitlines()) == 1, res.stderr
    assert "resumed from epoch 1 step 4 (global step 4)" in res.stdout
    _assert_same_run(tmp_path / "r", ref)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(ref, tmp_path):
    folder = _copy_checkpoints(ref, tmp_path / "r", [8])
    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(marker), "global_step": 99}, folder / "step-00000099.pt")
    assert not marker.exists()
    res = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=r", "resume=auto"], nproc=2)
    assert_ok(res)
    assert "step-00000099.pt is refused: not a plain checkpoint, it would run code" in res.stderr
    assert not marker.exists(), "the pickle's payload ran"
    assert "resumed from epoch 2 step 3 (global step 8)" in res.stdout
    _assert_same_run(tmp_path / "r", ref)


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
    folder = tmp_path / "r" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-00000003.pt").write_bytes(b"garbage")
    res = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=r", "resume=auto"], timeout=120)
    assert res.returncode == 2
    assert "ddp_train: error: no usable checkpoint in" in res.stderr
    bad = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=s", f"resume={folder / 'step-00000003.pt'}"], timeout=120)
    assert bad.returncode == 2 and "is damaged" in bad.stderr


def test_exception_on_one_rank_ends_the_job_quickly_with_its_traceback(tmp_path):
    start = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fault_entry.py"), *TINY, f"out_dir={tmp_path}", "run_name=r"]
    res = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in res.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


def test_run_name_is_required_for_resume_auto(tmp_path):
    res = run_cli([*CFG, f"out_dir={tmp_path}", "resume=auto"], timeout=120)
    assert res.returncode == 2 and "resume=auto: set run_name" in res.stderr
