"""The hang watchdog: when no rank completes a step within ``dist.hang_timeout_s``, say which rank
stopped, leave every live rank's stacks in ``<run>/hang/rank<N>.txt`` and end the job (exit 3).

Why a thread and the key-value store, not a collective: a stuck rank cannot join a collective (a
frozen process runs no code at all), so progress is published where the healthy ranks can read it
without the stuck one. Each rank's watchdog thread writes a heartbeat (a sequence number, its
global step, its phase, whether it is waiting for peers) to the store every ``beat_s`` seconds:
torchrun's agent store, or under ``srun`` the TCPStore that rank 0 hosts. A rank whose own clock
(:data:`ddp_train.resilience.steptime.CLOCK`) shows no progress for ``hang_timeout_s``:

1. reads every rank's heartbeat twice, ``2 * beat_s`` apart: a rank whose sequence number did not
   move is *not responding* (stopped, or its host unreachable);
2. writes its own stacks (``faulthandler``, every thread) and publishes where its main thread is;
3. the lowest responding rank waits briefly for the others' stacks, prints the one summary line
   (which ranks stopped making progress, at which step, in what; what the others wait in), and
   every responding rank exits with :data:`~ddp_train.errors.EXIT_HANG`.

The culprits (:func:`decide`, a pure function of the two reads): the ranks not responding; else the
responding ranks that are not waiting for peers (e.g. stuck in data loading); else (all waiting:
mismatched collectives) the lowest step. :func:`hang_summary` words the line.
Checkpoints are atomic (written whole or not at all), so the last good one survives the exit; the
run folder's lock is released before it.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import status
from ..errors import EXIT_HANG
from ..persistence.runlock import release_held
from .signals import agent_gone
from .steptime import CLOCK, PHASES


def beat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, between 0.5 and 5."""
    return min(5.0, max(0.5, timeout_s / 10))


@dataclass(frozen=True)
class Beat:
    """One rank's heartbeat as published in the store."""

    seq: int
    step: int
    phase: str
    waiting: bool
    host: str
    pid: int

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @staticmethod
    def decode(raw: bytes) -> Beat:
        return Beat(**json.loads(raw))


# The three reasons a rank is named, as the summary line words them; explained in
# docs/troubleshooting.md: "A rank stops making progress (hang watchdog)".
NOT_RESPONDING = "not responding (process stopped, or its node unreachable)"
NOT_WAITING = "not waiting for other ranks"
ALL_WAITING = "every rank waits for the others"


@dataclass(frozen=True)
class Verdict:
    """Who is stuck, as :func:`decide` found it."""

    responding: tuple[int, ...]  # ascending; the deciding rank is always one of them
    culprits: tuple[int, ...]  # ascending: the ranks named as having stopped making progress
    why: str  # NOT_RESPONDING, NOT_WAITING or ALL_WAITING

    @property
    def reporter(self) -> int:
        """The rank that prints the summary: the lowest responding one (it is alive to print it)."""
        return self.responding[0]

    @property
    def silent(self) -> tuple[int, ...]:
        """The ranks not responding: whenever there are any, they are the culprits."""
        return self.culprits if self.why == NOT_RESPONDING else ()


def decide(before: Mapping[int, Beat], after: Mapping[int, Beat], world_size: int, me: int) -> Verdict:
    """Who is stuck, from every rank's heartbeat read twice, a few beats apart (rank -> its beat; a rank
    that never beat is absent). ``after[me]`` is the deciding rank's own current beat.

    Responding: ``me`` (it runs this code), and each rank whose sequence number moved between the reads
    (a rank absent from ``before`` has not shown that it moves). The culprits: the ranks not responding;
    else the ranks busy in their own work (not waiting for peers) while others wait for them; else
    (every rank waits for the others: mismatched collectives) the ranks at the lowest global step."""
    responding = tuple(sorted(r for r, b in after.items() if r == me or (r in before and b.seq != before[r].seq)))
    silent = tuple(r for r in range(world_size) if r not in responding)
    if silent:
        return Verdict(responding, silent, NOT_RESPONDING)
    working = tuple(r for r in responding if not after[r].waiting)
    if working:
        return Verdict(responding, working, NOT_WAITING)
    low = min(after[r].step for r in responding)
    return Verdict(responding, tuple(r for r in responding if after[r].step == low), ALL_WAITING)


def silent_here(verdict: Verdict, beats: Mapping[int, Beat], host: str) -> list[int]:
    """The ranks not responding whose last heartbeat came from ``host`` (the reporter kills those)."""
    return [r for r in verdict.silent if r in beats and beats[r].host == host]


def phase_words(phase: str, waiting: bool) -> str:
    """``data loading, waiting for other ranks``: a phase of :data:`~ddp_train.resilience.steptime.PHASES`, in words."""
    return f"{PHASES.get(phase, phase)}{', waiting for other ranks' if waiting else ''}"


def beat_words(beat: Beat | None) -> str:
    """A culprit's last heartbeat, in words."""
    if beat is None:
        return "no heartbeat ever"
    return f"on {beat.host}, last seen at global step {beat.step} in {phase_words(beat.phase, beat.waiting)}"


