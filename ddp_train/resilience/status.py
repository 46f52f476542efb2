"""The run's status file, for launch scripts: how far the run got, and how the process ended.

A script that requeues a job (``launch/slurm.sbatch``) must tell a crash loop from progress and
a bad input from a transient failure, but torchrun reports every failed worker as exit 1. When
``DDP_TRAIN_STATUS_FILE`` is set, global rank 0 keeps the facts in that JSON file::

    {"global_step": 40, "checkpoint": "runs/x/checkpoints/last.pt", "exit_code": 75, "reason": "..."}

``global_step``/``checkpoint``: the newest checkpoint this process wrote (null before its first),
recorded when it is written, so a crash after progress still shows the progress. ``exit_code``/
``reason``: how :func:`ddp_train.cli.main` ended (null while it runs, and after a hard kill).
Every update replaces the file atomically. On other ranks, and without the variable, the status
is a no-op object, so the code that reports progress needs no ``if rank == 0``.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from ..files import atomic_write_text
from ..distributed.context import LaunchError, detect_launch, environ
from ..errors import EXIT_CHECKPOINTED, EXIT_HANG, EXIT_OK, EXIT_USER_ERROR, first_line

ENV = "DDP_TRAIN_STATUS_FILE"

# The reason recorded for each exit code main() returns (its own one-line message is in the log).
REASONS = {
    EXIT_OK: "finished",
    EXIT_USER_ERROR: "stopped on a bad input or environment (config, data, out_dir, a checkpoint, a run folder in "
                     "use, a write into the run folder that failed)",
    EXIT_HANG: "the hang watchdog ended the run: no rank completed a step in time",
    EXIT_CHECKPOINTED: "stopped by a signal after writing a checkpoint",
    1: "stopped: another rank ended during a collective",
}


class RunStatus:
    """The status file of this process's run, or a no-op (``path`` None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.record: dict[str, Any] = {"global_step": None, "checkpoint": None, "exit_code": None, "reason": None}

    def checkpoint(self, global_step: int, path: Path) -> None:
        """A checkpoint of ``global_step`` is being written to ``path``."""
        self._update(global_step=int(global_step), checkpoint=str(path))

    def exit(self, code: int, reason: str) -> None:
        """The process ends with ``code``; ``reason``: one line saying why."""
        self._update(exit_code=int(code), reason=" ".join(reason.split()))

    def _update(self, **fields: Any) -> None:
        if self.path is None:
            return
        self.record.update(fields)
        try:
            atomic_write_text(self.path, json.dumps(self.record) + "\n")
        except OSError as e:
            # The status only helps a launch script decide; losing it must not stop training.
            print(f"ddp_train: warning: cannot write the status file {self.path} ({ENV}): {e.strerror or e}; "
                  "no more status updates", file=sys.stderr, flush=True)
            self.path = None


NO_STATUS = RunStatus(None)
# The run of this process, installed by reported() for the duration of main(). Process-wide like the
# signal handlers of signals.StopFlag: the checkpoint writer (state.RunCheckpoints) reports to it
# without the trainer having to pass one more object through every phase.
_current = NO_STATUS


def current() -> RunStatus:
    """The status of the run this process is in: the one :func:`reported` installed, else a no-op."""
    return _current


def for_process(env: Mapping[str, str]) -> RunStatus:
    """The status file named by ``DDP_TRAIN_STATUS_FILE`` on global rank 0; a no-op elsewhere or without it."""
    path = env.get(ENV)
    if not path:
        return NO_STATUS
    try:
        main = detect_launch(env).rank == 0
    except LaunchError:
        main = True  # a rank that cannot tell its place writes what all of them write: the same exit 2
    return RunStatus(Path(path)) if main else NO_STATUS


def _exit_code(e: SystemExit) -> int:
    return 0 if e.code is None else e.code if isinstance(e.code, int) else 1


def _first_line(e: BaseException) -> str:
    line = first_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def reported(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate the CLI's ``main``: install this process's status, and record how ``main`` ended."""
    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        global _current
        status = _current = for_process(environ())
        try:
            code = main(*args, **kwargs)
        except SystemExit as e:  # argparse: 2 on a bad argument, 0 after --help
            status.exit(_exit_code(e), REASONS.get(_exit_code(e), f"exited {e.code}"))
            raise
        except BaseException as e:  # a bug: its traceback follows in the log
            status.exit(1, f"crashed: {_first_line(e)}")
            raise
        finally:
            _current = NO_STATUS
        status.exit(code, REASONS.get(code, f"exited {code}"))
        return code
    return run
