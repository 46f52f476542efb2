"""Typed, documented, validated configuration.

Config flows one way: defaults -> YAML file -> ``key=value`` overrides -> a validated
:class:`Config`, which is then passed explicitly. Every field carries its documentation in
``metadata["doc"]``; errors name the dotted key and the expected form.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError  # also importable from here, as it was before errors.py


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or a bad value."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


DatasetName = Literal["synthetic", "fashion_mnist", "cifar10", "image_folder"]
ModelName = Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


@dataclass
class DataConfig:
    """Which data, how it is split, augmented and loaded."""

    name: DatasetName = _f(
        "synthetic",
        "dataset: synthetic (built-in, generated from a fixed seed, offline), fashion_mnist "
        "(IDX .gz files), cifar10 (torchvision), image_folder (ROOT/train/<class>/*, optional "
        "val/ and test/)",
    )
    root: str | None = _f(
        None,
        "folder holding the data; null means the dataset's usual place "
        "(/usr/share/datasets/fashion-mnist for fashion_mnist, ./data/cifar10 for cifar10)",
    )
    download: bool = _f(False, "cifar10 only: download the dataset into root when it is missing")
    valid_fraction: float = _f(
        0.2,
        "fraction of the training set held out for validation, drawn with train.seed alone "
        "(ignored by image_folder when it has a val/ folder)",
    )
    subset: int | None = _f(
        None,
        "use only the first N samples of the training set and of the test set (before the "
        "train/valid split), for quick runs; null uses everything",
    )
    augment: bool = _f(
        False,
        "train-time augmentation: a random crop (data.crop), horizontal flip, and a cutout square "
        "(data.cutout) on the normalised image; with the defaults, the seed recipe's augmentation",
    )
    crop: Literal["resized", "pad"] = _f(
        "resized",
        "augment's crop: resized (the seed recipe's: resize 1.25x, random-resized-crop of 64-100% of the "
        "area back to the image size) or pad (pad data.crop_padding black pixels, random crop)",
    )
    crop_padding: int = _f(4, "crop=pad: pixels of padding on each side")
    cutout: int | None = _f(
        None, "augment's cutout: side of the zeroed square; null is half the image side (the seed recipe's), 0 none"
    )
    auto_augment: Literal["none", "ta_wide", "ra"] = _f(
        "none",
        "per-sample automatic augmentation on the uint8 image after the crop and flip (torchvision's "
        "--auto-augment): ta_wide (TrivialAugmentWide), ra (RandAugment, data.ra_num_ops and data.ra_magnitude) or "
        "none; DataLoader path only (see docs/recipes.md: \"TrivialAugment and RandAugment\")",
    )
    ra_num_ops: int = _f(2, "auto_augment=ra: operations per image")
    ra_magnitude: int = _f(9, "auto_augment=ra: magnitude of each operation, 0 to 30 (torchvision's bins)")
    random_erase: float = _f(
        0.0,
        "probability of random erasing (torchvision's RandomErasing, value 0 on the normalised image) per "
        "training image; 0: off; both input paths (see docs/recipes.md: \"Random erasing\")",
    )
    erase_min_area: float = _f(0.02, "random erasing: smallest erased fraction of the image area")
    erase_max_area: float = _f(0.33, "random erasing: largest erased fraction of the image area")
    erase_max_aspect: float = _f(3.3, "random erasing: aspect ratios (h/w) are drawn log-uniformly in [1/this, this]")
    mixup_alpha: float = _f(
        0.0,
        "mixup: Beta(alpha, alpha) mixing of pairs of training images and their (label-smoothed) targets; "
        "0: off (see docs/recipes.md: \"Mixup and CutMix\")",
    )
    cutmix_alpha: float = _f(0.0, "cutmix: Beta(alpha, alpha) area of the pasted box; 0: off")
    mix_prob: float = _f(1.0, "mixup/cutmix: probability that a step's global batch is mixed at all")
    mix_switch_prob: float = _f(
        0.5, "mixup and cutmix both on: probability that a mixed step uses cutmix rather than mixup"
    )
    device_resident: Literal["auto"] | bool = _f(
        "auto",
        "keep the uint8 images on the training device and batch, augment and normalise them there "
        "(same sample order, splits and resume as the DataLoader path; no loader workers): auto is on "
        "for in-memory datasets (synthetic, fashion_mnist, cifar10), on CPU always (the images are "
        "already in memory and used without a copy), on CUDA when they take under a quarter of the "
        "free GPU memory; image_folder always uses the DataLoader",
    )
    num_workers: int = _f(2, "DataLoader worker processes per rank (0 loads in the training process)")
    image_size: int = _f(
        32, "image_folder only: images are resized to this square size (in-memory datasets keep theirs)"
    )
    synthetic_size: int = _f(
        4000, "synthetic only: number of training images generated (the test set is a fifth of it)"
    )


@dataclass
class ModelConfig:
    """The network."""

    name: ModelName = _f(
        "resnet10",
        "torchvision ResNet with the small-image 3x3 stem and no max-pool (resnet10: one BasicBlock per stage)",
    )
    width: int = _f(16, "channels of the first stage (each later stage doubles them); torchvision's ResNets have 64")
    sync_bn: bool = _f(
        True,
        "synchronise batch-norm statistics over the global batch when world size > 1 "
        "(torch.nn.SyncBatchNorm on CUDA, ddp_train's own on CPU/gloo)",
    )
    zero_init_residual: bool = _f(False, "zero-initialise the last BN of each residual branch")
    channels_last: bool = _f(True, "use the channels_last memory format (faster on CUDA and on CPU)")
    init_from: str | None = _f(
        None,
        "fine-tune: start from these weights (this project's model.pth or a .pt checkpoint, or a plain "
        "torchvision-style state dict; module./_orig_mod. prefixes are stripped); fc is re-initialised when "
        "the number of classes differs, any other mismatch stops the run; null starts from scratch",
    )


@dataclass
class TrainConfig:
    """Optimisation."""

    def per_rank_batch(self, world_size: int) -> int:
        """The samples each rank computes per step: ``batch_size`` split evenly (``validate_for_world`` checks
        that it divides)."""
        return self.batch_size // world_size

    epochs: int = _f(3, "number of epochs")
    batch_size: int = _f(
        64,
        "GLOBAL batch size, split evenly across ranks, so a config means the same optimisation "
        "at any world size; must be divisible by the world size",
    )
    lr: float = _f(0.01, "peak learning rate (for the global batch)")
    micro_batch_size: int | None = _f(
        None,
        "gradient accumulation: each rank runs its batch (train.batch_size / world size) as forward-backward "
        "passes over micro-batches of this many samples, one optimizer step (and one gradient all-reduce) per "
        "batch; must divide the per-rank batch. The gradient and the reported loss are the whole batch's; batch "
        "norm normalises each micro-batch (see docs/configuration.md: \"Gradient accumulation\"); dist.static_graph "
        "is then off (torch's no_sync fails under it); null: no accumulation",
    )
    optimizer: Literal["sgd", "adamw"] = _f("adamw", "sgd (with momentum) or adamw")
    momentum: float = _f(
        0.9, "SGD momentum, or AdamW's beta1; the optimizer keeps it at every step unless train.cycle_momentum > 0"
    )
    cycle_momentum: float = _f(
        0.0,
        "onecycle: momentum goes from train.momentum down to train.momentum - X at the peak lr and back "
        "(AdamW: beta1); 0 = off, the momentum stays train.momentum (torch's OneCycleLR cycles 0.95-0.85 by default)",
    )
    nesterov: bool = _f(False, "SGD: use Nesterov momentum")
    weight_decay: float = _f(0.05, "weight decay")
    label_smoothing: float = _f(0.0, "label smoothing of the training loss (evaluation uses plain cross-entropy)")
    scheduler: Literal["none", "step", "plateau", "cosine", "onecycle"] = _f(
        "onecycle",
        "learning-rate schedule: step (x lr_decay every lr_period epochs), plateau (x0.1 after "
        "plateau_patience epochs without a lower valid loss), cosine (per step, after linear "
        "warmup), onecycle (per step), none",
    )
    lr_period: int = _f(30, "step: epochs between decays")
    lr_decay: float = _f(0.5, "step: decay factor")
    plateau_patience: int = _f(10, "plateau: epochs without improvement before the lr drops")
    warmup_epochs: float = _f(0.0, "cosine: linear warmup length in epochs (may be fractional)")
    seed: int = _f(42, "seed of the model initialisation, the train/valid split and the sample order (0 to 2**63-1)")
    deterministic: bool = _f(
        False, "deterministic algorithms (cudnn.deterministic, no benchmark); slower on GPU"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp64"] = _f(
        "auto",
        "autocast precision: auto is bf16 on CUDA GPUs that support it (fp16 on older ones) and on "
        "CPUs with native bf16 (AVX512-BF16/AMX), else fp32; fp16 uses a gradient scaler, saved in "
        "checkpoints (refused on CPU, where fp16 is emulated); fp64 trains in float64 throughout (model, "
        "batches, SyncBN; no autocast), a slower verification mode: N ranks then equal one process up to "
        "float64 rounding",
    )
    compile: bool = _f(
        False,
        "torch.compile the (DDP-wrapped) model; the first steps wait for the compilation",
    )
    test_weights: Literal["best", "final"] = _f(
        "best",
        "weights the test split is evaluated with: best (lowest valid loss, those the seed recipe saves) or final",
    )
    log_every_steps: int = _f(10, "log the global training loss to TensorBoard every N steps")
    ema_decay: float = _f(
        0.0,
        "EMA of the weights (torchvision's --model-ema, timm's ModelEmaV3): after every train.ema_every_steps "
        "optimizer steps, ema = decay * ema + (1 - decay) * weights, BN running statistics averaged too; saved in "
        "every checkpoint (see docs/recipes.md: \"EMA of the weights\"); 0: off, else in (0, 1), e.g. 0.999",
    )
    ema_every_steps: int = _f(1, "EMA: average the weights in every N optimizer steps (the decay applies per update)")
    ema_warmup: bool = _f(
        False, "EMA warm-up (timm's): update t uses min(train.ema_decay, 1 - (1 + t)^(-2/3)), so the first copies"
    )
    eval_weights: Literal["trained", "ema"] = _f(
        "trained",
        "weights that validation, best selection, the test and the exported model.pth use: trained or ema "
        "(needs train.ema_decay > 0)",
    )
    clip_grad_norm: float | None = _f(
        None,
        "clip the gradient to this global L2 norm, once per optimizer step (after the micro-batches and the DDP "
        "all-reduce, after unscaling under fp16); the norm before clipping is logged (train/grad_norm, the epoch "
        "record's grad_norm); null: off",
    )
    early_stop_patience: int = _f(
        0,
        "early stopping: end training after this many epochs in a row without an improvement of "
        "train.early_stop_metric by more than train.early_stop_min_delta, then test; 0: off",
    )
    early_stop_min_delta: float = _f(0.0, "early stopping: the smallest change that counts as an improvement")
    early_stop_metric: Literal["valid_loss", "valid_acc"] = _f(
        "valid_loss", "early stopping's metric: valid_loss (lower is better) or valid_acc (higher is better)"
    )


@dataclass
class DistConfig:
    """Process group settings."""

    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "auto: nccl on CUDA, gloo otherwise")
    timeout_s: int = _f(600, "process-group timeout in seconds (how long a collective may wait; at most 7 days)")
    hang_timeout_s: int = _f(
        300,
        "hang watchdog: when no rank completes a step or evaluation batch for this many seconds, name the "
        "rank(s) that stopped, write every live rank's stacks to <run>/hang/ and end the job (exit 3); 0: off. "
        "Keep it below dist.timeout_s",
    )
    straggler_every_steps: int = _f(
        50,
        "every N steps the ranks share their data-loading and compute time per step (TensorBoard ranks/*) "
        "and a slow rank is named; 0: off",
    )
    straggler_factor: float = _f(
        1.5, "a rank is named a straggler when its data or compute time per step exceeds this times the "
             "median of the other ranks', two windows in a row")
    bucket_cap_mb: float = _f(25.0, "DDP gradient bucket size in MiB (bigger: fewer, larger all-reduces)")
    gradient_as_bucket_view: bool = _f(True, "DDP: gradients are views into the all-reduce buckets (saves a copy)")
    static_graph: bool = _f(
        True,
        "DDP static_graph: the set of used parameters never changes, as in these ResNets (lets DDP skip "
        "work)",
    )


@dataclass
class CheckpointConfig:
    """When full checkpoints are written and how many are kept."""

    every_steps: int = _f(0, "also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends)")
    keep: int = _f(2, "keep the newest N step checkpoints (best.pt is kept besides)")


@dataclass
class TrackConfig:
    """Where rank 0 reports the run besides the console and metrics.json (docs/tracking.md), and what is measured."""

    trackers: str = _f(
        "tensorboard",
        "comma-separated, any of tensorboard, wandb, mlflow (e.g. tensorboard,wandb), or none; wandb and mlflow "
        "are the extras ddp_train[wandb] and ddp_train[mlflow]; a resumed run continues the same tracker run",
    )
    wandb_project: str = _f("ddp_train", "wandb: the W&B project")
    wandb_mode: Literal["offline", "online"] = _f(
        "offline", "wandb: offline (files under <run>/wandb, no network; `wandb sync` uploads them later) or online"
    )
    mlflow_uri: str | None = _f(
        None, "mlflow: the tracking URI (http://host:port, sqlite:///path.db, ...); null: sqlite:///<run>/mlflow.db"
    )
    mlflow_experiment: str = _f("ddp_train", "mlflow: the experiment's name")
    # str | int: YAML reads profile_steps=12 and profile_ranks=1 as numbers.
    profile_steps: str | int | None = _f(
        None,
        "torch.profiler window: global steps A-B (e.g. 10-15) or one step, traced on track.profile_ranks into "
        "<run>/profile/ as gzipped Chrome-trace JSON (Perfetto, TensorBoard's profile plugin); null: off, no cost",
    )
    profile_ranks: str | int = _f("0", "ranks the profiler window traces: comma-separated (e.g. 0,1) or all")
    peak_tflops: float | None = _f(
        None,
        "peak TFLOP/s of one rank's device for the MFU figure; null: a known GPU's bf16/fp16 dense peak, and on "
        "CPU (or an unknown GPU) no MFU, only the achieved GFLOP/s",
    )


TRACKERS = ("tensorboard", "wandb", "mlflow")
MLFLOW_SCHEMES = ("", "http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def tracker_names(track: TrackConfig) -> list[str]:
    """The trackers ``track.trackers`` names, in order (``none``: the empty list)."""
    names = [n.strip() for n in track.trackers.split(",") if n.strip()]
    return [] if names == ["none"] else names


def profile_window(track: TrackConfig) -> tuple[int, int] | None:
    """``track.profile_steps`` as (first, last) global steps; None when off."""
    if track.profile_steps is None:
        return None
    first, _, last = str(track.profile_steps).partition("-")
    return int(first), int(last or first)


def _validate_track(track: TrackConfig) -> None:
    """The track section's values (range checks, one line each)."""
    names = tracker_names(track)
    _check(bool(names or track.trackers.strip() == "none") and all(n in TRACKERS for n in names)
           and len(set(names)) == len(names), "track.trackers",
           "comma-separated names from tensorboard, wandb, mlflow, each once (or none)", track.trackers)
    _check(bool(track.wandb_project.strip()) and "/" not in track.wandb_project, "track.wandb_project",
           "a non-empty project name without '/'", track.wandb_project)
    # A password in the URI would be written to config.yaml, trackers.json and the trackers' params (shown hidden).
    password = re.compile(r"(://[^/@:]*:)[^/@]*@")
    _check(track.mlflow_uri is None or not password.search(track.mlflow_uri), "track.mlflow_uri",
           "a URI without a password (it would be written into the run folder): set MLFLOW_TRACKING_USERNAME and "
           "MLFLOW_TRACKING_PASSWORD for a server, PGPASSWORD or ~/.pgpass for a database",
           password.sub(r"\1***@", track.mlflow_uri or ""))
    scheme = (track.mlflow_uri or "").partition("://")[0] if "://" in (track.mlflow_uri or "") else ""
    _check(track.mlflow_uri is None or (bool(track.mlflow_uri.strip()) and scheme in MLFLOW_SCHEMES),
           "track.mlflow_uri", "null or a tracking URI (http(s)://host:port, sqlite:///path.db, postgresql://..., "
           "databricks, or a folder)", track.mlflow_uri)
    _check(bool(track.mlflow_experiment.strip()), "track.mlflow_experiment", "a non-empty name", track.mlflow_experiment)
    steps = None if track.profile_steps is None else str(track.profile_steps)
    _check(steps is None or (re.fullmatch(r"[1-9][0-9]{0,8}(-[1-9][0-9]{0,8})?", steps) is not None
                             and profile_window(track)[0] <= profile_window(track)[1]),  # type: ignore[index]
           "track.profile_steps", "null or global steps A-B with 1 <= A <= B (e.g. 10-15)", steps)
    _check(track.profile_ranks == "all" or re.fullmatch(r"[0-9]+(,[0-9]+)*", str(track.profile_ranks)) is not None,
           "track.profile_ranks", "all or comma-separated rank numbers (e.g. 0,1)", track.profile_ranks)
    _check(track.peak_tflops is None or track.peak_tflops > 0, "track.peak_tflops", "null or a number > 0",
           track.peak_tflops)


