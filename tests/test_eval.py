"""``python -m ddp_train eval``: exact metrics of a trained checkpoint at world sizes 1 and 3, through the real CLI."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from ddp_train.data import synthetic

from .helpers import assert_ok, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def evals(run, tmp_path_factory):
    """The same checkpoint evaluated by 1 process (--json) and by 3 torchrun ranks (--output), test and valid."""
    tmp = tmp_path_factory.mktemp("eval")
    best = str(run / "checkpoints" / "best.pt")
    one = run_cli(["eval", "--checkpoint", best, "--json"])
    three = run_cli(["eval", "--checkpoint", best, "--output", str(tmp / "three.json")], nproc=3)
    # Overrides on top of the checkpoint's config: an odd per-rank batch changes nothing.
    valid = run_cli(["eval", "--checkpoint", best, "split=valid", "train.batch_size=7",
                     "--output", str(tmp / "valid.json")], nproc=3)
    return one, three, valid, tmp


def test_exact_at_world_sizes_1_and_3(run, evals):
    one, three, _, tmp = evals
    assert_ok(one), assert_ok(three)
    r1 = json.loads(one.stdout)  # --json: stdout is the JSON document alone
    r3 = json.loads((tmp / "three.json").read_text())
    assert r1["world_size"] == 1 and r3["world_size"] == 3
    labels = synthetic.generate("test", 25)[1]
    for r in (r1, r3):
        assert r["split"] == "test" and r["count"] == 25 and r["global_step"] == 3
        assert r["classes"] == list(synthetic.CLASSES)
        confusion = np.array(r["confusion"])
        # Every test sample counted exactly once: the rows are the true class counts.
        assert confusion.sum() == 25 and confusion.sum(1).tolist() == np.bincount(labels, minlength=10).tolist()
        assert list(r["per_class_count"].values()) == np.bincount(labels, minlength=10).tolist()
    assert r3["confusion"] == r1["confusion"]
    assert r3["acc"] == r1["acc"] and r3["per_class_acc"] == r1["per_class_acc"]
    assert r3["loss"] == pytest.approx(r1["loss"], abs=1e-6)
    # The same numbers as the training run's own test evaluation of the best weights.
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert r1["count"] == test["count"] and r1["acc"] == test["acc"]
    assert r1["loss"] == pytest.approx(test["loss"], abs=1e-6)
    assert r1["per_class_acc"] == test["per_class_acc"]
    assert r1["acc"] == pytest.approx(np.trace(np.array(r1["confusion"])) / 25)


def test_valid_split_under_torchrun_matches_training(run, evals):
    _, _, valid, tmp = evals
    assert_ok(valid)
    r = json.loads((tmp / "valid.json").read_text())
    last = json.loads((run / "metrics.json").read_text())["history"][-1]  # 1 epoch: best.pt is that epoch
    assert r["split"] == "valid" and r["count"] == 25 and r["world_size"] == 3
    assert r["acc"] == pytest.approx(last["valid_acc"], abs=1e-12)
    assert r["loss"] == pytest.approx(last["valid_loss"], abs=1e-6)


def test_table_printed_once_by_rank_0(evals):
    _, three, _, tmp = evals
    assert_ok(three)
    out = three.stdout
    assert out.count("loss ") == 1 and out.count("| count 25") == 1, out
    assert out.count("torchrun x3 on cpu") == 1 and "test split: 25 samples, 10 classes" in out
    for k, name in enumerate(synthetic.CLASSES):
        assert out.count(f"{k:>3} {name} ") == 2, name  # its accuracy row and its confusion row
    assert "confusion matrix (rows: true class" in out
    assert f"results written to {tmp / 'three.json'}" in out


def test_confusion_matrix_image_in_the_run_tensorboard(run, evals):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    one, _, valid, _ = evals
    assert_ok(one), assert_ok(valid)
    images, scalars = {}, {}
    for path in (run / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(acc.Images(tag))
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    assert "valid/acc" in scalars  # the training run's own events are still there
    assert {"eval/test/confusion_matrix", "eval/valid/confusion_matrix"} <= set(images), sorted(images)
    event = images["eval/test/confusion_matrix"][0]
    assert event.step == 3
    png = Image.open(io.BytesIO(event.encoded_image_string))
    assert png.format == "PNG" and png.width >= 100 and png.height >= 100
    # Not blank: the matrix is drawn.
    assert np.asarray(png.convert("L")).std() > 10
    r1 = json.loads(one.stdout)
    assert [e.value for e in scalars["eval/test/acc"]] == [pytest.approx(r1["acc"])] * len(scalars["eval/test/acc"])


def test_model_pth_evaluates_like_best_pt(run, evals):
    one = evals[0]
    assert_ok(one)
    res = run_cli(["eval", "--checkpoint", str(run / "checkpoints" / "model.pth"), "--json"])
    assert_ok(res)
    r, r1 = json.loads(res.stdout), json.loads(one.stdout)
    assert r["confusion"] == r1["confusion"] and r["loss"] == pytest.approx(r1["loss"], abs=1e-7)


@pytest.mark.parametrize("case", ["garbage", "missing", "weights_alone", "split", "key"])
def test_bad_input_exits_2_with_one_line(run, tmp_path, case):
    best = str(run / "checkpoints" / "best.pt")
    args = {
        "garbage": ["--checkpoint", str(tmp_path / "garbage.pt")],
        "missing": ["--checkpoint", str(tmp_path / "nothing.pt")],
        "weights_alone": ["--checkpoint", str(tmp_path / "model.pth")],
        "split": ["--checkpoint", best, "split=train"],
        "key": ["--checkpoint", best, "data.rooot=/x"],
    }[case]
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "model.pth").write_bytes((run / "checkpoints" / "model.pth").read_bytes())  # no best.pt beside it
    res = run_cli(["eval", *args], timeout=120)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddp_train: error: "), res.stderr
    expected = {"garbage": "garbage.pt", "missing": "does not exist", "weights_alone": "no usable best.pt or last.pt",
                "split": "split: expected one of test, valid", "key": "unknown key 'data.rooot'"}[case]
    assert expected in lines[0]
    assert res.stdout == ""


def test_other_data_stops_every_rank_with_one_line(run, tmp_path):
    """Found after the process group starts (the data is loaded there): all ranks stop together."""
    from PIL import Image

    for name in ("cats", "dogs"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "train" / name / f"{i}.png")
    start = time.monotonic()
    res = run_cli(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "split=valid",
                   "data.name=image_folder", f"data.root={tmp_path}"], nproc=2, timeout=120)
    assert res.returncode != 0
    assert time.monotonic() - start < 60
    ours = [line for line in res.stderr.splitlines() if line.startswith("ddp_train: error:")]
    assert len(ours) == 1 and "are not the checkpoint's" in ours[0], res.stderr[-3000:]
    assert "cats" in ours[0] and "disk" in ours[0]


def test_help_lists_the_options():
    res = run_cli(["eval", "--help"], timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("usage: python -m ddp_train eval --checkpoint PATH")
    for option in ("--checkpoint", "--output", "--json", "--run-dir", "split=test|valid", "key=value"):
        assert option in out
