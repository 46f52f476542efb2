#!/usr/bin/env python3
"""Every GPU check of the speed targets in one run on one GPU (meant for an H200), a summary table last.

    python bench/gpu_check.py          # GPU mode: needs CUDA; about 6-7 minutes, never past the budget
    python bench/gpu_check.py --tiny   # the same steps on the CPU at tiny sizes (under a minute), to prove the script

Steps: training throughput (ResNet-18, 32x32x3 synthetic, bf16, device-resident data with
augmentation, global batch 1024; then 2048 and torch.compile while the time budget allows), the
DataLoader path, the notebook loop baseline, the Fashion-MNIST fast recipe (configs/
fashion_mnist_fast.yaml) on 3 seeds timed from command start to exit, and an exact-resume check in
fp16 (fp32 in tiny mode: fp16 is refused on the CPU). --tiny trains a narrow ResNet-10
(model.name=resnet10 model.width=8) for a few steps, hides any GPU and uses one thread per step
unless OMP_NUM_THREADS is set. Each step runs in its own session under its own timeout; a failed
step is reported as FAILED with the tail of its log and the others still run. Exit code: 0 when
every check passed, 1 if any failed, 2 for a bad argument, a missing GPU or an unusable PYTHON
(GPU mode), 130 when interrupted.

Environment: PYTHON (the interpreter that runs the steps, with torch and the project's
requirements; default: the one running this script), FASHION_ROOT (default data/fashion-mnist in
the checkout when present, else /usr/share/datasets/fashion-mnist), GPU_CHECK_BUDGET_S (no step
starts or runs past this many seconds from the start; default 450, 900 with --tiny),
GPU_CHECK_LOGS=DIR (copy every step's log and JSON, the summary, and each run's metrics.json and
config.yaml into DIR at the end; checkpoints are not copied), GPU_CHECK_KEEP=1 (keep the whole
temporary folder). The checkout is put on PYTHONPATH: the project need not be installed. This
driver needs only Python 3.10+'s standard library (Linux); the steps need torch.

On a GPU machine without network, copy the four Fashion-MNIST IDX .gz files (30 MB) into
data/fashion-mnist/ of the checkout (git-ignored, so send it along) first, then
`python bench/gpu_check.py 2>&1 | tee gpu_check.txt`: the output holds every failed step's log tail.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
USAGE = "usage: python bench/gpu_check.py [--tiny]"
CHECK_COLUMN = 44  # width of the table's first column (tests/test_gpu_check.py reads the table by it)
LOG_TAIL_LINES = 40
KILL_GRACE_S = 15  # between SIGTERM and SIGKILL: ddp_train writes a stop checkpoint on SIGTERM


# ---------------------------------------------------------------------------------------------
# Sizes of the two modes.


@dataclass(frozen=True)
class Mode:
    """Sizes and time limits of one mode. The GPU ones fit one H200 in the default budget."""

    name: str
    budget_s: int  # default of GPU_CHECK_BUDGET_S
    precision: str  # train.precision of the throughput steps
    batch: int  # global batch of the main throughput step
    batch2: int  # the doubled batch, run while the budget allows
    model: tuple[str, ...]  # model overrides of every ddp_train step (none: the configs' ResNet-18)
    synthetic_size: int  # synthetic images for the throughput steps
    tp_steps: tuple[str, ...]  # bench/throughput.py --steps/--warmup, batch and compile steps
    tp2_steps: tuple[str, ...]  # the same for the doubled batch
    dl_steps: tuple[str, ...]  # the same for the DataLoader path
    tp_limit_s: int
    compile_limit_s: int  # 0: the compile row is not run
    dl_workers: int
    nb_batch: int  # bench/notebook_loop.py
    nb_workers: int
    nb_steps: tuple[str, ...]
    nb_limit_s: int
    seeds: tuple[int, ...]  # of the Fashion-MNIST fast recipe
    fashion_extra: tuple[str, ...]  # overrides on top of configs/fashion_mnist_fast.yaml
    fashion_limit_s: int
    fashion_test_count: int  # test images the recipe must have evaluated
    resume_precision: str
    resume_cfg: tuple[str, ...]
    resume_limit_s: int
    min_start_s: int  # a step is not started with less of the budget left
    targets: bool  # judge the speed targets (GPU figures only)


GPU = Mode(
    name="gpu", budget_s=450, precision="bf16", batch=1024, batch2=2048, model=(), synthetic_size=50000,
    tp_steps=("--steps", "30", "--warmup", "10"), tp2_steps=("--steps", "15", "--warmup", "5"),
    dl_steps=("--steps", "20", "--warmup", "5"), tp_limit_s=150, compile_limit_s=240, dl_workers=8,
    nb_batch=64, nb_workers=2, nb_steps=("--steps", "30"), nb_limit_s=150, seeds=(0, 1, 2), fashion_extra=(),
    fashion_limit_s=120, fashion_test_count=10000, resume_precision="fp16",
    resume_cfg=("data.synthetic_size=2000", "train.batch_size=256", "train.precision=fp16", "train.deterministic=true"),
    resume_limit_s=120, min_start_s=30, targets=True,
)

# Tiny: every step still trains, evaluates and writes what the GPU mode checks, on a model and data
# small enough that process start-up dominates (the whole run fits in a minute on 2 CPU cores).
# bench/notebook_loop.py always trains its ResNet-18, so tiny mode's speed-up row only proves the
# arithmetic (ResNet-10 at width 8 against ResNet-18).
TINY_MODEL = ("model.name=resnet10", "model.width=8")
TINY = Mode(
    name="tiny", budget_s=900, precision="auto", batch=32, batch2=64, model=TINY_MODEL, synthetic_size=400,
    tp_steps=("--steps", "3", "--warmup", "1"), tp2_steps=("--steps", "3", "--warmup", "1"),
    dl_steps=("--steps", "3", "--warmup", "1"), tp_limit_s=120, compile_limit_s=0, dl_workers=0,
    nb_batch=16, nb_workers=0, nb_steps=("--steps", "3", "--warmup", "1"), nb_limit_s=120, seeds=(0, 1),
    # The GPU's input path (device-resident, no loader workers) on the CPU, on 600 images, 1 epoch.
    fashion_extra=("data.subset=600", "train.epochs=1", "train.batch_size=64", "data.device_resident=true"),
    fashion_limit_s=180, fashion_test_count=600, resume_precision="fp32",
    resume_cfg=("data.synthetic_size=200", "train.batch_size=32", "train.precision=fp32"),
    # Tiny steps take seconds, so a short GPU_CHECK_BUDGET_S still starts one (the timeout test does).
    resume_limit_s=120, min_start_s=5, targets=False,
)


@dataclass(frozen=True)
class Rows:
    """The table's row labels (the same labels as the shell script had)."""

    tp: str
    tp2: str
    compile: str
    dl: str
    nb: str
    speedup: str
    seeds: tuple[str, ...]
    mean: str
    resume: str

    @classmethod
    def for_mode(cls, mode: Mode) -> Rows:
        p, b = mode.precision, mode.batch
        resume = f"{mode.resume_precision} resume exact" + (" (tiny: no CPU fp16)" if mode.name == "tiny" else "")
        return cls(tp=f"throughput {p} resident b{b}", tp2=f"throughput {p} resident b{mode.batch2}",
                   compile=f"throughput {p} resident b{b} compile", dl=f"throughput {p} dataloader b{b} w{mode.dl_workers}",
                   nb=f"notebook loop b{mode.nb_batch} w{mode.nb_workers}", speedup=f"resident b{b} / notebook loop",
                   seeds=tuple(f"fashion fast seed {s}" for s in mode.seeds),
                   mean=f"fashion fast mean ({len(mode.seeds)} seeds)", resume=resume)

    def ordered(self) -> list[str]:
        return [self.tp, self.tp2, self.compile, self.dl, self.nb, self.speedup, *self.seeds, self.mean, self.resume]


