"""``torchrun ... tests/fault_entry.py ARGS``: ddp_train's CLI with an exception injected on rank 1.

Test scaffolding only: it stands in for a real bug or a broken node on one rank.
"""

import os
import sys

from ddp_train.training import trainer
from ddp_train.cli import main

_real_train_one_epoch = trainer.train_one_epoch


def _failing(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return _real_train_one_epoch(*args, **kwargs)


trainer.train_one_epoch = _failing

if __name__ == "__main__":
    sys.exit(main())
