"""launch/slurm.sbatch and direct srun on a real single-machine SLURM cluster (tests/slurm_cluster.py).

One cluster per test session. Every job is a 2-process CPU run of the same tiny synthetic config,
so the final weights of all of them must be identical (gloo on CPU, fp32, no augmentation):
- the batch script, uninterrupted (the reference);
- direct ``srun -n 2 python -m ddp_train`` inside a job (SLURM launch detection, no torchrun);
- the batch script preempted the way SLURM does it (USR1 to the batch shell), which checkpoints,
  requeues itself and resumes with ``resume=auto``.
Then when the script requeues and when not: one task of a job array, a crash after progress and a
crash loop, a bad config value, no scontrol, and (without a cluster) a loopback rendezvous host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers import ROOT, TINY, clean_env
from .slurm_cluster import FINAL_STATES, SlurmCluster, missing_packages

SBATCH = ROOT / "launch" / "slurm.sbatch"
# 3 epochs of 5 steps: long enough to signal the preemption test's job in the middle of a run.
CONFIG = [*TINY, "data.augment=false", "train.epochs=3"]
STEPS_PER_EPOCH = 160 // 32
JOB_TIMEOUT = 300
# One worker, 3 epochs of 50 steps (a few seconds each): time to signal or kill it after epoch 1.
LONG = [*TINY, "data.augment=false", "data.synthetic_size=2000", "train.epochs=3"]
LONG_STEPS_PER_EPOCH = 1600 // 32
# The batch script's requeue bookkeeping: by default in the submission folder (sbatch's cwd here: work).
STATE_DIR = ".ddp_train_slurm"

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
    return clean_env(**{"SLURM_CONF": str(cluster.conf), "PYTHON": sys.executable, **extra})


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
                         *CONFIG, f"out_dir={work / 'runs'}", env=job_env(cluster), cwd=work)
    info = cluster.wait(job, JOB_TIMEOUT)
    return job, info, work / "runs" / f"tiny-{job}", work / f"tiny-{job}.out"


def test_sbatch_two_process_cpu_run(cluster, work, reference):
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
    # The attempt's status file was read and removed; no requeue state was kept.
    assert (work / STATE_DIR).is_dir() and not list((work / STATE_DIR).glob(f"{job}.*"))


def test_direct_srun_two_tasks_equals_torchrun(cluster, work, reference):
    """``srun -n 2 python -m ddp_train`` in a batch job: ranks from SLURM_PROCID, no torchrun."""
    py = shlex.quote(sys.executable)
    probe = "import os; from ddp_train.distributed.context import detect_launch; print('probe', detect_launch(os.environ))"
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
                         *CONFIG, "data.num_workers=2", f"out_dir={work / 'runs'}", env=job_env(cluster), cwd=work)
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


# ----- when the batch script requeues, and when it does not ---------------------------------------


def wait_until(check, timeout: float, what: str, log: Path):
    """Poll ``check()`` until it returns something true; fail with the end of the job's log."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{read_log(log)[-6000:]}"
        time.sleep(0.2)
    return result


def wait_for_checkpoint(cluster: SlurmCluster, job: str, run: Path, log: Path) -> None:
    """Until the run's first epoch is over (checkpoint and metrics written), the job still running."""
    def written() -> bool:
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), read_log(log)[-4000:]
        return (run / "metrics.json").exists() and (run / "checkpoints" / "last.pt").exists()
    wait_until(written, JOB_TIMEOUT, f"the epoch-1 checkpoint of job {job} in {run}", log)


