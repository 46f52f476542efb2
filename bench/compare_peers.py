"""ddp_train against its peers on the same training work: wall clocks, ratios and test accuracies.

    python bench/compare_peers.py [--epochs 2] [--rounds 1] [--only ddp_sync,plain] [--tiny] [--json FILE]

The work, the same for all four systems: Fashion-MNIST (/usr/share/datasets/fashion-mnist), the
48,000 training samples of ddp_train's 80% split (seed 42), ddp_train's ResNet-10 of width 16 for 1
channel and 10 classes, 2 gloo ranks under torchrun (OMP_NUM_THREADS=1), global batch 256 (128 a
rank), bf16 autocast, channels_last, SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a per-step
one-cycle lr up to 0.2 (momentum not cycled), no augmentation, E epochs, the test set at the end.

- ddp_sync: ``torchrun -m ddp_train`` with the work as key=value overrides and no speed switch: its
  defaults (SyncBN, 2 loader workers, per-epoch validation on the 12,000 held-out samples,
  checkpoints, TensorBoard, the best weights tested);
- ddp_nosync: the same with ``model.sync_bn=false``;
- ddp_loader (only with ``--only``): ddp_nosync on its DataLoader path (``data.device_resident=false``,
  2 loader workers), to compare the CPU-seconds its loader path costs with the plain script's;
- plain: bench/peers/plain_ddp.py, a plain DDP script as PyTorch's tutorial teaches (plain BN);
- lightning: bench/peers/lightning_fit.py, PyTorch Lightning 2.x with its defaults (plain BN;
  Lightning's SyncBN refuses CPU tensors). Lightning is the optional extra ``bench``.

Each round runs every selected system once, in an order rotated by one each round, so slow drift of
the machine's load falls on all of them. A wall clock runs from the command's start to its exit;
"start s" is from the command's start to the line each prints when its training loop begins
(ddp_train's ``run ...`` header, the peers' ``train | ...``). The ratio is a system's median wall
clock over the fastest peer's (plain or Lightning): below 1 is faster than the peer. "CPU s" is the
user + system CPU time of the command and every process it started (ranks, loader workers), from the
kernel's accounting of waited-for children.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("ddp_sync", "ddp_nosync", "plain", "lightning", "ddp_loader")
DEFAULT = ("ddp_sync", "ddp_nosync", "plain", "lightning")
PEERS = ("plain", "lightning")
LABELS = {"ddp_sync": "ddp_train (SyncBN, default)", "ddp_nosync": "ddp_train model.sync_bn=false",
          "plain": "plain DDP script", "lightning": "PyTorch Lightning",
          "ddp_loader": "ddp_train sync_bn=false device_resident=false"}
START_LINE = {"ddp": re.compile(r"^run .* \| torchrun x\d+ on "), "peer": re.compile(r"^train \| ")}
TEST_LINE = re.compile(r"^test \|.*\bacc ([0-9.]+)")
TINY_SUBSET = 1000  # --tiny: the first 1000 train (800 after the split) and test samples, 1 epoch


@dataclass
class Work:
    """What every system trains: the settings the command lines are made from."""

    epochs: int
    subset: int | None
    precision: str


@dataclass
class Outcome:
    """One system's runs."""

    label: str
    command: list[str]
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # CPU seconds of the command and all it started
    starts: list[float | None] = field(default_factory=list)
    start_lines: list[str | None] = field(default_factory=list)  # ddp_train's header names its data path
    test_acc: list[float | None] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def ddp_train_overrides(work: Work) -> list[str]:
    """The work as ddp_train key=value overrides (several equal its defaults: stated, so the work is explicit)."""
    return ["data.name=fashion_mnist", f"train.epochs={work.epochs}", "train.batch_size=256",
            "train.optimizer=sgd", "train.lr=0.2", "train.momentum=0.9", "train.nesterov=true",
            "train.weight_decay=5e-4", "train.scheduler=onecycle", f"train.precision={work.precision}",
            "model.name=resnet10", "model.width=16", *([f"data.subset={work.subset}"] if work.subset else [])]


def command(name: str, work: Work, out: Path) -> list[str]:
    """The command line of ``name`` for ``work``; its files go under ``out``."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if name.startswith("ddp"):
        return [*torchrun, "-m", "ddp_train", *ddp_train_overrides(work),
                *(["model.sync_bn=false"] if name in ("ddp_nosync", "ddp_loader") else []),
                *(["data.device_resident=false"] if name == "ddp_loader" else []), f"out_dir={out}", f"run_name={name}"]
    script = ROOT / "bench" / "peers" / ("plain_ddp.py" if name == "plain" else "lightning_fit.py")
    return [*torchrun, str(script), "--epochs", str(work.epochs), "--precision", work.precision,
            *(["--subset", str(work.subset)] if work.subset else []),
            *(["--root", str(out / name)] if name == "lightning" else [])]


def environment() -> dict[str, str]:
    """This environment without launcher variables (each run starts its own torchrun), one thread a rank."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(cmd: list[str], kind: str, log: Path | None) -> tuple[float, float, float | None, float | None, int,
                                                                   list[str]]:
    """Run ``cmd`` to its exit: (wall s, CPU s, start s or None, test accuracy or None, exit code, its output lines)."""
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines, started, acc = [], None, None
    for raw in proc.stdout:  # read as it comes, so the start line gets its own time
        line = raw.decode(errors="replace").rstrip("\n").split("\r")[-1]  # progress bars redraw with \r
        if started is None and START_LINE[kind].search(line):
            started = time.perf_counter() - start
        if (found := TEST_LINE.search(line)) is not None:
            acc = float(found.group(1))
        lines.append(line)
    code = proc.wait()
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    if log is not None:
        log.write_text("\n".join(lines) + "\n")
    return wall, cpu, started, acc, code, lines


