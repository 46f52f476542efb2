"""One run per run folder, and every file a run writes: another run's checkpoint is not resumed into a
folder that holds a run, a write that fails is one line (exit 2) with the last checkpoint kept, stale
temporary files of killed writes go at the next start, and the lock goes however the run ends (but
SIGKILL). Real CLI runs (one process, or torchrun for the ranks' agreement), real files read back,
real full file systems (tmpfs) where the machine allows a mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ddp_train.persistence.checkpoint import load_checkpoint
from ddp_train.errors import EXIT_CHECKPOINTED, EXIT_HANG, EXIT_USER_ERROR
from ddp_train.persistence.runlock import LOCK_NAME

from .helpers import ROOT, TINY, clean_env, run_cli

SLOW_ENTRY = str(ROOT / "tests" / "slow_entry.py")
ONE_EPOCH = [*TINY, "train.epochs=1"]  # 5 steps of 32 samples


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def _one_error_line(stderr: str) -> str:
    """The run's one error line."""
    lines = [line for line in stderr.splitlines() if line.startswith("ddp_train: error:")]
    assert len(lines) == 1, stderr[-4000:]
    # None of ours, none from a writer thread (torchrun prints its own traceback when a worker fails).
    assert f'File "{ROOT / "ddp_train"}' not in stderr and "Exception in thread" not in stderr, stderr[-4000:]
    return lines[0]


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): a file's sha256, or "dir"."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _start_slow(args: list[str], **env: str) -> subprocess.Popen:
    """``python tests/slow_entry.py ARGS``: one process whose batches take ``SLOW_DATA_S`` longer each."""
    return subprocess.Popen([sys.executable, SLOW_ENTRY, *args], cwd=ROOT, env=clean_env(SLOW_RANK="0", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _interrupted(args: list[str], appears: Path, act: Callable[[subprocess.Popen], None]) -> tuple[int, str]:
    """A slow run (0.3 s a batch) that ``act`` interferes with once ``appears`` exists: its exit code and stderr."""
    proc = _start_slow(args, SLOW_DATA_S="0.3")
    try:
        _wait_for(appears, proc)
        act(proc)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


# --------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_another_runs_checkpoint_is_not_resumed_into_a_folder_holding_a_run(tmp_path):
    for name in ("rf", "re"):
        _ok(run_cli([*ONE_EPOCH, f"out_dir={tmp_path}", f"run_name={name}"]))
    rf, re = tmp_path / "rf", tmp_path / "re"
    before = _tree(re)
    more = ["train.epochs=2", "resume_allow=train.epochs"]  # the changed key allowed: only the folder is wrong
    res = run_cli([*ONE_EPOCH, *more, f"out_dir={tmp_path}", "run_name=re", f"resume={rf / 'checkpoints' / 'last.pt'}"])
    assert res.returncode == EXIT_USER_ERROR, res.stdout[-2000:] + res.stderr[-3000:]
    line = _one_error_line(res.stderr)
    assert "another run" in line and str(re) in line and "run_name" in line, line
    assert _tree(re) == before  # nothing written, nothing removed: byte for byte

    # Into a new folder it is a new run that records where it started from.
    ok = run_cli([*ONE_EPOCH, *more, f"out_dir={tmp_path}", "run_name=fork", f"resume={rf / 'checkpoints' / 'last.pt'}"])
    _ok(ok)
    fork = tmp_path / "fork"
    origin = json.loads((rf / "run.json").read_text())
    record = json.loads((fork / "run.json").read_text())
    assert record["run_id"] != origin["run_id"]
    assert record["resumed_from"] == {"checkpoint": str((rf / "checkpoints" / "last.pt").resolve()),
                                      "run_id": origin["run_id"], "global_step": 5}
    metrics = json.loads((fork / "metrics.json").read_text())
    assert metrics["resumed_from"] == record["resumed_from"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]  # rf's epoch, then the fork's own
    assert load_checkpoint(fork / "checkpoints" / "last.pt")["run_id"] == record["run_id"]
    assert load_checkpoint(rf / "checkpoints" / "last.pt")["run_id"] == origin["run_id"]
    # The fork continues as itself; rf's folder refuses the fork's checkpoint in turn.
    _ok(run_cli([*ONE_EPOCH, "train.epochs=3", "resume_allow=train.epochs", f"out_dir={tmp_path}", "run_name=fork",
                 "resume=auto"]))
    assert json.loads((fork / "run.json").read_text()) == record
    back = run_cli([*ONE_EPOCH, *more, f"out_dir={tmp_path}", "run_name=rf", f"resume={fork / 'checkpoints' / 'last.pt'}"])
    assert back.returncode == EXIT_USER_ERROR and "another run" in _one_error_line(back.stderr)


def test_the_run_identity_rule(tmp_path):
    from ddp_train.persistence.runrecord import RUN_FILE, check_same_run

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    own = run / "checkpoints" / "step-00000004.pt"
    elsewhere = tmp_path / "x.pt"
    check_same_run(run, elsewhere, {"run_id": "b"})  # an empty folder holds no run: a new run starts there
    (run / "config.yaml").write_text("x\n")  # a run that wrote its config, with no id (an older ddp_train)
    check_same_run(run, own, {"run_id": "b"})  # its own checkpoints folder: its own run
    with pytest.raises(Exception, match="another run"):
        check_same_run(run, elsewhere, {"run_id": "b"})
    (run / RUN_FILE).write_text(json.dumps({"run_id": "a", "resumed_from": None}))
    check_same_run(run, elsewhere, {"run_id": "a"})  # the same run's checkpoint, kept elsewhere
    for path in (elsewhere, own):  # another id, even copied into the checkpoints folder
        with pytest.raises(Exception, match="another run"):
            check_same_run(run, path, {"run_id": "b"})


# --------------------------------------------------------------------------- every write fails with one line


@pytest.mark.slow
def test_a_directory_in_place_of_metrics_json_stops_every_rank_with_one_line(tmp_path):
    run = tmp_path / "r"
    (run / "metrics.json").mkdir(parents=True)
    res = run_cli([*TINY, f"out_dir={tmp_path}", "run_name=r"], nproc=2, timeout=180)
    assert res.returncode != 0 and "exitcode  : 2" in res.stderr, res.stderr[-3000:]
    line = _one_error_line(res.stderr)
    assert str(run / "metrics.json") in line and "resume=auto" in line, line
    assert "lost" not in res.stderr  # rank 1 stopped on rank 0's word, not on a lost peer
    last = load_checkpoint(run / "checkpoints" / "last.pt")  # the epoch's checkpoint, whole
    assert last["global_step"] == 5
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_the_run_folder_removed_mid_run_is_one_line(tmp_path):
    run, gone = tmp_path / "r", tmp_path / "gone"
    # Each step logged (a TensorBoard write from its thread at every step), no mid-epoch checkpoints.
    # os.rename: as good as removed, for the run: its paths no longer exist.
    code, err = _interrupted([*TINY, "train.log_every_steps=1", f"out_dir={tmp_path}", "run_name=r"],
                             run / "checkpoints" / "step-00000005.pt", lambda proc: os.rename(run, gone))
    assert code == EXIT_USER_ERROR, err[-3000:]
    line = _one_error_line(err)
    assert str(run) in line and ("no longer exists" in line or "No such file or directory" in line), line
    assert load_checkpoint(gone / "checkpoints" / "step-00000005.pt")["global_step"] == 5


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(path, size)``: a real, small file system at ``path`` (needs root; skipped otherwise)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s file system."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass


@pytest.mark.slow
def test_a_full_run_folder_is_one_line_and_the_checkpoints_stay(tmp_path, mount_tmpfs):
    # The run folder on a small file system, its checkpoints on another: the disk that fills up is the
    # one metrics.json and TensorBoard write to.
    run = mount_tmpfs(tmp_path / "r", "1m")
    mount_tmpfs(run / "checkpoints", "16m")
    code, err = _interrupted([*TINY, "checkpoint.every_steps=2", f"out_dir={tmp_path}", "run_name=r"],
                             run / "checkpoints" / "step-00000002.pt", lambda proc: _fill(run))
    assert code == EXIT_USER_ERROR, err[-3000:]
    line = _one_error_line(err)
    assert "No space left on device" in line and ("metrics.json" in line or "TensorBoard" in line), line
    assert load_checkpoint(run / "checkpoints" / "last.pt")["global_step"] >= 2
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_full_out_dir_is_one_line_and_leaves_no_lock(tmp_path, mount_tmpfs):
    disk = mount_tmpfs(tmp_path / "disk", "64k")
    _fill(disk)
    res = run_cli([*ONE_EPOCH, f"out_dir={disk}", "run_name=r"], timeout=120)
    assert res.returncode == EXIT_USER_ERROR, res.stderr[-3000:]
    assert "No space left on device" in _one_error_line(res.stderr)
    assert not (disk / "r" / LOCK_NAME).exists()


# --------------------------------------------------------------------------- stale temporary files


@pytest.mark.slow
def test_stale_temp_files_of_killed_writes_go_at_the_next_start_and_only_ours(tmp_path):
    _ok(run_cli([*ONE_EPOCH, f"out_dir={tmp_path}", "run_name=r"]))
    run = tmp_path / "r"
    ours = [run / "checkpoints" / ".step-00000003.pt.tmp-4242", run / "checkpoints" / ".step-00000007-b1.pt.tmp-77",
            run / "checkpoints" / ".last.pt.tmp-4242", run / "checkpoints" / ".model.pth.tmp-1",
            run / ".metrics.json.tmp-4242", run / ".config.yaml.tmp-4242"]
    theirs = [run / "checkpoints" / ".step-00000003.pt.tmp-4242.bak", run / "checkpoints" / "step-00000003.pt.tmp-1",
              run / "checkpoints" / ".step-3.pt.tmp-x", run / "checkpoints" / "notes.tmp-4242",
              run / ".plot.png.tmp-4242", run / "my.pt"]
    for p in ours + theirs:
        p.write_bytes(os.urandom(1000))
    res = run_cli([*ONE_EPOCH, "train.epochs=2", "resume_allow=train.epochs", f"out_dir={tmp_path}", "run_name=r",
                   "resume=auto"])
    _ok(res)
    assert [p.name for p in ours if p.exists()] == []
    assert [p.name for p in theirs if not p.exists()] == []
    assert f"removed {len(ours)} temporary files of interrupted writes" in res.stdout + res.stderr


def test_the_temp_file_pattern_is_exactly_ours(tmp_path):
    from ddp_train.persistence.checkpoint import remove_stale_temp_files

    (tmp_path / "checkpoints").mkdir()
    ours = ["checkpoints/.step-00000010.pt.tmp-123", "checkpoints/.best.pt.tmp-9", ".job.tmp-5", ".run.json.tmp-5"]
    theirs = ["checkpoints/.step-00000010.pt.tmp-", "checkpoints/.other.pt.tmp-9", ".metrics.json.tmp-5~",
              "checkpoints/sub.tmp-1", ".step-00000010.pt.tmp-123"]  # a step file's temp name outside checkpoints/
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x" * 10)
    assert remove_stale_temp_files(tmp_path) == (len(ours), 40)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(theirs)


# --------------------------------------------------------------------------- the lock goes however the run ends


@pytest.mark.slow
def test_the_hang_watchdog_exit_releases_the_lock(tmp_path):
    res = subprocess.run([sys.executable, SLOW_ENTRY, *TINY, f"out_dir={tmp_path}", "run_name=r",
                          "dist.hang_timeout_s=3"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=clean_env(SLOW_RANK="0", STUCK_DATA_AFTER="2"))
    assert res.returncode == EXIT_HANG, res.stderr[-3000:]
    assert (tmp_path / "r" / "hang" / "rank0.txt").exists()
    assert not (tmp_path / "r" / LOCK_NAME).exists()


@pytest.mark.slow
def test_stop_signals_release_the_lock_and_a_resume_adds_an_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    args = [*TINY, "train.log_every_steps=1", "checkpoint.every_steps=2", f"out_dir={tmp_path}", "run_name=r"]
    proc = _start_slow(args, SLOW_DATA_S="0.3")
    _wait_for(run / "checkpoints" / "step-00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CHECKPOINTED and "stopped by SIGTERM" in err, err[-3000:]
    assert not (run / LOCK_NAME).exists()

    proc = _start_slow([*args, "resume=auto"], SLOW_DATA_S="0.3")
    _wait_for(run / LOCK_NAME, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two signals sent at once may arrive as one
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C: out at once, no checkpoint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert not (run / LOCK_NAME).exists()

    _ok(run_cli([*args, "resume=auto"]))
    # One event file per start of the run that opened TensorBoard; read together, each step once, in order.
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert 2 <= len(events) <= 3, events
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 11)), steps
    assert [e.step for e in acc.Scalars("valid/acc")] == [5, 10]


def test_held_locks_are_released_by_release_held(tmp_path):
    from ddp_train.persistence.runlock import RunLock, release_held

    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()
    release_held()
    assert not (tmp_path / LOCK_NAME).exists()
    lock.release()  # a second release is harmless


def test_a_tensorboard_write_that_fails_is_one_user_error_at_close(tmp_path, capsys):
    from ddp_train.errors import UserError
    from ddp_train.tracking import Tracker

    run = tmp_path / "r"
    run.mkdir()
    tracker = Tracker(run)
    tracker.scalar("train/loss", 1.0, 1)
    tracker.writer.flush()
    shutil.rmtree(run)
    for step in range(2, 40):  # the writer thread fails on its first write
        tracker.scalar("train/loss", 1.0, step)
    deadline = time.monotonic() + 10
    while not tracker.failed and time.monotonic() < deadline:
        tracker.scalar("train/loss", 1.0, 99)
        time.sleep(0.05)
    assert tracker.failed
    with pytest.raises(UserError, match="TensorBoard") as e:
        tracker.close()
    assert len(str(e.value).splitlines()) == 1 and str(run) in str(e.value)
    assert "Traceback" not in capsys.readouterr().err
