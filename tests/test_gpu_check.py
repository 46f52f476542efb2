"""bench/gpu_check.py: its tiny CPU mode runs every step and ends with a full table; failures and
timeouts are reported (a timed-out step leaves nothing running); its command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import ROOT, clean_env

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

SCRIPT = ROOT / "bench" / "gpu_check.py"
WIDTH = 45  # the table's result column

TP = r"\d+ img/s, MFU \d+\.\d%, (bf16|fp32), data \d+\.\d / compute \d+\.\d ms per step"
ACC = r"(0\.\d{4}|1\.0000)"
SECONDS = r"\d+\.\d"
TINY_ROWS = {
    "throughput auto resident b32": TP,
    "throughput auto resident b64": TP,
    "throughput auto resident b32 compile": r"skipped in tiny mode",
    "throughput auto dataloader b32 w0": TP,
    "notebook loop b16 w0": r"\d+\.\d img/s",
    "resident b32 / notebook loop": r"\d+\.\dx",
    "fashion fast seed 0": rf"acc {ACC}, {SECONDS} s \(1 epochs: {SECONDS} s, last \d+ img/s\)",
    "fashion fast seed 1": rf"acc {ACC}, {SECONDS} s \(1 epochs: {SECONDS} s, last \d+ img/s\)",
    "fashion fast mean (2 seeds)": (rf"acc {ACC} \+- \d\.\d{{4}} \(min {ACC}, max {ACC}\), "
                                    rf"wall s {SECONDS} \+- {SECONDS} \(min {SECONDS}, max {SECONDS}\)"),
    "fp32 resume exact (tiny: no CPU fp16)": r"yes \(10 steps, resumed at step 3, (\d+)/\1 tensors equal\)",
    "overall": r"ok",
}
STEPS = 9  # 2 throughput, notebook, 2 fashion seeds, resume (full, resumed, compare), doubled batch


def _run(python: str, fashion_root: Path, timeout: float, args: tuple[str, ...] = ("--tiny",),
         **env: str) -> subprocess.CompletedProcess:
    full_env = clean_env(PYTHON=python, FASHION_ROOT=str(fashion_root))
    for knob in ("GPU_CHECK_BUDGET_S", "GPU_CHECK_KEEP", "GPU_CHECK_LOGS", "OMP_NUM_THREADS"):
        full_env.pop(knob, None)  # the script's own defaults, not the caller's
    full_env.update(env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _table(stdout: str) -> dict[str, str]:
    """The summary table, which must be the last thing printed."""
    lines = stdout.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("== summary")]
    assert starts, stdout[-3000:]
    header, *rows = lines[starts[-1] + 1:]
    assert header.split() == ["check", "result"] and header.index("result") == WIDTH, header
    table = {row[:WIDTH].strip(): row[WIDTH:] for row in rows}
    assert len(table) == len(rows), rows
    assert rows[-1].startswith("overall"), rows
    return table


def _work_folder(stdout: str) -> Path:
    found = re.search(r"work folder: (\S+);", stdout)
    assert found, stdout[:2000]
    return Path(found.group(1))


def _fake_python(tmp_path: Path, body: str) -> Path:
    """An interpreter that fails the probe (python -c) and runs BODY for every step."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\nif [[ $1 == -c ]]; then echo "no torch here" >&2; exit 3; fi\n{body}\n')
    python.chmod(0o755)
    return python


