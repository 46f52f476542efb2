"""One writer per run folder: a lock file that a second run sees before it writes anything.

``<run>/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS
v3+) and holds the owner: host, pid, the process's start time, and the job (SLURM job id, or
torchrun's rendezvous id). A thread refreshes the file's mtime every :data:`HEARTBEAT_S`
seconds. A lock is *stale*, and may be taken over, when

- its owner ran on this host and that process is gone (or its pid now belongs to a process
  that started later: pid reuse), or
- its owner ran on another host and belongs to the same job (a SLURM requeue or torchrun
  restart that landed on another node), or its heartbeat is older than :data:`STALE_S` (a
  crashed node stops refreshing it).

Anything else is a live run: the new one is refused with one line naming it.

The lock goes however the run ends short of SIGKILL: by ``finally`` on the way out, and, for the
exits that skip ``finally`` (``os._exit``: the hang watchdog's, a second Ctrl-C), by
:func:`release_held` just before them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 20.0
STALE_S = 90.0


# The locks this process holds, for release_held: process-wide, because the exits that need it
# (os._exit from the watchdog's thread or a signal handler) have no way to reach the run's objects.
_HELD: set[RunLock] = set()


def release_held(timeout_s: float = 5.0) -> None:
    """Release every lock this process holds, before an exit that skips ``finally`` blocks (``os._exit``).

    Gives up after ``timeout_s``: a hung file system must not keep an exiting process from exiting
    (the lock is then stale, and the next run on this host takes it over).
    """
    held = list(_HELD)
    if not held:
        return
    worker = threading.Thread(target=lambda: [lock.release() for lock in held], name="ddp_train-unlock", daemon=True)
    worker.start()
    worker.join(timeout_s)


class RunFolderBusy(UserError):
    """Another live run writes to this run folder."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start: int | None) -> bool:
    if Path("/proc/self/stat").exists():
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    try:  # no /proc: a signal-0 probe (cannot see pid reuse)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(owner: dict[str, Any], age_s: float, job: str | None) -> str:
    """Why a lock held by ``owner`` (heartbeat ``age_s`` seconds ago) may be taken over, or '' if it is live."""
    if owner.get("host") == socket.gethostname():  # the process table answers for sure
        pid = int(owner.get("pid", -1))
        if not _alive(pid, owner.get("start")):
            return f"its process {pid} on this host is no longer running"
        return ""
    if job is not None and owner.get("job") == job:  # a requeue or restart that moved to another node
        return f"it belongs to an earlier attempt of the same job ({job}) on host {owner.get('host')}"
    if age_s > STALE_S:
        return f"its heartbeat from host {owner.get('host')} stopped {age_s:.0f} s ago"
    return ""


class RunLock:
    """The lock of one run folder, held by rank 0 from before the first write until the run ends."""

    def __init__(self, run_dir: Path, job: str | None = None) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.job = job
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                      "job": job, "since": time.time()}
        self.took_over = ""  # why a stale lock was replaced, for the run's log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock (replacing a stale one) or raise :class:`RunFolderBusy`; starts the heartbeat."""
        for _ in range(3):  # a stale lock removed by us may be re-created by a racing run: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner, age = self._read()
                why = stale_reason(owner, age, self.job) if owner is not None else "it is unreadable"
                if not why:
                    raise RunFolderBusy(
                        f"run folder {self.path.parent} is in use by another run (host {owner.get('host')}, "
                        f"pid {owner.get('pid')}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('since', 0)))}); "
                        f"choose another run_name, or wait for it to end") from None
                self.took_over = f"took over the lock of {self.path.parent}: {why}"
                self.path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.owner, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:  # a full disk: no empty or half-written lock left behind
                self.path.unlink(missing_ok=True)
                raise
            _HELD.add(self)
            self._thread = threading.Thread(target=self._beat, name="ddp_train-lock", daemon=True)
            self._thread.start()
            return self
        raise RunFolderBusy(f"run folder {self.path.parent}: could not take its lock (other runs keep creating it); "
                            f"choose another run_name")

    def _read(self) -> tuple[dict[str, Any] | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = json.loads(self.path.read_text())
            return (owner if isinstance(owner, dict) else None), age
        except (OSError, ValueError):
            return None, 0.0

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a vanished lock is reported by nobody; the run's own writes still work

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours (a warning line if it cannot be removed)."""
        _HELD.discard(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        owner, _ = self._read()
        if owner is not None and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:  # the run's own outcome stands; a lock left here is stale once we exit
                print(f"ddp_train: warning: cannot remove the lock {self.path}: {e.strerror or e}; the next run "
                      f"takes it over (its process has ended)", file=sys.stderr, flush=True)
