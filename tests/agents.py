"""torchrun agents standing for nodes on this machine: their workers found in /proc, and a node's end.

Test scaffolding shared by the elastic, etcd and watchdog tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # ended meanwhile
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent
                    found.append(int(entry.name))
    return found


def worker_pid(agent: int, rank: int) -> int:
    """The pid of the worker with ``RANK=rank`` among torchrun agent ``agent``'s children."""
    for pid in children(agent):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no worker with RANK={rank} under pid {agent}")


class AgentGroup:
    """Agents started by a subclass into ``self.agents``; on leaving the ``with`` block, every one still
    running is killed with its workers."""

    def __init__(self) -> None:
        self.agents: list[subprocess.Popen] = []

    def kill(self, agent: subprocess.Popen) -> None:
        """The node's end: its workers (each leads its own session) and the agent, with SIGKILL."""
        for worker in children(agent.pid):
            with contextlib.suppress(ProcessLookupError):  # ended by itself meanwhile
                os.killpg(worker, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()

    def __enter__(self) -> AgentGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                self.kill(agent)
