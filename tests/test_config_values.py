"""Config values: every YAML float spelling is a number, every value is range-checked where it is
parsed, and every refusal (device included) comes before anything is written or loaded."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
import torch

from ddp_train.config import MAX_SEED, ConfigError, load_config, validate_for_device

from .helpers import TINY, run_cli

# (spelling, value): YAML 1.2 floats; PyYAML's YAML 1.1 reads the ones without a dot or a signed exponent as strings.
SPELLINGS = [("1e-3", 1e-3), ("5E-4", 5e-4), (".5", 0.5), ("1.0e+2", 100.0), ("-2e-1", -0.2), ("1e3", 1000.0)]


def _load(tmp_path, how: str, key: str, text: str):
    section, name = key.split(".")
    if how == "file":
        f = tmp_path / "c.yaml"
        f.write_text(f"{section}:\n  {name}: {text}\n")
        return getattr(getattr(load_config(f), section), name)
    return getattr(getattr(load_config(None, [f"{key}={text}"]), section), name)


@pytest.mark.parametrize("how", ["file", "override"])
@pytest.mark.parametrize("text, value", SPELLINGS)
def test_every_yaml_float_spelling_is_a_number(tmp_path, how, text, value):
    if value > 0:
        lr = _load(tmp_path, how, "train.lr", text)
        assert lr == value and isinstance(lr, float)
    else:  # no float key takes a negative value: the refusal shows it was read as the number
        with pytest.raises(ConfigError, match=re.escape(f"train.lr: expected a number > 0, got {value!r}")):
            _load(tmp_path, how, "train.lr", text)


@pytest.mark.parametrize("how", ["file", "override"])
def test_ints_stay_ints_and_a_float_spelling_is_refused_for_an_int_key(tmp_path, how):
    epochs = _load(tmp_path, how, "train.epochs", "10")
    assert epochs == 10 and type(epochs) is int
    # 1e3 is the float 1000.0: refused for an integer key (an int is written as one), with its value.
    with pytest.raises(ConfigError, match=re.escape("train.epochs: expected an integer, got 1000.0")):
        _load(tmp_path, how, "train.epochs", "1e3")


def test_quoted_floats_stay_strings(tmp_path):
    assert load_config(None, ['run_name="1e-3"']).run_name == "1e-3"
    f = tmp_path / "c.yaml"
    f.write_text("run_name: '5E-4'\n")
    assert load_config(f).run_name == "5E-4"
    with pytest.raises(ConfigError, match=re.escape("train.lr: expected a number, got '1e-3'")):
        load_config(None, ['train.lr="1e-3"'])


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**64, 10**30])
def test_seeds_out_of_range_are_refused(seed):
    with pytest.raises(ConfigError, match=re.escape(f"train.seed: expected an integer from 0 to 2**63-1 "
                                                    f"({MAX_SEED}), got {seed}")):
        load_config(None, [f"train.seed={seed}"])


def test_the_extreme_seeds_run():
    """Seeds 0 and 2**63-1 go through every use of the seed: split, samplers, loader, augmentation, ranks."""
    from ddp_train.data import build_data, load_dataset
    from ddp_train.distributed.context import DistContext
    from ddp_train.seeding import rank_seed, seed_all

    for seed in (0, MAX_SEED):
        cfg = load_config(None, [*TINY, "data.synthetic_size=40", "train.batch_size=8", "data.augment=true",
                                 "data.device_resident=false", f"train.seed={seed}"])
        seed_all(seed)
        seed_all(rank_seed(seed, 1))
        data = build_data(load_dataset(cfg.data), cfg, DistContext("single", 0, 0, 1, torch.device("cpu")))
        data.sampler.set_epoch(3)
        images, labels = next(iter(data.train))
        assert images.shape[0] == 8 and labels.shape == (8,)


@pytest.mark.parametrize("timeout", [0, 7 * 24 * 3600 + 1, 10**20])
def test_timeouts_are_capped_at_seven_days(timeout):
    assert load_config(None, ["dist.timeout_s=604800"]).dist.timeout_s == 604800
    with pytest.raises(ConfigError, match=re.escape(f"dist.timeout_s: expected an integer from 1 to 604800 "
                                                    f"(7 days), got {timeout}")):
        load_config(None, [f"dist.timeout_s={timeout}"])


@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "train.momentum", "data.valid_fraction",
                                 "dist.bucket_cap_mb", "train.warmup_epochs"])
@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan"])
def test_numbers_must_be_finite(tmp_path, key, text):
    for how in ("file", "override"):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: expected a finite number, got ")):
            _load(tmp_path, how, key, text)


@pytest.mark.parametrize("bad, message", [
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("dist.timeout_s=100000000000000000000", "dist.timeout_s: expected an integer from 1 to 604800 (7 days)"),
    ("train.seed=-1", "train.seed: expected an integer from 0 to 2**63-1"),
])
def test_cli_out_of_range_value_exits_2_with_one_line(tmp_path, bad, message):
    res = run_cli([*TINY, bad, f"out_dir={tmp_path / 'out'}"], timeout=60)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ddp_train: error: {message}"), res.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_out_of_range_labels_are_refused_when_the_data_is_loaded(fashion_root, tmp_path):
    from ddp_train.config import DataConfig
    from ddp_train.data import DataError, load_dataset
    from ddp_train.data.datasets import check_labels

    root = tmp_path / "fm"
    root.mkdir()
    for f in fashion_root.glob("*.gz"):
        (root / f.name).symlink_to(f)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    data[8 + 7] = 10  # one past the last class
    labels.unlink()
    labels.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="fashion_mnist", root=str(root), subset=100))
    assert str(err.value) == (f"data: {labels} holds label 10 at index 7, but fashion_mnist has 10 classes; "
                              f"the file is damaged, fetch it again")
    # cifar10's targets go through the same check (its files carry checksums: no damaged copy to test with).
    with pytest.raises(DataError, match=re.escape("data: x holds label -1 at index 2 (2 labels out of range in all), "
                                                  "but cifar10 has 10 classes")):
        check_labels(np.array([0, 9, -1, 12]), 10, "x", "cifar10")
    check_labels(np.array([0, 9, 3]), 10, "x", "cifar10")


def test_fp16_is_refused_for_cpu_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="train.precision: fp16 on CPU is emulated"):
        validate_for_device(load_config(None, ["train.precision=fp16"]), "cpu")
    validate_for_device(load_config(None, ["train.precision=fp16"]), "cuda")
    validate_for_device(load_config(None, ["train.precision=bf16"]), "cpu")
    validate_for_device(load_config(None, ["train.precision=fp64"]), "cpu")
    with pytest.raises(ConfigError, match="train.precision: fp64 needs float64, which Apple's MPS devices lack"):
        validate_for_device(load_config(None, ["train.precision=fp64"]), "mps")
    if torch.cuda.is_available():
        pytest.skip("the CLI part needs a machine without CUDA")
    res = run_cli([*TINY, "train.precision=fp16", f"out_dir={tmp_path / 'out'}", "run_name=r"], timeout=60)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp_train: error: train.precision: fp16 on CPU"), res.stderr
    assert not (tmp_path / "out").exists(), "the run folder was written before the refusal"
