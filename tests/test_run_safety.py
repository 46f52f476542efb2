"""Nothing lost, nothing mixed: checkpoint retention and branches, one writer per run folder,
resumes that do not fit (model, data, optimizer, config, format), and a checkpoint folder that
becomes unwritable. Real CLI runs (one process or torchrun) and real files read back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp_train.persistence.checkpoint import FORMAT, REQUIRED, Checkpointer, branch_for_resume, load_checkpoint, newest_valid, step_files
from ddp_train.persistence.runlock import LOCK_NAME, STALE_S

from .helpers import ROOT, assert_ok, clean_env, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

# A small, exact, fast run: 160 train samples, global batch 32 -> 5 steps per epoch.
SMALL = ["data.synthetic_size=200", "data.num_workers=0", "train.batch_size=32", "train.epochs=2",
         "train.precision=fp32", "train.optimizer=sgd", "train.lr=0.002", "train.scheduler=cosine",
         "model.name=resnet10", "model.width=8", "model.channels_last=false"]
KEEP_ALL = [*SMALL, "checkpoint.every_steps=2", "checkpoint.keep=100"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("ddp_train: error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run keeping every checkpoint (steps 2, 4, 5, 6, 8, 10)."""
    out = tmp_path_factory.mktemp("safety")
    assert_ok(run_cli([*KEEP_ALL, f"out_dir={out}", "run_name=ref"]))
    return out / "ref"


# --------------------------------------------------------------------------- retention and branches


def _fake_checkpoint(folder: Path, step: int, branch: int = 0) -> Path:
    """A real (small) torch.save zip file under the step file's name, written now."""
    name = f"step-{step:08d}.pt" if branch == 0 else f"step-{step:08d}-b{branch}.pt"
    state = {key: 0 for key in REQUIRED}  # the keys a resumable checkpoint must have
    state.update({"format": FORMAT, "model": {"w": torch.tensor([float(step)])}, "global_step": step, "branch": branch})
    torch.save(state, folder / name)
    time.sleep(0.01)  # distinct mtimes on coarse file systems
    return folder / name


def test_retention_keeps_the_newest_written_readable_files(tmp_path):
    for step in (4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step-00000099.pt").write_bytes(b"garbage, and the highest step number")
    ckpt = Checkpointer(tmp_path, enabled=True, keep=2, branch=1)
    ckpt.save({"model": {"w": torch.zeros(1)}, "global_step": 5}, 5)  # resumed from 4: lower step, newest work
    names = {p.name for p in tmp_path.glob("step-*.pt")}
    # The file just written and the newest readable one before it are kept; the damaged file
    # neither counts toward keep nor is deleted.
    assert names == {"step-00000005-b1.pt", "step-00000008.pt", "step-00000099.pt"}, names
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "step-00000005-b1.pt")
    assert [p.name for p in step_files(tmp_path)][:2] == ["step-00000005-b1.pt", "step-00000099.pt"]


def test_resuming_an_older_step_starts_a_branch_and_auto_continues_it(tmp_path):
    old = [_fake_checkpoint(tmp_path, s) for s in (4, 6, 8)]
    state = load_checkpoint(old[0])
    assert branch_for_resume(tmp_path, old[0], state) == 1  # readable files past step 4 on branch 0
    assert branch_for_resume(tmp_path, old[2], load_checkpoint(old[2])) == 0  # the newest: continue
    newer = _fake_checkpoint(tmp_path, 6, branch=1)
    assert branch_for_resume(tmp_path, newer, load_checkpoint(newer)) == 1  # branch 1 has nothing past 6
    found = newest_valid(tmp_path, report=lambda line: None)
    assert found is not None and found[0] == newer  # written last, though step 8 is higher


