"""The run folder's life: named and claimed (its lock) before anything is written, run.json and config.yaml,
released.

Only rank 0 writes; every rank takes part in each step's agreement, so a refusal ends all of
them with rank 0's one line.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from .checkpoint import remove_stale_temp_files
from ..files import atomic_write_text, write_error_reason
from ..config import Config, dump_yaml
from ..distributed.context import DistContext
from ..errors import UserError
from .runlock import RunLock
from .runrecord import RUN_FILE, read_record, record_for_start


def prepare_run_dir(cfg: Config, ctx: DistContext, resume: str | None) -> tuple[Path, RunLock | None, str | None]:
    """Rank 0 names and creates the run folder and takes its lock, before anything else is written.

    The lock (``<run>/.lock``, see :mod:`ddp_train.persistence.runlock`) makes a second run that targets the
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
    taken: list[RunLock] = []  # rank 0's lock, as soon as it exists: released if the ranks fail to agree

    def claim() -> bool:
        lock, continuing = claim_run_dir(run_dir, name, resume, ctx.job_id)
        taken.append(lock)
        return continuing

    try:
        continuing = bool(ctx.run_agreed(claim, on_this_rank=ctx.is_main))
        resume = ctx.broadcast_object("auto" if continuing else resume)  # rank 0 saw the folder: its word holds
    except BaseException:  # e.g. a peer gone in the agreement: the lock must not outlive this process
        release_run_dir(taken[0] if taken else None, run_dir)
        raise
    return run_dir, (taken[0] if taken else None), resume


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
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
            shown = str(run_dir) if len(str(run_dir)) <= 120 else f"{str(run_dir)[:120]}..."
            raise UserError(f"out_dir/run_name: the run folder path {shown} ({len(os.fsencode(str(run_dir)))} "
                            f"bytes) is too long for the filesystem ({e.strerror}; a folder name is at most 255 "
                            f"bytes, a path 4096); choose a shorter out_dir or run_name") from None
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


def write_run_config(cfg: Config, ctx: DistContext, run_dir: Path,
                     origin: tuple[Path, dict[str, Any]] | None = None) -> str:
    """The run's first writes, by rank 0, once the resume (if any) is known to fit: the temporary files of
    killed writes go, then ``run.json``, ``job`` and ``config.yaml`` are written. All ranks agree on the
    outcome; returns the run id (the same on every rank) for the checkpoints.

    ``origin``: the checkpoint resumed from (path, contents), which decides the run (see
    :func:`~ddp_train.persistence.runrecord.record_for_start`). ``job`` names the job that owns the run from now
    on (see :func:`claim_run_dir`).
    """
    run_id = ctx.run_agreed(_write_config, cfg, run_dir, ctx.job_id, origin, on_this_rank=ctx.is_main)
    return ctx.broadcast_object(run_id)


def _write_config(cfg: Config, run_dir: Path, job_id: str | None,
                  origin: tuple[Path, dict[str, Any]] | None = None) -> str:
    """Rank 0's part of :func:`write_run_config`; UserError (one line) when a file cannot be written."""
    before = (read_record(run_dir) or {}).get("run_id")
    record = record_for_start(run_dir, origin)
    files = [(run_dir / RUN_FILE, json.dumps(record) + "\n"), (run_dir / "config.yaml", dump_yaml(cfg))]
    if job_id is not None:
        files.insert(1, (run_dir / "job", job_id + "\n"))
    path = run_dir
    try:
        # Under the lock, before the run's first write: no temporary file of ours belongs to a live write.
        removed, size = remove_stale_temp_files(run_dir)
        for path, text in files:
            atomic_write_text(path, text)
    except OSError as e:
        raise UserError(f"out_dir: cannot write {path}: {write_error_reason(e, run_dir)}; "
                        f"choose a writable out_dir") from None
    if removed:
        print(f"ddp_train: removed {removed} temporary file{'s' if removed != 1 else ''} of interrupted writes "
              f"({size / 1e6:.1f} MB) from {run_dir}", flush=True)
    origin_info = record["resumed_from"]
    if origin_info and record["run_id"] != before:
        print(f"ddp_train: {run_dir} starts a new run ({record['run_id']}) from {origin_info['checkpoint']} "
              f"(run {origin_info['run_id']}, global step {origin_info['global_step']}); run.json and "
              f"metrics.json record it as resumed_from", flush=True)
    return record["run_id"]


def release_run_dir(lock: RunLock | None, run_dir: Path) -> None:
    """Release rank 0's lock. A run refused before its first write leaves no empty folder behind."""
    if lock is None:
        return
    lock.release()
    for folder in (run_dir / "checkpoints", run_dir):
        with contextlib.suppress(OSError):
            folder.rmdir()  # fails on a folder that holds anything
