"""The requeue policy of launch/slurm.sbatch (ddp_train/resilience/requeue.py) on exact inputs.

:func:`decide` is pure: each rule is checked with the exact line the job's log gets. The
bookkeeping is checked on real files, and the command line as the batch script runs it (also
with a bare python3 that has only the checkout on its path: the script's fallback where the
job's PYTHON is broken). The wiring on a real SLURM cluster is tests/test_slurm.py's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddp_train.resilience.requeue import Action, Attempt, Bookkeeping, Decision, Progress, decide, job_name, main, requeue_failed

from .helpers import ROOT

JOB, RUN = "7", "tiny-7"
RESUBMIT = "resubmit with run_name=tiny-7 resume=auto"
NO_STATUS = "no status from ddp_train: it did not start, or was killed first"
NO_REASON = "ddp_train did not say why: killed, or a crash it could not report"


def status(step: int | None = None, code: int | None = None, reason: str | None = None,
           checkpoint: str | None = None) -> dict:
    """A status file's contents, as ddp_train/resilience/status.py writes them."""
    return {"global_step": step, "checkpoint": checkpoint, "exit_code": code, "reason": reason}


def run(attempt: Attempt, progress: Progress = Progress(), max_stalled: int = 3, can_requeue: bool = True) -> Decision:
    return decide(attempt, progress, job=JOB, run_name=RUN, max_stalled=max_stalled, can_requeue=can_requeue)


# ----- which job scontrol and scancel name ---------------------------------------------------------


