"""Launch detection from environment variables, and the device/fallback choice."""

from __future__ import annotations

import pytest

from ddp_train.distributed.context import LaunchError, LaunchInfo, detect_launch, first_host, init_distributed


def test_torchrun_variables():
    info = detect_launch({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "0",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert info == LaunchInfo("torchrun", rank=3, local_rank=1, world_size=4, store_addr=("10.0.0.1", 29500))


def test_srun_step_variables():
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.local_rank, info.world_size) == ("slurm", 1, 1, 2)
    assert info.master_addr == "gpu07"
    assert info.master_port == 15000 + (1234 * 16) % 15000
    assert detect_launch({**env, "SLURM_STEP_ID": "1"}).master_port != info.master_port  # two steps of one job
    other_job = detect_launch({**env, "SLURM_JOB_ID": "1235"})
    assert other_job.master_port != info.master_port  # two jobs on one node do not clash
    assert detect_launch({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29999"}).master_port == 29999


def test_slurm_batch_shell_without_srun_is_single():
    # A plain `python -m ddp_train` in a 2-task batch script must not wait for a peer that never starts.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}
    assert detect_launch(env).launcher == "single"
    assert detect_launch({**env, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


def test_no_launcher_is_single():
    assert detect_launch({}) == LaunchInfo("single")


@pytest.mark.parametrize("nodes, first", [("n1", "n1"), ("node[03-05]", "node03"), ("a[1,4],b2", "a1"),
                                          ("c1,c2", "c1"), ("gpu-[010-011]", "gpu-010"),
                                          ("rack[1-2]-node[01-04],x", "rack1-node01")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_bad_values_are_reported():
    with pytest.raises(LaunchError, match="RANK='x' is not an integer"):
        detect_launch({"RANK": "x", "WORLD_SIZE": "2"})


def test_single_process_context_on_cpu():
    ctx = init_distributed(LaunchInfo("single"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.data_parallel) == (0, 1, True, False, False)
    assert ctx.device.type == "cpu"
    # Collectives are no-ops without a process group.
    import torch

    t = torch.ones(3)
    assert ctx.all_reduce_sum(t) is t and ctx.broadcast_object("x") == "x" and ctx.any(False) is False
