"""Proof that a code change left a run's files unchanged: the default run in fp64, key for key.

    python bench/same_contents.py capture OUT.json [key=value ...]   # run it, write a manifest
    python bench/same_contents.py compare BEFORE.json AFTER.json     # list every difference

``capture`` runs the main command of README.md: "Quick start" (the default config, 2 gloo ranks under
torchrun) with ``train.precision=fp64`` and writes a manifest of the run folder: for every checkpoint and weights
file, every key with its type, and for tensors dtype, shape and the SHA-256 of their bytes (nested
state dicts are walked), plus the whole of metrics.json. fp64 makes the run bit-reproducible on any
CPU, so two captures of the same code differ only in the fields that name a time or a run
(``VOLATILE``); ``compare`` prints those apart from real differences and exits 1 on any real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Fields that differ between two runs of the same code: wall-clock times, rates, ids and paths.
VOLATILE = ("time", "_s", "seconds", "img_per_s", "run_id", "started", "finished", "path", "dir", "host", "pid",
            "out_dir", "samples_per_s", "throughput", "utc", "date")


def _describe(value: Any) -> Any:
    """A JSON-able fingerprint of a checkpoint value: tensors by dtype, shape and bytes' hash."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return {"tensor": str(data.dtype), "shape": list(data.shape), "sha256": digest}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def capture(out: Path, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_", "RANK", "WORLD"))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "ddp_train",
               f"out_dir={tmp}", "run_name=same", "train.precision=fp64", *overrides]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        run = Path(tmp) / "same"
        files: dict[str, Any] = {}
        for path in sorted((run / "checkpoints").iterdir()):
            if path.is_file() and path.suffix in (".pt", ".pth"):
                data = torch.load(path, map_location="cpu", weights_only=True)
                files[path.name] = _describe(data)
        metrics = json.loads((run / "metrics.json").read_text())
    manifest = {"command": " ".join(cmd[1:]), "checkpoints": files, "metrics.json": metrics}
    out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: {len(files)} checkpoint files, {len(metrics)} metrics.json keys")


def _diff(a: Any, b: Any, where: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                found.append(f"{where}/{key}: only in {'after' if key not in a else 'before'}")
            else:
                _diff(a[key], b[key], f"{where}/{key}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", found)
    elif a != b:
        found.append(f"{where}: {str(a)[:60]} -> {str(b)[:60]}")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    found: list[str] = []
    _diff({k: a[k] for k in ("checkpoints", "metrics.json")}, {k: b[k] for k in ("checkpoints", "metrics.json")},
          "", found)
    volatile = [d for d in found if any(v in d.split(":")[0].rsplit("/", 1)[-1] for v in VOLATILE)]
    real = [d for d in found if d not in volatile]
    files = sorted(set(a["checkpoints"]) | set(b["checkpoints"]))
    keys = sum(len(v) for v in a["checkpoints"].values() if isinstance(v, dict))
    print(f"checkpoint files compared: {', '.join(files)} ({keys} top-level keys in all)")
    print(f"metrics.json keys compared: {len(a['metrics.json'])}")
    print(f"differences in time, rate and id fields (expected): {len(volatile)}")
    for d in volatile[:8]:
        print(f"  {d}")
    print(f"other differences: {len(real)}")
    for d in real:
        print(f"  {d}")
    return 1 if real else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "capture":
        capture(Path(sys.argv[2]), sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
