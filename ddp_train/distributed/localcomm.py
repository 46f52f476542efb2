"""Small collectives between the ranks of one machine, through shared memory.

Why: CPU SyncBN needs two collectives per BatchNorm layer per step (the forward statistics, the
backward sums), 24 for a ResNet-10, each on the critical path. Over gloo each one crosses loopback
TCP and hands the work to gloo's threads and back: about 1 ms per collective measured on the
project's 2-core VM with idle ranks, 2-3 ms between busy ones, which made SyncBN add 70-90% to a
ResNet-10 step. Here a collective is a copy into a shared page, a store of a sequence number and a
wait for the peers' numbers: tens of microseconds.

How:
- One mapped file in ``/dev/shm`` per process group, created by rank 0 and unlinked as soon as
  every rank has mapped it (nothing is left behind, even after SIGKILL). Rank r owns one flag (its
  last posted sequence number) and two data slots (even and odd sequence numbers).
- ``all_gather``: write this rank's bytes into its slot for the new sequence number, then its
  flag; wait until every flag has reached it; read all slots. Two slots per rank suffice: a rank
  can post sequence s + 1 only after every rank posted s, that is after each finished reading s - 1.
- ``all_gather_parts``: the same for several pieces (tensors, numbers) written straight into the slot
  one after the other, SyncBN's [count, mean, var] without a concatenated copy first.
- ``all_reduce_sum``: ``all_gather`` then a sum in rank order, so every rank gets the same bits
  (and the result does not depend on gloo's reduction order).
- Waiting: spin for a moment (the peers usually arrive within microseconds: they run the same
  layer), yielding the core to anything else that wants it (``sched_yield``), then sleep in short
  naps, so a rank that waits long (a slow peer, a peer in its data loading) burns no core.
  While napping it checks that every peer process is still alive (a peer that died raises
  :class:`PeerGone`, which the CLI reports as a lost peer) and gives up after the process group's
  timeout.

Used only when every rank can map the file and see the others' processes (one machine, one
namespace) on x86-64, whose stores are seen by other cores in program order (data before flag);
anywhere else the callers use the process group's own collectives. Messages larger than a slot
(64 KiB) also go through the process group.
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SLOT_BYTES = 64 * 1024  # CPU SyncBN's largest message: (2 x 2048 + 1) fp64 numbers for ResNet-50's widest layer
FLAG_STRIDE = 8  # int64s between two ranks' flags: one cache line each (no false sharing)
SPIN_S = 0.002  # spin (yielding) this long before napping
NAP_S = 0.0002
LIVENESS_EVERY_S = 0.2


class PeerGone(RuntimeError):
    """A peer's process ended while this rank waited for it in a shared-memory collective."""

    def __init__(self, message: str, rank: int, pid: int) -> None:
        super().__init__(message)
        self.rank, self.pid = rank, pid