def check_trackers_installed(track: TrackConfig) -> None:
    """ConfigError when a chosen tracker's package is not installed here (before anything is written)."""
    import importlib.util

    for name in tracker_names(track):
        spec = None if name == "tensorboard" else importlib.util.find_spec(name)
        # A folder named wandb/ or mlruns/ in the working directory is a namespace package (origin None), not it.
        if name != "tensorboard" and (spec is None or spec.origin is None):
            raise ConfigError(f"track.trackers: {name} is chosen but the {name} package is not installed; "
                              f"pip install 'ddp_train[{name}]', or remove {name} from track.trackers")


@dataclass
class Config:
    """Everything a run needs. The defaults are the fast offline first run (configs/default.yaml): a
    narrow ResNet-10 (width 16) with SyncBN on the synthetic dataset, 3 epochs (its time and accuracy:
    README.md: "What to expect from the default run"); configs/synthetic_resnet18.yaml is the full-size recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    out_dir: str = _f("runs", "parent folder of run folders")
    run_name: str | None = _f(
        None,
        "run folder name under out_dir; null means <data.name>-<model.name>-<timestamp>, or "
        "<data.name>-<model.name>-<torchelastic run id> under torchrun with --max-restarts",
    )
    resume: str | None = _f(
        None,
        "null: start fresh (an existing run folder is refused); auto: continue from the most recently "
        "written valid checkpoint in the run folder, or start fresh when it has none; or a checkpoint path",
    )
    resume_allow: str | None = _f(
        None,
        "keys (comma-separated, or all) whose change from the resumed checkpoint's config a resume accepts; "
        "any other change to a key that alters the training refuses the resume",
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint friendly)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "dist": DistConfig,
                             "checkpoint": CheckpointConfig, "track": TrackConfig}


# --------------------------------------------------------------------------- types

# Values are shown in messages through a bounded repr: a value can be a long string or a big
# nested list (the repr of a YAML alias bomb grew to 3.5 GB), and a message is one short line.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 8
_SHORT.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters, for messages."""
    return _SHORT.repr(value)


