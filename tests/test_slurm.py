"""launch/slurm.sbatch and direct srun on a real single-machine SLURM cluster (tests/slurm_cluster.py).

One cluster per test session. Every job is a 2-process CPU run of the same tiny synthetic config,
so the final weights of all of them must be identical (gloo on CPU, fp32, no augmentation):
- the batch script, uninterrupted (the reference);
- direct ``srun -n 2 python -m ddp_train`` inside a job (SLURM launch detection, no torchrun);
- the batch script preempted the way SLURM does it (USR1 to the batch shell), which checkpoints,
  requeues itself and resumes with ``resume=auto``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers import ROOT, TINY, clean_env
from .slurm_cluster import SlurmCluster, missing_packages

SBATCH = ROOT / "launch" / "slurm.sbatch"
# 3 epochs of 5 steps: long enough to signal the preemption test's job in the middle of a run.
CONFIG = [*TINY, "data.augment=false", "train.epochs=3"]
STEPS_PER_EPOCH = 160 // 32
JOB_TIMEOUT = 300

_missing = missing_packages()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(_missing),
    reason=f"SLURM packages not installed (missing {', '.join(_missing)}): "
           "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)",
)]


@pytest.fixture(scope="session")
def cluster():
    with SlurmCluster() as c:
        yield c


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """What a user's shell would export to sbatch: no launcher variables, this cluster's config."""
    return clean_env(SLURM_CONF=str(cluster.conf), PYTHON=sys.executable, **extra)


def step_of(path: Path) -> int:
    """The global step a checkpoint was written at."""
    state = torch.load(path, weights_only=True)
    return state["global_step"] if "global_step" in state else state["step"]


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<no log at {path}>"


def weights(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(best weights from model.pth, last weights from last.pt)."""
    ckpt = run / "checkpoints"
    return (torch.load(ckpt / "model.pth", weights_only=True),
            torch.load(ckpt / "last.pt", weights_only=True)["model"])


def assert_same_weights(run: Path, ref: Path) -> None:
    for got, want, name in zip(weights(run), weights(ref), ("model.pth", "last.pt")):
        assert got.keys() == want.keys()
        diff = {k: (got[k].double() - want[k].double()).abs().max().item() for k in got
                if got[k].is_floating_point() and not torch.equal(got[k], want[k])}
        assert not diff, f"{name} of {run} differs from {ref}: max abs diff {max(diff.values()):.3g} in {len(diff)} tensors"
        assert all(torch.equal(got[k], want[k]) for k in got), f"{name}: integer buffers differ"


def finished_ok(cluster: SlurmCluster, job: str, info: dict[str, str], log: Path) -> None:
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job}: {info.get('JobState')} exit {info.get('ExitCode')}\n{read_log(log)[-6000:]}\n{cluster.logs()}")


@pytest.fixture(scope="module")
def reference(cluster, work):
    """``sbatch --cpus-per-task=2 launch/slurm.sbatch CONFIG``: 2 CPU workers on one node."""
    job = cluster.sbatch("--job-name=tiny", "--cpus-per-task=2", f"--chdir={work}", str(SBATCH),
                         *CONFIG, f"out_dir={work / 'runs'}", env=job_env(cluster))
    info = cluster.wait(job, JOB_TIMEOUT)
    return job, info, work / "runs" / f"tiny-{job}", work / f"tiny-{job}.out"


