"""Writing files safely: atomic writes, JSON that any reader parses, and what a failed write means.

A leaf module (it imports nothing of ddp_train's) that anything writing into a run folder uses:
checkpoints, metrics.json, run.json, the status file, evaluation reports and plots. An atomic
write goes to a temporary file in the same folder, is flushed and fsynced, and is renamed over
the real name, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch


def temp_name(path: Path) -> Path:
    """The temporary file an atomic write of ``path`` goes through: ``.<name>.tmp-<pid>`` beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(f)`` on a temporary file, fsync it, then rename it to ``path``."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a partial file under ``path``."""
    # Serialised in memory first: torch.save straight into a file turns a full disk into an opaque
    # "unexpected pos" RuntimeError; a plain write raises OSError(ENOSPC), which names the cause.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, lambda f: f.write(buffer.getbuffer()))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def clean_json(value: Any) -> Any:
    """JSON-safe: NaN and inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    return value



def write_error_reason(error: OSError, run_dir: Path) -> str:
    """Why a write into the run folder failed, in words: the OS's reason, or that the folder is gone."""
    if isinstance(error, FileNotFoundError) and not Path(run_dir).is_dir():
        return f"the run folder {run_dir} no longer exists (removed, or its file system unmounted)"
    return error.strerror or str(error)


def write_error_advice(run_dir: Path) -> str:
    """What to do after a failed write into ``run_dir`` (the end of the one-line error)."""
    if not Path(run_dir).is_dir():
        return "put the run folder back (its checkpoints went with it) and continue with resume=auto, or start again"
    return "make the folder writable (or free space), then continue with resume=auto"