def _clip(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters (with ``...``), for quoting user input in messages."""
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(tp: Any) -> str:
    """Human form of a field type, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in typing.get_args(tp) else "")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {shown(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {shown(value)}")
        return value
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok and value is None and tp is str:  # out_dir=~ means the home folder to a user, null to YAML
        raise ConfigError(f"{key}: expected a string, got null (an empty value, null or a bare ~ is YAML's null; "
                          f"for the home folder write '~' in quotes or the full path)")
    if not ok:
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {shown(value)}")
    return float(value) if tp is float else value


def _unknown(key: str, name: Any, valid: list[str], where: str) -> ConfigError:
    # A YAML key may be a number (1: x) or a long string: compared and shown as short text.
    close = difflib.get_close_matches(_clip(str(name)), valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown key '{_clip(key)}'{hint}; valid keys in {where}: {', '.join(valid)}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Make a ``cls`` instance from a plain mapping, checking keys and types."""
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise _unknown(key, name, list(types_), prefix.rstrip(".") or "the top level")
        section = SECTIONS.get(name) if not prefix else None
        if section is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {name} keys, got {shown(value)}")
            kwargs[name] = _build(section, value, f"{name}.")
        else:
            kwargs[name] = _coerce(key, value, types_[name])
    return cls(**kwargs)


# --------------------------------------------------------------------------- loading

# Bounds on what a config may hold, so that any input is refused quickly in bounded memory.
# The shipped configs are about 1 kB and 150 YAML values, two levels deep.
MAX_CONFIG_BYTES = 2**20  # 1 MiB: a bigger --config file is refused before it is parsed
MAX_OVERRIDE_CHARS = 8192  # one key=value: twice PATH_MAX, room for any path
MAX_YAML_VALUES = 10_000  # scalars, lists and mappings in one document
MAX_YAML_DEPTH = 10  # nesting of lists and mappings (PyYAML's composer recurses: a deep one is a RecursionError)
ERROR_PREFIX = "ddp_train: error: "  # what the CLI puts before a message: continuation lines of a many-line error


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading every YAML float spelling as a number, without anchors and aliases,
    within :data:`MAX_YAML_VALUES` values and :data:`MAX_YAML_DEPTH` levels.

    PyYAML implements YAML 1.1, whose float needs a dot and a signed exponent: ``1e-3``, ``5E-4``
    and ``1e3`` would be strings, and ``train.lr=1e-3`` refused. The extra resolver is tried after
    the int one, so ``10`` stays an int; quoted values stay strings.

    Anchors and aliases (``&a``, ``*a``) are refused where they appear: a config has no use for
    them, and nine nested aliases in 300 characters make a value of 387 million items (a
    "billion laughs"), which any later walk over it (a deep copy, a repr) expands.
    ``where(mark)`` names the place of a YAML mark in messages (``FILE:LINE``, or the override).
    """

    def __init__(self, text: str, where: Callable[[Any], str]) -> None:
        super().__init__(text)
        self.where = where
        self.values = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise ConfigError(f"{self.where(event.start_mark)}: YAML anchors and aliases ({sign}{_clip(anchor, 20)}) "
                              f"are not accepted in a config (an alias can expand to gigabytes); write the value out, "
                              f"or quote it")
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise ConfigError(f"{self.where(event.start_mark)}: more than {MAX_YAML_VALUES} YAML values; a config "
                              f"holds about 150 (sections of key: value lines)")
        if self.depth >= MAX_YAML_DEPTH:
            raise ConfigError(f"{self.where(event.start_mark)}: nested more than {MAX_YAML_DEPTH} levels deep; a config "
                              f"is sections of key: value lines")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _duplicates(node: yaml.Node, where: Callable[[Any], str], path: str = "") -> list[str]:
    """One line per key given twice in a mapping of ``node`` (at any depth), naming both lines.

    PyYAML keeps the last of two equal keys without a word: a second ``train:`` section replaced
    the first one whole.
    """
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            dotted = f"{path}{name}"
            if name is not None and name in first:
                if not path and name in SECTIONS:
                    what, fix = f"section '{name}'", "merge the two into one"
                else:
                    what, fix = f"key '{_clip(dotted)}'", "keep one"
                found.append(f"{where(key.start_mark)}: {what} given twice (first at line {first[name]}); {fix}")
            elif name is not None:
                first[name] = key.start_mark.line + 1
            found += _duplicates(value, where, f"{dotted}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found += _duplicates(item, where, path)
    return found


def _yaml(text: str, where: Callable[[Any], str]) -> Any:
    """The value of the YAML document ``text``; ConfigError for duplicate keys, aliases, or one too big."""
    loader = _Loader(text, where)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        found = _duplicates(node, where)
        if found:  # one error line each: the CLI prefixes the first
            raise ConfigError(("\n" + ERROR_PREFIX).join(found))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value); values are read as YAML scalars."""
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override '{_clip(text, 40)}' is {len(text)} characters; an override is at most "
                          f"{MAX_OVERRIDE_CHARS}")
    if "=" not in text:
        raise ConfigError(f"override '{_clip(text)}' is not of the form key=value (e.g. train.lr=0.05)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{_clip(text)}': empty key; write it as section.key=value")
    try:
        value = _yaml(raw, lambda mark: f"override '{_clip(text, 40)}'") if raw != "" else None
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the raw string, the type check will judge it
    return key.split("."), value


def _merge(base: dict[str, Any], parts: list[str], value: Any, full: str) -> None:
    if len(parts) > 2:
        raise ConfigError(f"override '{_clip(full)}': keys have at most two parts, section.key (e.g. train.lr=0.05)")
    node = base
    if len(parts) == 2:
        node = base.setdefault(parts[0], {})
        if not isinstance(node, dict) or (parts[0] not in SECTIONS and parts[0] in _field_types(Config)):
            raise ConfigError(f"override '{_clip(full)}': '{parts[0]}' is not a section")
    # A key given twice on the command line: the later one wins (docs/configuration.md: "The file, its keys and paths").
    node[parts[-1]] = value


def _read_config_text(p: Path) -> str:
    """The text of the --config file ``p``; ConfigError (one line) when it is not a readable, small, text file."""
    fix = "pass a YAML file (see configs/)"
    if p.is_dir():
        raise ConfigError(f"--config {p} is a directory; {fix}")
    if not p.exists():
        raise ConfigError(f"--config {p} does not exist; {fix}")
    if not p.is_file():  # /dev/zero, a pipe: reading could take forever
        raise ConfigError(f"--config {p} is not a regular file; {fix}")
    try:
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(MAX_CONFIG_BYTES + 1) if size <= MAX_CONFIG_BYTES else b""
    except OSError as e:
        raise ConfigError(f"--config {p}: cannot read it: {e.strerror or e}") from None
    if size > MAX_CONFIG_BYTES or len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {p} is {max(size, len(data))} bytes; a config file is at most 1 MiB "
                          f"({MAX_CONFIG_BYTES} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {p} is not a text YAML file (not UTF-8: byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); {fix}") from None
    if "\0" in text:
        raise ConfigError(f"--config {p} is not a text YAML file (a NUL byte at offset {data.index(0)}); {fix}")
    return text


def _load_file(path: str | Path) -> dict[str, Any]:
    """The mapping in the --config file at ``path`` (``~`` expanded: ``--config=~/c.yaml`` reaches us as typed)."""
    p = Path(expand_user("--config", str(path)))
    text = _read_config_text(p)
    try:
        loaded = _yaml(text, lambda mark: f"{p}:{mark.line + 1}")
    except yaml.reader.ReaderError as e:  # a control character: the file is not YAML text
        raise ConfigError(f"--config {p} is not a text YAML file (character {e.character!r} at offset {e.position} is "
                          f"not allowed in YAML)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = _clip(str(getattr(e, "problem", None) or e).splitlines()[0], 200)
        raise ConfigError(f"--config {p} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {p} must hold a mapping of sections (data:, model:, train:, ...)")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides; validated."""
    return config_from_dict(_load_file(path) if path is not None else {}, overrides)


PATH_KEYS = ("out_dir", "data.root", "model.init_from", "resume")  # expanded by expand_user


def expand_user(key: str, value: str) -> str:
    """``value`` with a leading ``~`` or ``~user`` expanded (os.path.expanduser), never left as a literal ``~``
    folder; ConfigError for an unknown user or a NUL character (no path can hold one)."""
    if "\0" in value:
        raise ConfigError(f"{key}: a path cannot contain a NUL character, got {shown(value)}")
    if not value.startswith("~"):
        return value
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        user = value[1:].split("/", 1)[0]
        raise ConfigError(f"{key}: cannot expand {shown(value)} (no user {shown(user)}); write the full path")
    return expanded


def _expand_paths(cfg: Config) -> None:
    """Expand ``~`` in every path-valued key (:data:`PATH_KEYS`), in place."""
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, name)
        if isinstance(value, str):
            setattr(owner, name, expand_user(key, value))


def config_from_dict(values: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated Config from a plain mapping (a YAML file's, or a checkpoint's :meth:`Config.to_dict`),
    with ``key=value`` overrides on top."""
    raw = copy.deepcopy(values)
    for text in overrides:
        parts, value = parse_override(text)
        _merge(raw, parts, value, text)
    cfg = _build(Config, raw, "")
    _expand_paths(cfg)
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {shown(value)}")


MAX_SEED = 2**63 - 1  # torch's seeds are 64-bit: this leaves the sampler's seed + epoch room; -1 has no meaning
MAX_TIMEOUT_S = 7 * 24 * 3600  # a collective that waits longer is a hang; datetime overflows near 10**14 s


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express. Raises ConfigError naming the key."""
    d, t, dist = cfg.data, cfg.train, cfg.dist
    for name, cls in SECTIONS.items():  # .inf and .nan parse as numbers; no setting means either
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, name), f.name)
            _check(not isinstance(value, float) or math.isfinite(value), f"{name}.{f.name}", "a finite number", value)
    _check(0.0 < d.valid_fraction < 1.0, "data.valid_fraction", "a number between 0 and 1 (exclusive)", d.valid_fraction)
    _check(d.subset is None or d.subset >= 2, "data.subset", "null or an integer >= 2", d.subset)
    _check(d.num_workers >= 0, "data.num_workers", "an integer >= 0", d.num_workers)
    _check(d.crop_padding >= 0, "data.crop_padding", "an integer >= 0", d.crop_padding)
    _check(d.cutout is None or d.cutout >= 0, "data.cutout", "null or an integer >= 0", d.cutout)
    _check(d.device_resident is not True or d.name != "image_folder", "data.device_resident",
           "auto or false for image_folder (its images are files, read by the DataLoader)", d.device_resident)
    _validate_augmentation(d)
    _check(d.image_size >= 8, "data.image_size", "an integer >= 8", d.image_size)
    _check(d.synthetic_size >= 10, "data.synthetic_size", "an integer >= 10", d.synthetic_size)
    _check(d.name != "image_folder" or d.root is not None, "data.root",
           "a folder with train/<class>/ images when data.name is image_folder", d.root)
    _check(cfg.model.width >= 1, "model.width", "an integer >= 1", cfg.model.width)
    _check(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    _check(t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size)
    _check(t.micro_batch_size is None or t.micro_batch_size >= 1, "train.micro_batch_size",
           "null or an integer >= 1 that divides the per-rank batch", t.micro_batch_size)
    _check(t.lr > 0, "train.lr", "a number > 0", t.lr)
    _check(0 <= t.momentum < 1, "train.momentum", "a number in [0, 1)", t.momentum)
    _check(0 <= t.cycle_momentum <= t.momentum, "train.cycle_momentum", "a number in [0, train.momentum]",
           t.cycle_momentum)
    _check(t.cycle_momentum == 0 or t.scheduler == "onecycle", "train.cycle_momentum",
           "0 unless train.scheduler is onecycle", t.cycle_momentum)
    _check(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "a number in [0, 1)", t.label_smoothing)
    _check(t.lr_period >= 1, "train.lr_period", "an integer >= 1", t.lr_period)
    _check(0 < t.lr_decay <= 1, "train.lr_decay", "a number in (0, 1]", t.lr_decay)
    _check(t.plateau_patience >= 0, "train.plateau_patience", "an integer >= 0", t.plateau_patience)
    _check(0 <= t.warmup_epochs < t.epochs, "train.warmup_epochs", "a number in [0, train.epochs)", t.warmup_epochs)
    _check(t.log_every_steps >= 1, "train.log_every_steps", "an integer >= 1", t.log_every_steps)
    _validate_recipe(t)
    _validate_track(cfg.track)
    _check(0 <= t.seed <= MAX_SEED, "train.seed", f"an integer from 0 to 2**63-1 ({MAX_SEED})", t.seed)
    _check(1 <= dist.timeout_s <= MAX_TIMEOUT_S, "dist.timeout_s", f"an integer from 1 to {MAX_TIMEOUT_S} (7 days)",
           dist.timeout_s)
    _check(0 <= dist.hang_timeout_s <= MAX_TIMEOUT_S, "dist.hang_timeout_s",
           f"0 (off) or an integer number of seconds up to {MAX_TIMEOUT_S} (7 days)", dist.hang_timeout_s)
    _check(dist.straggler_every_steps >= 0, "dist.straggler_every_steps", "an integer >= 0 (0: off)",
           dist.straggler_every_steps)
    _check(dist.straggler_factor > 1, "dist.straggler_factor", "a number > 1", dist.straggler_factor)
    _check(dist.bucket_cap_mb > 0, "dist.bucket_cap_mb", "a number > 0", dist.bucket_cap_mb)
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "an integer >= 0", cfg.checkpoint.every_steps)
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "an integer >= 1", cfg.checkpoint.keep)
    _check(cfg.resume is None or cfg.resume == "auto" or cfg.resume.endswith((".pt", ".pth")), "resume",
           "null, auto, or the path of a .pt checkpoint", cfg.resume)
    _check(cfg.model.init_from is None or bool(cfg.model.init_from), "model.init_from",
           "null or the path of a weights file", cfg.model.init_from)
    known = set(flat_keys(Config().to_dict()))
    for name in allowed_changes(cfg) or ():
        _check(name in known, "resume_allow", "all, or config keys separated by commas (e.g. train.lr,train.epochs)",
               cfg.resume_allow)
    _validate_folders(cfg)


