"""torchrun for launch/multinode.sh: ``python -m ddp_train.resilience.launch_agent [torchrun arguments]``.

It runs ``torch.distributed.run`` unchanged, and turns the two ways such a job ends badly
into a line and an exit code instead of an agent traceback:

- the rendezvous does not complete (nodes missing, a wrong HEAD_ADDR or PORT, a firewall):
  ``ddp_train: rendezvous timed out after 60 s: 1 of 2 nodes joined at HEAD:PORT; ...``,
  exit 2. The wait is torchrun's own setting, ``--rdzv-conf timeout=N`` for the static
  rendezvous and ``--rdzv-conf join_timeout=N`` for c10d (both 600 s by default);
- a worker fails: torchrun's table of failed workers, then exit with the first failed worker's
  exit code (2 for bad input, 75 after a stop checkpoint), where torchrun itself exits 1.

How many nodes joined: the static rendezvous's store says it in its error (``1/2 clients
joined``); c10d's error says nothing, so the count is read from the handler's last synchronised
rendezvous state (torch internals, read defensively: without them the line says "fewer than N").
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import EXIT_USER_ERROR

DEFAULT_TIMEOUT_S = 600  # torchrun's default for both the static and the c10d rendezvous


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the nodes meet, as torchrun's arguments say."""

    backend: str
    endpoint: str  # host:port
    min_nodes: int
    max_nodes: int
    timeout_s: int

    @classmethod
    def from_args(cls, args: Any) -> Rendezvous:
        from torch.distributed.run import parse_min_max_nnodes

        conf = dict(item.split("=", 1) for item in (args.rdzv_conf or "").split(",") if "=" in item)
        min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
        if args.rdzv_backend == "static":
            endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port or 29500}"
            timeout = conf.get("timeout")
        else:
            endpoint, timeout = args.rdzv_endpoint, conf.get("join_timeout")
        seconds = int(timeout) if timeout is not None and timeout.strip().isdigit() else DEFAULT_TIMEOUT_S
        return cls(args.rdzv_backend, endpoint, min_nodes, max_nodes, seconds)

    @property
    def nodes(self) -> str:
        return str(self.min_nodes) if self.min_nodes == self.max_nodes else f"at least {self.min_nodes}"


def joined_nodes(error: BaseException, handlers: list[Any]) -> int | None:
    """How many nodes had joined when the rendezvous timed out, if known."""
    found = re.search(r"(\d+)/(\d+) clients joined", str(error))  # the static rendezvous's TCPStore
    if found:
        return int(found.group(1))
    for handler in handlers:  # c10d: this node gave up its place on timeout; the others' are still listed
        state = getattr(getattr(handler, "_state_holder", None), "state", None)
        participants = getattr(state, "participants", None)
        if isinstance(participants, dict):
            me = getattr(handler, "_this_node", None)
            return len([node for node in participants if node != me]) + 1
    return None


def rendezvous_message(error: BaseException, rdzv: Rendezvous, handlers: list[Any]) -> str:
    """The one line for a rendezvous that did not complete."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # RendezvousTimeoutError (c10d), "Timed out ... clients joined" (static head), "wait timeout" (static, others)
    timed_out = any(word in f"{type(error).__name__} {text}".lower() for word in ("timeout", "timed out"))
    check = "check HEAD_ADDR, PORT and the firewall"
    if not timed_out:
        return (f"ddp_train: rendezvous at {rdzv.endpoint} failed: {text}; {check} "
                f"(PORT must be free on the head node and reachable from the others)")
    joined = joined_nodes(error, handlers)
    if joined is not None:
        return (f"ddp_train: rendezvous timed out after {rdzv.timeout_s} s: {joined} of {rdzv.nodes} nodes joined at "
                f"{rdzv.endpoint}; start the other nodes, or {check}")
    if type(error).__name__ == "DistNetworkError":  # this node's store client never reached the head's store
        # c10d's client waits for the store its own time (read_timeout, 60 s), not join_timeout: say torch's figure.
        waited = re.search(r"after (\d+) ?ms", text)
        seconds = round(int(waited.group(1)) / 1000) if waited else rdzv.timeout_s
        return (f"ddp_train: rendezvous timed out after {seconds} s: this node could not reach the head node "
                f"at {rdzv.endpoint}; start node 0 there, or {check}")
    return (f"ddp_train: rendezvous timed out after {rdzv.timeout_s} s: fewer than {rdzv.nodes} nodes joined at "
            f"{rdzv.endpoint}; start the other nodes, or {check}")


@contextlib.contextmanager
def keeping_handlers(kept: list[Any]) -> Iterator[None]:
    """Collect the rendezvous handlers torchrun's launcher makes (it looks the factory up at each call)."""
    import torch.distributed.elastic.rendezvous.registry as registry

    original = registry.get_rendezvous_handler

    def keep(params: Any) -> Any:
        handler = original(params)
        kept.append(handler)
        return handler

    registry.get_rendezvous_handler = keep
    try:
        yield
    finally:
        registry.get_rendezvous_handler = original


def main(argv: list[str] | None = None) -> int:
    """torchrun with ``argv``; returns the exit code (see the module's docstring)."""
    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.elastic.rendezvous import RendezvousError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    rdzv = Rendezvous.from_args(args)
    handlers: list[Any] = []
    try:
        with keeping_handlers(handlers):
            record(torchrun.run)(args)  # @record as in torchrun's main: workers' error files are collected
    except ChildFailedError as e:
        print(e, file=sys.stderr, flush=True)  # torchrun's table of failed workers, without the agent's traceback
        _, first = e.get_first_failure()
        return first.exitcode if 0 < first.exitcode < 256 else 1
    except (DistError, RendezvousError) as e:
        print(rendezvous_message(e, rdzv, handlers), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