class LocalGroup:
    """All-gather and all-reduce among ``world_size`` ranks of one machine (see the module docstring)."""

    def __init__(self, path: str, rank: int, world_size: int, pids: list[int], timeout_s: float) -> None:
        self.rank, self.world_size, self.pids, self.timeout_s = rank, world_size, pids, timeout_s
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _size(world_size))
        finally:
            os.close(fd)
        header = world_size * FLAG_STRIDE * 8
        # The flags through a memoryview: a Python int store or load of one aligned int64, about ten times
        # cheaper than numpy's; SyncBN posts and polls them 24 times a ResNet-10 step, so it counts.
        self._flag_words = memoryview(self._map)[:header].cast("q")
        self._flag_at = [r * FLAG_STRIDE for r in range(world_size)]
        self._data = torch.frombuffer(self._map, dtype=torch.uint8, offset=header,
                                      count=2 * world_size * SLOT_BYTES).view(2, world_size, SLOT_BYTES)
        self._typed: dict[tuple[int, torch.dtype], tuple[torch.Tensor, Any]] = {}
        self._seq = 0

    @property
    def collectives(self) -> int:
        """How many collectives went through this group so far."""
        return self._seq

    def __deepcopy__(self, memo: dict) -> LocalGroup:
        return self  # one per process: a copied model (an EMA copy, say) shares it

    def fits(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` (a CPU tensor) fits one slot; the same on every rank for the same shape."""
        return self.fits_numbers(tensor.numel(), tensor)

    def fits_numbers(self, count: int, like: torch.Tensor) -> bool:
        """True when ``count`` numbers of ``like``'s dtype (on the CPU) fit one slot."""
        return like.device.type == "cpu" and count * like.element_size() <= SLOT_BYTES

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` stacked by rank (a new ``world_size x ...`` tensor); collective."""
        t = tensor.detach()
        return self.all_gather_parts([t.reshape(-1)], t.dtype).view(self.world_size, *t.shape)

    def all_gather_parts(self, parts: list[torch.Tensor | float], dtype: torch.dtype) -> torch.Tensor:
        """Every rank's ``parts`` laid end to end (1-D CPU tensors of ``dtype``, or numbers), stacked by rank:
        a new ``world_size x total`` tensor; collective. The parts are written straight into this rank's
        slot (no concatenated copy first); the caller checks that they fit (:meth:`fits_numbers`)."""
        self._seq += 1
        rows, np_rows = self._rows(self._seq % 2, dtype)
        mine = rows[self.rank]
        np_mine = np_rows[self.rank] if np_rows is not None else mine
        at = 0
        for part in parts:
            if isinstance(part, torch.Tensor):
                n = part.numel()
                mine[at : at + n].copy_(part)
            else:
                n = 1
                np_mine[at] = part
            at += n
        self._flag_words[self._flag_at[self.rank]] = self._seq  # after the data: x86 keeps the two stores in order
        self._wait(self._seq)
        return rows[:, :at].clone()  # read before posting again (see the module docstring)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor``, added in rank order (the same bits on every rank); collective."""
        return self.sum_in_rank_order(self.all_gather(tensor))

    @staticmethod
    def sum_in_rank_order(gathered: torch.Tensor) -> torch.Tensor:
        """``gathered[0] + gathered[1] + ...`` (the first dimension is the rank), added in that order."""
        total = gathered[0] + gathered[1] if len(gathered) > 1 else gathered[0].clone()
        for r in range(2, len(gathered)):
            total += gathered[r]
        return total

    def _rows(self, parity: int, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """The slots of sequence numbers of this parity, one row per rank, as ``dtype`` elements: a torch view,
        and a numpy view of the same bytes for writing single numbers cheaply (None for dtypes numpy lacks,
        bfloat16 say: numbers are then written through torch). Made once."""
        key = (parity, dtype)
        if key not in self._typed:
            rows = self._data[parity].view(dtype)
            try:
                np_rows = rows.numpy()
            except TypeError:
                np_rows = None
            self._typed[key] = rows, np_rows
        return self._typed[key]

    def _arrived(self, seq: int) -> bool:
        words = self._flag_words
        return all(words[at] >= seq for at in self._flag_at)

    def _wait(self, seq: int) -> None:
        if self._arrived(seq):
            return
        start = time.monotonic()
        while time.monotonic() - start < SPIN_S:
            os.sched_yield()
            if self._arrived(seq):
                return
        checked = time.monotonic()
        while not self._arrived(seq):
            time.sleep(NAP_S)
            now = time.monotonic()
            if now - checked >= LIVENESS_EVERY_S:
                checked = now
                self._check_peers(seq, now - start)

    def _check_peers(self, seq: int, waited: float) -> None:
        flags = [self._flag_words[at] for at in self._flag_at]
        for r, pid in enumerate(self.pids):
            if r != self.rank and flags[r] < seq and not _alive(pid):
                raise PeerGone(f"shared-memory peer gone: rank {r} (pid {pid}) ended while rank {self.rank} "
                               f"waited for it in a collective", r, pid)
        if waited > self.timeout_s:
            late = [r for r in range(self.world_size) if flags[r] < seq]
            raise RuntimeError(f"shared-memory collective timed out after {self.timeout_s:.0f} s "
                               f"(dist.timeout_s) waiting for rank(s) {late}")

    def close(self) -> None:
        self._flag_words.release()
        self._typed.clear()
        self._data = None  # type: ignore[assignment]  # views first: mmap refuses to close under them
        try:
            self._map.close()
        except BufferError:  # a tensor handed out still views the map; it goes with the process
            pass


def _size(world_size: int) -> int:
    return world_size * FLAG_STRIDE * 8 + 2 * world_size * SLOT_BYTES


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return not Path(f"/proc/{pid}/stat").exists() or _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def supported() -> bool:
    """Shared-memory collectives need x86-64's store ordering and a /dev/shm."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def open_local_group(rank: int, world_size: int, timeout_s: float, group: object = None) -> LocalGroup | None:
    """A :class:`LocalGroup` over the ranks of ``group`` (the default process group), or None on every rank
    when any rank cannot join it (another machine, another namespace, no /dev/shm). Collective."""
    if world_size < 2:
        return None
    path, fd = None, -1
    if rank == 0 and supported():
        try:
            fd, path = tempfile.mkstemp(prefix="ddp_train-", dir="/dev/shm")
            os.ftruncate(fd, _size(world_size))
        except OSError:
            path = None
        finally:
            if fd >= 0:
                os.close(fd)
    box = [path]
    dist.broadcast_object_list(box, src=0, group=group)
    path = box[0]
    local: LocalGroup | None = None
    pids: list[int] = [0] * world_size
    dist.all_gather_object(pids, os.getpid(), group=group)
    if path is not None and supported() and all(_alive(p) for p in pids):
        try:
            local = LocalGroup(path, rank, world_size, pids, timeout_s)
        except OSError:
            local = None
    joined: list[bool] = [False] * world_size
    dist.all_gather_object(joined, local is not None, group=group)  # also: every rank has mapped it
    if rank == 0 and path is not None:
        os.unlink(path)  # mapped everywhere (or given up on): the name is no longer needed
    if not all(joined):
        if local is not None:
            local.close()
        return None
    return local
