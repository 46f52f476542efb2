"""The Weights & Biases sink: one W&B run per run folder, its id kept in trackers.json.

Offline by default (``track.wandb_mode``): the run's files go to ``<run>/wandb/`` and
``wandb sync <run>/wandb/offline-run-*`` uploads them later (docs/tracking.md: "Weights & Biases").
Every start of the run folder opens the same run id with ``resume="allow"``, and the charts' x-axis is
``global_step`` (the run's optimizer steps), so a resumed run continues the same axis.

W&B's own row number (``_step``) must grow across the starts of a run: W&B ignores a row below the
last one (a resumed online run starts after the server's last row). Row ``2 * global_step`` holds a
step's training values and ``2 * global_step + 1`` what its epoch end adds: a run stopped on an epoch's
last step validates that epoch after its resume, at the same global step, in the row after the stop's.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from ..config import TrackConfig
from .runids import read_ids, record_id


class WandbSink:
    """Logs scalars to one W&B run, with ``global_step`` in every row."""

    name = "wandb"

    def __init__(self, run: Any) -> None:
        self.run = run

    def scalars(self, values: dict[str, float], step: int, epoch_end: bool) -> None:
        self.run.log({**values, "global_step": step}, step=2 * step + int(epoch_end))

    def close(self, finished: bool) -> None:
        # 75: stopped with a checkpoint (ddp_train/errors.py); W&B shows it as not finished, and a resume reopens it.
        self.run.finish(exit_code=0 if finished else 75)


def open_sink(track: TrackConfig, run_dir: Path, hparams: dict[str, Any]) -> WandbSink:
    """Open (or reopen) the run folder's W&B run; the id is recorded before the run starts, so a crash in
    between still continues the same run next time."""
    import wandb

    known = read_ids(run_dir).get("wandb", {})
    run_id = known.get("id") if known.get("project") == track.wandb_project else None
    if run_id is None:
        run_id = uuid.uuid4().hex[:8]  # W&B's own form: 8 lowercase letters and digits
        record_id(run_dir, "wandb", {"id": run_id, "project": track.wandb_project})
    run = wandb.init(
        project=track.wandb_project, mode=track.wandb_mode, dir=str(run_dir), id=run_id, resume="allow",
        name=run_dir.name, config=hparams,
        # console off: W&B would otherwise wrap stdout and stderr, where ddp_train's one-line messages go.
        settings=wandb.Settings(console="off", silent=True, disable_git=True),
    )
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")  # every chart against the optimizer step, not W&B's row
    return WandbSink(run)
