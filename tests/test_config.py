"""Config: precedence, every error class, and the CLI's exit code 2 with one clear line."""

from __future__ import annotations

import time

import pytest

from ddp_train.config import Config, ConfigError, config_from_dict, load_config, validate_for_world

from .helpers import run_cli


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    cfg = load_config()
    assert cfg.train.lr == 0.01 and cfg.data.valid_fraction == 0.2 and cfg.data.subset is None
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.2\n  epochs: 7\ndata:\n  name: fashion_mnist\n")
    cfg = load_config(f)
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.name) == (0.2, 7, "fashion_mnist")
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep defaults
    cfg = load_config(f, ["train.lr=0.05", "data.subset=100", "run_name=x", "data.root=null"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.subset, cfg.run_name, cfg.data.root) == (0.05, 7, 100, "x", None)
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)  # ints widen to float


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    names = {p.name for p in configs}
    assert {"default.yaml", "synthetic_resnet18.yaml", "cifar10_resnet18.yaml", "fashion_mnist_resnet18.yaml"} <= names
    for p in configs:
        load_config(p)
    # configs/default.yaml spells out exactly what runs without --config.
    assert load_config(Path(__file__).parents[1] / "configs" / "default.yaml") == load_config()
    recipe = load_config(Path(__file__).parents[1] / "configs" / "cifar10_resnet18.yaml")
    t = recipe.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.scheduler, t.lr_period, t.lr_decay, t.batch_size) == (
        "sgd", 0.01, 0.9, 5e-4, "step", 30, 0.5, 128)


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.lr=0.3", "model.name=resnet50"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=0.1"], "unknown key 'train.lrr' (did you mean lr?); valid keys in train: epochs, batch_size, lr"),
        (["trian.lr=0.1"], "unknown key 'trian' (did you mean train?); valid keys in the top level: data, model"),
        (["train.epochs=abc"], "train.epochs: expected an integer, got 'abc'"),
        (["train.epochs=2.5"], "train.epochs: expected an integer, got 2.5"),
        (["data.augment=maybe"], "data.augment: expected true or false, got 'maybe'"),
        (["model.name=resnet19"], "model.name: expected one of resnet10, resnet18, resnet34, resnet50, resnet101, resnet152"),
        (["train.scheduler=linear"], "train.scheduler: expected one of none, step, plateau, cosine, onecycle"),
        (["train.lr=-1"], "train.lr: expected a number > 0, got -1.0"),
        (["data.valid_fraction=1.5"], "data.valid_fraction: expected a number between 0 and 1"),
        (["data.subset=0"], "data.subset: expected null or an integer >= 2, got 0"),
        (["data.name=image_folder"], "data.root: expected a folder with train/<class>/ images"),
        (["train"], "override 'train' is not of the form key=value"),
        (["=3"], "empty key"),
        (["train=3"], "train: expected a mapping of train keys, got 3"),
        (["train.lr.x=3"], "keys have at most two parts"),
        (["out_dir.x=3"], "'out_dir' is not a section"),
    ],
)
def test_errors_name_the_key_and_the_expected_form(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  depth: 18\n")
    with pytest.raises(ConfigError, match=r"unknown key .model.depth. \(did you mean width\?\); valid keys in model: name, width, sync_bn"):
        load_config(unknown)


def test_global_batch_must_split_evenly():
    cfg = load_config(None, ["train.batch_size=33"])
    validate_for_world(cfg, 1)
    validate_for_world(cfg, 3)
    with pytest.raises(ConfigError, match="train.batch_size: expected a multiple of the world size 2"):
        validate_for_world(cfg, 2)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    res = run_cli(["train.lrr=0.1", f"out_dir={tmp_path}"], timeout=60)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddp_train: error: unknown key 'train.lrr'"), res.stderr
    assert not list(tmp_path.iterdir())  # nothing started


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["train.lrr=0.1", "train.batch_size=33"])
def test_torchrun_bad_config_exits_2_on_both_ranks_quickly(tmp_path, bad):
    start = time.monotonic()
    res = run_cli([bad, f"out_dir={tmp_path}"], nproc=2, timeout=120)
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s: a rank waited instead of exiting"
    # torchrun reports each failed worker; both exited with our code 2.
    assert res.stderr.count("exitcode  : 2") + res.stderr.count("exitcode: 2") >= 1, res.stderr[-3000:]
    ours = [line for line in res.stderr.splitlines() if line.startswith("ddp_train: error:")]
    assert len(ours) == 1, res.stderr[-3000:]
    assert "train.lrr" in ours[0] or "multiple of the world size 2" in ours[0]


def test_readme_key_table_is_the_generated_one():
    """The key table in docs/configuration.md is made from the field docs; edit those, then run
    python -m ddp_train.config docs/configuration.md."""
    import dataclasses
    from pathlib import Path

    from ddp_train.config import README_END, README_START, SECTIONS, key_table

    readme = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    table = readme[readme.index(README_START) + len(README_START):readme.index(README_END)].strip()
    assert table == key_table(), ("the key table in docs/configuration.md is stale: "
                                  "run python -m ddp_train.config docs/configuration.md")
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == keys