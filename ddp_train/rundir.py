"""The run folder's life: named and claimed (its lock) before anything is written, config.yaml, released.

Only rank 0 writes; every rank takes part in each step's agreement, so a refusal ends all of
them with rank 0's one line.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
from pathlib import Path

from .checkpoint import atomic_write_text
from .config import Config, dump_yaml
from .distributed import DistContext
from .errors import UserError
from .runlock import RunLock


def prepare_run_dir(cfg: Config, ctx: DistContext, resume: str | None) -> tuple[Path, RunLock | None, str | None]:
    """Rank 0 names and creates the run folder and takes its lock, before anything else is written.

    The lock (``<run>/.lock``, see :mod:`ddp_train.runlock`) makes a second run that targets the
    same folder stop here with one line; creating it also proves ``out_dir`` writable. Returns
    the folder, on rank 0 the lock to release when the run ends (:func:`release_run_dir`), and the
    resume setting every rank uses: ``auto`` when the folder's checkpoints are this same job's (a
    torchrun group re-formed by a membership change, see :func:`claim_run_dir`), else ``resume``.
    """
    name = cfg.run_name
    if name is None and ctx.run_id:
        name = f"{cfg.data.name}-{cfg.model.name}-{ctx.run_id}"  # the same folder after a torchrun restart
    elif name is None and resume == "auto":
        name = ""  # reported by claim_run_dir: auto needs to know which folder to continue
    elif name is None:
        name = f"{cfg.data.name}-{cfg.model.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    name = ctx.broadcast_object(name)  # ranks may start a second apart: rank 0's timestamp wins
    run_dir = Path(cfg.out_dir) / name
    claimed = ctx.run_agreed(claim_run_dir, run_dir, name, resume, ctx.job_id, on_this_rank=ctx.is_main)
    lock, continuing = claimed if claimed is not None else (None, False)
    resume = ctx.broadcast_object("auto" if continuing else resume)  # rank 0 saw the folder: its word holds
    return run_dir, lock, resume


def claim_run_dir(run_dir: Path, name: str, resume: str | None, job_id: str | None) -> tuple[RunLock, bool]:
    """Create ``run_dir`` and take its lock; UserError (with the lock released) when it cannot or must not.

    Returns the lock and whether this is the same job continuing: the folder holds checkpoints and
    ``<run>/job`` names ``job_id``. torchrun re-forms a group when a node joins without counting a
    restart (TORCHELASTIC_RESTART_COUNT stays 0), so the job id is how its workers know to resume.
    """
    lock: RunLock | None = None
    try:
        if not name:
            raise UserError("resume=auto: set run_name to the run folder to continue")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir, job_id).acquire()
        held = (run_dir / "checkpoints" / "last.pt").exists() or any((run_dir / "checkpoints").glob("step-*.pt"))
        job_file = run_dir / "job"
        continuing = held and resume is None and job_id is not None and job_file.is_file() \
            and job_file.read_text().strip() == job_id
        if held and resume is None and not continuing:
            raise UserError(f"run folder {run_dir} already holds a run (checkpoints/); continue it with "
                            f"resume=auto, or choose another run_name")
    except (OSError, UserError) as e:
        if lock is not None:
            lock.release()
        if isinstance(e, OSError):
            raise UserError(f"out_dir: cannot write the run folder {run_dir}: {e.strerror or e}; "
                            f"choose a writable out_dir") from None
        raise
    if lock.took_over:
        print(f"ddp_train: {lock.took_over}", file=sys.stderr, flush=True)
    if continuing:
        print(f"ddp_train: {run_dir} holds this job's ({job_id}) checkpoints: the group was re-formed, "
              f"continuing with resume=auto", flush=True)
    return lock, continuing


def write_run_config(cfg: Config, ctx: DistContext, run_dir: Path) -> None:
    """Rank 0 writes ``config.yaml`` and ``job`` (once the resume, if any, is known to fit); all ranks agree
    on the outcome. ``job`` names the job that owns the run from now on (see :func:`claim_run_dir`)."""
    ctx.run_agreed(_write_config, cfg, run_dir, ctx.job_id, on_this_rank=ctx.is_main)


def _write_config(cfg: Config, run_dir: Path, job_id: str | None) -> None:
    try:
        if job_id is not None:
            atomic_write_text(run_dir / "job", job_id + "\n")
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    except OSError as e:
        raise UserError(f"out_dir: cannot write {run_dir / 'config.yaml'}: {e.strerror or e}; "
                        f"choose a writable out_dir") from None


def release_run_dir(lock: RunLock | None, run_dir: Path) -> None:
    """Release rank 0's lock. A run refused before its first write leaves no empty folder behind."""
    if lock is None:
        return
    lock.release()
    for folder in (run_dir / "checkpoints", run_dir):
        with contextlib.suppress(OSError):
            folder.rmdir()  # fails on a folder that holds anything
