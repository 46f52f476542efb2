"""The envelope of every command that forms a process group: training, ``eval`` and the Python API.

One way to read the launch, check the input before any group exists, form (or adopt) the group,
leave it cleanly and turn what went wrong into one line and an exit code. Inside the envelope a
failure is a :class:`RunError`: its ``str`` is the line the CLI prints, ``exit_code`` what the
process exits with, ``report`` whether this rank is the one that prints it (one line per job,
not one per rank). The CLI prints and returns the code (:func:`exit_code_of`); the Python API
(:mod:`ddp_train.api`) raises it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .distributed.context import (DistContext, LaunchError, LaunchInfo, PeerFailed, detect_launch, init_distributed,
                                  peer_gone, shutdown)
from .distributed.localcomm import PeerGone
from .errors import EXIT_CHECKPOINTED, EXIT_USER_ERROR, UserError
from .resilience.rendezvous import StartupEnded
from .resilience.steptime import CLOCK

EXIT_PEER_LOST = 1  # a collective failed because another rank's process ended (torchrun counts it a crash)


class RunError(Exception):
    """A run or command that ended other than by success: ``str(e)`` is its one line (``ddp_train: error: ...``),
    ``exit_code`` the documented exit code, ``report`` True on the rank that prints the job's line."""

    def __init__(self, line: str, exit_code: int, report: bool = True) -> None:
        super().__init__(line)
        self.line, self.exit_code, self.report = line, exit_code, report

    def exit(self) -> int:
        """Print the line (on the reporting rank) and return the exit code: the CLI's way to end."""
        if self.report and self.line:
            print(self.line, file=sys.stderr, flush=True)
        return self.exit_code


def user_error(message: str, exit_code: int = EXIT_USER_ERROR, report: bool = True) -> RunError:
    """The :class:`RunError` of a bad input: ``ddp_train: error: <message>``."""
    return RunError(f"ddp_train: error: {message}", exit_code, report)


def exit_code_of(body: Callable[..., int], *args: Any) -> int:
    """``body(*args)``'s exit code, or the code of the :class:`RunError` it raised (its line printed)."""
    try:
        return body(*args)
    except RunError as e:
        return e.exit()


def launch_info(env: Mapping[str, str]) -> LaunchInfo:
    """:func:`detect_launch`, its refusal as a :class:`RunError` (every process prints it: none knows its rank)."""
    try:
        return detect_launch(env)
    except LaunchError as e:
        raise user_error(str(e)) from None


@contextlib.contextmanager
def checked_input(rank: int, grace_s: float = 0.0) -> Iterator[None]:
    """The input checks every rank makes before any group exists: a :class:`UserError` becomes one line from rank 0.

    ``grace_s``: how long the other ranks wait before raising. Under torchrun the first rank to exit
    makes the launcher end the others: a rank other than 0 that exited first could cut rank 0 off
    before it printed the job's line.
    """
    try:
        yield
    except UserError as e:
        if rank != 0:
            time.sleep(grace_s)
        raise user_error(str(e), e.exit_code, report=rank == 0) from None


