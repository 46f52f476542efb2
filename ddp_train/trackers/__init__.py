"""Trackers besides TensorBoard (W&B, MLflow): sinks that rank 0's :class:`~ddp_train.tracking.Tracker` feeds.

Each sink gets the same scalars (batched per step) and the run's hyperparameters. The tracker's
run id is kept in ``<run>/trackers.json`` (:mod:`.runids`), so a resumed, restarted or requeued
run continues the same tracker run. A sink that fails is dropped with one warning line; the
training, the other trackers, metrics.json and the checkpoints go on (docs/tracking.md: "When a tracker fails").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

from ..config import TrackConfig, tracker_names
from ..errors import first_line


class Sink(Protocol):
    """One tracker: what :class:`Sinks` calls (each call may raise; the sink is then dropped)."""

    name: str

    def scalars(self, values: dict[str, float], step: int, epoch_end: bool) -> None:
        """One row: the training values of global step ``step``, or (``epoch_end``) what its epoch end adds."""
    def close(self, finished: bool) -> None: ...


def _warn(name: str, what: str, error: BaseException) -> None:
    print(f"ddp_train: warning: the {name} tracker failed {what} ({type(error).__name__}: "
          f"{first_line(error)[:200]}); training goes on without it (metrics.json, the checkpoints and the other "
          f"trackers are unaffected)", file=sys.stderr, flush=True)


class Sinks:
    """The open sinks; a call that raises drops that sink with one warning line and never reaches the caller."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def _each(self, what: str, call: Any) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as e:  # a tracker is never worth a training run: a server, a disk, a library bug
                self.sinks.remove(sink)
                _warn(sink.name, what, e)

    def scalars(self, values: dict[str, float], step: int, epoch_end: bool = False) -> None:
        if values:
            self._each(f"logging step {step}", lambda s: s.scalars(values, step, epoch_end))

    def close(self, finished: bool) -> None:
        self._each("closing", lambda s: s.close(finished))
        self.sinks = []


def open_sinks(track: TrackConfig, run_dir: Path, hparams: dict[str, Any]) -> Sinks:
    """The W&B and MLflow sinks ``track.trackers`` names, each continuing the run recorded in trackers.json.

    A sink that cannot start (server down, bad credentials) is left out with one warning line.
    """
    makers = {"wandb": "wandb_run", "mlflow": "mlflow_run"}
    sinks: list[Sink] = []
    for name in tracker_names(track):
        if name not in makers:
            continue
        try:
            module = __import__(f"{__name__}.{makers[name]}", fromlist=["open_sink"])
            sinks.append(module.open_sink(track, run_dir, hparams))
        except Exception as e:
            _warn(name, "to start", e)
    return Sinks(sinks)
