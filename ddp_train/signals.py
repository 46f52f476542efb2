"""Graceful stop on SIGTERM, SIGINT and SIGUSR1 (what SLURM sends before a time limit or preemption).

The handler only records the signal. The training loop asks, at every step boundary, whether
any rank received one (a collective, so all ranks agree on the same step), then every rank
stops after that step, rank 0 writes a checkpoint, and the process exits with
:data:`ddp_train.errors.EXIT_CHECKPOINTED` so a launch script knows to requeue. A second SIGINT
exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """Raised on every rank after the stop checkpoint is written."""

    def __init__(self, signame: str, checkpoint: str) -> None:
        super().__init__(f"stopped by {signame}; checkpoint {checkpoint}; continue with resume=auto")
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
