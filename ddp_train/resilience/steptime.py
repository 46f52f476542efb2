"""Where this rank's time goes: loading data, its own compute, and waiting for the other ranks.

One :class:`RankClock` per process, :data:`CLOCK`. The training loop says which phase the main
thread is in and when a step (or an evaluation batch) completes; collectives say when the thread
is waiting for other ranks. Two readers:

- the hang watchdog (another thread, :mod:`ddp_train.resilience.watchdog`) reads the phase, the global step
  and how long ago this rank last made progress;
- the straggler report (:mod:`ddp_train.resilience.stragglers`) takes, every N steps, the mean data and
  compute seconds per step of the window.

Compute excludes waiting: a fast rank spends part of each step blocked in SyncBN's all-gather, in
DDP's buffer broadcast at the start of forward, and at the end of backward for the last gradient
all-reduce. That time is the slow rank's, so it is subtracted (see :func:`instrument_ddp`).

Why a process-wide object rather than one passed down: the waits happen inside SyncBN's autograd
function and DDP's hooks, which no argument reaches; one process is one rank, so one clock.
On CUDA the host's clock times kernel launches, not kernels: the figures are then host times.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

# What a phase means, for messages: "rank 1 ... in <description>".
PHASES = {
    "setup": "set-up",
    "data": "data loading",
    "compute": "compute (forward, backward, optimizer step)",
    "sync": "the step-end agreement between ranks",
    "checkpoint": "writing a checkpoint",
    "eval": "evaluation",
}


@dataclass(frozen=True)
class Window:
    """Mean seconds per step in data loading and in this rank's own compute, over ``steps`` steps."""

    data_s: float
    compute_s: float
    steps: int
    first_step: int  # global step of the window's first step


class RankClock:
    """This rank's phase, progress and time accounts (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, armed: bool = True) -> None:
        """A new run in this process. ``armed=False``: the watchdog's clock starts at the first progress
        (``train.compile``: the first step includes compiling)."""
        self.phase = "setup"
        self.global_step = 0
        self.last_progress = time.monotonic()
        self.armed = armed
        self.waiting = False  # inside a collective (or a wait for one) right now
        self._lock = threading.Lock()
        self._data = self._compute = self._wait = 0.0
        self._steps, self._first_step = 0, 1
        self._wait_start: tuple[float, float] | None = None
        self._bucket_ready: tuple[float, float] | None = None

    # ----------------------------------------------------------------- written by the loop

    @contextlib.contextmanager
    def phase_of(self, name: str) -> Iterator[None]:
        """The main thread is in ``name`` (a key of :data:`PHASES`) inside the block; data and compute are timed."""
        previous, self.phase = self.phase, name
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            if name == "data":
                self._data += elapsed
            elif name == "compute":
                self._compute += elapsed
            self.phase = previous

    @contextlib.contextmanager
    def waiting_for_peers(self) -> Iterator[None]:
        """The block waits for other ranks (a collective): not this rank's compute."""
        if self.waiting:  # nested (a collective inside a timed one): counted once
            yield
            return
        self.wait_begins()
        try:
            yield
        finally:
            self.wait_ends()

    def wait_begins(self) -> None:
        """Start of a wait (a collective; DDP's forward, whose buffer broadcast ends in another hook)."""
        self._wait_start, self.waiting = _wait_mark(), True

    def wait_ends(self) -> None:
        if self._wait_start is not None:
            self._add_wait(_waited_since(self._wait_start))
            self._wait_start, self.waiting = None, False

    def bucket_ready(self) -> None:
        """A gradient is computed here (DDP's all-reduce of its bucket starts, asynchronously, once the bucket
        is complete): the last one of a backward marks the end of this rank's own backward."""
        self._bucket_ready = _wait_mark()

    def backward_done(self) -> None:
        """``backward()`` returned: the time since the last bucket was ready was spent waiting for its all-reduce."""
        if self._bucket_ready is not None:
            self._add_wait(_waited_since(self._bucket_ready))
            self._bucket_ready = None

    def step_done(self, global_step: int) -> None:
        """An optimizer step completed: progress, and one more step in the straggler window."""
        self.global_step = global_step
        self._steps += 1
        self.progressed()

    def restart(self) -> None:
        """Start the watchdog's clock now (its watch begins after the set-up, which it does not time)."""
        self.last_progress = time.monotonic()

    def progressed(self) -> None:
        """This rank completed something (a step, an evaluation batch): the watchdog's clock restarts."""
        self.last_progress = time.monotonic()
        self.armed = True

    def _add_wait(self, seconds: float) -> None:
        if self.phase == "compute":  # waits outside compute are not subtracted from anything
            with self._lock:  # DDP's hooks may run on another thread (CUDA's autograd threads)
                self._wait += seconds

    # ----------------------------------------------------------------- read by the reports

    def stalled_for(self) -> float:
        """Seconds since the last progress (0 while not armed)."""
        return time.monotonic() - self.last_progress if self.armed else 0.0

    def take_window(self) -> Window:
        """The window since the previous call, then a new one."""
        with self._lock:
            steps = max(self._steps, 1)
            window = Window(self._data / steps, max(self._compute - self._wait, 0.0) / steps, self._steps,
                            self._first_step)
            self._data = self._compute = self._wait = 0.0
            self._steps, self._first_step = 0, self.global_step + 1
        return window


