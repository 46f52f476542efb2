"""The status file (DDP_TRAIN_STATUS_FILE) that launch/slurm.sbatch reads: progress and how a run ended.

The decorator and the rank choice are checked in process; the rest through the real CLI, with
the file read back.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddp_train.resilience import status
from ddp_train.errors import EXIT_CHECKPOINTED

from .helpers import TINY, assert_ok, clean_env, run_cli

STEPS_PER_EPOCH = 160 // 32  # TINY: 160 training samples, batch 32


def test_only_global_rank_zero_with_the_variable_writes(tmp_path):
    path = tmp_path / "s.json"
    assert status.for_process({}) is status.NO_STATUS
    assert status.for_process({status.ENV: str(path)}).path == path  # one process: rank 0
    torchrun = {status.ENV: str(path), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}  # as torchrun sets them (without MASTER_*, detect_launch refuses the launch)
    assert status.for_process(torchrun) is status.NO_STATUS
    assert status.for_process({**torchrun, "RANK": "0", "LOCAL_RANK": "0"}).path == path
    srun = {status.ENV: str(path), "SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
            "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "n1"}
    assert status.for_process(srun) is status.NO_STATUS
    status.NO_STATUS.checkpoint(3, tmp_path / "last.pt")
    status.NO_STATUS.exit(0, "finished")
    assert not path.exists()


def test_main_s_exit_is_recorded_and_its_status_installed_meanwhile(tmp_path, monkeypatch):
    """A crash (an exception out of main) is exit 1 with its first line; a returned code, its reason."""
    path = tmp_path / "s.json"
    monkeypatch.setenv(status.ENV, str(path))
    seen = []

    @status.reported
    def crashing() -> int:
        seen.append(status.current())
        status.current().checkpoint(7, tmp_path / "last.pt")
        raise RuntimeError("boom\nsecond line")

    with pytest.raises(RuntimeError):
        crashing()
    assert seen[0].path == path and status.current() is status.NO_STATUS  # installed for the call only
    assert json.loads(path.read_text()) == {"global_step": 7, "checkpoint": str(tmp_path / "last.pt"),
                                            "exit_code": 1, "reason": "crashed: RuntimeError: boom"}

    assert status.reported(lambda: EXIT_CHECKPOINTED)() == EXIT_CHECKPOINTED
    assert json.loads(path.read_text())["reason"] == "stopped by a signal after writing a checkpoint"


@pytest.mark.slow
def test_real_runs_record_their_checkpoint_step_and_exit(tmp_path):
    """A finished run: its last checkpoint's step, exit 0. A bad config value: exit 2, no step."""
    path = tmp_path / "s.json"
    res = run_cli([*TINY, f"out_dir={tmp_path}", "run_name=ok"], env=clean_env(DDP_TRAIN_STATUS_FILE=str(path)))
    assert_ok(res)
    record = json.loads(path.read_text())
    last = tmp_path / "ok" / "checkpoints" / "last.pt"
    assert record == {"global_step": 2 * STEPS_PER_EPOCH, "checkpoint": str(last), "exit_code": 0, "reason": "finished"}
    assert torch.load(last, weights_only=True)["global_step"] == record["global_step"]

    res = run_cli([*TINY, "train.epochs=many", f"out_dir={tmp_path}"], env=clean_env(DDP_TRAIN_STATUS_FILE=str(path)))
    assert res.returncode == 2, res.stderr
    record = json.loads(path.read_text())
    assert (record["global_step"], record["exit_code"]) == (None, 2), record
    assert record["reason"].startswith("stopped on a bad input"), record


@pytest.mark.slow
def test_an_unwritable_status_file_is_one_warning_and_training_goes_on(tmp_path):
    path = tmp_path / "missing" / "s.json"
    res = run_cli([*TINY, "train.epochs=1", f"out_dir={tmp_path}", "run_name=r"],
                  env=clean_env(DDP_TRAIN_STATUS_FILE=str(path)))
    assert_ok(res)
    warnings = [line for line in res.stderr.splitlines() if "status file" in line]
    assert len(warnings) == 1 and str(path) in warnings[0] and "DDP_TRAIN_STATUS_FILE" in warnings[0], res.stderr
    assert (tmp_path / "r" / "metrics.json").exists() and not path.exists()
