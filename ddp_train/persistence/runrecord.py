"""Which run a run folder holds: ``<run>/run.json``, the run's identity and where it was started from.

A *run* is one line of training. Its first start makes a run id (16 random hex digits), kept in
``run.json`` and in every checkpoint it writes (``run_id``); a resume continues the run of the
folder it writes to. A run folder holds one run, so ``resume=PATH`` with a checkpoint of another
run is refused when the folder already holds a run (:func:`check_same_run`), and into a folder
that holds none it starts a new run that records its origin (:func:`record_for_start`)::

    {"run_id": "3f9c0a7b12d45e60", "resumed_from": null}
    {"run_id": "81aa2c...", "resumed_from": {"checkpoint": "/abs/runs/rf/checkpoints/last.pt",
                                             "run_id": "3f9c0a7b12d45e60", "global_step": 5}}

Rank 0 reads and writes these files; nothing here talks to the other ranks.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, step_files

RUN_FILE = "run.json"
# What a run leaves in its folder from its first write on: a folder with any of these holds a run.
RUN_FILES = (RUN_FILE, "config.yaml", "metrics.json", "checkpoints/last.pt")


def new_run_id() -> str:
    return secrets.token_hex(8)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """``run.json`` of ``run_dir``, or None when there is none (a new folder, or a run of an older ddp_train)."""
    try:
        record = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def holds_a_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run's files (its config, metrics, record or checkpoints), started or not."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in RUN_FILES) or bool(step_files(run_dir / "checkpoints"))


def _own_file(run_dir: Path, path: Path) -> bool:
    """``path`` lies in ``run_dir``'s own checkpoints folder."""
    try:
        return Path(path).resolve().parent == (Path(run_dir) / "checkpoints").resolve()
    except OSError:
        return False


def check_same_run(run_dir: Path, path: Path, ckpt: dict[str, Any]) -> None:
    """Raise CheckpointError (one line) when resuming ``ckpt`` (read from ``path``) into ``run_dir`` would put
    a second run into a folder that holds one.

    The same run: both have run ids and they are equal (a copy of the run's own checkpoint kept
    elsewhere is fine); without an id on either side (files of an older ddp_train), the
    checkpoint must be one of the folder's own files. A folder that holds no run takes any.
    """
    if not holds_a_run(run_dir):
        return
    folder_id = (read_record(run_dir) or {}).get("run_id")
    ckpt_id = ckpt.get("run_id")
    same = folder_id == ckpt_id if folder_id and ckpt_id else _own_file(run_dir, path)
    if same:
        return
    raise CheckpointError(
        f"resume: {path} is a checkpoint of another run{f' ({ckpt_id})' if ckpt_id else ''}, and the run folder "
        f"{run_dir} already holds a different run{f' ({folder_id})' if folder_id else ''}: a run folder holds one "
        f"run; resume into a new folder (another run_name; its run.json records where it started from), or "
        f"continue {run_dir}'s own run with resume=auto")


def record_for_start(run_dir: Path, origin: tuple[Path, dict[str, Any]] | None) -> dict[str, Any]:
    """The ``run.json`` of this start, given the checkpoint it resumes from (``origin``: path and contents).

    The folder's run continues (its id kept) when it starts fresh (then with no origin) or resumes
    its own checkpoint; a resume from another run's checkpoint, accepted by
    :func:`check_same_run` only into a folder that holds no run, starts a new run that records
    the checkpoint, its run and its step as ``resumed_from``.
    """
    record = read_record(run_dir) or {}
    run_id = record.get("run_id")
    if origin is None:
        return {"run_id": run_id or new_run_id(), "resumed_from": None}
    path, ckpt = origin
    ckpt_id = ckpt.get("run_id")
    if (run_id and run_id == ckpt_id) or _own_file(run_dir, path):
        return {"run_id": run_id or ckpt_id or new_run_id(), "resumed_from": record.get("resumed_from")}
    return {"run_id": new_run_id(),
            "resumed_from": {"checkpoint": str(Path(path).resolve()), "run_id": ckpt_id,
                             "global_step": int(ckpt["global_step"])}}
