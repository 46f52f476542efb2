"""``torchrun ... tests/phase_entry.py ARGS``: ddp_train's CLI where one rank sends itself a stop signal in a phase.

Test scaffolding only: it stands in for a SIGTERM or SIGUSR1 that arrives while the run validates or
tests. The signal is real (``os.kill`` of this process, through ddp_train's own handler); only its
timing is arranged, after the first batch of the phase, so that the test hits the phase every time.

- ``SIGNAL_PHASE``: ``valid`` (the first validation) or ``test`` (the test evaluation).
- ``SIGNAL_RANK``: the rank that signals itself (default 0); ``SIGNAL_NAME``: default ``SIGTERM``.
"""

import os
import signal
import sys

from ddp_train.training import trainer
from ddp_train.cli import main

PHASE = os.environ.get("SIGNAL_PHASE", "")
ME = os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0")
SIGNAL = signal.Signals[os.environ.get("SIGNAL_NAME", "SIGTERM")]
_real_evaluate, _real_run_test = trainer.evaluate, trainer.run_test
_state = {"phase": "valid", "sent": False}


def _signalling(loader):
    for i, batch in enumerate(loader):
        yield batch
        if i == 0 and not _state["sent"]:
            _state["sent"] = True
            os.kill(os.getpid(), SIGNAL)


def _evaluate(model, loader, *args, **kwargs):
    if ME and _state["phase"] == PHASE and not _state["sent"]:
        loader = _signalling(loader)
    return _real_evaluate(model, loader, *args, **kwargs)


def _run_test(*args, **kwargs):
    _state["phase"] = "test"
    return _real_run_test(*args, **kwargs)


trainer.evaluate, trainer.run_test = _evaluate, _run_test

if __name__ == "__main__":
    sys.exit(main())