def _validate_augmentation(d: DataConfig) -> None:
    """The recipe's augmentation keys (docs/recipes.md)."""
    _check(d.ra_num_ops >= 1, "data.ra_num_ops", "an integer >= 1", d.ra_num_ops)
    _check(0 <= d.ra_magnitude <= 30, "data.ra_magnitude", "an integer from 0 to 30", d.ra_magnitude)
    _check(d.device_resident is not True or d.auto_augment == "none", "data.auto_augment",
           "none with data.device_resident=true (it runs per sample in the DataLoader's workers); "
           "set data.device_resident=false (or auto)", d.auto_augment)
    _check(0 <= d.random_erase <= 1, "data.random_erase", "a probability in [0, 1]", d.random_erase)
    _check(0 < d.erase_min_area <= d.erase_max_area < 1, "data.erase_min_area",
           "0 < data.erase_min_area <= data.erase_max_area < 1", (d.erase_min_area, d.erase_max_area))
    _check(d.erase_max_aspect >= 1, "data.erase_max_aspect", "a number >= 1", d.erase_max_aspect)
    _check(d.mixup_alpha >= 0, "data.mixup_alpha", "0 (off) or a number > 0", d.mixup_alpha)
    _check(d.cutmix_alpha >= 0, "data.cutmix_alpha", "0 (off) or a number > 0", d.cutmix_alpha)
    _check(0 <= d.mix_prob <= 1, "data.mix_prob", "a probability in [0, 1]", d.mix_prob)
    _check(0 <= d.mix_switch_prob <= 1, "data.mix_switch_prob", "a probability in [0, 1]", d.mix_switch_prob)