def test_sbatch_two_process_cpu_run(cluster, reference):
    job, info, run, log = reference
    finished_ok(cluster, job, info, log)
    text = read_log(log)
    # Header defaults: log name %x-%j.out, requeue allowed; the script's own choices.
    assert info["Requeue"] == "1" and info["Restarts"] == "0"
    assert "SLURM_RESTART_COUNT=0" in text
    assert "nnodes=1 nproc_per_node=2" in text, text  # from SLURM_CPUS_ON_NODE (--cpus-per-task=2)
    assert f"rendezvous={cluster.node}:{15000 + int(job) % 15000}" in text, text
    assert f"run_name=tiny-{job} resume=auto" in text  # default run name: job name and id
    assert "torchrun x2 on cpu" in text and text.count("test | loss") == 1

    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["test"]["count"] == 40
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"last.pt", "best.pt", "model.pth"} <= names and not any(n.startswith(".") for n in names), names
    assert step_of(run / "checkpoints" / "last.pt") == 3 * STEPS_PER_EPOCH
    assert (run / "config.yaml").exists()
    events = list((run / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_direct_srun_two_tasks_equals_torchrun(cluster, work, reference):
    """``srun -n 2 python -m ddp_train`` in a batch job: ranks from SLURM_PROCID, no torchrun."""
    py = shlex.quote(sys.executable)
    probe = "import os; from ddp_train.distributed import detect_launch; print('probe', detect_launch(os.environ))"
    args = shlex.join([*CONFIG, f"out_dir={work / 'runs'}", "run_name=srun"])
    script = "; ".join([
        f"{py} -c {shlex.quote(probe)}",  # the batch shell itself: a plain python is one process
        f"srun --kill-on-bad-exit=1 {py} -m ddp_train {args}",
    ])
    job = cluster.sbatch("--job-name=srun", "--ntasks=2", f"--chdir={work}", "--output=%x-%j.out", f"--wrap={script}",
                         env=job_env(cluster))
    info = cluster.wait(job, JOB_TIMEOUT)
    log = work / f"srun-{job}.out"
    finished_ok(cluster, job, info, log)
    text = read_log(log)
    assert "probe LaunchInfo(launcher='single'" in text, text
    assert "slurm x2 on cpu" in text, text  # the launcher line of ddp_train: SLURM detection, world size 2
    assert text.count("test | loss") == 1  # rank 0 only
    _, _, ref_run, _ = reference
    assert_same_weights(work / "runs" / "srun", ref_run)


def test_preemption_checkpoints_requeues_and_resumes(cluster, work, reference):
    """USR1 to the batch shell (what ``#SBATCH --signal=B:USR1@...`` does before the time limit).

    The job must write a checkpoint, requeue itself, restart with SLURM_RESTART_COUNT=1, resume
    from that checkpoint (epoch 1 is not trained again) and end with the reference's weights.
    DataLoader workers are on (data.num_workers=2): they get the step-wide signal too.
    """
    job = cluster.sbatch("--job-name=preempt", "--cpus-per-task=2", f"--chdir={work}", str(SBATCH),
                         *CONFIG, "data.num_workers=2", f"out_dir={work / 'runs'}", env=job_env(cluster))
    run, log = work / "runs" / f"preempt-{job}", work / f"preempt-{job}.out"
    metrics_path, last_path = run / "metrics.json", run / "checkpoints" / "last.pt"

    # Wait for the end of epoch 1 (its checkpoint and metrics), then signal during epoch 2.
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics_path.exists() and last_path.exists()):
        assert time.monotonic() < deadline, f"no epoch-1 checkpoint\n{read_log(log)[-4000:]}"
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), read_log(log)[-4000:]
        time.sleep(0.2)
    before = json.loads(metrics_path.read_text())["history"]
    step_before = step_of(last_path)
    assert [h["epoch"] for h in before] == [1] and step_before == STEPS_PER_EPOCH, (before, step_before)
    cluster.run("scancel", "--signal=USR1", "--batch", job)

    # The trap requeues the job: SLURM counts the restart while it is pending again.
    deadline = time.monotonic() + 120
    while cluster.job(job).get("Restarts", "0") == "0":
        info = cluster.job(job)
        assert info.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"), (
            f"job ended without a requeue: {info.get('JobState')}\n{read_log(log)[-6000:]}")
        assert time.monotonic() < deadline, f"no requeue\n{read_log(log)[-6000:]}"
        time.sleep(0.2)
    step_stopped = step_of(last_path)
    assert step_stopped > step_before, f"no checkpoint written on the signal (last.pt is at step {step_stopped})"

    info = cluster.wait(job, JOB_TIMEOUT)
    finished_ok(cluster, job, info, log)
    assert info["Restarts"] == "1"
    text = read_log(log)
    first, sep, second = text.partition("SLURM_RESTART_COUNT=1")
    assert sep, f"the requeued run did not log SLURM_RESTART_COUNT=1\n{text[-6000:]}"
    assert "SLURM_RESTART_COUNT=0" in first and "SIGUSR1: passing it on" in first
    assert f"requeueing job {job}" in first, first[-4000:]
    # Resumed, not restarted: epoch 1 was trained once, by the first run; the second finished.
    assert text.count("epoch   1 |") == 1 and "epoch   1 |" in first, text[-6000:]
    assert "epoch   3 |" in second and "test | loss" in second, second[-4000:]

    history = json.loads(metrics_path.read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0] == before[0]  # the same record (timings included): epoch 1 was not re-run
    assert step_of(last_path) == 3 * STEPS_PER_EPOCH
    _, _, ref_run, _ = reference
    assert_same_weights(run, ref_run)
