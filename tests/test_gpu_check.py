"""bench/gpu_check.sh: its tiny CPU mode runs every step and ends with a full table; failures are reported; shellcheck."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, clean_env

SCRIPT = ROOT / "bench" / "gpu_check.sh"
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


def _run(python: str, fashion_root: Path, timeout: float) -> subprocess.CompletedProcess:
    env = clean_env(PYTHON=python, FASHION_ROOT=str(fashion_root))
    env.pop("GPU_CHECK_BUDGET_S", None)
    env.pop("GPU_CHECK_KEEP", None)
    env.pop("GPU_CHECK_LOGS", None)
    return subprocess.run(["bash", str(SCRIPT), "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


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


def test_shellcheck_gpu_check():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    res = subprocess.run(["shellcheck", "--shell=bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_tiny_mode_runs_every_step(fashion_root):
    """Every step really ran: each row holds its figures (a silently failed step would not)."""
    res = _run(sys.executable, fashion_root, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    table = _table(res.stdout)
    assert table.keys() == TINY_ROWS.keys(), table
    for row, pattern in TINY_ROWS.items():
        assert re.fullmatch(pattern, table[row]), f"{row}: {table[row]!r} does not match {pattern!r}"
    for row in ("throughput auto resident b32", "throughput auto dataloader b32 w0", "notebook loop b16 w0"):
        assert float(table[row].split()[0]) > 0, table[row]
    assert "tiny mode: the resume check runs in fp32" in res.stdout
    assert not _work_folder(res.stdout).exists()


def test_failed_steps_are_reported(tmp_path, fashion_root):
    """A python that fails every step (but runs the script's own inline checks): all FAILED, logs shown, exit 1."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\nif [[ $1 == - ]]; then exec {sys.executable} "$@"; fi\n'
                      'echo "simulated failure of: $*" >&2\nexit 3\n')
    python.chmod(0o755)
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
    assert not _work_folder(res.stdout).exists()