# ---------------------------------------------------------------------------------------------
# Steps and their parsers.


class CheckFailed(Exception):
    """A step ran but its output does not hold what its row needs; the message says what."""


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, and the figures later rows are computed from (img/s, acc, wall)."""

    text: str
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutput:
    """What a finished step left: its log (stdout and stderr) and its wall clock, start to exit."""

    log: str
    wall_s: float


@dataclass(frozen=True)
class Step:
    """One command of the check. A row may take several steps; the last one's parser fills it."""

    row: str  # the table row it fills
    tag: str  # its log is WORK/TAG.log
    argv: list[str]
    timeout_s: int
    parse: Callable[[StepOutput], Cell] | None  # None: a preparatory step (only its exit code counts)
    min_s: int  # not started with less of the budget left
    optional: bool = False  # skipped for lack of budget without failing the run
    note: str = ""  # which of the row's steps, in the progress lines
    show: int = 0  # lines of its log to echo after success
    show_only: str = ""  # a regex: echo only the matching lines


def throughput_cell(path: Path, checks: dict[str, str], target: bool, out: StepOutput) -> Cell:
    """bench/throughput.py's JSON as 'N img/s, MFU x%, prec, data a / compute b ms per step'."""
    f = json.loads(path.read_text())
    for key, want in checks.items():
        got = str(f[key]).split(":")[0] if key == "device" else str(f[key])  # cuda:0 is cuda
        if got != want:
            raise CheckFailed(f"{key} is {got}, expected {want}")
    text = (f"{f['img_per_s']:.0f} img/s, MFU {100 * f['mfu']:.1f}%, {f['precision']}, "
            f"data {f['data_ms']:.1f} / compute {f['compute_ms']:.1f} ms per step")
    if target:
        met = f["img_per_s"] >= 70000 and f["mfu"] >= 0.30
        text += f" [target 70000 img/s, 30% MFU: {'met' if met else 'MISSED'}]"
    return Cell(text, {"img_per_s": float(f["img_per_s"])})


