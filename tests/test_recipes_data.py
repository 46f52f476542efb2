"""The recipe's augmentation: mixup and cutmix, TrivialAugmentWide/RandAugment, random erasing (docs/recipes.md).

In-process: the mixed batches of both input paths are the same at world size 1 and 2 (bit for bit),
equal to the hand mix of the global batch's images by the step's pairing, and a resumed epoch
(the sampler's skip) repeats them; the steps' draws follow data.mix_prob and data.mix_switch_prob;
TrivialAugmentWide and RandAugment are torchvision's, applied per sample under its (seed, epoch, sample)
seed. Through the CLI under torchrun: fp64, 1 process vs 2 ranks with SyncBN and mixup/cutmix/erasing on
(device path) agree to 1e-9, with the sample digest of the unmixed sample order; SIGTERM + ``resume=auto``
repeats an uninterrupted run bit for bit on both paths (DataLoader: TrivialAugment, erasing,
mixup/cutmix, workers).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from ddp_train.config import ConfigError, load_config
from ddp_train.data import build_data, load_dataset
from ddp_train.distributed.context import DistContext

from .helpers import TINY, assert_ok, last_weights, rel_diff, run_cli

# Every augmentation at once; 240 training images, 7 global batches of 32 an epoch.
SMALL = ["data.synthetic_size=300", "train.batch_size=32", "data.num_workers=0", "data.augment=true",
         "data.random_erase=0.5", "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "data.mix_prob=0.9"]


@pytest.mark.parametrize("override, message", [
    ("data.auto_augment=aa", "data.auto_augment: expected one of none, ta_wide, ra"),
    ("data.ra_num_ops=0", "data.ra_num_ops: expected an integer >= 1"),
    ("data.ra_magnitude=31", "data.ra_magnitude: expected an integer from 0 to 30"),
    ("data.random_erase=1.5", "data.random_erase: expected a probability in [0, 1]"),
    ("data.erase_max_area=1", "data.erase_min_area: expected 0 < data.erase_min_area <= data.erase_max_area < 1"),
    ("data.erase_min_area=0", "data.erase_min_area: expected 0 < data.erase_min_area <= data.erase_max_area < 1"),
    ("data.erase_max_aspect=0.5", "data.erase_max_aspect: expected a number >= 1"),
    ("data.mixup_alpha=-1", "data.mixup_alpha: expected 0 (off) or a number > 0"),
    ("data.cutmix_alpha=-1", "data.cutmix_alpha: expected 0 (off) or a number > 0"),
    ("data.mix_prob=2", "data.mix_prob: expected a probability in [0, 1]"),
    ("data.mix_switch_prob=-0.1", "data.mix_switch_prob: expected a probability in [0, 1]"),
    ("data.mixup_alpha=nan", "data.mixup_alpha: expected a number"),
])
def test_augmentation_keys_refuse_bad_values_with_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_auto_augment_on_the_device_path_is_refused_with_one_line(policy, tmp_path):
    """data.device_resident=true cannot run TrivialAugment or RandAugment (per-sample operations): exit 2, one
    line, never a silent skip; with auto the run takes the DataLoader path and says why."""
    res = run_cli([f"data.auto_augment={policy}", "data.device_resident=true", f"out_dir={tmp_path}"], timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp_train: error: data.auto_augment:") \
        and "set data.device_resident=false" in lines[0] and lines[0].endswith(f"got '{policy}'"), res.stderr
    cfg = load_config(None, [*SMALL, f"data.auto_augment={policy}"])
    bundle = build_data(load_dataset(cfg.data), cfg, _ctx())
    assert not bundle.device_resident and f"data.auto_augment={policy}" in bundle.input_path


def _ctx(rank: int = 0, world: int = 1) -> DistContext:
    return DistContext("torchrun" if world > 1 else "single", rank, rank, world, torch.device("cpu"),
                       "gloo" if world > 1 else None)


def _epoch(overrides: list[str], rank: int, world: int, epoch: int = 3, skip_batches: int = 0) -> list:
    cfg = load_config(None, [*SMALL, *overrides])
    bundle = build_data(load_dataset(cfg.data), cfg, _ctx(rank, world))
    bundle.train.sampler.set_epoch(epoch)
    bundle.train.sampler.skip = skip_batches * cfg.train.per_rank_batch(world)
    return list(bundle.train)


@pytest.mark.parametrize("path", [
    ["data.device_resident=false", "data.auto_augment=ta_wide"],
    ["data.device_resident=true"],
])
def test_mixed_batches_do_not_depend_on_the_world_size_and_resume_exactly(path):
    """Global batch k at world size 1 is rank r's batch k at world size 2, rows j*2 + r, bit for bit
    (images and soft targets); it is the hand mix, by the step's pairing of global positions, of the
    same run's unmixed images; a resumed epoch (skip 3 batches) yields the uninterrupted batches 3..6."""
    one = _epoch(path, 0, 1)
    two = [_epoch(path, r, 2) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 7
    for k, (x, t) in enumerate(one):
        assert t.shape == (32, 10) and torch.allclose(t.sum(1), torch.ones(32))
        for r in range(2):
            assert torch.equal(x[r::2], two[r][k][0]) and torch.equal(t[r::2], two[r][k][1]), (k, r)
    # The hand mix of the unmixed batch: lambda and the box of the step, partners by global position.
    from ddp_train.data.mixing import Mixing

    plain = _epoch([*path, "data.mixup_alpha=0", "data.cutmix_alpha=0"], 0, 1)
    cfg = load_config(None, [*SMALL, *path])
    mixing = Mixing.from_config(cfg.data, 10, 32, cfg.train.seed)
    images = torch.cat([x for x, _ in plain])  # this epoch's samples in global order
    labels = torch.cat([y for _, y in plain])
    kinds = set()
    for k, (x, t) in enumerate(one):
        partner = torch.from_numpy(mixing.pairing(3, k)) + 32 * k
        own, other = images[32 * k:32 * (k + 1)], images[partner]
        lam, box = mixing.draw(3, k, x.shape[-2], x.shape[-1])
        kinds.add("none" if lam == 1.0 else "mixup" if box is None else "cutmix")
        if box is None:  # mixup (or no mixing: lam 1): the blend
            want = own * lam + other * (1.0 - lam)
        else:  # cutmix: the partner's box pasted, lambda the area kept
            y0, y1, x0, x1 = box
            want = own.clone()
            want[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
            assert 0 < (y1 - y0) * (x1 - x0) and lam == 1 - (y1 - y0) * (x1 - x0) / (32 * 32)
        assert torch.equal(x, want), k
        hot = torch.nn.functional.one_hot(labels[32 * k:32 * (k + 1)], 10).float()
        assert torch.equal(t, hot * lam + torch.nn.functional.one_hot(labels[partner], 10).float() * (1 - lam))
    assert {"mixup", "cutmix"} <= kinds, kinds
    resumed = _epoch(path, 1, 2, skip_batches=3)
    assert len(resumed) == 4
    for (x, t), (x2, t2) in zip(two[1][3:], resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(t, t2)


def test_the_draws_follow_mix_prob_switch_prob_and_beta():
    """Over 4000 steps: data.mix_prob of them mixed, data.mix_switch_prob of those cutmix, mixup's lambda
    Beta(alpha, alpha) (mean 1/2, variance 1/(4(2 alpha + 1))); one kind alone when the other alpha is 0."""
    import numpy as np

    from ddp_train.data.mixing import Mixing

    def draws(mixup: float, cutmix: float, prob: float, switch: float) -> list:
        mixing = Mixing(mixup, cutmix, prob, switch, 10, 32, seed=7)
        return [mixing.draw(0, s, 32, 32) for s in range(4000)]

    got = draws(0.4, 1.0, 0.7, 0.3)
    mixed = [d for d in got if d.lam != 1.0 or d.box is not None]
    cut = [d for d in mixed if d.box is not None]
    assert abs(len(mixed) / 4000 - 0.7) < 0.03 and abs(len(cut) / len(mixed) - 0.3) < 0.03
    lam = np.array([d.lam for d in mixed if d.box is None])
    assert abs(lam.mean() - 0.5) < 0.02 and abs(lam.var() / (1 / (4 * 1.8)) - 1) < 0.1
    assert all(d.box is None for d in draws(0.4, 0.0, 1.0, 0.9))
    assert all(d.box is not None for d in draws(0.0, 1.0, 1.0, 0.1))


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_auto_augment_is_torchvisions_per_sample_under_its_seed(policy):
    """The DataLoader path's uint8 batches with data.auto_augment are torchvision's TrivialAugmentWide or
    RandAugment(data.ra_num_ops, data.ra_magnitude) applied to each sample under the torch seed of
    (train.seed, epoch, sample), whichever rank loads it (rank 1 of 2 here)."""
    from torchvision.transforms import v2

    from ddp_train.data.loaders import sample_seed

    keys = [*SMALL, "data.mixup_alpha=0", "data.cutmix_alpha=0", "data.augment=false", "data.random_erase=0",
            "data.device_resident=false", f"data.auto_augment={policy}", "data.ra_num_ops=3", "data.ra_magnitude=20"]
    cfg = load_config(None, keys)
    bundle = build_data(load_dataset(cfg.data), cfg, _ctx(1, 2))
    bundle.train.sampler.set_epoch(3)
    loader = bundle.train.loader  # the uint8 batches, before the rank normalises them
    split = bundle.train.dataset
    policy_fn = v2.TrivialAugmentWide() if policy == "ta_wide" else v2.RandAugment(num_ops=3, magnitude=20)
    changed = 0
    for k, (pixels, _) in enumerate(loader):
        if k == 2:
            break
        positions = bundle.sampler.global_batch(k, 32)[1::2]  # rank 1's half of global batch k
        for image, pos in zip(pixels, positions, strict=True):
            index = int(split.indices[pos])
            plain = split.source.load(index)
            torch.manual_seed(sample_seed(cfg.train.seed, 3, index))
            assert torch.equal(image, policy_fn(plain)), (k, index)
            changed += not torch.equal(image, plain)
    assert changed > 16  # most images are changed (some operations are the identity, or change nothing)


def test_erasing_and_trivial_augment_are_drawn_per_sample_and_erasing_zeroes_rectangles():
    """Without mixing, the DataLoader path's batches with TrivialAugment and erasing: the same at world size 1
    and 2, and some images hold an erased rectangle (zeros on the normalised image) that the run without
    erasing lacks; the device path erases rectangles too."""
    base = ["data.mixup_alpha=0", "data.cutmix_alpha=0", "data.augment=false"]
    loader = ["data.device_resident=false", "data.auto_augment=ta_wide"]
    one = _epoch([*base, *loader], 0, 1)
    two = [_epoch([*base, *loader], r, 2) for r in range(2)]
    for k, (x, _) in enumerate(one):
        for r in range(2):
            assert torch.equal(x[r::2], two[r][k][0])
    for path in (loader, ["data.device_resident=true"]):
        erased = torch.cat([x for x, _ in _epoch([*base, *path], 0, 1)])
        kept = torch.cat([x for x, _ in _epoch([*base, *path, "data.random_erase=0"], 0, 1)])
        changed = (erased != kept).flatten(1).any(1)
        assert 0.2 < changed.float().mean() < 0.8  # probability 0.5 (and some draws fit no rectangle)
        assert bool((erased[changed] == 0).flatten(1).any(1).all())


# fp64: resnet10 width 16, 160 synthetic images (128 train), 2 epochs of 4 steps of 32, SyncBN on the 2 ranks.
FP64 = [*TINY, "data.synthetic_size=160", "train.precision=fp64", "train.lr=0.05", "model.width=16",
        "data.augment=true", "data.random_erase=0.5", "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0",
        "train.label_smoothing=0.1", "data.device_resident=true", "checkpoint.every_steps=2",
        "checkpoint.keep=100"]
# The DataLoader path with everything per sample in 2 loader workers (fp32: it is compared with itself).
LOADER = [*TINY, "data.augment=true", "data.auto_augment=ta_wide", "data.random_erase=0.5",
          "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "train.label_smoothing=0.1",
          "data.device_resident=false", "data.num_workers=2", "checkpoint.every_steps=2", "checkpoint.keep=100"]


def _history(run: Path) -> list[dict]:
    rows = json.loads((run / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k not in ("epoch_s", "img_per_s")} for r in rows]  # timings differ


def _sigterm_then_resume(args: list[str], tmp_path: Path) -> Path:
    """The run stopped by SIGTERM after its step-2 checkpoint, then finished with ``resume=auto``."""
    from .test_resume import _start, _wait_for

    args = [*args, f"out_dir={tmp_path}", "run_name=r"]
    proc = _start(args)
    _wait_for(tmp_path / "r" / "checkpoints" / "step-00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "ddp_train: stopped by SIGTERM; checkpoint" in err, err[-3000:]
    res = run_cli([*args, "resume=auto"], nproc=2)
    assert_ok(res)
    assert "resumed from epoch" in res.stdout
    return tmp_path / "r"


def _assert_same_run(run: Path, ref: Path) -> None:
    a, b = last_weights(run), last_weights(ref)
    different = [k for k in b if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run in {different[:5]}"
    assert _history(run) == _history(ref)


@pytest.mark.slow
def test_fp64_one_vs_two_ranks_with_mixing_and_sigterm_resume_on_the_device_path(tmp_path):
    """The mixed run is the same at world size 1 and 2 (SyncBN, fp64, <= 1e-9), and a SIGTERM + resume=auto
    run repeats the 2-rank run bit for bit."""
    two = run_cli([*FP64, f"out_dir={tmp_path}", "run_name=two"], nproc=2)
    assert_ok(two)
    one = run_cli([*FP64, f"out_dir={tmp_path}", "run_name=one"])
    assert_ok(one)
    w1, w2 = last_weights(tmp_path / "one"), last_weights(tmp_path / "two")
    assert w2["fc.weight"].dtype == torch.float64
    assert rel_diff(w1, w2) < 1e-9, f"1 rank vs 2 ranks: weights differ by {rel_diff(w1, w2)} (relative L2)"
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["sample_digest"] == b["sample_digest"]
    # The digest names the samples each step trains on, in the sampler's order: the partners are not in it.
    from ddp_train.persistence.state import fold_digest

    cfg = load_config(None, FP64)
    bundle = build_data(load_dataset(cfg.data), cfg, _ctx())
    digest = ""
    for epoch, record in enumerate(_history(tmp_path / "two")):
        bundle.sampler.set_epoch(epoch)
        for k in range(len(bundle.train)):
            digest = fold_digest(digest, bundle.global_batch_ids(k, 32))
        assert record["sample_digest"] == digest, epoch
    _assert_same_run(_sigterm_then_resume(FP64, tmp_path / "resumed"), tmp_path / "two")


@pytest.mark.slow
def test_sigterm_resume_is_exact_with_trivial_augment_erasing_and_mixing_in_loader_workers(tmp_path):
    ref = run_cli([*LOADER, f"out_dir={tmp_path}", "run_name=ref"], nproc=2)
    assert_ok(ref)
    assert "2 loader workers (data.device_resident=false)" in ref.stdout
    _assert_same_run(_sigterm_then_resume(LOADER, tmp_path / "resumed"), tmp_path / "ref")
