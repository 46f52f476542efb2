#!/usr/bin/env python3
"""The Fashion-MNIST recipe (configs/fashion_mnist_recipe.yaml) against the same config with the recipe's
features off, at the same epochs, on 2 CPU ranks: final test accuracy and wall time from command start.

    python bench/recipe_fmnist.py               # both runs in full: about 2 x 60 minutes on a 2-core CPU
    python bench/recipe_fmnist.py --epochs 1    # a 1-epoch check that the script works
    python bench/recipe_fmnist.py --only recipe key=value ...

"Features off" are the ones the recipe adds (docs/recipes.md): mixup and cutmix, TrivialAugment,
random erasing, EMA, gradient clipping, early stopping; the crop, flip and label smoothing stay. The
figures go into bench/RESULTS.md with the CPU kind this prints. Exit code: 0, or 1 when a run failed
(the tail of its log is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_mnist_recipe.yaml"
FEATURES_OFF = ["data.mixup_alpha=0", "data.cutmix_alpha=0", "data.auto_augment=none", "data.random_erase=0",
                "train.ema_decay=0", "train.eval_weights=trained", "train.clip_grad_norm=null",
                "train.early_stop_patience=0"]


def cpu_kind() -> str:
    """The CPU's model name, core count and its bf16 flags (what decides precision: auto)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = sorted({f for f in ("amx_bf16", "avx512_bf16", "avx2") if f in info})
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'none'}"


def run(name: str, overrides: list[str], out: Path, nproc: int) -> dict:
    """One training run under torchrun; its test accuracy, epochs, mean img/s and wall time from command start."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddp_train", "--config", str(CONFIG), f"out_dir={out}", f"run_name={name}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if res.returncode != 0:
        print(f"{name}: failed with exit code {res.returncode}\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
        return {"name": name, "failed": True}
    metrics = json.loads((out / name / "metrics.json").read_text())
    history = metrics["history"]
    return {"name": name, "test_acc": metrics["test"]["acc"], "epochs": len(history), "wall_s": wall,
            "img_per_s": sum(h["img_per_s"] for h in history) / len(history),
            "weights": metrics["test"].get("weights", "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, help="train.epochs for both runs (default: the config's)")
    parser.add_argument("--only", choices=["recipe", "plain"], help="run only one of the two")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args(argv)
    common = [*args.overrides, *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    print(f"machine: {cpu_kind()}; config {CONFIG.relative_to(ROOT)} {' '.join(common)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="recipe_fmnist_") as tmp:
        for name, extra in (("recipe", []), ("plain", FEATURES_OFF)):
            if args.only in (None, name):
                results.append(run(name, [*common, *extra], Path(tmp), args.nproc))
                print(_row(results[-1]), flush=True)
    return 1 if any(r.get("failed") for r in results) else 0


def _row(r: dict) -> str:
    if r.get("failed"):
        return f"{r['name']:7s} | FAILED"
    return (f"{r['name']:7s} | test acc {r['test_acc']:.4f} ({r['weights']} weights) | {r['epochs']} epochs | "
            f"{r['img_per_s']:.0f} img/s | {r['wall_s'] / 60:.1f} min from command start")


if __name__ == "__main__":
    sys.exit(main())
