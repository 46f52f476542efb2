"""How fast ddp_train notices what goes wrong: a frozen rank (hang watchdog) and a slow rank (stragglers).

    python bench/failure_detection.py [--hang-timeout 15] [--repeat 2]

Each case is a real 2-rank torchrun job on this machine (CPU, gloo), the same tiny model as the
tests; tests/slow_entry.py makes rank 1 slow. Prints one table, labelled with the CPU kind:

- frozen: rank 1 gets SIGSTOP after the first checkpoint; seconds from SIGSTOP to the job's end
  (torchrun exited), and to the watchdog's line;
- compute straggler: rank 1's main thread shares its core with 3 CPU hogs; seconds from the first
  training step to the straggler line (windows of 5 steps, named after 2 windows);
- data straggler: rank 1 sleeps 50 ms before each batch; the same.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic_size=4000", "data.num_workers=0", "train.batch_size=32", "train.epochs=5",
        "train.precision=fp32", "train.optimizer=sgd", "train.lr=0.002", "model.name=resnet10", "model.width=8",
        "model.channels_last=false", "dist.timeout_s=300"]


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    return next((k for k in ("amx_bf16", "avx512_bf16", "avx2") if k in flags), "other")


def start(out: Path, args: list[str], entry: list[str], **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    environ.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, *TINY,
           *args, f"out_dir={out}", "run_name=r"]
    return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def worker(parent: int, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    raise RuntimeError(f"no rank {rank} under {parent}")


def frozen(hang_timeout: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        proc = start(Path(out), ["checkpoint.every_steps=5", f"dist.hang_timeout_s={hang_timeout}"],
                     ["-m", "ddp_train"])
        while not list(Path(out, "r", "checkpoints").glob("step-*.pt")):
            time.sleep(0.1)
        pid = worker(proc.pid, 1)
        os.kill(pid, signal.SIGSTOP)
        t0, line_at = time.monotonic(), None
        assert proc.stdout is not None
        for line in proc.stdout:
            if "ddp_train: hang:" in line and line_at is None:
                line_at = time.monotonic() - t0
        proc.wait()
        with_end = time.monotonic() - t0
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return line_at or float("nan"), with_end


def straggler(**env: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        proc = start(Path(out), ["dist.straggler_every_steps=5", "train.epochs=1", "data.synthetic_size=2000",
                                 f"data.num_workers={1 if 'HOG_CORE' in env else 0}"],
                     [str(ROOT / "tests" / "slow_entry.py")], **env)
        t0, found = None, ("nan", "none")
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("run ") and t0 is None:  # the header: training starts right after it
                t0 = time.monotonic()
            if line.startswith("straggler: rank") and found[1] == "none" and t0 is not None:
                kind = re.search(r"median in (\w+)", line)
                found = (f"{time.monotonic() - t0:.1f}", f"rank {line.split()[2]} {kind.group(1) if kind else '?'}")
        proc.wait()
        return float(found[0]), found[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hang-timeout", type=int, default=15)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    rows = []
    for _ in range(a.repeat):
        line_s, end_s = frozen(a.hang_timeout)
        rows.append(("frozen rank 1 (SIGSTOP)", f"line {line_s:.1f} s, job ended {end_s:.1f} s after SIGSTOP "
                                                f"(hang_timeout_s={a.hang_timeout})"))
        secs, who = straggler(PIN_RANKS="1", HOG_CORE="1", HOGS="3")
        rows.append(("rank 1 on a hogged core", f"{who} named {secs:.1f} s after training began"))
        secs, who = straggler(SLOW_DATA_S="0.05")
        rows.append(("rank 1 batches +50 ms", f"{who} named {secs:.1f} s after training began"))
    print(f"\nCPU: {cpu_kind()}, {os.cpu_count()} cores; 2 gloo ranks, resnet10 width 8, batch 32")
    print(f"{'case':28} result")
    for case, result in rows:
        print(f"{case:28} {result}")


if __name__ == "__main__":
    main()
