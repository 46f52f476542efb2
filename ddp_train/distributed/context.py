"""The distributed context: how the job was launched, and the collectives the loop uses.

The launch is read from the environment exactly once (:func:`detect_launch`); everything
downstream receives the resulting :class:`DistContext`. Collectives on a context without a
process group are no-ops, so the training loop reads the same at any world size.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from ..errors import UserError
from .localcomm import LocalGroup, PeerGone, open_local_group
from ..resilience.rendezvous import Rendezvous
from ..resilience.steptime import CLOCK

Launcher = Literal["torchrun", "slurm", "single", "external"]  # external: a group the caller formed
T = TypeVar("T")


@dataclass(frozen=True)
class LaunchInfo:
    """What the environment says about this process's place in the job."""

    launcher: Launcher
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0  # > 0 when torchrun or SLURM restarted this job: it must resume
    run_id: str | None = None  # an id stable across restarts (torchrun's rendezvous id), if any
    job_id: str | None = None  # the job this process belongs to (SLURM job, torchrun rendezvous), if known
    # The key-value store every rank can reach: torchrun's agent store, or rank 0's under srun
    # (MASTER_ADDR/MASTER_PORT either way). The hang watchdog heartbeats through it.
    store_addr: tuple[str, int] | None = None


class LaunchError(RuntimeError):
    """The launch environment is inconsistent."""


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[03-05,9],gpu1`` -> ``node03``, ``r[1-2]-n[01-04]`` -> ``r1-n01``."""
    depth, first = 0, ""
    for ch in nodelist.strip():  # the first comma outside brackets ends the first item
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            break
        first += ch
    if not first or first.count("[") != first.count("]"):
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _place(rank: int, local_rank: int, world: int, env: Mapping[str, str], names: tuple[str, str, str]) -> None:
    """Refuse a rank, local rank or world size that cannot be (``names``: the variables they came from)."""
    rank_key, local_key, world_key = names
    if world < 1:
        raise LaunchError(f"{world_key}={world}: the number of ranks must be 1 or more")
    if not 0 <= rank < world:
        raise LaunchError(f"{rank_key}={rank} is out of range for {world_key}={world}: ranks are 0 to {world - 1}")
    if local_rank < 0:
        raise LaunchError(f"{local_key}={local_rank} is negative: local ranks count from 0 on each machine")
    if "LOCAL_WORLD_SIZE" in env:
        local_world = _int(env, "LOCAL_WORLD_SIZE")
        if not 0 <= local_rank < local_world:
            raise LaunchError(f"{local_key}={local_rank} is out of range for LOCAL_WORLD_SIZE={local_world}: local "
                              f"ranks are 0 to {local_world - 1}")


def _master(env: Mapping[str, str], world: int) -> tuple[str, int] | None:
    """MASTER_ADDR and MASTER_PORT: required (and checked) with several ranks; None for one rank without them."""
    if world == 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        return None
    why = f"with WORLD_SIZE={world} every rank needs rank 0's address and a free port on it (torchrun sets both)"
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key, "").strip():
            raise LaunchError(f"{key} is not set: {why}")
    port = _int(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a port number (1 to 65535)")
    return env["MASTER_ADDR"].strip(), port


def job_id(env: Mapping[str, str]) -> str | None:
    """What identifies this job across its restarts: the SLURM job (array task included) or torchrun's rendezvous id."""
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm:{env['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    run_id = env.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{run_id}" if run_id not in (None, "", "none") else None


def detect_launch(env: Mapping[str, str]) -> LaunchInfo:
    """Read the launcher from environment variables (torchrun first, then a SLURM step)."""
    restarts = max([_int(env, k) for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT") if k in env], default=0)
    if "RANK" in env and "WORLD_SIZE" in env:
        run_id = env.get("TORCHELASTIC_RUN_ID")
        # torchrun's rendezvous id names the job across its restarts, but only when restarts are on.
        stable = run_id not in (None, "", "none") and env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        _place(rank, local_rank, world, env, ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        return LaunchInfo(
            "torchrun",
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            restart_count=restarts,
            run_id=run_id if stable else None,
            job_id=job_id(env),
            store_addr=_master(env, world),
        )
    # SLURM_STEP_ID exists only inside an `srun` step: a plain `python` in a batch script of a
    # multi-task job must not wait for peers that were never started.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _int(env, ntasks_key)
        if world > 1:
            local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
            _place(_int(env, "SLURM_PROCID"), local_rank, world, {}, ("SLURM_PROCID", "SLURM_LOCALID", ntasks_key))
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            job_number = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
            step_id = _int(env, "SLURM_STEP_ID") % 16 if env["SLURM_STEP_ID"].isdigit() else 0
            # A port derived from the job and step ids keeps jobs (and steps) sharing a node apart;
            # 15000-29999 stays below Linux's ephemeral range (32768+).
            port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 15000 + (job_number * 16 + step_id) % 15000
            if not 1 <= port <= 65535:
                raise LaunchError(f"MASTER_PORT={port} is not a port number (1 to 65535)")
            return LaunchInfo(
                "slurm",
                rank=_int(env, "SLURM_PROCID"),
                local_rank=local_rank,
                world_size=world,
                master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                master_port=port,
                restart_count=restarts,
                job_id=job_id(env),
                store_addr=(env.get("MASTER_ADDR") or first_host(nodelist), port),
            )
    return LaunchInfo("single", restart_count=restarts, job_id=job_id(env))


@dataclass(frozen=True)
class DistContext:
    """Rank, world size, device and the collectives; made once, passed down."""

    launcher: Launcher
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None = None
    data_parallel: bool = False  # single process driving several GPUs through nn.DataParallel
    restart_count: int = 0
    run_id: str | None = None
    job_id: str | None = None  # see LaunchInfo.job_id
    store_addr: tuple[str, int] | None = None  # see LaunchInfo.store_addr
    # A gloo group beside NCCL for host-side agreement (stop flags, errors): a CPU all-reduce
    # that never waits for the GPU queue to drain, unlike an NCCL one read back with .item().
    control_group: Any = None
    # The ranks through shared memory when all are on this machine (localcomm): host-side
    # agreements and CPU SyncBN take microseconds there instead of gloo's loopback milliseconds.
    local_group: LocalGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group connects several ranks."""
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            with CLOCK.waiting_for_peers():
                if self.backend == "nccl":
                    dist.barrier(device_ids=[self.device.index])
                else:
                    dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (returns it)."""
        if self.distributed:
            with CLOCK.waiting_for_peers():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        with CLOCK.waiting_for_peers():
            dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with CLOCK.waiting_for_peers():
            dist.all_gather_object(out, obj)
        return out

    def _host_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small CPU tensor over ranks without synchronising the GPU (the control group under NCCL)."""
        if not self.distributed:
            return tensor
        if self.local_group is not None and self.local_group.fits(tensor):
            with CLOCK.waiting_for_peers():
                return self.local_group.all_reduce_sum(tensor)
        if self.control_group is not None:
            with CLOCK.waiting_for_peers():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.control_group)
            return tensor
        return self.all_reduce_sum(tensor.to(self.device)).cpu()

    def all_gather_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's small CPU ``tensor`` stacked by rank (world_size x ...), without synchronising the GPU."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        if self.local_group is not None and self.local_group.fits(tensor):
            with CLOCK.waiting_for_peers():
                return self.local_group.all_gather(tensor)
        group = self.control_group
        device = torch.device("cpu") if group is not None or self.backend == "gloo" else self.device
        out = [torch.empty_like(tensor, device=device) for _ in range(self.world_size)]
        with CLOCK.waiting_for_peers():
            dist.all_gather(out, tensor.to(device), group=group)
        return torch.stack(out).cpu()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return self.any_each([flag])[0]

    def any_each(self, flags: list[bool]) -> list[bool]:
        """For each flag, True on every rank when it is true on any rank (one all-reduce for all of them)."""
        sums = self._host_sum(torch.tensor([1.0 if f else 0.0 for f in flags]))
        return [bool(v > 0) for v in sums.tolist()]

    def agree(self, error: BaseException | None) -> None:
        """Called on every rank after a step that may fail on some: if any rank failed, all stop.

        The failing ranks re-raise their own errors (the lowest of them marked ``report=True``, so
        one message is printed); the others raise :class:`PeerFailed`. This keeps a bad input on
        one rank from leaving the others blocked in the next collective.
        """
        flags = torch.zeros(self.world_size)
        flags[self.rank] = 1.0 if error is not None else 0.0
        failed = self._host_sum(flags).nonzero().flatten().tolist()
        if error is not None:
            error.report = failed[0] == self.rank  # type: ignore[attr-defined]
            raise error
        if failed:
            raise PeerFailed(f"rank {self.rank}: stopping because rank {failed[0]} reported an error")

    def run_agreed(self, fn: Callable[..., T], *args: Any, on_this_rank: bool = True) -> T | None:
        """``fn(*args)`` on every rank, then :meth:`agree` on the :class:`UserError` it raised, if any.

        Collective: every rank calls it. A rank passing ``on_this_rank=False`` (e.g. all but rank
        0 for a rank-0-only write) skips ``fn``, gets None and still takes part in the agreement.
        Other exceptions are bugs: they propagate, and the peers end through :func:`peer_gone`.
        """
        result, error = None, None
        if on_this_rank:
            try:
                result = fn(*args)
            except UserError as e:
                error = e
        self.agree(error)
        return result


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops too."""


# What gloo raises in a collective whose peer process has ended (a crash, or an exit after its own
# error); NCCL reports a lost peer as a timeout instead.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_gone(error: BaseException) -> bool:
    """True when ``error`` is a collective failing because another rank's process ended."""
    return isinstance(error, PeerGone) or isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_GONE)


def device_kind(cuda_ok: bool | None = None) -> str:
    """The kind of device :func:`init_distributed` picks: cuda, mps or cpu (known before it starts anything)."""
    if torch.cuda.is_available() if cuda_ok is None else cuda_ok:
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _pick_device(local_rank: int, cuda_ok: bool) -> torch.device:
    kind = device_kind(cuda_ok)
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if kind == "cuda" else torch.device(kind)


def init_distributed(launch: LaunchInfo, backend: str = "auto", timeout_s: int = 600,
                     stopped_by: Callable[[], str] = lambda: "") -> DistContext:
    """Start the process group (when there are several ranks) and pick the device.

    ``stopped_by()`` names a stop signal once one arrived (the CLI's :class:`~ddp_train.resilience.signals.StopFlag`):
    a rendezvous still waiting for ranks then ends (:class:`~ddp_train.resilience.rendezvous.StartupEnded`, as at
    ``timeout_s``); one that has completed keeps the signal for the first training step.
    """
    cuda_ok = torch.cuda.is_available()
    if launch.launcher == "single":
        gpus = torch.cuda.device_count() if cuda_ok else 0
        return DistContext("single", 0, 0, 1, _pick_device(0, cuda_ok), None, data_parallel=gpus > 1,
                           restart_count=launch.restart_count, job_id=launch.job_id)

    device = _pick_device(launch.local_rank, cuda_ok)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError("dist.backend: nccl needs CUDA GPUs; use dist.backend=gloo (or auto) on CPU")
    if launch.world_size > 1:
        timeout = datetime.timedelta(seconds=timeout_s)
        if launch.launcher == "torchrun" and environ().get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent hosts the store and has gathered the nodes: torch's rendezvous only connects to it.
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
            # The agent's store outlives a restart; a restarted group that read the previous
            # attempt's gloo/NCCL addresses from it would fail to connect: a prefix per attempt.
            # (With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 each round gets a new store, and the
            # attempt counts of the agents may differ: a node that joins later counts from 0.)
            store = dist.PrefixStore(f"ddp_train/attempt{launch.restart_count}", store)
        else:  # rank 0 hosts the store (srun, or RANK/WORLD_SIZE set by hand): a wait that can end early
            assert launch.store_addr is not None  # detect_launch requires MASTER_ADDR/MASTER_PORT here
            store = Rendezvous(*launch.store_addr, launch.rank, launch.world_size, timeout_s,
                               speaks=launch.local_rank == 0).join(stopped_by)
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout)
    control = dist.new_group(backend="gloo") if backend == "nccl" and launch.world_size > 1 else None
    ctx = DistContext(launch.launcher, launch.rank, launch.local_rank, launch.world_size, device, backend,
                      restart_count=launch.restart_count, run_id=launch.run_id, job_id=launch.job_id,
                      store_addr=launch.store_addr, control_group=control,
                      local_group=open_local_group(launch.rank, launch.world_size, timeout_s)
                      if launch.world_size > 1 else None)
    # Each torchrun agent counts its own restarts: a node that joined after a failure says 0 where
    # the others say 1. The job restarted if any rank did; every rank must see the same count.
    return dataclasses.replace(ctx, restart_count=max(ctx.all_gather_object(launch.restart_count)))


def shutdown(ctx: DistContext) -> None:
    """Leave the process group cleanly."""
    if ctx.local_group is not None:
        ctx.local_group.close()
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def environ() -> Mapping[str, str]:
    """The process environment; the only place the launch variables are read."""
    return os.environ
