"""bench/compare_peers.py: every system trains and reports a test accuracy and a wall clock (--tiny); the
peers do ddp_train's work (its config, its training split); a missing Lightning is one line, exit 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ddp_train.config import load_config
from ddp_train.data.loaders import split_indices

from .helpers import ROOT, clean_env

DRIVER = ROOT / "bench" / "compare_peers.py"
PLAIN = ROOT / "bench" / "peers" / "plain_ddp.py"
LIGHTNING = ROOT / "bench" / "peers" / "lightning_fit.py"
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None


def load(path: Path) -> ModuleType:
    """A bench script as a module (bench/ is not a package), its folder importable as when it runs."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))  # the peers import fashion_data from beside them
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def without_lightning(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script ARGS`` in a Python where ``import lightning`` fails, as where it is not installed."""
    code = (f"import runpy, sys; sys.modules['lightning'] = None; sys.argv = [{str(script)!r}, *{list(args)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", [DRIVER, LIGHTNING], ids=["compare_peers", "lightning_fit"])
def test_missing_lightning_is_one_line_and_exit_2(script):
    res = without_lightning(script, "--tiny") if script == DRIVER else without_lightning(script)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "lightning is not installed" in lines[0] and "--only" in lines[0], res.stderr


def test_unknown_system_is_refused():
    res = subprocess.run([sys.executable, str(DRIVER), "--only", "ddp_sync,tensorflow"], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown system tensorflow" in res.stderr, res.stderr


def test_ddp_train_gets_the_peers_work_and_its_own_defaults():
    """The overrides are valid ddp_train config, and the values the peers hard-code are what it trains with."""
    cp = load(DRIVER)
    work = cp.Work(epochs=3, subset=None, precision="bf16")
    cfg = load_config(None, cp.ddp_train_overrides(work))
    t, d, m = cfg.train, cfg.data, cfg.model
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay) == \
        (3, 256, "sgd", 0.2, 0.9, True, 5e-4)
    assert (t.scheduler, t.cycle_momentum, t.precision, t.seed, t.label_smoothing) == ("onecycle", 0.0, "bf16", 42, 0)
    assert (d.name, d.valid_fraction, d.augment, d.num_workers, d.subset) == ("fashion_mnist", 0.2, False, 2, None)
    assert (m.name, m.width, m.channels_last, m.sync_bn) == ("resnet10", 16, True, True)
    sync, nosync = (cp.command(n, work, Path("/tmp/x")) for n in ("ddp_sync", "ddp_nosync"))
    assert [a for a in nosync if a not in sync and not a.startswith("run_name=")] == ["model.sync_bn=false"]
    assert not [a for a in sync if a.startswith(("data.device_resident", "train.compile", "dist."))]


def test_peers_train_on_ddp_train_split(fashion_root):
    """plain_ddp.py and lightning_fit.py read the same training samples as ddp_train's split (subset 500)."""
    train_idx, _ = split_indices(500, 0.2, 42)
    from ddp_train.data.datasets import read_idx

    images = read_idx(fashion_root / "train-images-idx3-ubyte.gz")[:500]
    labels = read_idx(fashion_root / "train-labels-idx1-ubyte.gz")[:500]
    for script in (PLAIN, *([LIGHTNING] if HAS_LIGHTNING else [])):
        peer = load(script).fashion("train", 500)
        x, y = peer.tensors
        assert np.array_equal(x.squeeze(1).numpy(), images[train_idx]), script.name
        assert np.array_equal(y.numpy(), labels[train_idx].astype(np.int64)), script.name


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> dict:
    """One --tiny round of every system (Lightning when installed): the --json results."""
    out = tmp_path_factory.mktemp("compare_peers") / "results.json"
    only = ["--only", "ddp_sync,ddp_nosync,plain"] if not HAS_LIGHTNING else []
    res = subprocess.run([sys.executable, str(DRIVER), "--tiny", "--rounds", "1", "--json", str(out), *only],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    results = json.loads(out.read_text())
    results["table"] = res.stdout
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_sync", "ddp_nosync", "plain", "lightning"])
def test_tiny_round_reports_accuracy_and_wall_clock(fashion_root, name, tiny_results):
    if name == "lightning" and not HAS_LIGHTNING:
        pytest.skip("lightning is not installed (pip install -e '.[bench]'); the other three systems are checked")
    system = tiny_results["systems"][name]
    assert system["failures"] == []
    assert len(system["walls"]) == 1 and system["walls"][0] > 0
    assert system["starts"][0] is not None and 0 < system["starts"][0] < system["walls"][0]
    acc = system["test_acc"][0]
    assert acc is not None and 0 <= acc <= 1
    assert system["label"] in tiny_results["table"]
    assert tiny_results["work"] == {"epochs": 1, "subset": 1000, "precision": "bf16"}