def test_an_array_task_names_only_itself():
    assert job_name({"SLURM_JOB_ID": "12"}) == "12"
    # The task carrying the array's own id: its bare id would name every task of the array.
    assert job_name({"SLURM_JOB_ID": "10", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "1"}) == "10_1"
    assert job_name({"SLURM_JOB_ID": "11", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "0"}) == "10_0"
    assert job_name({"SLURM_JOB_ID": "11", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": ""}) == "11"
    assert job_name({}) == "0"


# ----- the rule ------------------------------------------------------------------------------------


def test_exit_0_finishes_whatever_the_status_says():
    for found in (None, status(5, 2, "stopped on a bad input")):
        assert run(Attempt(0, False, found)) == Decision(Action.FINISH, 0, "step exited 0")


def test_a_bad_input_is_not_requeued():
    want = Decision(Action.STOP, 2, f"error: step exited 1: ddp_train stopped on a bad input (its own line is above): "
                    f"job {JOB} is not requeued; fix the input, then {RESUBMIT}", to_stderr=True)
    # Through torchrun the step exits 1 whatever the workers' codes: the status file says 2.
    assert run(Attempt(1, False, status(None, 2, "stopped on a bad input"))) == want
    # Workers as the step's own tasks (or launch_agent): the step's 2, without a status file.
    assert run(Attempt(2)).action is Action.STOP and run(Attempt(2)).exit_code == 2
    assert "step exited 2: ddp_train stopped on a bad input" in run(Attempt(2)).line
    # The status file's code wins over the step's: a crash reported by ddp_train is not a bad input.
    assert run(Attempt(2, False, status(None, 1, "crashed: RuntimeError: x"))).action is Action.REQUEUE


def test_a_stop_signal_is_requeued_with_its_progress():
    attempt = Attempt(1, True, status(40, 75, "stopped by a signal after writing a checkpoint", "runs/x/step-40.pt"))
    assert run(attempt) == Decision(Action.REQUEUE, 0, "attempt ended (stopped after the signal, exit 1; global step 40)"
                                    f": requeueing job {JOB}", progress=Progress(40, 0))
    # The workers' 75 without the batch shell's signal (--signal=USR1 without B:, or the step's own 75).
    assert run(Attempt(1, False, status(40, 75, "x"))).line.startswith("attempt ended (stopped after the signal, exit 1;")
    assert run(Attempt(75)).line.startswith("attempt ended (stopped after the signal, exit 75;")
    # The batch shell passed a signal on: the step's end is the stop's, whatever the status says (or if none).
    assert Attempt(1, True, None).why == "stopped after the signal, exit 1"
    assert Attempt(143, True, status(40, 1, "stopped: another rank ended")).why == "stopped after the signal, exit 143"


def test_why_an_attempt_ended_comes_from_the_status_file_first():
    assert Attempt(1, False, status(5, 3, "hang: rank 1 not responding")).why == "exit 3: hang: rank 1 not responding"
    assert Attempt(1, False, status(5)).why == f"exit 1: {NO_REASON}"  # a checkpoint, then killed
    assert Attempt(137).why == f"exit 137: {NO_STATUS}"
    assert Attempt(1, False, status(5, 1, "crashed:\n  two\tlines")).why == "exit 1: crashed: two lines"


def test_a_crash_after_progress_is_requeued_and_resets_the_count():
    decision = run(Attempt(1, False, status(60)), Progress(50, 2))
    assert decision == Decision(Action.REQUEUE, 0, f"attempt ended (exit 1: {NO_REASON}; global step 60): "
                                f"requeueing job {JOB}", progress=Progress(60, 0))


def test_attempts_without_a_newer_checkpoint_count_as_stalled():
    assert run(Attempt(1), Progress()).progress == Progress(-1, 1)
    assert "(exit 1: " + NO_STATUS + "; no checkpoint written): requeueing" in run(Attempt(1)).line
    assert run(Attempt(1, False, status(50)), Progress(50, 0)).progress == Progress(50, 1)  # the same step again
    assert run(Attempt(1, False, status(40)), Progress(50, 0)).progress == Progress(50, 1)  # an older one
    # A stop signal without a checkpoint beyond the best step counts too ("stops included").
    assert run(Attempt(1, True, status(50, 75, "x")), Progress(50, 1)).progress == Progress(50, 2)


def test_a_crash_loop_stops_at_max_stalled_attempts():
    loop = run(Attempt(1), Progress(50, 1), max_stalled=2)
    assert loop == Decision(Action.STOP, 1, f"error: job {JOB} is in a crash loop: 2 attempts in a row ended without "
                            f"advancing the global step (global step 50; last: exit 1: {NO_STATUS}), so it is not "
                            f"requeued (MAX_STALLED_ATTEMPTS=2); fix the cause shown above, then {RESUBMIT}",
                            to_stderr=True)
    assert run(Attempt(1), Progress(50, 1), max_stalled=3).action is Action.REQUEUE
    assert run(Attempt(3), Progress(), max_stalled=1).exit_code == 3  # the step's code
    assert "(no checkpoint written; last: exit 3: " in run(Attempt(3), Progress(), max_stalled=1).line
    # The crash loop is decided before whether a requeue is possible.
    assert run(Attempt(1), Progress(50, 1), max_stalled=2, can_requeue=False).action is Action.STOP


def test_without_scontrol_a_wanted_requeue_is_exit_75_and_one_line():
    with_checkpoint = run(Attempt(1, True, status(40, 75, "x", "runs/tiny-7/checkpoints/step-40.pt")), can_requeue=False)
    assert with_checkpoint == Decision(
        Action.RESUBMIT, 75, "requeue unavailable: scontrol is not on PATH (stopped after the signal, exit 1); the "
        f"newest checkpoint is runs/tiny-7/checkpoints/step-40.pt: {RESUBMIT}", to_stderr=True)
    assert run(Attempt(1), can_requeue=False).line == (
        f"requeue unavailable: scontrol is not on PATH (exit 1: {NO_STATUS}); the newest checkpoint is in the run "
        f"folder {RUN} under out_dir: {RESUBMIT}")


def test_a_refused_requeue_ends_with_the_step_s_code():
    assert requeue_failed(JOB, 1, RUN) == Decision(
        Action.STOP, 1, f"error: scontrol requeue {JOB} failed (its message is above): not requeued; {RESUBMIT}",
        to_stderr=True)


@pytest.mark.parametrize("text, want", [
    ("40 1\n", Progress(40, 1)), ("-1 2\n", Progress(-1, 2)), ("", Progress()), ("5\n", Progress()),
    ("5 1 x\n", Progress()), ("a 1\n", Progress()), ("5 -1\n", Progress()), ("40 1\nmore\n", Progress(40, 1)),
])
def test_the_state_file_is_read_or_counted_from_scratch(text, want):
    assert Progress.parse(text) == want


# ----- the bookkeeping on real files --------------------------------------------------------------


def test_bookkeeping_reads_removes_and_forgets_only_this_job(tmp_path):
    books = Bookkeeping(tmp_path, "12", "1")
    assert (books.state_file.name, books.status_file.name) == ("12.state", "12.attempt1.status.json")
    assert books.take_status() is None and books.progress() == Progress()
    books.status_file.write_text(json.dumps(status(5, 1, "crashed: x")))
    assert books.take_status() == status(5, 1, "crashed: x") and not books.status_file.exists()
    for damaged in ("", "{not json", "[1, 2]"):
        books.status_file.write_text(damaged)
        assert books.take_status() is None and not books.status_file.exists()
    books.keep(Progress(5, 1))
    assert books.state_file.read_text() == "5 1\n" and books.progress() == Progress(5, 1)
    others = [tmp_path / n for n in ("123.state", "123.attempt0.status.json", "12_1.state", "12_1.attempt0.status.json")]
    for path in [*others, tmp_path / "12.attempt0.status.json", tmp_path / "12.attempt3.status.json"]:
        path.write_text("x")
    books.forget()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)


# ----- the command line, as the batch script runs it ------------------------------------------------


def policy(args: list[str], cwd: Path, env: dict[str, str], python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "ddp_train.resilience.requeue", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_start_then_end_without_scontrol(tmp_path):
    """start names the job and the status file; end reads it, says one line, exits 75 and forgets the job."""
    bin_dir = tmp_path / "bin"  # a PATH without scontrol
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir), "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "11", "SLURM_ARRAY_JOB_ID": "10",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "2"}
    state = tmp_path / "state"
    common = [f"--state-dir={state}", "--max-stalled-attempts=3"]
    res = policy([*common, "start"], tmp_path, env)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.splitlines() == ["10_1", str(state / "10_1.attempt2.status.json")]
    Path(res.stdout.splitlines()[1]).write_text(json.dumps(status(40, 75, "x", "ck/step-40.pt")) + "\n")
    (state / "10_1.attempt1.status.json").write_text("{}")  # an earlier attempt killed before it cleaned up

    res = policy([*common, "end", "1", "1", "arr-10_1"], tmp_path, env)
    assert res.returncode == 75 and res.stdout == "", res.stdout + res.stderr
    assert re.fullmatch(r"\[slurm\.sbatch \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] requeue unavailable: scontrol is not on PATH "
                        r"\(stopped after the signal, exit 1\); the newest checkpoint is ck/step-40\.pt: resubmit with "
                        r"run_name=arr-10_1 resume=auto\n", res.stderr), res.stderr
    assert list(state.iterdir()) == []


@pytest.mark.parametrize("args, line", [
    (["--max-stalled-attempts=0", "start"], "error: MAX_STALLED_ATTEMPTS=0: expected a whole number >= 1 (default 3)"),
    (["--max-stalled-attempts=x", "end", "1", "0", "r"], "error: MAX_STALLED_ATTEMPTS=x: expected a whole number >= 1 "
                                                         "(default 3)"),
    (["--state-dir=FILE/sub", "start"], "error: REQUEUE_STATE_DIR=FILE/sub: cannot create it; set it to a writable "
                                        "folder that survives a requeue"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, args, line):
    (tmp_path / "FILE").write_text("a file where the folder would go")
    res = policy(args, tmp_path, {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "5"})
    assert res.returncode == 2 and res.stdout == "", res.stdout
    assert len(res.stderr.splitlines()) == 1 and res.stderr.rstrip("\n").endswith("] " + line), res.stderr


def test_it_runs_on_a_bare_python_without_torch(tmp_path):
    """The batch script's fallback where the job's PYTHON is broken: python3 with only the checkout on its path."""
    probe = "import sys, ddp_train.resilience.requeue; print(sorted(m for m in ('torch', 'numpy', 'yaml') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "[]\n", res.stdout + res.stderr
    bare = Path("/usr/bin/python3")
    if not bare.exists():
        pytest.skip("no /usr/bin/python3")
    res = policy(["start"], tmp_path, {"PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "3"}, python=str(bare))
    assert res.returncode == 0 and res.stdout.splitlines()[0] == "3", res.stdout + res.stderr


def test_the_batch_script_stays_thin():
    """Policy lives in Python: the batch script is wiring, at most 150 lines, without Python inside it."""
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert len(text.splitlines()) <= 150
    assert "import json" not in text and "ddp_train.resilience.requeue" in text


def test_main_in_process(tmp_path, capsys):
    assert main([f"--state-dir={tmp_path}", "start"], {"SLURM_JOB_ID": "9"}) == 0
    assert capsys.readouterr().out == f"9\n{tmp_path / '9.attempt0.status.json'}\n"