def _validate_recipe(t: TrainConfig) -> None:
    """The EMA, gradient clipping and early stopping keys (docs/recipes.md)."""
    _check(0 <= t.ema_decay < 1, "train.ema_decay", "0 (off) or a number in (0, 1), e.g. 0.999", t.ema_decay)
    _check(t.ema_every_steps >= 1, "train.ema_every_steps", "an integer >= 1", t.ema_every_steps)
    _check(t.eval_weights != "ema" or t.ema_decay > 0, "train.eval_weights",
           "trained unless train.ema_decay > 0 (ema needs the EMA on)", t.eval_weights)
    _check(t.clip_grad_norm is None or t.clip_grad_norm > 0, "train.clip_grad_norm", "null (off) or a number > 0",
           t.clip_grad_norm)
    _check(t.early_stop_patience >= 0, "train.early_stop_patience", "an integer >= 0 (0: off)", t.early_stop_patience)
    _check(t.early_stop_min_delta >= 0, "train.early_stop_min_delta", "a number >= 0", t.early_stop_min_delta)


NAME_MAX = 255  # bytes in one folder name on Linux filesystems (ext4, xfs, btrfs, tmpfs, NFS)


def _validate_folders(cfg: Config) -> None:
    """out_dir and run_name can name the run folder: each name fits a filesystem, run_name is one folder."""
    _check(bool(cfg.out_dir), "out_dir", "a non-empty folder path", cfg.out_dir)
    for part in Path(cfg.out_dir).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise ConfigError(f"out_dir: the folder name {shown(part)} is {size} bytes, too long for a folder name "
                              f"(at most {NAME_MAX} bytes); choose a shorter out_dir")
    name = cfg.run_name
    if name is None:
        return
    _check(bool(name), "run_name", "a folder name (or null for a generated one)", name)
    _check("/" not in name, "run_name", "a folder name without '/'", name)
    _check("\0" not in name, "run_name", "a folder name without a NUL character", name)
    if name in (".", ".."):
        meaning = "out_dir itself" if name == "." else "the folder above out_dir"
        raise ConfigError(f"run_name: '{name}' is not a folder name (it means {meaning}); choose a name such as my-run")
    size = len(os.fsencode(name))
    if size > NAME_MAX:
        raise ConfigError(f"run_name: {size} bytes is too long for a folder name (at most {NAME_MAX} bytes); "
                          f"choose a shorter name, got {shown(name)}")


