"""``python -m ddp_train plot RUN_DIR``: curves.png from metrics.json, and the message without matplotlib."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ddp_train.tracking import Tracker

from .helpers import run_cli, run_cli_without

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'


@pytest.fixture
def run_dir(tmp_path, capsys):
    """A run folder whose metrics.json is written by the training loop's own Tracker (4 epochs)."""
    run = tmp_path / "demo"
    run.mkdir()
    tracker = Tracker(run, tensorboard=False)
    for epoch, (train_loss, valid_loss, acc) in enumerate([(2.1, 1.9, 0.3), (1.2, 1.1, 0.6), (0.6, 0.7, 0.8),
                                                            (0.3, float("nan"), 0.9)], start=1):
        record = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_acc": acc,
                  "lr": 0.01, "img_per_s": 100.0, "epoch_s": 1.0}
        tracker.history.append(record)
        tracker.log_epoch(record, epoch * 10)
    capsys.readouterr()
    assert json.loads((run / "metrics.json").read_text())["history"][3]["valid_loss"] is None  # NaN -> null
    return run


def test_curves_png_written_and_read_back(run_dir, tmp_path):
    res = run_cli(["plot", str(run_dir)], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {run_dir / 'curves.png'} (4 epochs)"
    with Image.open(run_dir / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 400)
        pixels = np.asarray(im.convert("RGB"))
    # Curves drawn: the matplotlib default blue (train loss), orange (valid loss) and green (accuracy) lines.
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        near = (np.abs(pixels.astype(int) - colour).sum(2) < 30).sum()
        assert near > 200, colour
    # --output elsewhere; a second plot replaces the file.
    res = run_cli(["plot", str(run_dir), "--output", str(tmp_path / "x.png")], timeout=120)
    assert res.returncode == 0, res.stderr
    with Image.open(tmp_path / "x.png") as im:
        assert im.size == (1000, 400)


def test_without_matplotlib_says_how_to_install_it(run_dir):
    res = run_cli_without("matplotlib", ["plot", str(run_dir)])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0] and "pip install 'ddp_train[plot]'" in lines[0], res.stderr
    assert not (run_dir / "curves.png").exists()


def test_not_a_run_folder(tmp_path):
    res = run_cli(["plot", str(tmp_path)], timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics.json not found" in lines[0], res.stderr


def test_help_lists_the_options():
    res = run_cli(["plot", "--help"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m ddp_train plot RUN_DIR [--output FILE]")
    assert "--output" in res.stdout and "ddp_train[plot]" in res.stdout