def notebook_cell(out: StepOutput) -> Cell:
    found = re.findall(r"notebook loop: ([0-9.]+) img/s", out.log)
    if not found:
        raise CheckFailed("no 'notebook loop: ... img/s' line in its output")
    return Cell(f"{float(found[-1]):.1f} img/s", {"img_per_s": float(found[-1])})


def configured_epochs(config_yaml: str) -> int:
    """train.epochs of a run's config.yaml (ddp_train writes it in block style; the stdlib reads no YAML)."""
    found = re.search(r"^train:\n(?: .*\n)*? +epochs: (\d+)$", config_yaml, re.MULTILINE)
    if not found:
        raise CheckFailed("no train.epochs in the run's config.yaml")
    return int(found.group(1))


def fashion_cell(run: Path, test_count: int, out: StepOutput) -> Cell:
    """One seed of the fast recipe: final test accuracy, wall clock from command start to exit."""
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = configured_epochs((run / "config.yaml").read_text())
    test, history = metrics["test"], metrics["history"]
    if len(history) != epochs:
        raise CheckFailed(f"{len(history)} epochs in metrics.json, the config has {epochs}")
    if test["count"] != test_count or test["weights"] != "final":
        raise CheckFailed(f"test count {test['count']} (expected {test_count}), "
                          f"weights {test['weights']} (expected final)")
    in_epochs = sum(h["epoch_s"] for h in history)
    text = (f"acc {test['acc']:.4f}, {out.wall_s:.1f} s ({epochs} epochs: {in_epochs:.1f} s, "
            f"last {history[-1]['img_per_s']:.0f} img/s)")
    return Cell(text, {"acc": float(test["acc"]), "wall_s": out.wall_s})


def resume_cell(out: StepOutput) -> Cell:
    """The verdict line compare_resumed_runs printed: 'yes (...)' fills the row, 'no (...)' fails it."""
    verdict = out.log.strip().splitlines()[-1] if out.log.strip() else ""
    if verdict.startswith("yes ("):
        return Cell(verdict)
    if verdict.startswith("no ("):
        raise CheckFailed(f"not exact: {verdict[4:-1]}")
    raise CheckFailed("no verdict in the comparison's output")


