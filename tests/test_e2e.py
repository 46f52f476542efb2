"""End to end through the real CLI: torchrun with 2 gloo ranks, and the single-process fallback."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ddp_train.persistence.checkpoint import load_checkpoint
from ddp_train.config import load_config
from ddp_train.models import build_model

from .helpers import TINY, assert_ok, last_weights, rel_diff, run_cli

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

EXACT = TINY + ["data.augment=false"]
# The equivalence runs: fp64, so that rounding cannot decide the outcome on any CPU. resnet10 at
# width 16 (0.3M parameters), augmentation on, 160 synthetic images: 2 epochs of 4 SGD steps at lr 0.05.
FP64 = [*TINY, "data.synthetic_size=160", "data.augment=true", "train.precision=fp64", "train.lr=0.05",
        "model.name=resnet10", "model.width=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return out, run_cli([*EXACT, f"out_dir={out}", "run_name=two"], nproc=2)


@pytest.fixture(scope="module")
def fp64_runs(tmp_path_factory):
    """2 ranks (SyncBN, channels_last) and 1 process (contiguous), the same config otherwise."""
    out = tmp_path_factory.mktemp("fp64")
    two = run_cli([*FP64, "model.channels_last=true", f"out_dir={out}", "run_name=two"], nproc=2)
    one = run_cli([*FP64, "model.channels_last=false", f"out_dir={out}", "run_name=one"])
    return out, two, one



def test_torchrun_run_folder(runs):
    out, two = runs
    assert_ok(two)
    run = out / "two"
    assert "torchrun x2 on cpu" in two.stdout
    cfg = load_config(run / "config.yaml")
    assert cfg.train.batch_size == 32 and cfg.data.augment is False and cfg.run_name == "two"

    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    for h in metrics["history"]:
        assert set(h) == {"epoch", "train_loss", "valid_loss", "valid_acc", "lr", "img_per_s", "epoch_s", "sample_digest"}
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
    model = build_model("resnet10", 10, width=8)  # TINY's model
    model.load_state_dict(torch.load(ckpt / "model.pth"))
    best = load_checkpoint(ckpt / "best.pt")
    assert all(torch.equal(best["model"][k], v) for k, v in model.state_dict().items())


def test_console_lines_come_from_rank_0_only(runs):
    _, two = runs
    assert_ok(two)
    assert two.stdout.count("Validation loss decreased (inf --> ") == 1
    assert two.stdout.count("epoch   2 |") == 1
    assert "test | loss" in two.stdout


def test_tensorboard_one_event_file_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, two = runs
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


def test_single_process_fallback_equals_two_ranks_in_fp64(fp64_runs):
    """1 process and 2 ranks with SyncBN train the same model: the same global batches (augmentation
    included), BN over the whole batch either way, and layout (channels_last or not) does not matter.

    In fp64: in fp32 a 1e-7 rounding difference that flips the sign of a ReLU input changes that
    element's gradient, and such flips depend on the CPU and the layout (on an AVX2 EPYC, ResNet-18
    weights after 8 SGD steps differed by 2.4e-3 relative). Measured here in fp64: at most 6e-14
    relative in any tensor (1e-15 over all weights); with SyncBN off on the 2 ranks, 1.1.
    """
    out, two, one = fp64_runs
    assert_ok(one), assert_ok(two)
    assert "single x1 on cpu" in one.stdout and "torchrun x2 on cpu" in two.stdout
    assert "| fp64 |" in one.stdout and "| fp64 |" in two.stdout
    w1, w2 = last_weights(out / "one"), last_weights(out / "two")
    assert {v.dtype for v in w2.values() if v.is_floating_point()} == {torch.float64}
    assert torch.load(out / "two" / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 8
    assert rel_diff(w1, w2) < 1e-9, f"1 rank vs 2 ranks: weights differ by {rel_diff(w1, w2)} (relative L2)"
    h1 = json.loads((out / "one" / "metrics.json").read_text())["history"]
    h2 = json.loads((out / "two" / "metrics.json").read_text())["history"]
    for a, b in zip(h1, h2, strict=True):
        for key in ("train_loss", "valid_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key


def test_fp64_checkpoint_evaluates_and_predicts_with_an_fp32_model(fp64_runs, tmp_path):
    """eval and predict build an fp32 model; load_state_dict casts the float64 weights."""
    import numpy as np

    from ddp_train.persistence.checkpoint import load_checkpoint
    from ddp_train.config import config_from_dict
    from ddp_train.data import build_splits, load_dataset

    out, two, _ = fp64_runs
    assert_ok(two)
    best = out / "two" / "checkpoints" / "best.pt"
    model = build_model("resnet10", 10, width=16)
    model.load_state_dict(torch.load(out / "two" / "checkpoints" / "model.pth", weights_only=True))
    assert next(model.parameters()).dtype == torch.float32
    # eval (fp32) reproduces the run's own fp64 test metrics.
    res = run_cli(["eval", "--checkpoint", str(best), "--json"], timeout=120)
    assert_ok(res)
    report = json.loads(res.stdout[res.stdout.index("{"):])
    test = json.loads((out / "two" / "metrics.json").read_text())["test"]
    assert report["count"] == test["count"] == 32
    assert report["acc"] == test["acc"] and report["loss"] == pytest.approx(test["loss"], rel=1e-5)
    # predict (fp32) gives the fp64 model's probabilities.
    ckpt = load_checkpoint(best)
    cfg = config_from_dict(ckpt["config"])
    split = build_splits(load_dataset(cfg.data), cfg)[2]
    np.save(tmp_path / "s.npy", split.source.load(int(split.indices[0])).permute(1, 2, 0).numpy())
    res = run_cli(["predict", "--checkpoint", str(best), "--json", "--top-k", "10", str(tmp_path / "s.npy")],
                  timeout=120)
    assert_ok(res)
    got = torch.zeros(10, dtype=torch.float64)
    for t in json.loads(res.stdout)["results"][0]["top_k"]:
        got[t["index"]] = t["prob"]
    ref = build_model("resnet10", 10, width=16).double()
    ref.load_state_dict(ckpt["model"])
    from ddp_train.data.loaders import eval_loader

    dataset = load_dataset(cfg.data)
    first, _ = next(iter(eval_loader(split, 1, 0, 1, 0, False, (dataset.mean, dataset.std, torch.device("cpu")))))
    with torch.no_grad():
        want = torch.softmax(ref.eval()(first.double()), 1)[0]
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_existing_run_is_not_overwritten(fp64_runs):
    out, _, one = fp64_runs
    assert_ok(one)
    before = (out / "one" / "checkpoints" / "last.pt").read_bytes()
    res = run_cli([*FP64, f"out_dir={out}", "run_name=one"], timeout=120)
    assert res.returncode == 2
    assert "already holds a run" in res.stderr
    assert (out / "one" / "checkpoints" / "last.pt").read_bytes() == before


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_cli([*EXACT, f"out_dir={blocker}"], timeout=120)
    assert res.returncode == 2
    assert "out_dir: cannot write the run folder" in res.stderr and "epoch" not in res.stdout