def fake_python(path: Path, script: str) -> Path:
    """A PYTHON for the batch script: a shell script (a broken node's python, or one that breaks later)."""
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_an_array_task_requeues_only_itself(cluster, work):
    """``--array=0-1``: USR1 to one task's batch shell requeues that task alone; both finish.

    The task signalled is the one that carries the array's own job id (SLURM gives it to the last
    task it starts): ``scontrol requeue`` or ``scancel`` with that bare id acts on every task of the
    array, so this is the task for which "only itself" can go wrong.
    """
    array = cluster.sbatch("--job-name=arr", "--array=0-1", "--cpus-per-task=1", f"--chdir={work}",
                           "--output=%x-%A_%a.out", str(SBATCH), *LONG, f"out_dir={work / 'runs'}",
                           env=job_env(cluster), cwd=work)
    tasks = [f"{array}_{i}" for i in (0, 1)]
    logs = {t: work / f"arr-{t}.out" for t in tasks}
    runs = {t: work / "runs" / f"arr-{t}" for t in tasks}
    for t in tasks:  # both run at once (one CPU each on the 2-CPU node); each has its own job id then
        cluster.wait(t, JOB_TIMEOUT, {"RUNNING", *FINAL_STATES})
    ids = {t: cluster.job(t)["JobId"] for t in tasks}
    assert len(set(ids.values())) == 2 and array in ids.values(), ids
    hit = next(t for t in tasks if ids[t] == array)
    other = next(t for t in tasks if t != hit)

    wait_for_checkpoint(cluster, hit, runs[hit], logs[hit])
    cluster.run("scancel", "--signal=USR1", "--batch", hit)
    wait_until(lambda: cluster.job(hit).get("Restarts", "0") != "0", 120, f"task {hit} to be requeued", logs[hit])
    infos = {t: cluster.wait(t, JOB_TIMEOUT) for t in tasks}
    for t in tasks:
        finished_ok(cluster, t, infos[t], logs[t])
    assert (infos[hit]["Restarts"], infos[other]["Restarts"]) == ("1", "0"), infos

    hit_log, other_log = read_log(logs[hit]), read_log(logs[other])
    assert f"requeueing job {hit}" in hit_log and "SLURM_RESTART_COUNT=1" in hit_log, hit_log[-6000:]
    assert "SLURM_RESTART_COUNT=1" not in other_log and "SIGUSR1" not in other_log, other_log[-6000:]
    # Readable run folders, one per task, the same one after the requeue; a rendezvous port per task.
    assert hit_log.count(f"run_name=arr-{hit} resume=auto") == 2, hit_log[-6000:]
    ports = {t: set(re.findall(r"rendezvous=\S+:(\d+)", read_log(logs[t]))) for t in tasks}
    assert all(len(p) == 1 for p in ports.values()) and ports[hit] != ports[other], ports
    for t in tasks:
        history = json.loads((runs[t] / "metrics.json").read_text())["history"]
        assert [h["epoch"] for h in history] == [1, 2, 3], (t, history)
    # The same config at the same world size: the resumed task ends with the uninterrupted one's weights.
    assert_same_weights(runs[hit], runs[other])
    assert not list((work / STATE_DIR).glob(f"{array}_*")), list((work / STATE_DIR).iterdir())


def _kill_workers(job: str) -> list[int]:
    """SIGKILL the ddp_train workers (not torchrun) of the run named ``crash-JOB``: what an OOM kill does."""
    killed = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if f"run_name=crash-{job}" in argv and "ddp_train" in argv and "torch.distributed.run" not in argv:
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(int(proc.name))
    return killed


def test_a_crash_after_progress_is_requeued_and_a_crash_loop_stops(cluster, work):
    """MAX_STALLED_ATTEMPTS=2. Attempt 1: the worker is killed after its epoch-1 checkpoint: progress
    (from ddp_train's status file), requeued. Then the node is broken (its PYTHON exits 1 at once):
    attempt 2 is requeued (1 stalled), attempt 3 is the second in a row without progress: the job
    stops with the crash-loop line instead of being requeued for ever."""
    python = fake_python(work / "python-broken-after-attempt-1", "\n".join([
        'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo "python: this node is broken" >&2; exit 1; fi',
        f'exec {shlex.quote(sys.executable)} "$@"']))
    job = cluster.sbatch("--job-name=crash", "--cpus-per-task=1", f"--chdir={work}", str(SBATCH), *LONG,
                         f"out_dir={work / 'runs'}", env=job_env(cluster, PYTHON=str(python), MAX_STALLED_ATTEMPTS="2"),
                         cwd=work)
    run, log = work / "runs" / f"crash-{job}", work / f"crash-{job}.out"
    wait_for_checkpoint(cluster, job, run, log)
    assert step_of(run / "checkpoints" / "last.pt") == LONG_STEPS_PER_EPOCH
    assert wait_until(lambda: _kill_workers(job), 30, "a worker to kill", log)

    info = cluster.wait(job, JOB_TIMEOUT)
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "2"), (info, text[-6000:])
    requeues = [line for line in text.splitlines() if f"requeueing job {job}" in line]
    assert len(requeues) == 2, text[-6000:]
    assert f"global step {LONG_STEPS_PER_EPOCH}" in requeues[0] and "did not say why" in requeues[0], requeues
    assert "no status from ddp_train" in requeues[1], requeues
    loop = [line for line in text.splitlines() if "crash loop" in line]
    assert len(loop) == 1, text[-6000:]
    for part in (f"job {job} is in a crash loop", "2 attempts in a row", f"global step {LONG_STEPS_PER_EPOCH}",
                 "MAX_STALLED_ATTEMPTS=2", f"resubmit with run_name=crash-{job} resume=auto"):
        assert part in loop[0], (part, loop[0])
    assert not list((work / STATE_DIR).glob(f"{job}.*")), list((work / STATE_DIR).iterdir())


