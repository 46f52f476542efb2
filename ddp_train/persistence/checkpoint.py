"""Checkpoints: atomic writes by rank 0, safe loads everywhere.

A checkpoint is written to a temporary file in the same folder, flushed, fsynced and renamed
over the real name, so a crash leaves either the old file or the new one, never half of one.
Everything stored is tensors and plain Python types, so loading with ``weights_only=True``
works and a crafted pickle cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, first_line
from ..files import atomic_save, temp_name, write_error_advice, write_error_reason


# The temporary names of the run's own atomic writes (temp_name), by folder: a write killed mid-way
# (SIGKILL, a lost node) leaves one, and only these are ever removed by remove_stale_temp_files.
_OUR_TEMPS = {
    "checkpoints": re.compile(r"^\.(?:step-\d{8,}(?:-b\d+)?\.pt|last\.pt|best\.pt|model\.pth)\.tmp-\d+$"),
    ".": re.compile(r"^\.(?:metrics\.json|config\.yaml|job|run\.json)\.tmp-\d+$"),
}


def remove_stale_temp_files(run_dir: Path) -> tuple[int, int]:
    """Remove the temporary files of killed writes from ``run_dir`` and its ``checkpoints/``; returns
    (files, bytes) removed.

    Only names of the exact pattern of the run's own writes go (``.step-00000010.pt.tmp-4242``,
    ``.metrics.json.tmp-77``, ...; never another file). Call it with the run's lock held, before the
    run's first write: one run writes a folder at a time, so any such file is from a process that
    was killed while writing it (whatever its pid: in a container a restart may reuse it).
    """
    files = size = 0
    for sub, pattern in _OUR_TEMPS.items():
        folder = Path(run_dir) / sub
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                nbytes = p.stat().st_size
                p.unlink()
                files, size = files + 1, size + nbytes
    return files, size


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or weights file onto the CPU, refusing anything but tensors and plain types."""
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointError(UserError):
    """No usable checkpoint where one is required."""


FORMAT = 2  # the checkpoint layout this version writes and the newest it reads
# The checkpoint format, declared once: every key of a checkpoint file in the order written, and whether
# a run needs it to continue (False: added within format 2, absent from older files, read with a default).
# persistence.parts fills exactly these keys; nothing else lists them.
KEYS: dict[str, bool] = {
    "format": True, "run_id": False, "branch": False, "steps_per_epoch": False, "epoch": True, "step_in_epoch": True,
    "global_step": True, "model": True, "optimizer": True, "scheduler": True, "scaler": False,
    "best_valid_loss": True, "best_step": True, "history": True, "config": True, "dataset": True, "world_size": True,
    "partial": True, "rng": True, "epoch_lr": True, "sample_digest": False,
    # The recipe's parts (training/ema.py, clipping.py, stopping.py), each None while its feature is off.
    "ema": False, "grad_norm": False, "early_stop": False,
}
REQUIRED = tuple(key for key, required in KEYS.items() if required)
STEP_GLOB = "step-*.pt"
_STEP_NAME = re.compile(r"^step-(\d+)(?:-b(\d+))?\.pt$")


def step_file(folder: Path, step: int, branch: int = 0) -> Path:
    """``step-<global step>.pt`` on the first line of a run, ``step-<global step>-b<branch>.pt`` on a branch."""
    return Path(folder) / (f"step-{step:08d}.pt" if branch == 0 else f"step-{step:08d}-b{branch}.pt")