def torch_side(python: str, function: str, *args: str) -> list[str]:
    """argv that runs FUNCTION(args) of this file under PYTHON, which has torch (this driver does not need it)."""
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import gpu_check; sys.exit(gpu_check.{function}(sys.argv[1:]))"
    return [python, "-c", code, *args]


@dataclass(frozen=True)
class Context:
    """What every step builder needs: the mode, the row labels, the interpreter and the folders."""

    mode: Mode
    rows: Rows
    python: str
    work: Path
    fashion_root: Path
    budget_s: int  # GPU_CHECK_BUDGET_S, or the mode's default


def throughput_step(ctx: Context, row: str, tag: str, batch: int, steps: tuple[str, ...],
                    extra: tuple[str, ...], *, limit_s: int, min_s: int, optional: bool = False) -> Step:
    """bench/throughput.py on augmented synthetic images, its JSON checked and turned into the row."""
    mode = ctx.mode
    resident = "data.device_resident=true" in extra
    checks = {"device_resident": str(resident)}
    if mode.name == "gpu":
        checks |= {"device": "cuda", "precision": "bf16"}
    if "train.compile=true" in extra:
        checks["compile"] = "True"
    json_path = ctx.work / f"{tag}.json"
    overrides = ("data.augment=true", f"data.synthetic_size={mode.synthetic_size}", f"train.precision={mode.precision}",
                 *mode.model, *extra, f"train.batch_size={batch}")
    argv = [ctx.python, "bench/throughput.py", *steps, "--json", str(json_path), *overrides]
    parse = functools.partial(throughput_cell, json_path, checks, mode.targets)
    return Step(row, tag, argv, limit_s, parse, min_s, optional=optional, show=9)


def fashion_steps(ctx: Context) -> list[Step]:
    """The Fashion-MNIST fast recipe once per seed, each timed from command start to exit."""
    steps = []
    for seed, row in zip(ctx.mode.seeds, ctx.rows.seeds):
        run = f"fashion-seed{seed}"
        argv = [ctx.python, "-m", "ddp_train", "--config", "configs/fashion_mnist_fast.yaml",
                f"data.root={ctx.fashion_root}", *ctx.mode.model, *ctx.mode.fashion_extra,
                f"out_dir={ctx.work / 'runs'}", f"run_name={run}", f"train.seed={seed}"]
        parse = functools.partial(fashion_cell, ctx.work / "runs" / run, ctx.mode.fashion_test_count)
        steps.append(Step(row, f"fashion-{seed}", argv, ctx.mode.fashion_limit_s, parse, ctx.mode.min_start_s,
                          show=2, show_only=r"^(epoch|test \|)"))
    return steps


def resume_steps(ctx: Context) -> list[Step]:
    """Exact resume: a full run checkpointing every 3 steps, a second resumed from step 3, equal weights.

    On the GPU train.deterministic=true, else cudnn's autotuner may pick other kernels in the second
    process and the comparison would say nothing about resuming.
    """
    mode, runs = ctx.mode, ctx.work / "runs"
    common = [ctx.python, "-m", "ddp_train", *mode.resume_cfg, *mode.model, "data.num_workers=0", "train.epochs=2",
              "checkpoint.every_steps=3", "checkpoint.keep=100", "train.seed=1", f"out_dir={runs}"]
    resumed = [*common, "run_name=resume-b", f"resume={runs / 'resume-a' / 'checkpoints' / 'step-00000003.pt'}"]
    compare = torch_side(ctx.python, "compare_resumed_runs", str(runs / "resume-a"), str(runs / "resume-b"),
                         str(ctx.work / "resume-b.log"), "1" if mode.resume_precision == "fp16" else "0")
    row, limit, least = ctx.rows.resume, mode.resume_limit_s, mode.min_start_s
    return [Step(row, "resume-a", [*common, "run_name=resume-a"], limit, None, least, note="full run"),
            Step(row, "resume-b", resumed, limit, None, least, note="resumed from step 3", show=2),
            Step(row, "resume-compare", compare, 60, resume_cell, min(least, 10), note="compare the weights")]