def hang_summary(verdict: Verdict, beats: Mapping[int, Beat], wheres: Mapping[int, str], stalled: float,
                 timeout_s: float, run_dir: Path, host: str) -> str:
    """The reporter's line (after ``ddp_train: hang: ``). ``beats``: the second read, with the reporter's
    own; ``wheres``: where each responding rank's main thread is, as it published it; ``host``: the
    reporter's, where it killed the silent ranks."""
    culprits, responding = verdict.culprits, verdict.responding
    parts = [f"no rank completed a step for {stalled:.0f} s (dist.hang_timeout_s={timeout_s:g}); "
             f"stopped making progress: " + ", ".join(
                 f"rank {r} ({beat_words(beats.get(r))})" for r in culprits) + f" - {verdict.why}"]
    others = [r for r in responding if r not in culprits]
    if others:
        parts.append("the others: " + ", ".join(
            f"rank {r} at global step {beats[r].step} in {wheres.get(r, '?')}" for r in others))
    parts += [f"rank {r} was in {wheres[r]}" for r in culprits if r in wheres]
    parts.append(f"stacks: {run_dir / 'hang'}/rank<N>.txt for ranks {', '.join(map(str, responding))}")
    if silent_here(verdict, beats, host):
        parts.append("the non-responding ranks on this machine were killed")
    parts.append(f"the last checkpoint is kept (resume=auto); exit code {EXIT_HANG}")
    return "; ".join(parts)


def store_down_line(rank: int, stalled: float, timeout_s: float, store_addr: tuple[str, int], where: str,
                    stack_path: Path) -> str:
    """Each live rank's own line when the store does not answer (no way to agree on a reporter)."""
    return (f"ddp_train: hang: rank {rank}: no step completed for {stalled:.0f} s "
            f"(dist.hang_timeout_s={timeout_s:g}) and the rendezvous store at "
            f"{store_addr[0]}:{store_addr[1]} does not answer: the rank or node hosting it "
            f"(rank 0 under srun, the first node's torchrun agent) is stuck or gone; this rank was in {where}; "
            f"stacks: {stack_path}; exit code {EXIT_HANG}")