def validate_for_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on the launch (known from the environment before any process group)."""
    if cfg.train.batch_size % world_size != 0:
        raise ConfigError(
            f"train.batch_size: expected a multiple of the world size {world_size} (it is the global "
            f"batch, split evenly across ranks), got {cfg.train.batch_size}"
        )
    micro, per_rank = cfg.train.micro_batch_size, cfg.train.per_rank_batch(world_size)
    if micro is not None and per_rank % micro != 0:
        raise ConfigError(f"train.micro_batch_size: expected a divisor of the per-rank batch {per_rank} "
                          f"(train.batch_size {cfg.train.batch_size} / {world_size} ranks), got {micro}")


# Keys that do not change what is trained: where files go, logging, loader processes, launch
# plumbing, and speed switches whose only effect is float rounding. A resume passes them with an
# info line; a change to any other key must be accepted with resume_allow.
RESULT_NEUTRAL = ("data.root", "data.download", "data.num_workers", "model.init_from", "model.channels_last",
                  "train.compile", "train.deterministic", "train.log_every_steps", "train.test_weights",
                  "dist.", "checkpoint.", "track.", "out_dir", "run_name", "resume", "resume_allow")


def flat_keys(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def diff_configs(old: dict[str, Any], new: Config) -> tuple[list[str], list[str]]:
    """(changes that alter the training, changes that do not), each ``"key: old -> new"``.

    ``old`` is a checkpoint's stored config; keys it lacks (written before they existed) count
    as their defaults.
    """
    before, after, default = flat_keys(old), flat_keys(new.to_dict()), flat_keys(Config().to_dict())
    changing, neutral = [], []
    for key, value in after.items():
        if key in ("resume", "resume_allow"):  # how this run was started, not what it trains
            continue
        was = before.get(key, default.get(key))
        if was == value or (isinstance(was, (int, float)) and isinstance(value, (int, float))
                            and not isinstance(was, bool) and float(was) == float(value)):
            continue
        line = f"{key}: {was} -> {value}"
        (neutral if key.startswith(RESULT_NEUTRAL) else changing).append(line)
    return changing, neutral


def allowed_changes(cfg: Config) -> set[str] | None:
    """The keys resume_allow names (None: all of them)."""
    if cfg.resume_allow is None:
        return set()
    names = {k.strip() for k in cfg.resume_allow.split(",") if k.strip()}
    return None if "all" in names else names


def validate_for_device(cfg: Config, device_type: str) -> None:
    """Checks that depend on the device kind the run will get (cuda, mps or cpu), made before anything is written."""
    check_precision(cfg.train.precision, device_type)
    check_trackers_installed(cfg.track)  # a machine without the package: refused before the run folder


def check_precision(precision: str, device_type: str) -> None:
    """ConfigError when ``train.precision`` cannot run on this kind of device (the one place that says so)."""
    if precision == "fp16" and device_type == "cpu":
        # Measured: 3 steps of ResNet-18 at batch 32 took 5 minutes (no native fp16 kernels on CPU).
        raise ConfigError("train.precision: fp16 on CPU is emulated, about 100x slower than fp32; "
                          "use bf16 (native on CPUs with AVX512-BF16/AMX) or fp32")
    if precision == "fp64" and device_type == "mps":
        raise ConfigError("train.precision: fp64 needs float64, which Apple's MPS devices lack; use fp32")


def _key_docs(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(dotted key, default as YAML, type, doc) of each field of ``cls`` (sections left out at the top level)."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and not prefix:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = yaml.safe_dump(default).strip().removesuffix("...").strip()
        rows.append((f"{prefix}{f.name}", shown, _describe(_field_types(cls)[f.name]), f.metadata.get("doc", "")))
    return rows


def _section_docs() -> list[tuple[str, str, str, str]]:
    return [row for name, cls in SECTIONS.items() for row in _key_docs(cls, f"{name}.")]


def describe_keys() -> str:
    """Every key with its type, default and documentation (for --help): top-level keys, then the sections."""
    return "\n".join(f"  {key} = {default}  ({tp})\n      {doc}"
                     for key, default, tp, doc in _key_docs(Config, "") + _section_docs())


README_START = "<!-- config keys: generated by `python -m ddp_train.config docs/configuration.md` from the field docs -->"
README_END = "<!-- end of config keys -->"


def key_table() -> str:
    """The table of config keys in docs/configuration.md, made from the field docs (the one source of the
    table and of --help): sections, then the top level."""
    rows = ["| key | default | type | meaning |", "| --- | --- | --- | --- |"]
    for key, default, tp, doc in _section_docs() + _key_docs(Config, ""):
        doc = doc.replace("|", "\\|")  # a literal | would end the cell
        rows.append(f"| `{key}` | `{default}` | {tp} | {doc} |")
    return "\n".join(rows)


def write_readme_table(path: str | Path) -> bool:
    """Replace the key table between the markers in ``path`` (docs/configuration.md); True when the file changed."""
    p = Path(path)
    text = p.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    new = text[:start] + "\n" + key_table() + "\n" + text[end:]
    if new != text:
        p.write_text(new)
    return new != text


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


if __name__ == "__main__":  # regenerate the key table: python -m ddp_train.config docs/configuration.md
    import sys

    for readme in sys.argv[1:] or ["docs/configuration.md"]:
        print(f"{readme}: {'updated' if write_readme_table(readme) else 'already up to date'}")
