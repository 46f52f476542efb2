"""``python -m ddp_train predict``: image files and .npy arrays through the real CLI, checked against the eval path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_train.persistence.checkpoint import load_checkpoint
from ddp_train.config import config_from_dict
from ddp_train.data import build_splits, load_dataset
from ddp_train.data.loaders import eval_loader
from ddp_train.models import build_model

from .helpers import assert_ok, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def reference(run):
    """The eval path: the test split with its evaluation transform, through the checkpoint's model."""
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    cfg = config_from_dict(ckpt["config"])
    dataset = load_dataset(cfg.data)
    test = build_splits(dataset, cfg)[2]
    model = build_model(cfg.model.name, len(dataset.classes), dataset.channels)
    model.load_state_dict(ckpt["model"])
    model.eval()
    images, _ = next(iter(eval_loader(test, 4, 0, 1, 0, False, (dataset.mean, dataset.std, torch.device("cpu")))))
    with torch.no_grad():
        probs = torch.softmax(model(images), 1)
    raw = [test.source.load(int(test.indices[i])).permute(1, 2, 0).numpy() for i in range(4)]  # uint8 HxWxC
    return dataset.classes, probs, raw


def test_png_and_npy_agree_with_the_eval_path(run, reference, tmp_path):
    classes, probs, raw = reference
    Image.fromarray(raw[0]).save(tmp_path / "s0.png")
    np.save(tmp_path / "s1.npy", raw[1])
    Image.fromarray(raw[2]).save(tmp_path / "s2.jpg", quality=95)  # lossy: accepted, not compared
    np.save(tmp_path / "gray.npy", raw[3].mean(2).astype(np.uint8))  # HxW into a 3-channel model
    Image.fromarray(raw[3]).resize((50, 40)).save(tmp_path / "big.png")  # resized to 32x32
    files = [str(tmp_path / n) for n in ("s0.png", "s1.npy", "s2.jpg", "gray.npy", "big.png")]
    res = run_cli(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--json", "--top-k", "10",
                   *files], timeout=120)
    assert_ok(res)
    results = json.loads(res.stdout)["results"]
    assert [r["file"] for r in results] == files
    for r, expected in zip(results[:2], probs[:2]):
        top = r["top_k"]
        assert len(top) == 10 and [t["class"] for t in top] == [classes[t["index"]] for t in top]
        got = torch.zeros(10)
        for t in top:
            got[t["index"]] = t["prob"]
        # Normalisation included: the probabilities are the eval path's, not just the same argmax.
        assert torch.allclose(got, expected, atol=1e-5), (got, expected)
        assert top[0]["index"] == int(expected.argmax())
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    for r in results[2:]:
        assert len(r["top_k"]) == 10 and sum(t["prob"] for t in r["top_k"]) == pytest.approx(1, abs=1e-4)


def test_bad_files_get_one_line_each_and_the_others_are_still_reported(run, reference, tmp_path):
    _, probs, raw = reference
    Image.fromarray(raw[0]).save(tmp_path / "good.png")
    np.save(tmp_path / "good.npy", raw[1])
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "corrupt.png").write_bytes(png[:40] + b"\0" * 64)  # a PNG header, then nothing usable
    (tmp_path / "notes.txt").write_text("not an image\n")
    np.save(tmp_path / "volume.npy", np.zeros((4, 8, 8, 3), np.uint8))  # wrong shape
    np.save(tmp_path / "float.npy", raw[1].astype(np.float32))  # wrong dtype
    names = ["good.png", "corrupt.png", "notes.txt", "volume.npy", "float.npy", "good.npy"]
    res = run_cli(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--top-k", "2",
                   *(str(tmp_path / n) for n in names)], timeout=120)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 4, res.stderr
    for line, name in zip(errors, ["corrupt.png", "notes.txt", "volume.npy", "float.npy"]):
        assert line.startswith(f"ddp_train: predict: {tmp_path / name}: ")
    assert "not a readable image" in errors[0] and "not a readable image" in errors[1]
    assert "got shape (4, 8, 8, 3)" in errors[2] and "expected a uint8 array" in errors[3]
    lines = res.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(tmp_path / "good.png"), str(tmp_path / "good.npy")]
    classes = reference[0]
    for line, p in zip(lines, probs[:2]):
        best = int(p.argmax())
        assert line.split(": ")[1].startswith(f"{classes[best]} {p[best]:.4f}, ")


def test_model_pth_takes_class_names_and_normalisation_from_best_pt(run, reference, tmp_path):
    _, _, raw = reference
    Image.fromarray(raw[0]).save(tmp_path / "s0.png")
    a = run_cli(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(tmp_path / "s0.png")])
    b = run_cli(["predict", "--checkpoint", str(run / "checkpoints" / "model.pth"), str(tmp_path / "s0.png")])
    assert_ok(a), assert_ok(b)
    assert a.stdout == b.stdout and a.stdout.count(", ") == 2  # top 3 by default
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.pth").write_bytes((run / "checkpoints" / "model.pth").read_bytes())
    c = run_cli(["predict", "--checkpoint", str(alone / "model.pth"), str(tmp_path / "s0.png")])
    assert c.returncode == 2 and c.stdout == ""
    lines = c.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds weights only" in lines[0] and "best.pt" in lines[0], c.stderr


def test_help_lists_the_options():
    res = run_cli(["predict", "--help"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m ddp_train predict --checkpoint PATH FILE...")
    for option in ("--checkpoint", "--top-k", "--json", "--device", "FILE"):
        assert option in res.stdout