class Watchdog:
    """Started on every rank for the training loop and the test evaluation (``with Watchdog(...)``).

    ``store_addr`` None (a single process) watches this process alone.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, run_dir: Path,
                 store_addr: tuple[str, int] | None, namespace: str) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.run_dir, self.store_addr, self.prefix = run_dir, store_addr, f"ddp_train/watchdog/{namespace}/"
        self.beat_s = beat_interval(timeout_s)
        self.store_timeout_s = max(2 * self.beat_s, 5.0)
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddp_train-watchdog", daemon=True)
        self._store: Any = None
        self._seq = 0

    def __enter__(self) -> Watchdog:
        CLOCK.restart()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        # Wait out a store operation in progress (it gives up after store_timeout_s): a thread still
        # inside the store's C++ code when the interpreter shuts down aborts the process (SIGABRT).
        self._thread.join(timeout=self.store_timeout_s + self.beat_s + 5)

    # ----------------------------------------------------------------- the thread

    def _run(self) -> None:
        self._publish()  # at once: a rank frozen before its first interval is still known
        while not self._stop.wait(self.beat_s):
            self._publish()
            if CLOCK.stalled_for() > self.timeout_s and not self._stop.is_set():
                try:
                    self._end()
                finally:  # whatever happens while reporting, the job must end
                    _exit_hang()

    def _connect(self) -> Any:
        if self._store is None and self.store_addr is not None:
            import torch.distributed as dist

            # Its own client: the main thread's store connection may be in use, and a store op
            # must give up (not block) when the host of the store is the rank that froze.
            self._store = dist.TCPStore(self.store_addr[0], self.store_addr[1], is_master=False,
                                        timeout=datetime.timedelta(seconds=self.store_timeout_s),
                                        wait_for_workers=False)
        return self._store

    def _beat(self) -> Beat:
        return Beat(self._seq, CLOCK.global_step, CLOCK.phase, CLOCK.waiting, self.host, os.getpid())

    def _publish(self) -> None:
        if self._stop.is_set():  # the run is over: no new store operation to wait for
            return
        self._seq += 1
        beat = self._beat()
        self._store_op(lambda s: s.set(f"{self.prefix}beat/{self.rank}", beat.encode()))

    def _store_op(self, op: Any) -> Any:
        """``op(store)``; None when there is no store or it does not answer (its host may be the stuck one)."""
        if agent_gone():  # its store died with it (C++ would print a stack dump); signals' watcher ends this worker
            return None
        try:
            store = self._connect()
            return None if store is None else op(store)
        except Exception:  # noqa: BLE001 - a store that does not answer is what this class reports on
            return None

    def _read_beats(self) -> dict[int, Beat]:
        keys = [f"{self.prefix}beat/{r}" for r in range(self.world_size)]

        def read(store: Any) -> dict[int, Beat]:
            return {r: Beat.decode(store.get(k)) for r, k in enumerate(keys) if store.check([k])}

        return self._store_op(read) or {}

    # ----------------------------------------------------------------- the end

    def _end(self) -> None:
        """Decide, dump stacks, report (lowest responding rank) and exit with EXIT_HANG."""
        stalled = CLOCK.stalled_for()
        first = self._read_beats()
        self._beat_while(lambda: False, 2 * self.beat_s)  # long enough for every live rank to beat twice
        second = self._read_beats()
        beats = {**second, self.rank: self._beat()}  # this rank's own, whatever the store says
        verdict = decide(first, beats, self.world_size, self.rank)
        where = self._dump_stacks(stalled)
        self._store_op(lambda s: s.set(f"{self.prefix}where/{self.rank}", where.encode()))
        if self.store_addr is not None and not second:  # no store to agree on a reporter: each rank says what it knows
            print(store_down_line(self.rank, stalled, self.timeout_s, self.store_addr, where, self._stack_path()),
                  file=sys.stderr, flush=True)
            _exit_hang()
        if self.rank == verdict.reporter:
            wheres = {**self._gather_wheres(verdict.responding), self.rank: where}
            summary = hang_summary(verdict, beats, wheres, stalled, self.timeout_s, self.run_dir, self.host)
            status.current().exit(EXIT_HANG, f"hang: {summary}")  # for a launch script deciding on a requeue
            print(f"ddp_train: hang: {summary}", file=sys.stderr, flush=True)
            self._store_op(lambda s: s.set(f"{self.prefix}reported", b"1"))
            self._kill_frozen_here(beats, verdict)
        else:  # the reporter prints first: an early exit would make torchrun stop it
            self._beat_while(lambda: bool(self._store_op(lambda s: s.check([f"{self.prefix}reported"]))),
                             6 * self.beat_s + 5)
        _exit_hang()

    def _beat_while(self, done: Any, seconds: float) -> None:
        """Wait up to ``seconds`` for ``done()``, heartbeating meanwhile: the other ranks, deciding too, must
        see this one responding."""
        deadline, next_beat = time.monotonic() + seconds, time.monotonic() + self.beat_s
        while time.monotonic() < deadline and not done():
            if time.monotonic() >= next_beat:
                self._publish()
                next_beat += self.beat_s
            time.sleep(min(0.2, self.beat_s / 2))

    def _kill_frozen_here(self, beats: Mapping[int, Beat], verdict: Verdict) -> None:
        """SIGKILL the non-responding ranks on this machine. A stopped process ignores the launcher's SIGTERM
        until it is continued; torchrun would wait 30 s before its own SIGKILL, and the job's end with it."""
        for rank in silent_here(verdict, beats, self.host):
            try:
                os.kill(beats[rank].pid, signal.SIGKILL)
            except OSError:
                pass

    def _gather_wheres(self, responding: tuple[int, ...]) -> dict[int, str]:
        """Where each responding rank's main thread is, as each published it (waiting up to a few beats)."""
        if self.store_addr is None:
            return {}
        keys = {r: f"{self.prefix}where/{r}" for r in responding}
        self._beat_while(lambda: bool(self._store_op(lambda s: s.check(list(keys.values())))), 4 * self.beat_s + 3)
        got = self._store_op(lambda s: {r: s.get(k).decode() for r, k in keys.items() if s.check([k])}) or {}
        return got

    def _stack_path(self, rank: int | None = None) -> Path:
        return self.run_dir / "hang" / f"rank{self.rank if rank is None else rank}.txt"

    def _dump_stacks(self, stalled: float) -> str:
        """Write every thread's stack to ``<run>/hang/rank<N>.txt``; returns where the main thread is, in words."""
        where, doing = main_thread_location(), phase_words(CLOCK.phase, CLOCK.waiting)
        path = self._stack_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"rank {self.rank} of {self.world_size} on {self.host}, pid {os.getpid()}: no progress for "
                        f"{stalled:.0f} s at global step {CLOCK.global_step}, in {doing}; main thread in {where}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            where += f" (stacks not written: {e})"
        return f"{doing}, {where}"


def _exit_hang() -> None:
    """End the process with EXIT_HANG, now: the main thread is stuck, so no ``finally`` would run. The
    run folder's lock (rank 0's) is released first, as on every other way out but SIGKILL."""
    release_held()
    os._exit(EXIT_HANG)


def main_thread_location() -> str:
    """``function (file:line)`` of the main thread's innermost frame, and of the innermost ddp_train frame above it."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None:
        return "?"

    def words(f: Any) -> str:
        return f"{f.f_code.co_name} ({Path(f.f_code.co_filename).name}:{f.f_lineno})"

    inner, ours = words(frame), None
    f = frame
    package = str(Path(__file__).parent)
    while f is not None:
        if f.f_code.co_filename.startswith(package):
            ours = words(f)
            break
        f = f.f_back
    return inner if ours is None or ours == inner else f"{inner} from {ours}"
