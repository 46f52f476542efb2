"""The MLflow sink: one MLflow run per run folder, its id kept in trackers.json.

Logs through ``MlflowClient`` (no global active run) to ``track.mlflow_uri``: a tracking server
(``http://host:port``), a database URI, or by default a SQLite file ``<run>/mlflow.db``. Every start of
the run folder continues the recorded run (docs/tracking.md: "MLflow").
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..config import TrackConfig
from .runids import read_ids, record_id

# MLflow retries a failed HTTP call 7 times with exponential backoff (minutes) by default: a tracking
# server that went down would stall the training loop. A user's own setting wins.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(track: TrackConfig, run_dir: Path) -> str:
    """``track.mlflow_uri``, or the run folder's own store."""
    return track.mlflow_uri or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class MlflowSink:
    """Logs scalars to one MLflow run, one ``log_batch`` call per step."""

    name = "mlflow"

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def scalars(self, values: dict[str, float], step: int, epoch_end: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()],
                              synchronous=True)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


def _log_params(client: Any, run_id: str, hparams: dict[str, Any]) -> None:
    """The hyperparameters MLflow does not have yet (it refuses to change a logged param's value: a resume
    with an accepted config change keeps the first value, and metrics.json's config.yaml has the new one)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    params = [Param(k, str(v)[:6000]) for k, v in hparams.items() if k not in have]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100], synchronous=True)


def open_sink(track: TrackConfig, run_dir: Path, hparams: dict[str, Any]) -> MlflowSink:
    """Open (or reopen) the run folder's MLflow run and log the hyperparameters it lacks."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(track, run_dir)
    client = MlflowClient(tracking_uri=uri)
    known = read_ids(run_dir).get("mlflow", {})
    if known.get("uri") == uri and known.get("run_id"):
        run_id = known["run_id"]
        client.update_run(run_id, status="RUNNING")
    else:
        experiment = client.get_experiment_by_name(track.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(track.mlflow_experiment))
        run_id = client.create_run(experiment_id, run_name=run_dir.name,
                                   tags={"ddp_train.run_dir": str(Path(run_dir).resolve())}).info.run_id
        record_id(run_dir, "mlflow", {"run_id": run_id, "uri": uri, "experiment": track.mlflow_experiment})
    _log_params(client, run_id, hparams)
    return MlflowSink(client, run_id)