def build_steps(ctx: Context) -> list[Step]:
    """Every step in the order they run: the speed targets first, the budget-permitting extras last."""
    mode, rows = ctx.mode, ctx.rows
    resident, loader = ("data.device_resident=true",), ("data.device_resident=false", f"data.num_workers={mode.dl_workers}")
    steps = [
        throughput_step(ctx, rows.tp, "tp", mode.batch, mode.tp_steps, resident,
                        limit_s=mode.tp_limit_s, min_s=mode.min_start_s),
        throughput_step(ctx, rows.dl, "dl", mode.batch, mode.dl_steps, loader,
                        limit_s=mode.tp_limit_s, min_s=mode.min_start_s),
        Step(rows.nb, "notebook", [ctx.python, "bench/notebook_loop.py", *mode.nb_steps, "--batch-size",
                                   str(mode.nb_batch), "--workers", str(mode.nb_workers)],
             mode.nb_limit_s, notebook_cell, mode.min_start_s, show=3),
        *fashion_steps(ctx),
        *resume_steps(ctx),
        throughput_step(ctx, rows.tp2, "tp2", mode.batch2, mode.tp2_steps, resident,
                        limit_s=mode.tp_limit_s, min_s=40, optional=True),
    ]
    if mode.compile_limit_s:  # compiling takes minutes: last, and only while the budget allows
        steps.append(throughput_step(ctx, rows.compile, "compile", mode.batch, mode.tp_steps,
                                     (*resident, "train.compile=true"),
                                     limit_s=mode.compile_limit_s, min_s=90, optional=True))
    return steps


# ---------------------------------------------------------------------------------------------
# Running steps.


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is already empty
        pass


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Whether PID exited within TIMEOUT_S, leaving it a zombie: while it is one, its process group id
    cannot be reused, so killing the group afterwards cannot hit an unrelated process."""
    deadline = time.monotonic() + timeout_s
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def run_process(argv: list[str], log_path: Path, timeout_s: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run ARGV in its own session, output into LOG_PATH; (exit code, or None on timeout; wall seconds).

    subprocess.run(timeout=...) would kill only the process it started; a run's loader workers or
    torch.compile's helpers would outlive it. Here the whole process group is signalled: SIGTERM on
    timeout, then SIGKILL to whatever is left, also after a normal exit and on an interrupt.
    """
    start = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    exited = False
    try:
        exited = _wait_unreaped(proc.pid, timeout_s)
        if not exited:
            _signal_group(proc.pid, signal.SIGTERM)
            _wait_unreaped(proc.pid, KILL_GRACE_S)
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
        code = proc.wait()
    return (code if exited else None), time.monotonic() - start


def _echo(lines: list[str]) -> None:
    for line in lines:
        print(f"  | {line}")


def run_step(step: Step, number: int, ctx: Context, env: dict[str, str], started: float) -> Cell | None:
    """Run one step and print how it went; the row's cell (FAILED... on failure), None when the step
    succeeded without filling its row (a preparatory step)."""
    label = f"{step.row}: {step.note}" if step.note else step.row
    elapsed = time.monotonic() - started
    limit = min(step.timeout_s, int(ctx.budget_s - elapsed))  # no step runs past the budget
    if limit < step.min_s:
        spent = f"time budget of {ctx.budget_s} s spent"
        print(f"\n[{elapsed:4.0f} s] step {number}: {label}: skipped: {spent}")
        return Cell(f"skipped ({spent})") if step.optional else Cell(f"FAILED (skipped: {spent})")
    print(f"\n[{elapsed:4.0f} s] step {number}: {label} (timeout {limit} s)", flush=True)
    log_path = ctx.work / f"{step.tag}.log"
    try:
        code, wall_s = run_process(step.argv, log_path, limit, env)
    except OSError as e:  # PYTHON missing or not executable
        print(f"  FAILED: cannot start {step.argv[0]}: {e.strerror}")
        return Cell(f"FAILED (cannot start: {e.strerror})")
    log = log_path.read_text(errors="replace")
    if code != 0:
        reason = f"timed out after {limit} s" if code is None else f"exit code {code}"
        print(f"  FAILED: {reason}; the end of its log:")
        _echo(log.splitlines()[-LOG_TAIL_LINES:])
        return Cell(f"FAILED ({reason})")
    print(f"  ok, {wall_s:.1f} s")
    shown = [line for line in log.splitlines() if re.search(step.show_only, line)] if step.show_only else log.splitlines()
    _echo(shown[-step.show:] if step.show else [])
    if step.parse is None:
        return None
    try:
        return step.parse(StepOutput(log, wall_s))
    except Exception as e:  # a parser's error fails its row, and the table still comes out
        reason = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
        print(f"  check failed: {reason}")
        return Cell(f"FAILED ({reason})")


