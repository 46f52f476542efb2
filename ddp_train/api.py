"""Training from Python: ``ddp_train.api.train(config, overrides)``, for notebooks, Ray Train and other engines.

The same run as ``python -m ddp_train``: the same run folder, resume, checkpoints and messages.
What differs is how it ends: a failure raises :class:`~ddp_train.envelope.RunError`, whose
``str`` is the one line the CLI would print (``ddp_train: error: ...``) and whose ``exit_code``
is the CLI's; success returns a :class:`TrainResult`. Every rank calls it.

When ``torch.distributed`` is already initialised (Ray Train's ``TorchTrainer``, a notebook, a
test), the run joins that group and leaves it initialised at the end: it is the caller's.
Otherwise the launch is read from the environment as the CLI reads it (one process, torchrun,
srun) and the group formed here is left at the end. See docs/engines.md: "Python API".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .config import Config, config_from_dict, load_config, validate_for_device, validate_for_world
from .envelope import RunError, checked_input, launch_info, process_group

ConfigLike = Union[Config, Mapping[str, Any], str, Path, None]

__all__ = ["RunError", "TrainResult", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run returns on every rank."""

    run_dir: Path  # the run folder: checkpoints/, metrics.json, config.yaml, tb/
    test: dict[str, Any]  # the final test metrics (loss, acc, ...), as in metrics.json
    history: list[dict[str, Any]]  # one entry per epoch (train and valid loss and accuracy)
    metrics: dict[str, Any]  # metrics.json's whole content


def load(config: ConfigLike = None, overrides: Sequence[str] = ()) -> Config:
    """A validated Config from a Config, a mapping of sections, a YAML path or None (the defaults), with
    ``key=value`` overrides on top. Raises ConfigError (one line) on a bad value."""
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), list(overrides))
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), list(overrides))
    return load_config(config, list(overrides))


def train(config: ConfigLike = None, overrides: Sequence[str] = ()) -> TrainResult:
    """Train as ``python -m ddp_train`` does; every rank calls it, and every rank gets the result.

    ``config``: a :class:`~ddp_train.config.Config`, a mapping (a YAML file's content), a YAML path, or
    None for the defaults; ``overrides``: ``key=value`` strings applied on top, as on the command line.
    Raises :class:`RunError` (``str``: the one line; ``exit_code``: the CLI's) on every rank when the run
    cannot finish: a bad config or data, a stop signal (75, checkpoint written), a lost peer (1).
    """
    import torch.distributed as dist

    from .distributed.context import device_kind, environ

    env = environ()
    adopted = dist.is_available() and dist.is_initialized()
    launch = None if adopted else launch_info(env)
    rank = dist.get_rank() if adopted else launch.rank  # type: ignore[union-attr]
    world = dist.get_world_size() if adopted else launch.world_size  # type: ignore[union-attr]
    with checked_input(rank):  # the same error on every rank, before anything is formed or written
        cfg = load(config, overrides)
        validate_for_world(cfg, world)
        validate_for_device(cfg, device_kind())

    from .training.trainer import train as train_run

    with _stop_flag() as stop_flag:
        with process_group(launch, cfg.dist.backend, cfg.dist.timeout_s, env, lambda: stop_flag.name) as ctx:
            metrics = train_run(cfg, ctx, stop_flag)
    return TrainResult(Path(metrics["run_dir"]), metrics.get("test") or {}, metrics.get("history") or [], metrics)


@contextlib.contextmanager
def _stop_flag() -> Iterator[Any]:
    """The stop-signal flag of the run: listening to SIGTERM/SIGINT/SIGUSR1 on the main thread; elsewhere
    (Ray Train runs the training function in a thread) Python allows no handler, so none is installed and
    the engine's own stop (it ends the worker) applies."""
    from .resilience.signals import StopFlag

    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    with flag:
        yield flag