def adopt_group(timeout_s: float) -> DistContext:
    """The context of a default process group someone else initialised (Ray Train, a notebook, a test).

    Its rank and size come from the group; its backend decides the device (a GPU per local rank
    under NCCL). No store is known, so the hang watchdog is off (see docs/engines.md: "Python API").
    """
    import torch
    import torch.distributed as dist

    from .distributed.context import _pick_device, environ
    from .distributed.localcomm import open_local_group

    rank, world = dist.get_rank(), dist.get_world_size()
    backend = "nccl" if "nccl" in str(dist.get_backend()) else "gloo"
    local_rank = int(environ().get("LOCAL_RANK", "0") or 0)
    device = _pick_device(local_rank, backend == "nccl" and torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    control = dist.new_group(backend="gloo") if backend == "nccl" and world > 1 else None
    ctx = DistContext("external", rank, local_rank, world, device, backend, control_group=control,
                      local_group=open_local_group(rank, world, timeout_s) if world > 1 else None)
    return dataclasses.replace(ctx, restart_count=0)


def _open(launch: LaunchInfo | None, backend: str, timeout_s: int, stopped_by: Callable[[], str]) -> DistContext:
    """Form the group of ``launch`` (None: adopt the caller's); a refusal or an ended start-up as a :class:`RunError`."""
    if launch is None:
        return adopt_group(timeout_s)
    try:
        return init_distributed(launch, backend, timeout_s, stopped_by)
    except LaunchError as e:
        raise user_error(str(e), report=launch.rank == 0) from None
    except StartupEnded as e:  # a stop signal or dist.timeout_s while ranks were missing: one line for the job
        raise RunError(e.line, e.exit_code, e.report) from None


@contextlib.contextmanager
def process_group(launch: LaunchInfo | None, backend: str, timeout_s: int, env: Mapping[str, str],
                  stopped_by: Callable[[], str] = lambda: "",
                  after_shutdown: Callable[[], None] = lambda: None) -> Iterator[DistContext]:
    """The process group a command runs in, left cleanly whatever happens; what ends the command early as a
    :class:`RunError`.

    ``launch`` None adopts the default group the caller initialised, and leaves it initialised at the
    end (it is the caller's). ``after_shutdown`` runs once the group is left (the CLI stops listening
    to signals there: the exit code is decided).
    """
    from .resilience.signals import Preempted, end_orphan

    ctx = _open(launch, backend, timeout_s, stopped_by)
    try:
        try:
            yield ctx
        except BaseException as e:
            _release_frames(e)
            raise
    except Preempted as e:
        raise RunError(f"ddp_train: {e}", EXIT_CHECKPOINTED, ctx.is_main) from e
    except PeerFailed as e:  # the failing rank prints the job's line
        raise RunError(f"ddp_train: {e}", EXIT_USER_ERROR, report=False) from e
    except UserError as e:
        raise user_error(str(e), e.exit_code, getattr(e, "report", True)) from e
    except RuntimeError as e:
        if not (ctx.distributed and peer_gone(e)):
            raise  # a bug: its traceback (and torchrun's error file, through the CLI's @record)
        end_orphan()  # the peer may be a sibling whose agent (this one's too) died: that line instead
        # A peer's process ended (a crash says why above it; a lost node says nothing): one line
        # per surviving node, not a traceback per rank.
        raise RunError(peer_lost_line(ctx, e, env), EXIT_PEER_LOST, ctx.local_rank == 0) from e
    finally:
        if launch is not None:
            shutdown(ctx)
        elif ctx.local_group is not None:  # ours, not the caller's group: closed, the group stays
            ctx.local_group.close()
        after_shutdown()


def _release_frames(error: BaseException) -> None:
    """Free what the ended frames of ``error``'s traceback hold, now rather than at exit.

    A DataLoader iterator held by such a frame shuts its workers down when it is collected; left
    to the interpreter's exit that happened inside another package's exit handler (torch's dynamo
    imports modules there), where the workers no longer answered: 5 s per worker to join, 5 s more
    after a SIGTERM they ignore (loaders.py), so 11 s from a data error's line to the exit. Collected
    here, they end at once. The traceback itself (files, lines) is kept; the frames' locals are not.
    """
    import gc
    import traceback

    traceback.clear_frames(error.__traceback__)
    gc.collect()


def peer_lost_line(ctx: DistContext, error: BaseException, env: Mapping[str, str]) -> str:
    """The line for a collective that failed because another rank's process ended: which peer (gloo's
    error names its address, not its rank; a shared-memory collective knows its rank and process),
    after which global step, and what happens next."""
    found = re.search(r"\[([^\]\s]+)\]:(\d+)", str(error))
    process = "its process"
    if isinstance(error, PeerGone):
        peer, process = f"rank {error.rank}", f"its process, pid {error.pid} on this machine,"
    else:
        peer = f"the rank at {found.group(1)}:{found.group(2)}" if found else "a peer"
    # CLOCK.global_step: the last step this process completed (0 before its first, resumed or not).
    when = f"after global step {CLOCK.global_step}" if CLOCK.global_step else "before this process's first step"
    limit = env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if ctx.launcher == "torchrun" and limit.isdigit() and ctx.restart_count < int(limit):
        then = (f"torchrun restarts the group with the nodes left (restart {ctx.restart_count + 1} of {limit}) "
                f"and it resumes from the newest checkpoint in the run folder")
    elif ctx.launcher == "external":
        then = ("the caller's engine decides what follows (Ray Train restarts the workers); run again with "
                "resume=auto to continue from the newest checkpoint in the run folder")
    else:  # no torchrun restart left (or none asked for): under launch/slurm.sbatch the job is requeued
        then = ("the job ends (the first error above, if any, says why); run it again with resume=auto to continue "
                "from the newest checkpoint in the run folder")
    return f"ddp_train: rank {ctx.rank}: lost {peer} ({process} ended: a crash, a kill or a lost node) {when}; {then}"


__all__ = ["RunError", "adopt_group", "checked_input", "exit_code_of", "launch_info", "peer_lost_line",
           "process_group", "user_error"]
