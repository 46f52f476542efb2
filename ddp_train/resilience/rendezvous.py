"""The start-up rendezvous when rank 0 hosts the store (``srun``, RANK/WORLD_SIZE set by hand): bounded,
interruptible, and saying what it waits for.

torch's own (``env://``, ``tcp://``) blocks in C++ until every rank has joined or ``dist.timeout_s``
has passed (600 s by default): no signal handler runs meanwhile, nothing is printed, and the end is
a DistStoreError traceback. Here every step is short: rank 0 starts the store at once, the others
probe its port with a plain socket (a TCPStore client that cannot connect retries, printing C++
stack dumps), and each rank announces itself with a counter in the store. Between tries each rank
checks for a stop signal, says after :data:`NOTICE_S` who is missing, and gives up at the deadline
naming them.

How the wait ends is decided once, in the store (``compare_set`` on one key): ``go`` when every
rank has joined, else the first rank to stop or time out writes why, and every rank follows it, so
no rank proceeds into ``init_process_group`` while another leaves. Under torchrun's agent store
(the default) torch's rendezvous is kept: the agent has already gathered the nodes and starts its
workers together, and it ends them itself when one fails.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import EXIT_CHECKPOINTED, EXIT_USER_ERROR, first_line

NOTICE_S = 5.0  # a wait longer than this is announced (ranks launched together join well within it)
POLL_S = 0.2  # between looks at the store: a stop signal ends the wait within about this long
PROBE_S = 1.0  # one attempt to reach rank 0's port
LINGER_S = 3.0  # rank 0 keeps its store up this long, at most, for the others to read how the wait ended
JOIN = "ddp_train/join/"
OUTCOME = JOIN + "outcome"
EXIT_STORE_LOST = 1  # the store's host (rank 0) ended while the others waited: a crash, as far as they know
NAMED = 8  # missing ranks named in a line; more are counted


class StartupEnded(Exception):
    """The rendezvous did not complete: a stop signal (exit 75), the timeout (exit 2) or a lost store (exit 1).

    ``report`` is False on the ranks that follow another rank's decision: one line for the job.
    """

    def __init__(self, line: str, exit_code: int, report: bool = True) -> None:
        super().__init__(line)
        self.line, self.exit_code, self.report = line, exit_code, report


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet (rank 0's store at ``addr:port``) and how long they wait for each other."""

    addr: str
    port: int
    rank: int
    world_size: int
    timeout_s: int
    speaks: bool = True  # this rank prints the lines no other rank can (local rank 0: one per node)

    @property
    def where(self) -> str:
        return f"{self.addr}:{self.port}"

    def join(self, stopped_by: Callable[[], str]) -> dist.Store:
        """The store, once every rank has joined it; ``stopped_by()`` names a stop signal once one arrived.

        Raises :class:`StartupEnded` when the wait ends otherwise.
        """
        start = time.monotonic()
        with cpp_output_aside():
            store = self._reach(start, stopped_by)
            store.set_timeout(datetime.timedelta(seconds=self.timeout_s))  # the process group's, from here on
            try:
                store.set(f"{JOIN}rank{self.rank}", b"1")
                store.add(f"{JOIN}count", 1)
                self._await_ranks(store, start, stopped_by)
            except RuntimeError as e:  # not a decision: rank 0, hosting the store, ended meanwhile
                raise self._lost(e) from None
        return store

    def _lost(self, error: BaseException) -> StartupEnded:
        return StartupEnded(f"ddp_train: rank {self.rank}: lost the rendezvous store at {self.where} while waiting "
                            f"for the other ranks: rank 0, which hosts it, ended ({_first_line(error)})",
                            EXIT_STORE_LOST, report=self.speaks)

    # ----------------------------------------------------------------- reaching the store

    def _reach(self, start: float, stopped_by: Callable[[], str]) -> dist.Store:
        """Rank 0 starts the store; the others probe its port until it answers, a signal or the deadline."""
        if self.rank == 0:
            try:
                return dist.TCPStore(self.addr, self.port, self.world_size, True,
                                     timeout=datetime.timedelta(seconds=10), wait_for_workers=False,
                                     multi_tenant=True)
            except dist.DistError as e:
                raise StartupEnded(f"ddp_train: error: rank 0 cannot host the rendezvous store at {self.where} "
                                   f"(MASTER_ADDR:MASTER_PORT): {_first_line(e)}; choose a free MASTER_PORT, and a "
                                   f"MASTER_ADDR of this machine", EXIT_USER_ERROR) from None
        noticed = False
        while not _port_answers(self.addr, self.port):
            waited = time.monotonic() - start
            signame = stopped_by()
            if signame:
                raise StartupEnded(f"ddp_train: stopped by {signame} while rank {self.rank} waited for rank 0's "
                                   f"rendezvous store at {self.where}; no step had run, nothing to save; run it "
                                   f"again (resume=auto)", EXIT_CHECKPOINTED, report=self.speaks)
            if waited >= self.timeout_s:
                raise StartupEnded(f"ddp_train: error: rank {self.rank} could not reach the rendezvous store at "
                                   f"{self.where} within {self.timeout_s} s (dist.timeout_s): rank 0 hosts it; start "
                                   f"rank 0 there, or check MASTER_ADDR, MASTER_PORT and the firewall",
                                   EXIT_USER_ERROR, report=self.speaks)
            if not noticed and waited >= NOTICE_S and self.speaks:
                _say(f"ddp_train: rank {self.rank} waiting for rank 0, which hosts the rendezvous store at "
                     f"{self.where} (dist.timeout_s={self.timeout_s})")
                noticed = True
            time.sleep(PROBE_S / 2)
        try:
            return dist.TCPStore(self.addr, self.port, None, False, timeout=datetime.timedelta(seconds=10),
                                 wait_for_workers=False)
        except RuntimeError as e:  # its port answered, then the store went away: rank 0 ended meanwhile
            raise self._lost(e) from None

    # ----------------------------------------------------------------- waiting for every rank

    def _await_ranks(self, store: dist.Store, start: float, stopped_by: Callable[[], str]) -> None:
        """Poll the join counter until every rank is in, or the wait ends by a decision all ranks follow."""
        noticed = False
        while True:
            joined = int(store.add(f"{JOIN}count", 0))
            if joined >= self.world_size:
                if self._decide(store, b"go", "") == b"go":
                    return
            elif store.check([OUTCOME]):
                self._decide(store, b"", "")  # another rank stopped or timed out: follow it
            waited = time.monotonic() - start
            signame = stopped_by()
            if signame:
                self._decide(store, b"stop", f"ddp_train: stopped by {signame} while waiting for "
                             f"{self._missing_words(store, joined)} at {self.where}; no step had run, nothing to "
                             f"save; run it again (resume=auto)")
            elif waited >= self.timeout_s:
                self._decide(store, b"timeout", f"ddp_train: error: rendezvous timed out after {self.timeout_s} s "
                             f"(dist.timeout_s): {joined} of {self.world_size} ranks joined at {self.where}; missing: "
                             f"{', '.join(self._missing(store))}; start them with the same MASTER_ADDR, MASTER_PORT "
                             f"and WORLD_SIZE, or raise dist.timeout_s")
            elif not noticed and waited >= NOTICE_S and self.rank == 0:
                _say(f"ddp_train: rank 0 waiting for {self._missing_words(store, joined)} at {self.where} "
                     f"(dist.timeout_s={self.timeout_s})")
                noticed = True
            time.sleep(POLL_S)

    def _decide(self, store: dist.Store, outcome: bytes, line: str) -> bytes:
        """Propose ``outcome`` (empty: only read the decision); returns ``go``, else raises the decided end.

        The first proposal wins: the rank that made it prints its line, the others end silently with its code.
        """
        decided = store.compare_set(OUTCOME, "", outcome) if outcome else store.get(OUTCOME)
        if decided == b"go":
            return decided
        code = EXIT_CHECKPOINTED if decided == b"stop" else EXIT_USER_ERROR
        store.add(f"{JOIN}left", 1)
        if self.rank == 0:  # its store must outlive the others' last look at the decision
            deadline = time.monotonic() + LINGER_S
            while store.add(f"{JOIN}left", 0) < store.add(f"{JOIN}count", 0) and time.monotonic() < deadline:
                time.sleep(POLL_S / 2)
        raise StartupEnded(line, code, report=bool(line) and decided == outcome)

    def _missing(self, store: dist.Store) -> list[str]:
        """``rank N`` for each rank not joined yet (the first :data:`NAMED`, then how many more)."""
        missing = [r for r in range(self.world_size) if not store.check([f"{JOIN}rank{r}"])]
        words = [f"rank {r}" for r in missing[:NAMED]]
        return words + ([f"{len(missing) - NAMED} more"] if len(missing) > NAMED else [])

    def _missing_words(self, store: dist.Store, joined: int) -> str:
        return f"{self.world_size - joined} of {self.world_size} ranks ({', '.join(self._missing(store))})"


def _port_answers(addr: str, port: int) -> bool:
    """Something listens at ``addr:port`` (rank 0's store, once it has started)."""
    try:
        with socket.create_connection((addr, port), timeout=PROBE_S):
            return True
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    return first_line(error) or type(error).__name__


# While the rendezvous waits, file descriptor 2 goes to /dev/null and this module's own lines to the
# real stderr: a store operation on a lost connection logs a C++ warning with a stack dump before it
# raises, and what it raises becomes one line here.
_stderr_fd: int | None = None


@contextlib.contextmanager
def cpp_output_aside() -> Iterator[None]:
    """Discard what C++ writes to stderr (fd 2) in the block; :func:`_say` still reaches the real stderr."""
    global _stderr_fd
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    _stderr_fd = saved
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        _stderr_fd = None


def _say(line: str) -> None:
    if _stderr_fd is None:
        print(line, file=sys.stderr, flush=True)
    else:
        os.write(_stderr_fd, (line + "\n").encode())
