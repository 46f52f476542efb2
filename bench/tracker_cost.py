"""What each tracker costs a training step: none, TensorBoard, + W&B offline, + MLflow (SQLite, file store).

    python bench/tracker_cost.py [--rounds 2] [--epochs 3] [--log-every 1]

Each case is a real single-process run of the CLI (the tests' tiny model, 50 steps an epoch, the train loss
logged every ``--log-every`` steps: 1 is the worst case, the default config logs every 10), the cases taking
turns round by round so that other load on the machine spreads over all of them. Per case it prints:

- ms/step: the training phase's seconds per optimizer step (from metrics.json's img/s, the epochs after the
  first), the smallest over the rounds; and its difference to ``none``, the trackers' cost per logged step;
- start+end s: the process's wall time outside the epochs (imports, the tracker's start, test, closing).

Needs the [wandb] and [mlflow] extras; a case whose package is missing is skipped. Labelled with the CPU kind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
TINY = ["data.synthetic_size=2000", "data.num_workers=0", f"train.batch_size={BATCH}", "train.precision=fp32",
        "train.optimizer=sgd", "train.lr=0.002", "model.name=resnet10", "model.width=8", "model.channels_last=false"]
CASES = {  # name -> (track.* overrides, the package it needs)
    "none": (["track.trackers=none"], None),
    "tensorboard": (["track.trackers=tensorboard"], None),
    "tensorboard + wandb offline": (["track.trackers=tensorboard,wandb"], "wandb"),
    "tensorboard + mlflow sqlite": (["track.trackers=tensorboard,mlflow"], "mlflow"),  # <run>/mlflow.db
    "tensorboard + mlflow file store": (["track.trackers=tensorboard,mlflow", "track.mlflow_uri=file://{out}/mlruns"],
                                        "mlflow"),
}


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    return next((k for k in ("amx_bf16", "avx512_bf16", "avx2") if k in flags), "other")


def one_run(out: Path, track: list[str], epochs: int, log_every: int) -> tuple[float, float]:
    """(training seconds per step over the epochs after the first, wall seconds outside the epochs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "ddp_train", *TINY, f"train.epochs={epochs}", f"train.log_every_steps={log_every}",
           *[t.format(out=out) for t in track], f"out_dir={out}", "run_name=r"]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(track)}: exit {res.returncode}\n{res.stderr[-2000:]}")
    history = json.loads((out / "r" / "metrics.json").read_text())["history"]
    per_step = sorted(BATCH / epoch["img_per_s"] for epoch in history[1:])
    return per_step[len(per_step) // 2], wall - sum(epoch["epoch_s"] for epoch in history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=1)
    args = parser.parse_args()
    cases = {name: track for name, (track, package) in CASES.items()
             if package is None or importlib.util.find_spec(package) is not None}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, track in cases.items():
            with tempfile.TemporaryDirectory() as out:
                results[name].append(one_run(Path(out), track, args.epochs, args.log_every))
    base = min(step for step, _ in results["none"])
    print(f"CPU {cpu_kind()}, 1 process, resnet10 width 8, batch {BATCH}, 50 steps an epoch, {args.epochs} epochs, "
          f"train loss logged every {args.log_every} step(s), best of {args.rounds} rounds")
    print(f"| case | ms/step | vs none, ms/step | start+end s |\n| --- | --- | --- | --- |")
    for name, runs in results.items():
        step = min(s for s, _ in runs)
        print(f"| {name} | {1000 * step:.1f} | {1000 * (step - base):+.1f} | {min(o for _, o in runs):.1f} |")


if __name__ == "__main__":
    main()
