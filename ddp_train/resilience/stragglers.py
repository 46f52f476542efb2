"""Stragglers: a rank that is persistently slower than the others, and whether in data or compute.

Every ``dist.straggler_every_steps`` steps each rank takes its window from
:data:`ddp_train.resilience.steptime.CLOCK` (mean seconds per step in data loading and in its own compute,
waits for other ranks excluded) and the ranks share it in one small all-gather. Rank 0 logs every
rank's figures to TensorBoard (``ranks/data_s/rank<N>``, ``ranks/compute_s/rank<N>``) and names a
rank whose figure exceeds ``dist.straggler_factor`` times the median of the other ranks' in two
windows in a row (one slow window is noise: a checkpoint write, a page cache miss), and says so
again when it has caught up.
"""

from __future__ import annotations

import socket
import statistics
from dataclasses import dataclass, field

import torch

from ..distributed.context import DistContext
from .steptime import CLOCK
from ..tracking import NullTracker

KINDS = ("data", "compute")
MIN_GAP_S = 0.005  # below 5 ms a step, a "slower" rank costs nothing worth a line
PATIENCE = 2  # windows in a row


def slow_ranks(table: list[list[float]], factor: float) -> dict[tuple[int, str], tuple[float, float]]:
    """``{(rank, kind): (its seconds per step, the others' median)}`` for each rank slower than ``factor``
    times the median of the other ranks in that kind. ``table[rank] = [data_s, compute_s]``."""
    out = {}
    for rank, row in enumerate(table):
        others = [other for r, other in enumerate(table) if r != rank]
        if not others:
            continue
        for k, kind in enumerate(KINDS):
            median = statistics.median(o[k] for o in others)
            if row[k] > factor * median and row[k] - median > MIN_GAP_S:
                out[(rank, kind)] = (row[k], median)
    return out


@dataclass
class StragglerReport:
    """Called on every rank after every step (a collective every ``every`` steps); rank 0 reports."""

    ctx: DistContext
    every: int
    factor: float
    tracker: NullTracker
    hosts: list[str] = field(default_factory=list)
    _streak: dict[tuple[int, str], int] = field(default_factory=dict)
    _named: set[tuple[int, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.every and self.ctx.distributed:
            self.hosts = self.ctx.all_gather_object(socket.gethostname())

    def __call__(self, global_step: int) -> None:
        if not self.every or global_step % self.every or not self.ctx.distributed:
            return
        window = CLOCK.take_window()
        table = self.ctx.all_gather_host(torch.tensor([window.data_s, window.compute_s], dtype=torch.float64))
        if not self.ctx.is_main:
            return
        rows = table.tolist()
        for rank, (data_s, compute_s) in enumerate(rows):
            self.tracker.scalar(f"ranks/data_s/rank{rank}", data_s, global_step)
            self.tracker.scalar(f"ranks/compute_s/rank{rank}", compute_s, global_step)
        slow = slow_ranks(rows, self.factor)
        self._streak = {key: self._streak.get(key, 0) + 1 for key in slow}
        steps = f"steps {window.first_step}-{global_step}"
        for key, count in sorted(self._streak.items()):
            if count >= PATIENCE and key not in self._named:
                self._named.add(key)
                (rank, kind), (mine, median) = key, slow[key]
                other = KINDS[1 - KINDS.index(kind)]
                self.tracker.info(
                    f"straggler: rank {rank} ({self.hosts[rank] if self.hosts else '?'}) is {mine / max(median, 1e-9):.1f}x "
                    f"slower than the other ranks' median in {kind}: {mine:.3f} s/step vs {median:.3f} "
                    f"({other} {rows[rank][1 - KINDS.index(kind)]:.3f} s/step), {PATIENCE} windows to {steps}")
        for key in sorted(self._named - set(slow)):
            self._named.discard(key)
            self.tracker.info(f"straggler: rank {key[0]} no longer slower in {key[1]} ({steps})")