def parse_step_file(path: Path) -> tuple[int, int] | None:
    """(global step, branch) of a step file's name, or None for any other name."""
    m = _STEP_NAME.match(Path(path).name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def step_files(folder: Path) -> list[Path]:
    """The step checkpoints in ``folder``, the most recently written first (mtime, then step).

    Write order, not step number: a run resumed from an older step writes lower step numbers
    after higher ones, and its files are the newest work.
    """
    def key(p: Path) -> tuple[int, int]:
        try:
            mtime = p.stat().st_mtime_ns
        except OSError:
            mtime = -1
        return mtime, parse_step_file(p)[0]  # type: ignore[index]

    return sorted((p for p in Path(folder).glob(STEP_GLOB) if parse_step_file(p) is not None), key=key, reverse=True)


def _link(target: Path, name: Path) -> None:
    """Point ``name`` at ``target``'s data (a hard link), replacing ``name`` atomically."""
    tmp = temp_name(name)
    if tmp.exists():
        tmp.unlink()
    os.link(target, tmp)
    os.replace(tmp, name)


def looks_whole(path: Path) -> bool:
    """A cheap readability check of a step file: a zip archive whose every member passes its CRC.

    torch.save writes zip archives; a truncated, emptied or overwritten file fails this without
    being unpickled.
    """
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; the previous one is still on disk."""


class Checkpointer:
    """Full checkpoints ``step-<global step>[-b<branch>].pt`` under ``folder``; a no-op when not enabled.

    ``last.pt`` and ``best.pt`` are hard links to step files (no second write of the same bytes),
    ``model.pth`` holds the best plain weights. Retention keeps the ``keep`` most recently written
    step files that are readable (damaged files neither count nor get deleted); a pruned step file
    that ``best.pt`` still names lives on through that link.
    """

    def __init__(self, folder: Path, enabled: bool, keep: int = 2, branch: int = 0) -> None:
        self.folder, self.enabled, self.keep, self.branch = Path(folder), enabled, keep, branch
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._whole: dict[tuple[str, int, int], bool] = {}  # (name, size, mtime) -> looks_whole, for retention

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    @property
    def weights(self) -> Path:
        return self.folder / "model.pth"

    @property
    def failed(self) -> bool:
        """A background write has failed (its error is raised by :meth:`wait`); cheap, never blocks."""
        return self._error is not None

    def save(self, state: dict[str, Any], step: int, improved: bool = False, background: bool = False) -> Path:
        """Write the step file, point ``last.pt`` (and ``best.pt`` and ``model.pth`` when ``improved``) at it.

        ``background``: copy the tensors (a memory copy, tens of milliseconds) and write from a
        thread while training goes on; the write is atomic either way, so a crash meanwhile
        leaves the previous checkpoint as the newest. Writes stay in order: a save first waits
        for the previous one. A failed write raises :class:`CheckpointWriteError` (in line, or
        from the next :meth:`wait`), naming the path and the reason.
        """
        path = step_file(self.folder, step, self.branch)
        if not self.enabled:
            return path
        self.wait()
        if not background:
            self._write_catching(state, path, improved)
            self.wait()
            return path
        snapshot = _snapshot(state)
        self._writer = threading.Thread(target=self._write_catching, args=(snapshot, path, improved),
                                        name="ddp_train-checkpoint")
        self._writer.start()
        return path

    def fail(self, error: BaseException) -> None:
        """Keep ``error`` to be raised by the next :meth:`wait` (and seen by :attr:`failed`)."""
        self._error = error

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
        except OSError as e:  # reported on the training thread (the next wait(), or the step agreement)
            previous = self.last if self.last.exists() else None
            self._error = CheckpointWriteError(
                f"checkpoint: cannot write {path}: {write_error_reason(e, self.folder.parent)}; "
                + (f"the previous checkpoint {previous} is kept; " if previous else "")
                + write_error_advice(self.folder.parent))
        except BaseException as e:
            self._error = e

    def _write(self, state: dict[str, Any], path: Path, improved: bool) -> None:
        atomic_save(state, path)
        _link(path, self.last)
        if improved:
            _link(path, self.best)
            atomic_save(evaluated_weights(state), self.weights)
        self._prune(path)

    def _prune(self, written: Path) -> None:
        """Keep the ``keep`` newest readable step files (``written``, just fsynced, among them)."""
        kept = 0
        for p in step_files(self.folder):
            if p == written or self._is_whole(p):
                kept += 1
                if kept > self.keep and p != written:
                    p.unlink(missing_ok=True)

    def _is_whole(self, p: Path) -> bool:
        try:
            st = p.stat()
        except OSError:
            return False
        key = (p.name, st.st_size, st.st_mtime_ns)
        if key not in self._whole:
            self._whole[key] = looks_whole(p)
        return self._whole[key]


def _snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are private CPU copies (training keeps changing the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _first_line(e: BaseException) -> str:
    return first_line(e)[:120] or "empty"


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


def check_format(state: Any, required: tuple[str, ...] = REQUIRED) -> str:
    """Why ``state`` is not a checkpoint this version can continue from ('' when it is).

    ``required``: the keys it must have (a whole checkpoint's by default).
    """
    if not isinstance(state, dict) or "global_step" not in state or ("model" in required and "model" not in state):
        return "damaged (not a ddp_train checkpoint: no model/global_step)"
    fmt = state.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        return "not a ddp_train checkpoint (no format version)"
    if fmt > FORMAT:
        return (f"written by a newer ddp_train (checkpoint format {fmt}; this version reads up to {FORMAT}); "
                f"upgrade ddp_train to use it")
    missing = [k for k in required if k not in state]
    if missing:
        return f"incomplete (missing {', '.join(missing)}): not a checkpoint a run can continue from"
    return ""


def try_load(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, "") or (None, why it cannot be used to continue a run)."""
    state, why = safe_load(path)
    if why:
        return None, why
    why = check_format(state)
    return (None, why) if why else (state, "")


def find_weights_at(step: int, branch: int, folders: list[Path]) -> dict[str, torch.Tensor] | None:
    """The model of the checkpoint written at global ``step``, from ``best.pt`` or a step file in ``folders``.

    The trainer looks up its best epoch's weights this way when that epoch came before a resume.
    The run's own branch is looked at first: another branch may hold a different checkpoint at
    the same step.
    """
    for folder in folders:
        names = ["best.pt", step_file(folder, step, branch).name, step_file(folder, step).name]
        names += sorted(p.name for p in folder.glob(f"step-{step:08d}-b*.pt"))
        for name in dict.fromkeys(names):
            if (folder / name).exists():
                state, _ = try_load(folder / name)
                if state is not None and state["global_step"] == step:
                    return evaluated_weights(state)
    return None


def evaluated_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's run validated, tested and exports to ``model.pth``: its EMA copy when the run
    evaluated that (``train.eval_weights: ema``, docs/recipes.md: "EMA of the weights"), else its ``model``."""
    ema = state.get("ema")
    return ema["weights"] if isinstance(ema, dict) and ema.get("evaluated") else state["model"]


def newest_valid(folder: Path, report: Any = print) -> tuple[Path, dict[str, Any]] | None:
    """The most recently written loadable step checkpoint in ``folder``, skipping damaged ones with one line each.

    Returns None when there is no step checkpoint at all; raises CheckpointError when there are
    some but none can be used.
    """
    candidates = step_files(folder)
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


def branch_for_resume(folder: Path, resumed: Path, state: dict[str, Any]) -> int:
    """The branch a run resumed from ``resumed`` writes to.

    It continues the checkpoint's own branch unless that branch already has readable step files
    past the resumed step (the user went back to an older checkpoint): then it starts a new
    branch, numbered one above the highest in ``folder``, so the newer files are never
    overwritten or pruned as "older".
    """
    branch = int(state.get("branch", 0))
    step = int(state["global_step"])
    names = [(p, parse_step_file(p)) for p in Path(folder).glob(STEP_GLOB)]
    names = [(p, n) for p, n in names if n is not None]
    ahead = [p for p, (s, b) in names if b == branch and s > step and looks_whole(p)
             and not (p.exists() and resumed.exists() and os.path.samefile(p, resumed))]
    if not ahead:
        return branch
    return max([b for _, (_, b) in names] + [branch]) + 1