class _Descriptor:
    """An open file descriptor, closed when the object goes (here: when its thread ends)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.thread = threading.get_native_id()  # a forked child inherits it, but names another thread

    def __del__(self) -> None:
        os.close(self.fd)


class _Schedstat(threading.local):
    """This thread's ``/proc/thread-self/schedstat``, opened once per thread: read at both ends of every
    collective (48 a ResNet-10 step with SyncBN), where an open() and close() each time cost more than
    the read. The descriptor names the thread that opened it, hence one per thread."""

    file: _Descriptor | None = None
    failed = False


_SCHEDSTAT = _Schedstat()


def _runqueue_s() -> float:
    """Seconds this thread has spent runnable but not running (Linux's schedstat; 0 elsewhere)."""
    if _SCHEDSTAT.failed:
        return 0.0
    try:
        if _SCHEDSTAT.file is None or _SCHEDSTAT.file.thread != threading.get_native_id():
            _SCHEDSTAT.file = _Descriptor("/proc/thread-self/schedstat")
        return int(os.pread(_SCHEDSTAT.file.fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        _SCHEDSTAT.failed = True  # no schedstat here (not Linux, or no /proc): the wall time alone
        return 0.0


def _wait_mark() -> tuple[float, float]:
    return time.perf_counter(), _runqueue_s()


def _waited_since(mark: tuple[float, float]) -> float:
    """Seconds since ``mark`` spent waiting for peers: wall time less the time this thread was ready to
    run but had no core. That part is this rank's own slowness (a busy core), not the other ranks': a
    collective's end wakes the thread, and on a crowded core the wake-up waits its turn."""
    wall, queued = time.perf_counter() - mark[0], _runqueue_s() - mark[1]
    return max(wall - queued, 0.0)


CLOCK = RankClock()


def instrument_ddp(ddp: nn.Module) -> None:
    """Make DDP's waits visible to :data:`CLOCK`: its buffer broadcast at the start of forward, and the
    gradient all-reduce still running when backward returns.

    Plain Python hooks on the module and on each parameter's gradient accumulation: DDP keeps its own
    (C++) all-reduce. (A Python comm hook would do too, but a DDP holding one, collected as garbage
    while the interpreter shuts down, can abort the process: seen as SIGABRT.)
    """

    def forward_starts(module: nn.Module, args: Any) -> None:
        CLOCK.wait_begins()

    def module_forward_starts(module: nn.Module, args: Any) -> None:
        CLOCK.wait_ends()

    def grad_ready(param: Any) -> None:  # the last one of a backward marks the end of this rank's compute
        CLOCK.bucket_ready()

    ddp.register_forward_pre_hook(forward_starts)
    ddp.module.register_forward_pre_hook(module_forward_starts)
    for param in ddp.module.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(grad_ready)