def run_all(steps: list[Step], ctx: Context, env: dict[str, str], started: float) -> dict[str, Cell]:
    """Every step in order; a row whose step failed skips that row's later steps."""
    cells: dict[str, Cell] = {}
    for number, step in enumerate(steps, 1):
        if cells.get(step.row, Cell("")).text.startswith("FAILED"):
            continue
        cell = run_step(step, number, ctx, env, started)
        if cell is not None:
            cells[step.row] = cell
    return cells


# ---------------------------------------------------------------------------------------------
# Rows computed from other rows, and the table.


def speedup_cell(fast: Cell | None, slow: Cell | None) -> Cell:
    if fast is None or slow is None or "img_per_s" not in fast.figures or "img_per_s" not in slow.figures:
        return Cell("n/a (a figure is missing)")
    return Cell(f"{fast.figures['img_per_s'] / slow.figures['img_per_s']:.1f}x")


def _spread(values: list[float], fmt: str) -> str:
    sd = fmt.format(statistics.stdev(values)) if len(values) > 1 else "n/a"
    return (f"{fmt.format(statistics.mean(values))} +- {sd} "
            f"(min {fmt.format(min(values))}, max {fmt.format(max(values))})")


def fashion_mean_cell(seeds: list[Cell | None], target: bool) -> Cell:
    """Mean and spread of the seeds that finished; the speed targets on the GPU."""
    done = [c.figures for c in seeds if c is not None and "acc" in c.figures]
    if not done:
        return Cell("FAILED (no seed finished)")
    accs, walls = [f["acc"] for f in done], [f["wall_s"] for f in done]
    text = f"acc {_spread(accs, '{:.4f}')}, wall s {_spread(walls, '{:.1f}')}"
    if len(done) < len(seeds):
        text += f" [only {len(done)} of {len(seeds)} seeds]"
    if target:
        acc_ok, wall_ok = statistics.mean(accs) >= 0.95, max(walls) < 45
        text += (f" [targets: mean acc >= 0.95 {'met' if acc_ok else 'MISSED'}, "
                 f"every wall < 45 s {'met' if wall_ok else 'MISSED'}]")
    return Cell(text)


def summary(ctx: Context, cells: dict[str, Cell], elapsed_s: float) -> tuple[str, int]:
    """The table (with the derived rows) and the number of failed rows."""
    rows = ctx.rows
    cells = dict(cells)
    if ctx.mode.compile_limit_s == 0:
        cells[rows.compile] = Cell(f"skipped in {ctx.mode.name} mode")
    cells[rows.speedup] = speedup_cell(cells.get(rows.tp), cells.get(rows.nb))
    cells[rows.mean] = fashion_mean_cell([cells.get(r) for r in rows.seeds], ctx.mode.targets)
    texts = {row: cells[row].text if row in cells else "not run" for row in rows.ordered()}
    failed = sum(text.startswith("FAILED") for text in texts.values())
    overall = f"{failed} FAILED (the rows above; each step's log tail is printed above the table)" if failed else "ok"
    lines = [f"== summary ({ctx.mode.name} mode, {elapsed_s:.0f} s) ==", f"{'check':<{CHECK_COLUMN}} result"]
    lines += [f"{row:<{CHECK_COLUMN}} {text}" for row, text in [*texts.items(), ("overall", overall)]]
    return "\n".join(lines), failed