def test_resume_from_an_older_checkpoint_keeps_the_new_work(ref, tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    for step in (4, 6, 8):  # a run folder whose newest work is step 8
        (run / "checkpoints" / f"step-{step:08d}.pt").write_bytes((ref / "checkpoints" / f"step-{step:08d}.pt").read_bytes())
        time.sleep(0.01)
    args = [*SMALL, "checkpoint.every_steps=2", "checkpoint.keep=2", f"out_dir={tmp_path}", "run_name=r"]
    res = run_cli([*args, f"resume={run / 'checkpoints' / 'step-00000004.pt'}"])
    assert_ok(res)
    assert "writing branch b1" in res.stdout
    names = {p.name for p in (run / "checkpoints").glob("step-*.pt")}
    # The branch's two newest files survive their own pruning; the old line's newer files were
    # older than them (written before), so they went, never the new work.
    assert names == {"step-00000008-b1.pt", "step-00000010-b1.pt"}, names
    assert os.path.samefile(run / "checkpoints" / "last.pt", run / "checkpoints" / "step-00000010-b1.pt")
    # Same training as the uninterrupted run (same world size: bit for bit).
    assert _equal(_weights(run / "checkpoints" / "last.pt"), _weights(ref / "checkpoints" / "step-00000010.pt"))
    # resume=auto continues the branch (the most recently written file), with one more epoch accepted.
    more = run_cli([*args, "resume=auto", "train.epochs=3", "resume_allow=train.epochs"])
    assert_ok(more)
    assert "resumed from epoch 3 step 0 (global step 10)" in more.stdout
    assert (run / "checkpoints" / "step-00000015-b1.pt").exists()


# --------------------------------------------------------------------------- one writer per run folder


def test_two_runs_with_the_same_run_name_one_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "ddp_train", *SMALL, "train.epochs=1", f"out_dir={tmp_path}", "run_name=same"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    refused = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    errors = [line for line in refused.splitlines() if line.startswith("ddp_train: error:")]
    # Normally the lock; if the first run had already finished, its checkpoints refuse the second.
    assert len(errors) == 1 and ("is in use by another run" in errors[0] or "already holds a run" in errors[0]), refused
    run = tmp_path / "same"
    assert len(list((run / "tb").iterdir())) == 1  # one writer: one event file
    assert not (run / LOCK_NAME).exists()  # released at the end


def _write_lock(run: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    lock.write_text(json.dumps({"host": host, "pid": pid, "start": None, "job": None, "since": time.time()}))
    if age_s:
        past = time.time() - age_s
        os.utime(lock, (past, past))


def test_a_stale_lock_does_not_block_resume_auto(ref, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    run = tmp_path / "r"
    _write_lock(run, socket.gethostname(), dead.pid)
    (run / "checkpoints" / "step-00000008.pt").write_bytes((ref / "checkpoints" / "step-00000008.pt").read_bytes())
    res = run_cli([*KEEP_ALL, f"out_dir={tmp_path}", "run_name=r", "resume=auto"])
    assert_ok(res)
    assert f"took over the lock of {run}: its process {dead.pid} on this host is no longer running" in res.stderr
    assert _equal(_weights(run / "checkpoints" / "last.pt"), _weights(ref / "checkpoints" / "last.pt"))


def test_a_live_lock_from_another_host_refuses_until_its_heartbeat_stops(tmp_path):
    run = tmp_path / "r"
    _write_lock(run, "other-node", 12345)
    args = [*SMALL, "train.epochs=1", f"out_dir={tmp_path}", "run_name=r", "resume=auto"]
    busy = run_cli(args, timeout=120)
    assert busy.returncode == 2 and "in use by another run (host other-node, pid 12345" in _one_error_line(busy)
    assert not (run / "config.yaml").exists()
    _write_lock(run, "other-node", 12345, age_s=STALE_S + 30)
    res = run_cli(args)
    assert_ok(res)
    assert "its heartbeat from host other-node stopped" in res.stderr


# --------------------------------------------------------------------------- resumes that do not fit


@pytest.mark.parametrize("change, expected", [
    (["model.width=16", "resume_allow=model.width"], "does not fit the configured run: its weights (resnet10, width 8)"),
    (["model.name=resnet18", "resume_allow=model.name"], "do not fit resnet18 (width 8): missing keys (48)"),
    (["train.optimizer=adamw"], "train.optimizer: sgd -> adamw"),
    (["data.name=fashion_mnist", "data.subset=200", "resume_allow=data.name,data.subset"], "it was trained on 10 classes"),
])
def test_a_resume_that_does_not_fit_is_refused_before_any_write(ref, tmp_path, change, expected):
    if "data.name=fashion_mnist" in change and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000008.pt").write_bytes((ref / "checkpoints" / "step-00000008.pt").read_bytes())
    (run / "config.yaml").write_text("the user's config, untouched\n")
    res = run_cli([*KEEP_ALL, *change, f"out_dir={tmp_path}", "run_name=r", "resume=auto"], timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert expected in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert (run / "config.yaml").read_text() == "the user's config, untouched\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008.pt"]
    assert not (run / "tb").exists()


def test_changed_config_lists_each_key_and_neutral_keys_pass(ref, tmp_path):
    ckpt = ref / "checkpoints" / "step-00000006.pt"
    res = run_cli([*KEEP_ALL, "train.lr=0.5", "train.seed=7", f"out_dir={tmp_path}", "run_name=r", f"resume={ckpt}"],
                  timeout=120)
    assert res.returncode == 2
    assert "  train.lr: 0.002 -> 0.5" in res.stderr and "  train.seed: 42 -> 7" in res.stderr
    assert "resume_allow=train.lr,train.seed" in res.stderr and "Traceback" not in res.stderr
    ok = run_cli([*KEEP_ALL, "data.num_workers=2", "train.log_every_steps=3", f"out_dir={tmp_path}", "run_name=s",
                  f"resume={ckpt}"])
    assert_ok(ok)
    assert "config changes that do not alter the training: data.num_workers: 0 -> 2; train.log_every_steps: 10 -> 3" in ok.stdout
    assert _equal(_weights(tmp_path / "s" / "checkpoints" / "last.pt"), _weights(ref / "checkpoints" / "last.pt"))


def test_accepted_lr_change_reaches_the_optimizer(ref, tmp_path):
    ckpt = ref / "checkpoints" / "step-00000005.pt"
    res = run_cli([*KEEP_ALL, "train.lr=0.01", "train.momentum=0.5", "resume_allow=train.lr,train.momentum",
                   f"out_dir={tmp_path}", "run_name=r", f"resume={ckpt}"])
    assert_ok(res)
    assert "accepted config changes (resume_allow): train.lr: 0.002 -> 0.01; train.momentum: 0.9 -> 0.5" in res.stdout
    last = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    group = last["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.5 and group["initial_lr"] == 0.01


@pytest.mark.parametrize("kind", ["incomplete", "newer", "foreign"])
def test_unusable_checkpoints_are_one_line(ref, tmp_path, kind):
    state = load_checkpoint(ref / "checkpoints" / "step-00000008.pt")
    bad = tmp_path / "bad.pt"
    if kind == "incomplete":
        torch.save({"model": state["model"], "global_step": 8, "format": 2}, bad)
        expected = "is incomplete (missing epoch, step_in_epoch"
    elif kind == "newer":
        torch.save({**state, "format": 99}, bad)
        expected = "written by a newer ddp_train (checkpoint format 99"
    else:
        torch.save({"model": state["model"], "global_step": 8}, bad)  # e.g. someone else's .pt
        expected = "not a ddp_train checkpoint"
    res = run_cli([*KEEP_ALL, f"out_dir={tmp_path}", "run_name=r", f"resume={bad}"], timeout=120)
    assert res.returncode == 2 and expected in _one_error_line(res), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    # resume=auto steps over such a file to the previous good checkpoint.
    run = tmp_path / "s" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step-00000006.pt").write_bytes((ref / "checkpoints" / "step-00000006.pt").read_bytes())
    time.sleep(0.01)
    (run / "step-00000008.pt").write_bytes(bad.read_bytes())
    auto = run_cli([*KEEP_ALL, f"out_dir={tmp_path}", "run_name=s", "resume=auto"])
    assert_ok(auto)
    assert expected in auto.stderr and "resumed from epoch 2 step 1 (global step 6)" in auto.stdout


# --------------------------------------------------------------------------- an unwritable checkpoint folder


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for one checkpoint of the SMALL model, not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_checkpoint_folder_stops_at_that_save_and_keeps_the_previous(small_disk):
    res = run_cli([*SMALL, "model.width=16", "checkpoint.every_steps=2", f"out_dir={small_disk}", "run_name=r"],
                  nproc=2, timeout=120)
    # torchrun itself exits 1 when a worker fails; the workers exit 2 (bad environment: the disk).
    assert res.returncode == 1 and "exitcode  : 2" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    line = _one_error_line(res)
    assert "checkpoint: cannot write" in line and "No space left on device" in line, line
    assert "the previous checkpoint" in line
    assert f'File "{ROOT / "ddp_train"}' not in res.stderr  # no traceback from our code (torchrun prints its own)
    folder = small_disk / "r" / "checkpoints"
    last = load_checkpoint(folder / "last.pt")  # still whole
    assert last["global_step"] == 2
    assert not list(folder.glob(".*tmp*"))  # no partial file left behind


def test_a_reformed_torchrun_group_continues_its_own_run_only(tmp_path):
    # torchrun re-forms the group when a node joins, without counting a restart: the workers start
    # with TORCHELASTIC_RESTART_COUNT=0 and no resume setting, and must continue their own run.
    from ddp_train.config import Config
    from ddp_train.errors import UserError
    from ddp_train.persistence.rundir import _write_config, claim_run_dir

    run = tmp_path / "r"
    lock, continuing = claim_run_dir(run, "r", None, "torchrun:job1")
    assert not continuing and not (run / "job").exists()  # written with config.yaml, once the run is accepted
    _write_config(Config(), run, "torchrun:job1")
    (run / "checkpoints" / "step-00000004.pt").write_bytes(b"x")
    lock.release()
    lock, continuing = claim_run_dir(run, "r", None, "torchrun:job1")  # the same job, re-formed
    assert continuing
    lock.release()
    for other in ("torchrun:job2", None):  # another job, or one without an id: refused as before
        with pytest.raises(UserError, match="already holds a run"):
            claim_run_dir(run, "r", None, other)
    assert (run / "job").read_text() == "torchrun:job1\n"  # a refused job leaves the owner as it was
    lock, continuing = claim_run_dir(run, "r", "auto", "torchrun:job2")  # an explicit resume=auto takes it on
    assert not continuing
    lock.release()