def test_a_bad_config_value_is_not_requeued(cluster, work):
    """Two workers under torchrun (the step exits 1 whatever they return): the status file says 2."""
    job = cluster.sbatch("--job-name=badcfg", "--cpus-per-task=2", f"--chdir={work}", str(SBATCH), *CONFIG,
                         "train.lr=fast", f"out_dir={work / 'runs'}", env=job_env(cluster), cwd=work)
    info = cluster.wait(job, JOB_TIMEOUT)
    text = read_log(work / f"badcfg-{job}.out")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), (info, text[-6000:])
    assert text.count("ddp_train: error: train.lr") == 1, text[-6000:]
    assert f"bad input (its own line is above): job {job} is not requeued" in text, text[-6000:]
    assert "requeueing" not in text


def test_without_scontrol_a_requeue_is_one_line_and_exit_75(cluster, work, tmp_path):
    """A container with srun but no scontrol: the step crashes (PYTHON exits 1), a requeue is wanted."""
    bin_dir = tmp_path / "bin"  # /usr/bin less scontrol, as the job's whole PATH
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "scontrol":
            (bin_dir / tool.name).symlink_to(tool)
    python = fake_python(tmp_path / "python", "exit 1")
    job = cluster.sbatch("--job-name=noctl", f"--chdir={work}", str(SBATCH), *CONFIG, f"out_dir={work / 'runs'}",
                         env=job_env(cluster, PATH=str(bin_dir), PYTHON=str(python)), cwd=work)
    info = cluster.wait(job, JOB_TIMEOUT)
    text = read_log(work / f"noctl-{job}.out")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), (info, text[-6000:])
    lines = [line for line in text.splitlines() if "requeue unavailable" in line]
    assert len(lines) == 1 and "scontrol is not on PATH" in lines[0], text[-6000:]
    assert f"resubmit with run_name=noctl-{job} resume=auto" in lines[0], lines
    assert f"rendezvous={cluster.node}:" in text  # the first node, read from the node list without scontrol


def run_outside_slurm(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The batch script run by bash with a made-up SLURM environment: no job, no cluster.

    SLURM_CONF names an empty file, so srun and scontrol fail at once should the script get
    that far (never reaching a cluster this machine may belong to).
    """
    conf = tmp_path / "no-cluster.conf"
    conf.write_text("# not a cluster\n")
    base = {"SLURM_CONF": str(conf), "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "fake", "NPROC_PER_NODE": "1",
            "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SBATCH), *CONFIG], cwd=tmp_path, env=clean_env(**{**base, **env}),
                          capture_output=True, text=True, timeout=60)


def test_two_nodes_refuse_a_loopback_rendezvous_host(tmp_path):
    for host in ("localhost", "127.0.0.1"):
        res = run_outside_slurm(tmp_path, SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-2]", RDZV_HOST=host)
        assert res.returncode == 2, res.stdout + res.stderr
        assert len(res.stderr.splitlines()) == 1, res.stderr
        assert f"rendezvous host {host} resolves to the loopback address" in res.stderr, res.stderr
        assert "other 1 node(s) cannot reach" in res.stderr and "set RDZV_HOST" in res.stderr, res.stderr
        assert "ddp_train args" not in res.stdout  # refused before torchrun was started
    # One node may use loopback; two nodes may use an address of a network. Both go on to srun
    # (which then fails here, outside a job).
    for nodes, host in (("1", "localhost"), ("2", "203.0.113.7")):
        res = run_outside_slurm(tmp_path, SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_NODELIST="n[1-2]", RDZV_HOST=host)
        assert "loopback" not in res.stderr and f"rendezvous={host}:" in res.stdout, res.stdout + res.stderr