# ---------------------------------------------------------------------------------------------
# Torch-side helpers: run under PYTHON by torch_side(), never imported by the driver's own process.


def probe(args: list[str]) -> int:
    """Print the interpreter and its torch; in GPU mode the GPU torch sees, or 2 when it sees none."""
    from importlib.metadata import version

    print(f"python {platform.python_version()} ({sys.executable}), torch {version('torch')}, "
          f"torchvision {version('torchvision')}")
    if args[0] == "tiny":  # GPUs are hidden there; importing torch would only add seconds to the run
        print(f"tiny mode: on the CPU, {os.environ.get('OMP_NUM_THREADS')} thread(s) per step")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; GPU mode needs one (python bench/gpu_check.py --tiny runs on "
              "the CPU)", file=sys.stderr)
        return 2
    p = torch.cuda.get_device_properties(0)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"CUDA {torch.version.cuda}, cuDNN {cudnn}; torch sees {torch.cuda.device_count()} GPU(s), {p.name}, "
          f"{p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
    return 0


def compare_resumed_runs(args: list[str]) -> int:
    """FULL RESUMED RESUMED_LOG WANT_SCALER(0/1): print 'yes (...)' when the resumed run ended with the
    full run's exact weights (and, for fp16, a saved grad scaler), else 'no (...)'."""
    print(_resume_verdict(Path(args[0]), Path(args[1]), Path(args[2]).read_text(), args[3] == "1"))
    return 0


def _resume_verdict(full: Path, resumed: Path, log: str, want_scaler: bool) -> str:
    import torch

    if "resumed from" not in log:
        return "no (the second run did not say 'resumed from')"
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu") for run in (full, resumed))
    notes = [f"{a['global_step']} steps, resumed at step 3"]
    if a["global_step"] != b["global_step"]:
        return f"no (global step {a['global_step']} vs {b['global_step']})"
    if want_scaler:
        scaler = a.get("scaler")
        if not isinstance(scaler, dict) or "scale" not in scaler:
            return f"no (last.pt's scaler is {type(scaler).__name__}, not a dict with 'scale')"
        notes.append(f"scaler scale {float(scaler['scale']):g}")
    ma, mb = a["model"], b["model"]
    if ma.keys() != mb.keys():
        return "no (different model keys)"
    differ = [k for k in ma if not torch.equal(ma[k], mb[k])]
    notes.append(f"{len(ma) - len(differ)}/{len(ma)} tensors equal")
    if "does not have a deterministic implementation" in log:
        notes.append("a nondeterministic op warned")
    if differ:
        worst = max(float((ma[k].double() - mb[k].double()).abs().max()) for k in differ)
        return f"no ({', '.join(notes)}; max abs diff {worst:.3g}, first {differ[0]})"
    return f"yes ({', '.join(notes)})"


# ---------------------------------------------------------------------------------------------
# Set-up, header, clean-up, main.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"gpu_check: error: {message} ({USAGE})\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="python bench/gpu_check.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="run the same steps on the CPU at tiny sizes")
    return parser.parse_args(argv)


def make_context(mode: Mode, budget_s: int) -> Context:
    """The interpreter and folders from the environment; relative paths mean what they meant where the
    script was started (the steps run in the checkout)."""
    python = os.environ.get("PYTHON") or sys.executable
    if os.sep in python:  # abspath, not resolve: a venv's python is a symlink that must stay one
        python = os.path.abspath(python)
    default_root = REPO / "data" / "fashion-mnist"
    root = os.environ.get("FASHION_ROOT") or (default_root if default_root.is_dir() else "/usr/share/datasets/fashion-mnist")
    work = Path(tempfile.mkdtemp(prefix="gpu_check.")).resolve()
    return Context(mode, Rows.for_mode(mode), python, work, Path(os.path.abspath(root)), budget_s)


