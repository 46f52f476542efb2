"""The multi-node tests' log filter (tests/helpers.without_exit_barrier_race) drops torchrun's own exit-barrier
record and nothing else: a real traceback must still reach the "no Traceback" checks."""

from __future__ import annotations

from .helpers import without_exit_barrier_race

# As CI printed it (2026-12-05), shortened: one logger record, every line with the same prefix.
PREFIX = "E1205 16:47:49.259000 26615 torch/distributed/elastic/agent/server/api.py:1008]"
RECORD = "".join(f"{PREFIX} {line}\n" for line in [
    "Error waiting on exit barrier. Elapsed: 0.0123 seconds",
    "Traceback (most recent call last):",
    '  File "/x/torch/distributed/elastic/agent/server/api.py", line 994, in _exit_barrier',
    "torch.distributed.DistNetworkError: Failed to recv, got 0 bytes.",
])
WORKER_CRASH = 'Traceback (most recent call last):\n  File "/x/ddp_train/cli.py", line 1, in main\nValueError: boom\n'
# Another record of torchrun's agent, from another moment: kept (only the exit barrier's is a known race).
OTHER = "E1205 16:47:50.100000 26615 torch/distributed/elastic/agent/server/api.py:700] Traceback (most recent call last):\n"


def test_drops_the_exit_barrier_record_and_keeps_everything_else():
    log = "epoch   1 | ...\n" + RECORD + WORKER_CRASH + OTHER
    kept = without_exit_barrier_race(log)
    assert kept == "epoch   1 | ...\n" + WORKER_CRASH + OTHER
    assert "Traceback" not in without_exit_barrier_race("epoch   1 | ...\n" + RECORD)
