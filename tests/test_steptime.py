"""The rank clock's run-queue reading (ddp_train.resilience.steptime): per thread, and per process after a fork."""

from __future__ import annotations

import os
import threading

from ddp_train.resilience import steptime


def _reading_names(thread_id: int) -> bool:
    """After a read, the kept descriptor belongs to THREAD_ID."""
    steptime._runqueue_s()
    held = steptime._SCHEDSTAT.file
    return held is not None and held.thread == thread_id


def test_each_thread_and_a_forked_child_read_their_own_schedstat():
    assert _reading_names(threading.get_native_id())
    seen: list[bool] = []
    other = threading.Thread(target=lambda: seen.append(_reading_names(threading.get_native_id())))
    other.start()
    other.join()
    assert seen == [True]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child inherits the parent's descriptor, which names the parent's thread
        os.write(write, b"1" if _reading_names(os.getpid()) else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1", "a forked child reads the schedstat of its own thread"
    os.close(read)
    os.close(write)