def step_env(mode: Mode) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if mode.name == "tiny":
        env["CUDA_VISIBLE_DEVICES"] = ""  # tiny mode is the CPU's, on any machine
        # One thread: a model this small gains nothing from two, and two collapse when another
        # process shares the cores (10x slower steps measured on the 2-core machine).
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS") or "1"
    return env


def _command(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30)
        return res.stdout.strip() if res.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def header(ctx: Context, env: dict[str, str]) -> int:
    """Print the machine, checkout and interpreter; the probe's exit code."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*: (.*)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    print(f"== gpu_check ({ctx.mode.name} mode) ==")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"host: {platform.node()}, {os.cpu_count()} cores, {int(mem.group(1)) / 2**20 if mem else 0:.0f} GiB")
    print(f"cpu: {model.group(1) if model else platform.processor()}")
    if shutil.which("nvidia-smi"):
        print(f"gpu: {_command(['nvidia-smi', '--query-gpu=name,memory.total', '--format=csv,noheader'])}")
    changed = _command(["git", "status", "--porcelain"])
    print(f"checkout: {REPO}, commit {_command(['git', 'rev-parse', '--short', 'HEAD'])} "
          f"({len(changed.splitlines()) if changed != 'unknown' else '?'} changed files)")
    print(f"fashion-mnist: {ctx.fashion_root}; work folder: {ctx.work}; budget: {ctx.budget_s} s")
    if ctx.mode.name == "tiny":
        print("tiny mode: the resume check runs in fp32 (fp16 on the CPU is refused by design)")
    try:
        res = subprocess.run(torch_side(ctx.python, "probe", ctx.mode.name), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"gpu_check: {ctx.python} could not be run: {e}")
        return 2
    print((res.stdout + res.stderr).rstrip())
    return res.returncode


def clean_up(ctx: Context) -> None:
    """Copy the logs out (GPU_CHECK_LOGS), then remove the work folder unless GPU_CHECK_KEEP=1."""
    logs = os.environ.get("GPU_CHECK_LOGS")
    if logs:
        dest = Path(os.path.abspath(logs))
        dest.mkdir(parents=True, exist_ok=True)
        for path in [*ctx.work.glob("*.log"), *ctx.work.glob("*.json"), *ctx.work.glob("*.txt")]:
            shutil.copy2(path, dest)
        for run in sorted(ctx.work.glob("runs/*/")):
            (dest / "runs" / run.name).mkdir(parents=True, exist_ok=True)
            for name in ("metrics.json", "config.yaml"):
                if (run / name).exists():
                    shutil.copy2(run / name, dest / "runs" / run.name)
    if os.environ.get("GPU_CHECK_KEEP") == "1":
        print(f"(kept {ctx.work})", file=sys.stderr)
    else:
        shutil.rmtree(ctx.work, ignore_errors=True)


def _interrupted(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt  # run_process then kills the running step's group


def main(argv: list[str]) -> int:
    mode = TINY if parse_args(argv).tiny else GPU
    budget = os.environ.get("GPU_CHECK_BUDGET_S", "")
    if budget and not budget.isdigit():
        print(f"gpu_check: error: GPU_CHECK_BUDGET_S must be a whole number of seconds, got {budget!r}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    ctx = make_context(mode, int(budget) if budget else mode.budget_s)
    started = time.monotonic()
    try:
        env = step_env(mode)
        probe_code = header(ctx, env)
        if probe_code != 0 and mode.name == "gpu":
            return 2
        if probe_code != 0:  # tiny mode still runs: every step will show what is wrong with PYTHON
            print(f"gpu_check: the probe of {ctx.python} failed (exit code {probe_code}); running the steps anyway")
        cells = run_all(build_steps(ctx), ctx, env, started)
        table, failed = summary(ctx, cells, time.monotonic() - started)
        (ctx.work / "summary.txt").write_text(table + "\n")
        print(f"\n{table}")
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("gpu_check: interrupted; the running step was stopped", file=sys.stderr)
        return 130
    finally:
        clean_up(ctx)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
