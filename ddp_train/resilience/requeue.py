"""The requeue policy of ``launch/slurm.sbatch``: after each attempt of a job, finish, stop, or requeue.

The batch script runs this module twice per attempt::

    python -m ddp_train.resilience.requeue [--state-dir D] [--max-stalled-attempts N] start
        -> checks the settings, prepares D, prints the job's name for scontrol/scancel and the
           attempt's status file (the script exports it as DDP_TRAIN_STATUS_FILE, see status.py)
    python -m ddp_train.resilience.requeue [--state-dir D] [--max-stalled-attempts N] end RC SIGNALLED RUN_NAME
        -> reads how the attempt ended, decides (:func:`decide`), prints one line, requeues the job
           with ``scontrol requeue`` if that is the decision, and exits with the batch script's code

The rule (docs/launching.md: "Preemption and requeue"): exit 0 finishes; a bad input (exit 2) stops, as the
same input would fail again; anything else (a stop signal's 75, a crash, a lost node, the hang
watchdog) is requeued, unless ``MAX_STALLED_ATTEMPTS`` attempts in a row ended without a checkpoint
beyond the best global step of the job's earlier attempts (a crash loop). An array task names and
requeues only itself.

Standard library only, and nothing of ddp_train that imports torch: the batch script must be able
to run this where the job's ``PYTHON`` is broken, which is one of the failures it decides about.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import EXIT_CHECKPOINTED, EXIT_OK, EXIT_USER_ERROR

DEFAULT_MAX_STALLED_ATTEMPTS = 3
NO_STATUS = "no status from ddp_train: it did not start, or was killed first"
NO_REASON = "ddp_train did not say why: killed, or a crash it could not report"


def job_name(env: Mapping[str, str]) -> str:
    """The job as scontrol and scancel must name it: ``<array job id>_<task id>`` for an array task (its
    bare job id may be the array's own, which names every task of the array), else the job id."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or "0"


@dataclass(frozen=True)
class Attempt:
    """How one attempt ended: the job step's exit code, the stop signal, and ddp_train's status file."""

    step_rc: int  # srun's: the first failed node's code (launch_agent: its first failed worker's)
    signalled: bool = False  # the batch shell got USR1 and passed it on to the step
    status: Mapping[str, Any] | None = None  # the status file (status.py); None: absent or unreadable

    def field(self, key: str) -> str | None:
        """A field of the status file as one line of text; None where it is missing or null."""
        value = None if self.status is None else self.status.get(key)
        return None if value is None else " ".join(str(value).split())

    @property
    def step(self) -> int | None:
        """The global step of the newest checkpoint this attempt wrote, if any."""
        step = self.field("global_step")
        return int(step) if step is not None and re.fullmatch(r"[0-9]+", step) else None

    @property
    def why(self) -> str:
        """Why it ended, for the messages: the stop signal, else ddp_train's code and reason, else the step's."""
        code = self.field("exit_code")
        if code == str(EXIT_CHECKPOINTED) or self.step_rc == EXIT_CHECKPOINTED or self.signalled:
            return f"stopped after the signal, exit {self.step_rc}"
        if self.status is None:
            reason = NO_STATUS
        else:
            reason = self.field("reason") or NO_REASON
        return f"exit {code if code is not None else self.step_rc}: {reason}"


@dataclass(frozen=True)
class Progress:
    """The job's bookkeeping between attempts: ``<best step> <stalled attempts>`` in its state file."""

    best_step: int = -1  # the best global step of the job's earlier attempts; -1: no checkpoint yet
    stalled: int = 0  # attempts in a row that ended without passing it

    @classmethod
    def parse(cls, text: str) -> Progress:
        """The state file's text; a missing, empty or damaged file counts from scratch."""
        fields = text.splitlines()[0].split() if text.strip() else []
        if len(fields) == 2 and re.fullmatch(r"-?[0-9]+", fields[0]) and re.fullmatch(r"[0-9]+", fields[1]):
            return cls(int(fields[0]), int(fields[1]))
        return cls()

    def after(self, attempt: Attempt) -> Progress:
        """The bookkeeping once ``attempt`` is counted: a checkpoint beyond the best step resets the count."""
        step = attempt.step
        if step is not None and step > self.best_step:
            return Progress(step, 0)
        return Progress(self.best_step, self.stalled + 1)

    @property
    def at(self) -> str:
        """How far the job got, for the messages."""
        return f"global step {self.best_step}" if self.best_step >= 0 else "no checkpoint written"


class Action(Enum):
    """What the batch script does after an attempt."""

    FINISH = "finish"  # the job is done (exit 0)
    STOP = "stop"  # the job ends for good without a requeue: a bad input or a crash loop
    REQUEUE = "requeue"  # scontrol requeue the job
    RESUBMIT = "resubmit"  # a requeue is wanted but scontrol is missing: exit 75, the user resubmits


@dataclass(frozen=True)
class Decision:
    """What to do after an attempt, the one line that says it, and the batch script's exit code."""

    action: Action
    exit_code: int  # the batch script's, once the action is done (REQUEUE: should scontrol fail, requeue_failed)
    line: str  # without the ``[slurm.sbatch <time>]`` prefix
    to_stderr: bool = False
    progress: Progress | None = None  # to keep for the next attempt; None: forget the job


def resubmit(run_name: str) -> str:
    """The hint that ends every line after which the user must submit the job again."""
    return f"resubmit with run_name={run_name} resume=auto"


def decide(attempt: Attempt, progress: Progress, *, job: str, run_name: str, max_stalled: int,
           can_requeue: bool) -> Decision:
    """The requeue rule, for an attempt of ``job`` that ended as ``attempt`` after the earlier ones'
    ``progress``. ``run_name``: the run folder, for the resubmit hint; ``max_stalled``:
    MAX_STALLED_ATTEMPTS; ``can_requeue``: scontrol is on PATH."""
    rc, code = attempt.step_rc, attempt.field("exit_code")
    if rc == EXIT_OK:
        return Decision(Action.FINISH, EXIT_OK, "step exited 0")
    # 2: a bad input (config, data, out_dir, ...); the same again would fail the same way. Through torchrun
    # the step exits 1 whatever the workers' codes, so ddp_train's status file says it.
    if code == str(EXIT_USER_ERROR) or (code is None and rc == EXIT_USER_ERROR):
        return Decision(Action.STOP, EXIT_USER_ERROR, f"error: step exited {rc}: ddp_train stopped on a bad input "
                        f"(its own line is above): job {job} is not requeued; fix the input, then {resubmit(run_name)}",
                        to_stderr=True)
    # Anything else may be transient (a stop signal's 75, a crash, a lost node, the watchdog's 3): requeued,
    # unless it keeps happening without progress.
    counted, why = progress.after(attempt), attempt.why
    if counted.stalled >= max_stalled:
        return Decision(Action.STOP, rc, f"error: job {job} is in a crash loop: {counted.stalled} attempts in a row "
                        f"ended without advancing the global step ({counted.at}; last: {why}), so it is not requeued "
                        f"(MAX_STALLED_ATTEMPTS={max_stalled}); fix the cause shown above, then {resubmit(run_name)}",
                        to_stderr=True)
    if not can_requeue:
        checkpoint = attempt.field("checkpoint") or f"in the run folder {run_name} under out_dir"
        return Decision(Action.RESUBMIT, EXIT_CHECKPOINTED, f"requeue unavailable: scontrol is not on PATH ({why}); "
                        f"the newest checkpoint is {checkpoint}: {resubmit(run_name)}", to_stderr=True)
    return Decision(Action.REQUEUE, EXIT_OK, f"attempt ended ({why}; {counted.at}): requeueing job {job}", progress=counted)


def requeue_failed(job: str, rc: int, run_name: str) -> Decision:
    """``scontrol requeue`` refused (its own message is above): the job ends with the step's code."""
    return Decision(Action.STOP, rc, f"error: scontrol requeue {job} failed (its message is above): not requeued; "
                    f"{resubmit(run_name)}", to_stderr=True)


# ----- the batch script's side: files, scontrol, lines ------------------------------------------------


class Bookkeeping:
    """A job's files in the state folder: its progress between attempts and each attempt's status file."""

    def __init__(self, state_dir: Path, job: str, attempt: str) -> None:
        self.state_dir, self.job = state_dir, job
        self.state_file = state_dir / f"{job}.state"
        self.status_file = state_dir / f"{job}.attempt{attempt}.status.json"

    def progress(self) -> Progress:
        """The job's progress so far (from scratch for its first attempt)."""
        try:
            return Progress.parse(self.state_file.read_text())
        except (OSError, UnicodeDecodeError):
            return Progress()

    def keep(self, progress: Progress) -> None:
        """Keep ``progress`` for the next attempt; a failure only loses the crash-loop count."""
        tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
        try:
            tmp.write_text(f"{progress.best_step} {progress.stalled}\n")
            os.replace(tmp, self.state_file)
        except OSError:
            say(f"warning: cannot write {self.state_file}: crash loops go unnoticed")

    def take_status(self) -> Mapping[str, Any] | None:
        """This attempt's status file, read and removed; None when there is none or it cannot be read."""
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            status = None
        with contextlib.suppress(OSError):
            self.status_file.unlink(missing_ok=True)
        return status if isinstance(status, dict) else None

    def forget(self) -> None:
        """The job ends for good: its count and the status files of every attempt (killed ones' too) go."""
        for path in [self.state_file, *self.state_dir.glob(f"{self.job}.attempt*.status.json")]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def say(line: str, to_stderr: bool = False) -> None:
    """One line in the job's log, as the batch script prints its own."""
    print(f"[slurm.sbatch {time.strftime('%Y-%m-%d %H:%M:%S')}] {line}", file=sys.stderr if to_stderr else sys.stdout,
          flush=True)


def start(books: Bookkeeping) -> int:
    """Before the step: the state folder exists, no stale status file; print the job and the status file."""
    try:
        books.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        say(f"error: REQUEUE_STATE_DIR={books.state_dir}: cannot create it; set it to a writable folder that "
            "survives a requeue", to_stderr=True)
        return EXIT_USER_ERROR
    with contextlib.suppress(OSError):  # an earlier run of this attempt's number (a job id reused) left it
        books.status_file.unlink(missing_ok=True)
    print(books.job, books.status_file, sep="\n")
    return EXIT_OK


def end(books: Bookkeeping, attempt_rc: int, signalled: bool, run_name: str, max_stalled: int) -> int:
    """After the step: decide, act, and return the batch script's exit code."""
    attempt = Attempt(attempt_rc, signalled, books.take_status())
    decision = decide(attempt, books.progress(), job=books.job, run_name=run_name, max_stalled=max_stalled,
                      can_requeue=shutil.which("scontrol") is not None)
    say(decision.line, decision.to_stderr)
    if decision.progress is None:
        books.forget()
        return decision.exit_code
    books.keep(decision.progress)
    if subprocess.run(["scontrol", "requeue", books.job]).returncode == 0:
        return EXIT_OK
    books.forget()
    failed = requeue_failed(books.job, attempt_rc, run_name)
    say(failed.line, failed.to_stderr)
    return failed.exit_code


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The batch script's arguments: settings first, then ``start`` or ``end RC SIGNALLED RUN_NAME``."""
    parser = argparse.ArgumentParser(prog="python -m ddp_train.resilience.requeue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path(".ddp_train_slurm"), help="REQUEUE_STATE_DIR")
    parser.add_argument("--max-stalled-attempts", default=str(DEFAULT_MAX_STALLED_ATTEMPTS),
                        help="MAX_STALLED_ATTEMPTS")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start")
    finished = commands.add_parser("end")
    finished.add_argument("rc", type=int, help="the job step's exit code")
    finished.add_argument("signalled", type=int, choices=(0, 1), help="1: the batch shell passed USR1 on")
    finished.add_argument("run_name")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The batch script's entry point (see the module's docstring); returns its exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    max_stalled = args.max_stalled_attempts
    if not re.fullmatch(r"[0-9]+", max_stalled) or int(max_stalled) < 1:
        say(f"error: MAX_STALLED_ATTEMPTS={max_stalled}: expected a whole number >= 1 (default "
            f"{DEFAULT_MAX_STALLED_ATTEMPTS})", to_stderr=True)
        return EXIT_USER_ERROR
    books = Bookkeeping(args.state_dir, job_name(env), env.get("SLURM_RESTART_COUNT") or "0")
    if args.command == "start":
        return start(books)
    return end(books, args.rc, bool(args.signalled), args.run_name, int(max_stalled))


if __name__ == "__main__":
    sys.exit(main())
