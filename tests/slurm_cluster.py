"""A real single-machine SLURM cluster for the tests: munged, slurmctld and slurmd, started here.

Everything lives in a fresh temporary folder (slurm.conf, state, spool, logs, PID files, and a
private munged with its own key and socket); the client commands find it through ``SLURM_CONF``
in :meth:`SlurmCluster.env`, and free ports are picked, so the cluster touches nothing
system-wide and can run next to another one. Daemons are stopped through their PID files (jobs
are cancelled first, so no ``slurmstepd`` outlives ``slurmd``), never by process name.

Used by ``tests/test_slurm.py`` through a session-scoped fixture; also runnable by hand:
``python -m tests.slurm_cluster`` starts a cluster, prints ``export SLURM_CONF=...`` and waits
for Ctrl-C.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


class ClusterError(RuntimeError):
    pass


def missing_packages() -> list[str]:
    """The SLURM/munge programs that are not installed (empty when the cluster can start)."""
    found = {name: shutil.which(name) or (Path("/usr/sbin") / name).exists() for name in DAEMONS + CLIENTS + ("munge",)}
    return [name for name, ok in found.items() if not ok]


def _sbin(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: the daemons are not our children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(check, timeout: float, what: str, interval: float = 0.3) -> Any:
    end = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def parse_scontrol(text: str) -> dict[str, str]:
    """``Key=Value Key2=Value2`` (one record, ``scontrol -o`` style) -> dict. Values may hold spaces only
    for the last keys on a line (Command=, WorkDir=, ...), which the tests do not need exactly."""
    fields: dict[str, str] = {}
    for match in re.finditer(r"(\S+?)=(\S*)", text):
        fields.setdefault(match.group(1), match.group(2))
    return fields


class SlurmCluster:
    """One-node cluster whose node line is copied from ``slurmd -C`` (CPUs, topology, memory)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-"))
        self.root.chmod(0o755)  # munged runs as user munge and writes its PID file below
        self._own_root = root is None
        self.conf = self.root / "slurm.conf"
        self.munged_pid: int | None = None
        self.jobs: list[str] = []
        self.node = socket.gethostname().split(".")[0]

    # ----- life cycle -------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {res.returncode}: {res.stdout}{res.stderr}")
        return res

    def start(self) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self.run(_sbin("slurmctld"), "-i", "-f", str(self.conf))
            _wait_for(lambda: self.run("scontrol", "ping", check=False).returncode == 0
                      and "UP" in self.run("scontrol", "ping", check=False).stdout, 30, "slurmctld")
            self.run(_sbin("slurmd"), "-f", str(self.conf), "-N", self.node)
            _wait_for(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60,
                      "the node to be idle")
        except BaseException as e:
            detail = self.logs()
            self.stop()
            if isinstance(e, ClusterError):
                raise ClusterError(f"{e}\n{detail}") from None
            raise
        return self

    def _start_munge(self) -> None:
        """A private munged: its own key, socket, PID, seed and log files under the cluster folder.

        Nothing system-wide is touched (no /etc/munge key, no /run/munge socket), so another
        cluster or a system munged on the machine is not disturbed.
        """
        munge = pwd.getpwnam("munge")
        d = self.root / "munge"
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
        key = d / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chown(key, munge.pw_uid, munge.pw_gid)
            key.chmod(0o400)
        pidfile = d / "munged.pid"
        res = subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--key-file={key}",
                              f"--socket={self.munge_socket}", f"--pid-file={pidfile}", f"--seed-file={d / 'munged.seed'}",
                              f"--log-file={d / 'munged.log'}"], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise ClusterError(f"munged exited {res.returncode}: {res.stdout}{res.stderr}")
        self.munged_pid = int(_wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
                                        "munged's PID file"))
        _wait_for(self._munge_ok, 15, "munged to answer")

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def _munge_ok(self) -> bool:
        try:
            sock = f"--socket={self.munge_socket}"
            cred = subprocess.run(["munge", "-n", sock], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge", sock], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _node_line(self) -> str:
        """``slurmd -C``'s first line (NodeName=... CPUs=... RealMemory=...), as the node definition."""
        out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
        line = out.splitlines()[0].strip()
        fields = parse_scontrol(line)
        keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
        return f"NodeName={self.node} NodeAddr=127.0.0.1 " + " ".join(f"{k}={fields[k]}" for k in keep if k in fields)

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            f"ClusterName=ddptest{os.getpid()}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a requeued job restarts in ~15 s instead of ~150 s; the private munged's socket
            f"AuthInfo=cred_expire=10,socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=5,bf_interval=5",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobRequeue=1",
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",
            "MailProg=/bin/true",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            self._node_line(),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def stop(self) -> None:
        """Cancel this harness's jobs, then stop slurmd, slurmctld and (if started here) munged by PID."""
        if self.conf.exists() and (self.root / "slurmctld.pid").exists():
            if self.jobs:
                self.run("scancel", *self.jobs, check=False)
                try:
                    _wait_for(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(), 40,
                              "cancelled jobs to leave the queue")
                except (ClusterError, subprocess.TimeoutExpired):
                    pass
        for pidfile in (self.root / "slurmd.pid", self.root / "slurmctld.pid"):
            self._stop_pidfile(pidfile)
        if self.munged_pid is not None:
            self._stop_pid(self.munged_pid)
            self.munged_pid = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_pidfile(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        self._stop_pid(pid)

    @staticmethod
    def _stop_pid(pid: int, timeout: float = 20) -> None:
        if not _alive(pid):
            return
        try:
            os.kill(pid, signal.SIGTERM)
            _wait_for(lambda: not _alive(pid), timeout, f"PID {pid} to exit", 0.2)
        except ProcessLookupError:
            return
        except ClusterError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----- jobs -------------------------------------------------------------------------------

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | str | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        res = self.run("sbatch", "--parsable", *args, env=env or self.env(), cwd=cwd)
        job = res.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise ClusterError(f"sbatch printed {res.stdout!r}")
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job -o JOB`` as a dict ({} when the job is unknown)."""
        res = self.run("scontrol", "-o", "show", "job", job, check=False)
        return parse_scontrol(res.stdout) if res.returncode == 0 else {}

    def wait(self, job: str, timeout: float = 300, states: set[str] = FINAL_STATES) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (by default: finished); return its record."""
        def check() -> dict[str, str] | None:
            info = self.job(job)
            return info if info.get("JobState") in states else None
        try:
            return _wait_for(check, timeout, f"job {job} to reach {sorted(states)}", 1.0)
        except ClusterError as e:
            raise ClusterError(f"{e}; last: {self.job(job)}\n{self.logs()}") from None

    def queued(self, job: str) -> bool:
        """True while ``squeue`` lists the job (pending, running, requeued...)."""
        return bool(self.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip())

    def logs(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)


if __name__ == "__main__":
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
