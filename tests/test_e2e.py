"""End to end through the real CLI: torchrun with 2 gloo ranks, and the single-process fallback."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ddp_train.checkpoint import load_checkpoint
from ddp_train.config import load_config
from ddp_train.models import build_model

from .helpers import TINY, assert_ok, run_cli

EXACT = TINY + ["data.augment=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    two = run_cli([*EXACT, f"out_dir={out}", "run_name=two"], nproc=2)
    one = run_cli([*EXACT, f"out_dir={out}", "run_name=one"])
    return out, two, one



def test_torchrun_run_folder(runs):
    out, two, _ = runs
    assert_ok(two)
    run = out / "two"
    assert "torchrun x2 on cpu" in two.stdout
    cfg = load_config(run / "config.yaml")
    assert cfg.train.batch_size == 32 and cfg.data.augment is False and cfg.run_name == "two"

    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    for h in metrics["history"]:
        assert set(h) == {"epoch", "train_loss", "valid_loss", "valid_acc", "lr", "img_per_s", "epoch_s"}
        assert h["img_per_s"] > 0 and 0 <= h["valid_acc"] <= 1
    test = metrics["test"]
    assert test["count"] == 40  # synthetic_size 200 -> a test set of 40, counted exactly once
    assert len(test["per_class_acc"]) == 10 and "disk" in test["per_class_acc"]

    ckpt = run / "checkpoints"
    # The newest 2 step checkpoints (epoch ends), hard links to them, best weights; no temporary files.
    assert {p.name for p in ckpt.iterdir()} == {"step-00000005.pt", "step-00000010.pt", "last.pt", "best.pt",
                                                 "model.pth"}
    assert os.path.samefile(ckpt / "last.pt", ckpt / "step-00000010.pt")
    last = load_checkpoint(ckpt / "last.pt")
    assert last["epoch"] == 2 and last["step_in_epoch"] == 0 and last["global_step"] == 2 * (160 // 32)
    assert last["config"] == cfg.to_dict() and last["dataset"]["classes"][0] == "disk"
    assert len(last["history"]) == 2
    # The notebook's way to load weights works, with no module./_orig_mod. prefixes.
    model = build_model("resnet18", 10)
    model.load_state_dict(torch.load(ckpt / "model.pth"))
    best = load_checkpoint(ckpt / "best.pt")
    assert all(torch.equal(best["model"][k], v) for k, v in model.state_dict().items())


def test_console_lines_come_from_rank_0_only(runs):
    _, two, _ = runs
    assert_ok(two)
    assert two.stdout.count("Validation loss decreased (inf --> ") == 1
    assert two.stdout.count("epoch   2 |") == 1
    assert "test | loss" in two.stdout


def test_tensorboard_one_event_file_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, two, _ = runs
    assert_ok(two)
    files = list((out / "two" / "tb").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_epoch", "valid/loss", "valid/acc", "lr", "throughput/img_per_s",
            "time/epoch_overhead_s"} <= scalars
    # What an epoch costs besides its steps (evaluation, checkpoint, logging), for a small model.
    assert all(0 < e.value < 5 for e in acc.Scalars("time/epoch_overhead_s"))
    history = json.loads((out / "two" / "metrics.json").read_text())["history"]
    assert [round(e.value, 5) for e in acc.Scalars("valid/acc")] == [round(h["valid_acc"], 5) for h in history]
    assert [e.step for e in acc.Scalars("train/loss")] == [10]  # log_every_steps 10, 10 steps in all
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(
        acc.PluginTagToContent("hparams"))
    assert "hparam/test_acc" in scalars


def test_single_process_fallback_equals_two_ranks(runs):
    """Same global batch, no augmentation, fp32: 1 process and 2 ranks train the same model.

    Equal up to float rounding, which ReLU amplifies: a 1e-7 difference that flips the sign of a
    pre-activation changes that element's gradient (with smooth activations the two agree to
    6e-6 relative). Measured: weights within 7e-4 after 10 steps; a wrong split of the batch or
    unsynchronised BN moves them by about one update (2e-3) per step.
    """
    out, two, one = runs
    assert_ok(one), assert_ok(two)
    assert "single x1 on cpu" in one.stdout
    w1 = torch.load(out / "one" / "checkpoints" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(out / "two" / "checkpoints" / "last.pt", weights_only=True)["model"]
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1 if "running" not in k and w1[k].is_floating_point())
    assert worst < 2e-3, f"1 rank vs 2 ranks: weights differ by {worst}"
    h1 = json.loads((out / "one" / "metrics.json").read_text())["history"]
    h2 = json.loads((out / "two" / "metrics.json").read_text())["history"]
    assert h1[0]["train_loss"] == pytest.approx(h2[0]["train_loss"], abs=1e-4)
    assert h1[1]["train_loss"] == pytest.approx(h2[1]["train_loss"], abs=2e-3)


def test_existing_run_is_not_overwritten(runs):
    out, _, one = runs
    assert_ok(one)
    before = (out / "one" / "checkpoints" / "last.pt").read_bytes()
    res = run_cli([*EXACT, f"out_dir={out}", "run_name=one"], timeout=120)
    assert res.returncode == 2
    assert "already holds a run" in res.stderr
    assert (out / "one" / "checkpoints" / "last.pt").read_bytes() == before


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_cli([*EXACT, f"out_dir={blocker}"], timeout=120)
    assert res.returncode == 2
    assert "out_dir: cannot write the run folder" in res.stderr and "epoch" not in res.stdout