def test_command_line():
    """--help explains the script; a bad argument or budget is exit code 2 with one line, nothing run."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python bench/gpu_check.py [-h] [--tiny]")
    for knob in ("GPU_CHECK_BUDGET_S", "GPU_CHECK_KEEP", "GPU_CHECK_LOGS", "FASHION_ROOT", "PYTHON", "data/fashion-mnist"):
        assert knob in res.stdout, knob
    for args, env in ((["--bogus"], {}), (["--tiny", "extra"], {}), (["--tiny"], {"GPU_CHECK_BUDGET_S": "5m"})):
        res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                             env=clean_env(**env))
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stdout == "" and len(res.stderr.splitlines()) == 1, (args, res.stderr)
        assert res.stderr.startswith("gpu_check: error: "), res.stderr


def test_tiny_mode_runs_every_step(fashion_root, tmp_path):
    """Every step really ran: each row holds its figures (a silently failed step would not); the logs
    are copied out (GPU_CHECK_LOGS) and the work folder removed."""
    logs = tmp_path / "logs"
    res = _run(sys.executable, fashion_root, timeout=900, GPU_CHECK_LOGS=str(logs))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    table = _table(res.stdout)
    assert table.keys() == TINY_ROWS.keys(), table
    for row, pattern in TINY_ROWS.items():
        assert re.fullmatch(pattern, table[row]), f"{row}: {table[row]!r} does not match {pattern!r}"
    for row in ("throughput auto resident b32", "throughput auto dataloader b32 w0", "notebook loop b16 w0"):
        assert float(table[row].split()[0]) > 0, table[row]
    assert len(re.findall(r"^\[ *\d+ s\] step \d+: .*\n  ok, ", res.stdout, re.MULTILINE)) == STEPS, res.stdout
    assert "tiny mode: the resume check runs in fp32" in res.stdout
    assert "tiny mode: on the CPU, 1 thread(s) per step" in res.stdout
    assert not _work_folder(res.stdout).exists()
    assert (logs / "summary.txt").read_text() in res.stdout
    assert {p.name for p in (logs / "runs").iterdir()} == {"fashion-seed0", "fashion-seed1", "resume-a", "resume-b"}
    assert (logs / "runs" / "fashion-seed0" / "metrics.json").exists() and (logs / "tp.json").exists()


def test_failed_steps_are_reported(tmp_path, fashion_root):
    """A python that fails every step: all FAILED, the failed steps' logs shown, exit 1."""
    python = _fake_python(tmp_path, 'echo "simulated failure of: $*" >&2\nexit 3')
    res = _run(str(python), fashion_root, timeout=300)
    assert res.returncode == 1, res.stdout[-6000:] + res.stderr[-3000:]
    table = _table(res.stdout)
    assert table.keys() == TINY_ROWS.keys(), table
    for row in TINY_ROWS:
        if row in ("throughput auto resident b32 compile", "resident b32 / notebook loop", "overall"):
            continue
        want = "FAILED (no seed finished)" if row.startswith("fashion fast mean") else "FAILED (exit code 3)"
        assert table[row] == want, (row, table[row])
    assert table["resident b32 / notebook loop"].startswith("n/a")
    assert table["overall"].startswith("8 FAILED")
    assert "  | simulated failure of: bench/notebook_loop.py" in res.stdout  # the failed step's log tail
    assert "the probe of" in res.stdout and "no torch here" in res.stdout
    assert not _work_folder(res.stdout).exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_timeout_stops_the_whole_step(tmp_path, fashion_root):
    """A step past its time limit is stopped with everything it started; the budget then skips the rest."""
    pid_file = tmp_path / "child.pid"
    python = _fake_python(tmp_path, f"sleep 300 &\necho $! > {pid_file}\nsleep 300")
    start = time.monotonic()
    res = _run(str(python), fashion_root, timeout=120, GPU_CHECK_BUDGET_S="8")
    assert res.returncode == 1, res.stdout[-6000:] + res.stderr[-3000:]
    assert time.monotonic() - start < 8 + 15, res.stdout  # the budget, plus SIGTERM's grace at most
    table = _table(res.stdout)
    assert re.fullmatch(r"FAILED \(timed out after \d s\)", table["throughput auto resident b32"]), table
    assert table["throughput auto dataloader b32 w0"] == "FAILED (skipped: time budget of 8 s spent)", table
    assert table["throughput auto resident b64"] == "skipped (time budget of 8 s spent)", table  # optional
    assert table["overall"].startswith("7 FAILED"), table
    child = int(pid_file.read_text())
    survived = _alive(child)
    if survived:
        os.kill(child, 9)
    assert not survived, f"the step's background process {child} outlived its timeout"
