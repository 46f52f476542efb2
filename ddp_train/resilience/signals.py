"""Graceful stop on SIGTERM, SIGINT and SIGUSR1 (what SLURM sends before a time limit or preemption).

The handler only records the signal. The training loop asks, at every step boundary, whether
any rank received one (a collective, so all ranks agree on the same step), then every rank
stops after that step, rank 0 writes a checkpoint, and the process exits with
:data:`ddp_train.errors.EXIT_CHECKPOINTED` so a launch script knows to requeue. A second SIGINT
exits at once.

A worker whose torchrun agent died (SIGKILL, the OOM killer) is an orphan in a session of its own:
no signal reaches it, nobody restarts or stops it, and its store (the agent's) is gone. A thread
(:func:`watch_agent`) sees its parent change and ends it with one line.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from types import FrameType
from typing import Any, TypeVar

from ..persistence.runlock import release_held

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
T = TypeVar("T")


class Preempted(Exception):
    """Raised on every rank after the stop checkpoint is written (``note``: what ``resume=auto`` does next)."""

    def __init__(self, signame: str, checkpoint: str, note: str = "") -> None:
        super().__init__(f"stopped by {signame}; checkpoint {checkpoint}; continue with resume=auto"
                         + (f" ({note})" if note else ""))
        self.signame, self.checkpoint = signame, checkpoint


class StopFlag:
    """Records the first stop signal; installed for the duration of a ``with`` block.

    The CLI installs it before any slow set-up, so a SIGUSR1 that arrives while the data loads is
    honoured at the first step instead of killing the process (SIGUSR1's default action).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._sigints = 0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:  # only a second Ctrl-C means "now"; TERM then INT still checkpoints
                print("ddp_train: second SIGINT, stopping now without a checkpoint", file=sys.stderr, flush=True)
                release_held()  # os._exit skips the run's finally: the run folder's lock goes here
                os._exit(130)
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopFlag:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def ignore_from_now(self) -> None:
        """Ignore the stop signals until the process ends (the ``with`` block then restores nothing).

        For a process whose exit code is decided: under torchrun, the first worker to exit with a non-zero
        code (75 after a stop) makes torchrun SIGTERM the others, and one still on its way out would die
        of it (-15) instead of exiting with its own code. SIG_IGN, not a handler: Python resets its own
        handlers to the default late in its shutdown, and torch's teardown runs after that.
        """
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()


def until_stopped(batches: Iterable[T], flag: StopFlag) -> Iterator[T]:
    """``batches`` until ``flag`` records a stop signal (an evaluation cut short; its caller agrees on it after)."""
    for batch in batches:
        if flag.signum is not None:
            return
        yield batch


# --------------------------------------------------------------------------- a worker without its agent

AGENT_POLL_S = 0.25  # how often the watcher looks at the parent process
EXIT_AGENT_LOST = 1  # a crash as far as anyone can tell (nobody is left to read it but the process reaper)


class _Agent:
    """The torchrun agent this worker was started by, once :func:`watch_agent` has looked (process-wide:
    the exits that use it happen in a thread, or deep in the CLI's error handling)."""

    pid: int | None = None
    rank = 0
    stderr_fd: int | None = None  # a copy of fd 2 from the start: the rendezvous may divert fd 2 for a while
    ending = threading.Lock()


def watch_agent(env: Mapping[str, str], rank: int) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), end this worker with one line when its agent dies.

    The agent is the parent process at start; an orphan is given another parent (init, or a subreaper).
    """
    if "TORCHELASTIC_RUN_ID" not in env or _Agent.pid is not None:
        return
    _Agent.pid, _Agent.rank = os.getppid(), rank
    try:
        _Agent.stderr_fd = os.dup(2)
    except OSError:  # no stderr to copy: the line goes to fd 2, whatever it is then
        _Agent.stderr_fd = None
    threading.Thread(target=_watch, name="ddp_train-agent-watch", daemon=True).start()


def agent_gone() -> bool:
    """True when this worker's torchrun agent has died (False when not under torchrun)."""
    return _Agent.pid is not None and os.getppid() != _Agent.pid


def _watch() -> None:
    while not agent_gone():
        time.sleep(AGENT_POLL_S)
    end_orphan()


def end_orphan() -> None:
    """End this process now, with one line, if its torchrun agent has died; else return.

    Called by the watcher thread, and by the main thread on a failed collective (the peer that
    ended may be a sibling orphan): one line either way, then ``os._exit`` (the main thread may
    be inside a collective that no longer ends).
    """
    if not agent_gone():
        return
    if not _Agent.ending.acquire(blocking=False):
        time.sleep(60)  # the other thread is ending the process (os._exit) meanwhile
        return
    line = (f"ddp_train: rank {_Agent.rank}: the torchrun agent (pid {_Agent.pid}) died; stopping (nothing would "
            f"restart or stop this worker); the newest checkpoint is kept: run the job again with resume=auto; "
            f"exit code {EXIT_AGENT_LOST}\n")
    try:
        os.write(_Agent.stderr_fd if _Agent.stderr_fd is not None else 2, line.encode())
    except OSError:  # stderr gone with the agent's terminal: end all the same
        pass
    release_held()  # os._exit skips the run's finally: the run folder's lock goes here
    for child in multiprocessing.active_children():  # loader workers ignore stop signals
        child.kill()
    os._exit(EXIT_AGENT_LOST)
