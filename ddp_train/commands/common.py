"""What the subcommands share: an argument parser with one-line errors, and one way to fail."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from ..errors import EXIT_USER_ERROR


class SubcommandParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), printed by rank 0 only."""

    def __init__(self, *args: Any, rank: int = 0, **kw: Any) -> None:
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kw)
        self.rank = rank

    def error(self, message: str) -> NoReturn:
        if self.rank == 0:
            print(f"{self.prog}: error: {message} (see python -m {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def add_weights_option(p: argparse.ArgumentParser) -> None:
    """``--weights trained|ema``: which weights of a full checkpoint eval, predict and demo use."""
    p.add_argument("--weights", choices=("trained", "ema"), default=None,
                   help="which weights of a full checkpoint: trained, or ema (the EMA copy of a run with "
                        "train.ema_decay > 0); default: those the run evaluated (train.eval_weights), as in model.pth")


def fail(message: str, rank: int = 0, report: bool = True) -> int:
    """One line on stderr (rank 0, or the rank that reports), exit code 2."""
    if rank == 0 and report:
        print(f"ddp_train: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
