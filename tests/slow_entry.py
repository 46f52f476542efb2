"""``torchrun ... tests/slow_entry.py ARGS``: ddp_train's CLI with one rank made slow or stuck, by environment.

Test scaffolding only: it stands in for a slow disk, a stuck file system or a busy core on one rank.

- ``SLOW_RANK``: the rank affected (default 1).
- ``SLOW_DATA_S``: that rank sleeps this long before each training batch (a slow data pipeline).
- ``STUCK_DATA_AFTER``: after this many training batches that rank sleeps in data loading for an
  hour (a hung file system read), in :func:`_sleep_in_data_loading`.
- ``PIN_RANKS=1``: at its first batch, every rank pins its main thread to the core of its own number
  (rank r on core r); see :func:`_pin_threads`.
- ``HOG_CORE=1``: that rank (pinned) also starts ``HOGS`` (default 3) CPU hog processes on its own core. Started from the
  rank itself, it shares the rank's session: with the kernel's autogroup scheduling, a hog started
  from another session would get its own share of the core and hardly slow the rank.
"""

import os
import sys
import time

from ddp_train.training import trainer
from ddp_train.cli import main

RANK = int(os.environ.get("RANK", "0"))
AFFECTED = RANK == int(os.environ.get("SLOW_RANK", "1"))
_real_train_one_epoch = trainer.train_one_epoch
_batches = 0


def _sleep_in_data_loading(seconds: float) -> None:
    time.sleep(seconds)


class _SlowLoader:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        global _batches
        for batch in self.loader:  # its loader worker processes start (unpinned) before the first batch
            _batches += 1
            if os.environ.get("PIN_RANKS") == "1" and _batches == 1:
                _pin_threads()
            if "SLOW_DATA_S" in os.environ and AFFECTED:
                _sleep_in_data_loading(float(os.environ["SLOW_DATA_S"]))
            if AFFECTED and _batches > int(os.environ.get("STUCK_DATA_AFTER", "1000000000")):
                _sleep_in_data_loading(3600)
            yield batch


def _pin_threads() -> None:
    """The main thread (data and compute) on core ``RANK``; every other thread (gloo's communication
    threads) on core 0. On a two-core machine the communication threads would otherwise share the
    hogged core, and every collective, so every rank, would slow down alike."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {0})
    os.sched_setaffinity(0, {RANK % os.cpu_count()})  # 0: the calling (main) thread


def _patched(learner, loader, *args, **kwargs):
    wrap = AFFECTED or os.environ.get("PIN_RANKS") == "1"
    return _real_train_one_epoch(learner, _SlowLoader(loader) if wrap else loader, *args, **kwargs)


trainer.train_one_epoch = _patched

if os.environ.get("HOG_CORE") == "1" and AFFECTED:
    import atexit
    import subprocess

    os.sched_setaffinity(0, {RANK % os.cpu_count()})  # for the hogs to inherit; reset below
    for _ in range(int(os.environ.get("HOGS", "3"))):  # several: each takes an equal share of the core
        atexit.register(subprocess.Popen([sys.executable, "-c", "while True: pass"]).kill)  # inherits the pinning
    os.sched_setaffinity(0, range(os.cpu_count()))

if __name__ == "__main__":
    sys.exit(main())