def cpu_kind() -> str:
    """The bf16-relevant flags of the first CPU (as ``grep -o -m1 -E 'avx512_bf16|amx_bf16|avx2' /proc/cpuinfo``),
    the model name and the core count."""
    flags, model = "", "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = " ".join(f for f in ("amx_bf16", "avx512_bf16", "avx2") if f in value.split())
        elif key.strip() == "model name" and model == "unknown CPU":
            model = value.strip()
    return f"{flags or 'no avx2'} ({model}, {os.cpu_count()} cores)"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_rounds(names: list[str], work: Work, rounds: int, logs: Path | None) -> dict[str, Outcome]:
    """``rounds`` rounds of every system in ``names``, rotated by one each round; progress on stderr."""
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="compare_peers-") as tmp:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                out = Path(tmp) / f"r{r + 1}"
                cmd = command(name, work, out)
                outcome = outcomes.setdefault(name, Outcome(LABELS[name], cmd))
                log = logs / f"{name}-r{r + 1}.log" if logs else None
                kind = "ddp" if name.startswith("ddp") else "peer"
                wall, cpu, started, acc, code, lines = run_once(cmd, kind, log)
                print(f"round {r + 1}: {name} {wall:.1f} s ({cpu:.1f} CPU s), test acc {acc}, exit {code}",
                      file=sys.stderr, flush=True)
                if code != 0 or acc is None:
                    why = f"exit {code}" if code != 0 else "no test accuracy in its output"
                    outcome.failures.append(f"round {r + 1}: {why}")
                    tail = "\n".join(lines[-25:])
                    print(f"{name} failed in round {r + 1} ({why}); its last lines:\n{tail}", file=sys.stderr)
                outcome.walls.append(wall)
                outcome.cpus.append(cpu)
                outcome.starts.append(started)
                outcome.start_lines.append(next((x for x in lines if START_LINE[kind].search(x)), None))
                outcome.test_acc.append(acc)
    return outcomes


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def table(outcomes: dict[str, Outcome], rounds: int) -> str:
    """The results: wall clock of each round, median, start-up, ratio to the fastest peer, test accuracy."""
    peers = [median(o.walls) for n, o in outcomes.items() if n in PEERS and not o.failures]
    fastest = min((p for p in peers if p is not None), default=None)
    rows = [["system", *[f"round {r + 1} s" for r in range(rounds)], "median s", "CPU s", "start s",
             "x fastest peer", "test acc"]]
    for o in outcomes.values():
        wall, start, acc = median(o.walls), median(o.starts), median(o.test_acc)
        rows.append([o.label, *[f"{w:.1f}" for w in o.walls], f"{wall:.1f}", f"{median(o.cpus):.1f}",
                     "-" if start is None else f"{start:.1f}",
                     "-" if fastest is None or o.failures else f"{wall / fastest:.2f}",
                     "FAILED" if o.failures else f"{acc:.4f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every run (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs every system once (default 1)")
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"comma-separated systems of {', '.join(SYSTEMS)} (default: all but ddp_loader)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a check, not a benchmark: the first {TINY_SUBSET} samples, 1 epoch")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast of every run")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--logs", type=Path, help="keep each run's output in this folder (<system>-r<round>.log)")
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in SYSTEMS]
    if unknown or not args.names:
        parser.error(f"--only: unknown system {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    if args.epochs < 1 or args.rounds < 1:
        parser.error("--epochs and --rounds: expected integers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "lightning" in args.names and importlib.util.find_spec("lightning") is None:
        print("compare_peers.py: error: lightning is not installed; install it with pip install -e '.[bench]', "
              "or leave it out with --only ddp_sync,ddp_nosync,plain", file=sys.stderr)
        return 2
    work = Work(1 if args.tiny else args.epochs, TINY_SUBSET if args.tiny else None, args.precision)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    outcomes = run_rounds(args.names, work, args.rounds, args.logs)
    data = "Fashion-MNIST " + (f"first {work.subset} samples (800 train / {work.subset} test)" if work.subset
                               else "48000 train / 10000 test")
    header = (f"{data}, ResNet-10 w16, 2 gloo ranks, global batch 256, {work.precision}, {work.epochs} epoch(s)\n"
              f"CPU: {cpu_kind()}; torch {version('torch')}, lightning {version('lightning')}")
    print(header + "\n" + table(outcomes, args.rounds))
    if args.json:
        args.json.write_text(json.dumps({"work": asdict(work), "cpu": cpu_kind(), "torch": version("torch"),
                                         "lightning": version("lightning"),
                                         "systems": {n: asdict(o) for n, o in outcomes.items()}}, indent=2) + "\n")
    return 1 if any(o.failures for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
