"""Command line: ``python -m ddp_train [train] [--config PATH] [key=value ...]``.

Under ``torchrun`` or ``srun`` every rank runs this. The config is parsed and validated on
every rank before any process group starts, so a bad config exits all ranks with code 2 and
one line on stderr (from rank 0), never a hang.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .commands import SUBCOMMANDS
from .commands import run as run_subcommand
from .config import describe_keys, load_config, validate_for_device, validate_for_world
from .distributed.context import device_kind, environ
from .envelope import checked_input, exit_code_of, launch_info, process_group
from .resilience.signals import watch_agent
from .resilience.status import reported

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


@record
@reported  # DDP_TRAIN_STATUS_FILE: how the run ended, for launch scripts (status.py)
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ddp_train`` and the ``ddp-train`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:  # using a trained model: see each one's --help
        return run_subcommand(argv[0], argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    return exit_code_of(_train, _parser().parse_args(argv))


def _train(args: argparse.Namespace) -> int:
    """Training in the envelope (ddp_train/envelope.py); a :class:`RunError` ends it with its line and code."""
    env = environ()
    launch = launch_info(env)
    watch_agent(env, launch.rank)  # under torchrun: a worker whose agent died ends with one line
    with checked_input(launch.rank, REPORT_GRACE_S):
        cfg = load_config(args.config, args.overrides)
        validate_for_world(cfg, launch.world_size)
        validate_for_device(cfg, device_kind())  # before the run folder is written or the data loaded

    from .resilience.signals import StopFlag

    # Stop signals are recorded from here on: one that arrives during set-up stops the run at its
    # first step, with a checkpoint, instead of killing the process mid-way.
    with StopFlag() as stop_flag:
        from .training.trainer import train  # heavy imports after the cheap checks

        # Once the group is left, this rank's exit code is decided: torchrun's SIGTERM must not change it.
        with process_group(launch, cfg.dist.backend, cfg.dist.timeout_s, env, lambda: stop_flag.name,
                           stop_flag.ignore_from_now) as ctx:
            train(cfg, ctx, stop_flag)
            if stop_flag.signum is not None and ctx.is_main:  # after the test's agreement: the run is complete
                print(f"ddp_train: {stop_flag.name} arrived as the run finished; nothing left to stop",
                      file=sys.stderr, flush=True)
    return 0


def console_main() -> None:
    sys.exit(main())
