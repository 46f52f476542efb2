"""Checkpoints: atomic writes by rank 0, safe loads everywhere.

A checkpoint is written to a temporary file in the same folder, flushed, fsynced and renamed
over the real name, so a crash leaves either the old file or the new one, never half of one.
Everything stored is tensors and plain Python types, so loading with ``weights_only=True``
works and a crafted pickle cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(f)`` on a temporary file, fsync it, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or weights file onto the CPU, refusing anything but tensors and plain types."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer:
    """Writes ``last.pt``, ``best.pt`` and ``model.pth`` under ``folder``; a no-op when not enabled."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder, self.enabled = Path(folder), enabled

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    @property
    def weights(self) -> Path:
        return self.folder / "model.pth"

    def save(self, state: dict[str, Any], improved: bool) -> None:
        """``last.pt`` always; ``best.pt`` and the plain weights ``model.pth`` when ``improved``."""
        if not self.enabled:
            return
        atomic_save(state, self.last)
        if improved:
            atomic_save(state, self.best)
            atomic_save(state["model"], self.weights)
