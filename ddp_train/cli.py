"""Command line: ``python -m ddp_train [train] [--config PATH] [key=value ...]``.

Under ``torchrun`` or ``srun`` every rank runs this. The config is parsed and validated on
every rank before any process group starts, so a bad config exits all ranks with code 2 and
one line on stderr (from rank 0), never a hang.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping

from torch.distributed.elastic.multiprocessing.errors import record

from .commands import SUBCOMMANDS
from .commands import run as run_subcommand
from .commands.common import fail
from .config import ConfigError, describe_keys, load_config, validate_for_device, validate_for_world
from .distributed.context import (DistContext, LaunchError, PeerFailed, detect_launch, device_kind, environ, init_distributed,
                                  peer_gone, shutdown)
from .errors import EXIT_CHECKPOINTED, UserError
from .distributed.localcomm import PeerGone
from .resilience.rendezvous import StartupEnded
from .resilience.signals import end_orphan, watch_agent
from .resilience.status import reported
from .resilience.steptime import CLOCK

USAGE = """python -m ddp_train [train] [--config PATH] [key=value ...]
  torchrun --nproc_per_node=N -m ddp_train [--config PATH] [key=value ...]
  python -m ddp_train eval --checkpoint PATH [split=test|valid] [key=value ...]   (see eval --help)
  python -m ddp_train predict --checkpoint PATH FILE...                          (see predict --help)
  python -m ddp_train plot RUN_DIR                                               (see plot --help)
  python -m ddp_train demo --checkpoint PATH [--port N]                          (see demo --help)"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddp_train",
        usage=USAGE,
        description="Train an image classifier with DDP (torchrun, SLURM srun) or on one process.",
        epilog="config keys (set in the YAML file or as key=value):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="PATH", help="YAML config file (see configs/); defaults apply without one")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.lr=0.05")
    return p


# How long a rank other than 0 waits before exiting on a bad config: rank 0 (same config, same
# error) prints the job's one line, and the launcher ends the job when rank 0 exits. A rank that
# exited first would make torchrun SIGTERM rank 0 before it had printed anything.
REPORT_GRACE_S = 10.0


def _config_error(message: str, rank: int) -> int:
    """The bad-config exit: one line from rank 0; the other ranks give rank 0 time to say it first."""
    if rank != 0:
        time.sleep(REPORT_GRACE_S)
    return fail(message, rank)


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
    else:  # no torchrun restart left (or none asked for): under launch/slurm.sbatch the job is requeued
        then = ("the job ends (the first error above, if any, says why); run it again with resume=auto to continue "
                "from the newest checkpoint in the run folder")
    return f"ddp_train: rank {ctx.rank}: lost {peer} ({process} ended: a crash, a kill or a lost node) {when}; {then}"


@record
@reported  # DDP_TRAIN_STATUS_FILE: how the run ended, for launch scripts (status.py)
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ddp_train`` and the ``ddp-train`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:  # using a trained model: see each one's --help
        return run_subcommand(argv[0], argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = _parser().parse_args(argv)
    env = environ()
    try:
        launch = detect_launch(env)
    except LaunchError as e:
        return fail(str(e))
    watch_agent(env, launch.rank)  # under torchrun: a worker whose agent died ends with one line
    try:
        cfg = load_config(args.config, args.overrides)
        validate_for_world(cfg, launch.world_size)
        validate_for_device(cfg, device_kind())  # before the run folder is written or the data loaded
    except ConfigError as e:
        return _config_error(str(e), launch.rank)

    from .resilience.signals import Preempted, StopFlag

    # Stop signals are recorded from here on: one that arrives during set-up stops the run at its
    # first step, with a checkpoint, instead of killing the process mid-way.
    with StopFlag() as stop_flag:
        from .training.trainer import train  # heavy imports after the cheap checks

        try:
            ctx = init_distributed(launch, cfg.dist.backend, cfg.dist.timeout_s, lambda: stop_flag.name)
        except LaunchError as e:
            return fail(str(e), launch.rank)
        except StartupEnded as e:  # a stop signal or dist.timeout_s while ranks were missing: one line for the job
            if e.report:
                print(e.line, file=sys.stderr, flush=True)
            return e.exit_code
        try:
            train(cfg, ctx, stop_flag)
            if stop_flag.signum is not None and ctx.is_main:  # after the test's agreement: the run is complete
                print(f"ddp_train: {stop_flag.name} arrived as the run finished; nothing left to stop",
                      file=sys.stderr, flush=True)
        except Preempted as e:
            if ctx.is_main:
                print(f"ddp_train: {e}", file=sys.stderr, flush=True)
            return EXIT_CHECKPOINTED
        except PeerFailed:
            return 2
        except UserError as e:
            if getattr(e, "report", True):  # one line for the job, not one per rank
                print(f"ddp_train: error: {e}", file=sys.stderr, flush=True)
            return e.exit_code
        except RuntimeError as e:
            if not (ctx.distributed and peer_gone(e)):
                raise  # a bug: its traceback (and torchrun's error file, through @record)
            end_orphan()  # the peer may be a sibling whose agent (this one's too) died: that line instead
            # A peer's process ended (a crash says why above it; a lost node says nothing): one line
            # per surviving node, not a traceback per rank.
            if ctx.local_rank == 0:
                print(peer_lost_line(ctx, e, env), file=sys.stderr, flush=True)
            return 1
        finally:
            shutdown(ctx)
            stop_flag.ignore_from_now()  # this rank's exit code is decided: torchrun's SIGTERM must not change it
    return 0


def console_main() -> None:
    sys.exit(main())
