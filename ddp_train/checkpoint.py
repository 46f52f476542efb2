"""Checkpoints: atomic writes by rank 0, safe loads everywhere.

A checkpoint is written to a temporary file in the same folder, flushed, fsynced and renamed
over the real name, so a crash leaves either the old file or the new one, never half of one.
Everything stored is tensors and plain Python types, so loading with ``weights_only=True``
works and a crafted pickle cannot run code.
"""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path
from typing import Any

import torch

from .config import UserError


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


class CheckpointError(UserError):
    """No usable checkpoint where one is required."""


STEP_GLOB = "step-*.pt"


def step_file(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def _link(target: Path, name: Path) -> None:
    """Point ``name`` at ``target``'s data (a hard link), replacing ``name`` atomically."""
    tmp = name.with_name(f".{name.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    os.link(target, tmp)
    os.replace(tmp, name)


class Checkpointer:
    """Full checkpoints ``step-<global step>.pt`` under ``folder``; a no-op when not enabled.

    ``last.pt`` and ``best.pt`` are hard links to step files (no second write of the same bytes),
    ``model.pth`` holds the best plain weights. Only the newest ``keep`` step files are kept; a
    pruned step file that ``best.pt`` still names lives on through that link.
    """

    def __init__(self, folder: Path, enabled: bool, keep: int = 2) -> None:
        self.folder, self.enabled, self.keep = Path(folder), enabled, keep
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    @property
    def weights(self) -> Path:
        return self.folder / "model.pth"

    def save(self, state: dict[str, Any], step: int, improved: bool = False, background: bool = False) -> Path:
        """Write the step file, point ``last.pt`` (and ``best.pt`` and ``model.pth`` when ``improved``) at it.

        ``background``: copy the tensors (a memory copy, tens of milliseconds) and write from a
        thread while training goes on; the write is atomic either way, so a crash meanwhile
        leaves the previous checkpoint as the newest. Writes stay in order: a save first waits
        for the previous one.
        """
        path = step_file(self.folder, step)
        if not self.enabled:
            return path
        self.wait()
        if not background:
            self._write(state, path, improved)
            return path
        snapshot = _snapshot(state)
        self._writer = threading.Thread(target=self._write_catching, args=(snapshot, path, improved),
                                        name="ddp_train-checkpoint")
        self._writer.start()
        return path

    def wait(self) -> None:
        """Block until a background write is on disk; re-raise its error, if any."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_catching(self, state: dict[str, Any], path: Path, improved: bool) -> None:
        try:
            self._write(state, path, improved)
        except BaseException as e:  # reported by the next wait(), on the training thread
            self._error = e

    def _write(self, state: dict[str, Any], path: Path, improved: bool) -> None:
        atomic_save(state, path)
        _link(path, self.last)
        if improved:
            _link(path, self.best)
            atomic_save(state["model"], self.weights)
        for old in sorted(self.folder.glob(STEP_GLOB))[: -self.keep]:
            old.unlink()


def _snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are private CPU copies (training keeps changing the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else "empty"


def safe_load(path: Path) -> tuple[Any, str]:
    """(the object in ``path``, "") or (None, why it cannot be loaded: "refused: ..." or "damaged (...)")."""
    try:
        return load_checkpoint(path), ""
    except pickle.UnpicklingError as e:
        # weights_only refuses any pickle that names a global (a function or class it would call).
        lines = [line.strip() for line in str(e).splitlines() if line.strip()
                 and not line.startswith(("Weights only load failed", "Please file", "Check the documentation"))]
        detail = (lines[0] if lines else _first_line(e))[:120]
        if "global" in detail.lower():
            return None, f"refused: not a plain checkpoint, it would run code ({detail})"
        return None, f"damaged (UnpicklingError: {detail})"
    except Exception as e:  # truncated zip, garbage, empty file, a folder: all mean "damaged"
        return None, f"damaged ({type(e).__name__}: {_first_line(e)})"


def try_load(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, "") or (None, why it cannot be used)."""
    state, why = safe_load(path)
    if why:
        return None, why
    if not isinstance(state, dict) or "model" not in state or "global_step" not in state:
        return None, "damaged (not a ddp_train checkpoint: no model/global_step)"
    return state, ""


def newest_valid(folder: Path, report: Any = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable step checkpoint in ``folder``, skipping damaged ones with one line each.

    Returns None when there is no step checkpoint at all; raises CheckpointError when there are
    some but none can be used.
    """
    candidates = sorted(Path(folder).glob(STEP_GLOB), key=_step_of, reverse=True)
    reasons = []
    for path in candidates:
        state, why = try_load(path)
        if state is not None:
            return path, state
        reasons.append(f"{path.name}: {why}")
        report(f"ddp_train: checkpoint {path} is {why}; trying the previous one")
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {folder} ({'; '.join(reasons)}); "
                              f"move the run folder away to start fresh, or pass resume=PATH")
    return None
