"""Loading weights: fine-tuning (``model.init_from``), and the model behind eval/predict.

Three kinds of file are accepted, all loaded with ``torch.load(..., weights_only=True)`` (a
crafted pickle is refused, never run):

- this project's full checkpoints (``checkpoints/best.pt``, ``last.pt``, ``step-*.pt``): the
  weights are their ``"model"`` (eval/predict/demo: the ``"ema"`` copy when its run evaluated it,
  or as ``--weights`` chooses), and they carry the config and the dataset's class names,
  channels, size and normalisation;
- this project's ``model.pth``: the best evaluated weights alone (a plain state dict); eval and
  predict take the metadata from ``best.pt`` or ``last.pt`` in the same folder;
- plain torchvision-style state dicts (also under a ``"state_dict"`` key), with or without the
  ``module.`` (DDP, DataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import safe_load
from .meta import DatasetMeta
from ..errors import UserError

PREFIXES = ("module.", "_orig_mod.")
CLASSIFIER = ("fc.weight", "fc.bias")  # torchvision ResNet's last layer


class WeightsError(UserError):
    """A weights file that cannot be read or does not fit the model."""


def read_weights_file(path: str | Path, what: str) -> Any:
    """The object stored in ``path``; one-line :class:`WeightsError` when missing, damaged or refused."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise WeightsError(f"{what}: {p} is a directory, expected a file")
    if not p.is_file():
        raise WeightsError(f"{what}: {p} does not exist" if not p.exists() else f"{what}: {p} is not a regular file")
    obj, why = safe_load(p)
    if why:
        raise WeightsError(f"{what}: {p} is {why}")
    return obj


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The weights in a loaded file: a full checkpoint's ``"model"``, a ``"state_dict"``, or the dict itself."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            return strip_prefixes(obj[key])
    if _is_state_dict(obj):
        return strip_prefixes(obj)
    raise WeightsError(f"{what}: {path} holds no model weights (expected a ddp_train checkpoint, a model.pth, "
                       f"or a state dict of tensors)")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading ``module.`` / ``_orig_mod.`` (in any order and number) from every key."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def describe_mismatch(model_state: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> str:
    """Missing keys, unexpected keys and shape differences, as one line ('' when they fit)."""
    missing = [k for k in model_state if k not in loaded]
    unexpected = [k for k in loaded if k not in model_state]
    shapes = [f"{k} {_shape(loaded[k])} in the file, {_shape(v)} in the model"
              for k, v in model_state.items() if k in loaded and loaded[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
    if shapes:
        parts.append(f"different shapes ({len(shapes)}): {_names(shapes, 4)}")
    stem = "conv1.weight"
    if stem in loaded and stem in model_state and loaded[stem].shape[-2:] != model_state[stem].shape[-2:]:
        parts.append("note: ddp_train's ResNets have a 3x3 small-image stem and the data's channel count, "
                     "so ImageNet stems (7x7) do not fit")
    return "; ".join(parts)


def load_init_weights(model: nn.Module, path: str, model_desc: str = "the model") -> str:
    """Load ``path`` into ``model`` for fine-tuning; returns the line to print.

    When only the classifier's number of classes differs, ``fc`` keeps the model's own fresh
    initialisation (seeded, so identical on every rank). Any other difference raises a
    :class:`WeightsError` listing the missing and unexpected keys. Reads no randomness.
    """
    what = "model.init_from"
    loaded = extract_state_dict(read_weights_file(path, what), path, what)
    own = model.state_dict()
    # BatchNorm's num_batches_tracked counters are absent from some older state dicts; they are unused here.
    fill = {k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in loaded}
    loaded = {**loaded, **fill}
    reinit = [k for k in CLASSIFIER if k in loaded and k in own and loaded[k].shape != own[k].shape
              and loaded[k].shape[1:] == own[k].shape[1:]]
    if reinit:
        file_classes = int(loaded[reinit[0]].shape[0])
        loaded = {k: (own[k] if k in reinit else v) for k, v in loaded.items()}
    problem = describe_mismatch(own, loaded)
    if problem:
        raise WeightsError(f"{what}: {path} does not fit {model_desc}: {problem}")
    model.load_state_dict(loaded)
    n = len(loaded) - len(fill) - len(reinit)
    if reinit:
        classes = int(own["fc.weight"].shape[0])
        return (f"model.init_from: loaded {n} tensors from {path}; fc re-initialised for {classes} classes "
                f"(the weights have {file_classes})")
    return f"model.init_from: loaded {n} tensors from {path}"


def apply_init_from(model: nn.Module, path: str, ctx: Any, model_desc: str = "the model") -> None:
    """Every rank loads the same file into its (identically initialised) model; all stop together on error.

    Called right after the model is built, before SyncBN conversion and DDP wrapping. A bad file
    raises the same :class:`WeightsError` on every rank (reported once, exit 2), before training.
    """
    message = ctx.run_agreed(load_init_weights, model, path, model_desc)
    if ctx.is_main:
        print(message, flush=True)


# --------------------------------------------------------------------------- trained models (eval, predict)


@dataclass
class Trained:
    """Weights and the metadata to rebuild their model and input transform."""

    path: Path
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]  # Config.to_dict() of the training run
    dataset: DatasetMeta  # name, classes, channels, image size, normalisation
    global_step: int | None
    meta_from: Path  # the file the config and dataset came from (path itself, or best.pt/last.pt beside it)
    kind: str = "trained"  # which weights these are: "trained" or "EMA" (docs/recipes.md: "EMA of the weights")

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.classes)


def _meta(obj: Any) -> tuple[dict[str, Any], DatasetMeta] | None:
    """A checkpoint's config and dataset metadata, or None when it lacks them."""
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict):
        return None
    meta = DatasetMeta.from_dict(obj.get("dataset"))
    return None if meta is None else (obj["config"], meta)


WEIGHT_KINDS = {"trained": "trained", "ema": "EMA"}  # --weights choices -> Trained.kind


def _evaluates_ema(ckpt: dict[str, Any]) -> bool:
    """The checkpoint's run evaluated (and exported to model.pth) its EMA weights (train.eval_weights: ema)."""
    ema = ckpt.get("ema")
    return isinstance(ema, dict) and bool(ema.get("evaluated"))


def choose_weights(ckpt: dict[str, Any], choice: str | None, path: Path) -> tuple[Any, str]:
    """(state dict, kind) of a full checkpoint: ``choice`` "trained" (its ``model``) or "ema" (its EMA copy),
    None for the weights its run evaluated; one-line :class:`WeightsError` for an EMA it does not hold."""
    if choice is None:
        choice = "ema" if _evaluates_ema(ckpt) else "trained"
    if choice == "trained":
        return ckpt["model"], WEIGHT_KINDS[choice]
    ema = ckpt.get("ema")
    if not (isinstance(ema, dict) and _is_state_dict(ema.get("weights"))):
        raise WeightsError(f"--weights ema: {path} holds no EMA weights (its run had train.ema_decay 0); "
                           f"use --weights trained")
    return ema["weights"], WEIGHT_KINDS[choice]


def load_trained(path: str | Path, what: str = "--checkpoint", choice: str | None = None) -> Trained:
    """A full checkpoint, or a ``model.pth`` with ``best.pt``/``last.pt`` beside it for the metadata.

    ``choice`` (``--weights``): "trained" or "ema"; None takes the weights the run evaluated (the EMA
    copy under ``train.eval_weights: ema``, as in model.pth). model.pth holds that kind only.
    """
    p = Path(path).expanduser()  # --checkpoint=~/x: no shell expands a ~ after "="
    obj = read_weights_file(p, what)
    weights = extract_state_dict(obj, p, what)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a full checkpoint
        chosen, kind = choose_weights(obj, choice, p)
        weights = strip_prefixes(chosen) if _is_state_dict(chosen) else weights
        found = _meta(obj)
        if found is None:
            raise WeightsError(f"{what}: {p} has no config or dataset metadata (class names, normalisation); "
                               f"pass a checkpoint written by this version of ddp_train")
        return Trained(p, weights, *found, obj.get("global_step"), p, kind)
    for sibling in ("best.pt", "last.pt"):
        candidate = p.parent / sibling
        if candidate.is_file() and candidate.resolve() != p.resolve():
            try:
                meta = read_weights_file(candidate, what)
            except WeightsError as e:
                print(f"ddp_train: {e}; not using it for the metadata", file=sys.stderr)
                continue
            found = _meta(meta)
            if found is not None:
                return Trained(p, weights, *found, None, candidate, _model_pth_kind(p, meta, choice))
    raise WeightsError(f"{what}: {p} holds weights only (no config, class names or normalisation), and there is no "
                       f"usable best.pt or last.pt beside it to take them from; pass the run's checkpoints/best.pt")


def _model_pth_kind(path: Path, meta: Any, choice: str | None) -> str:
    """The kind of weights a model.pth holds (its run's evaluated ones, as its best.pt/last.pt says), checked
    against ``--weights``."""
    kind = "EMA" if isinstance(meta, dict) and _evaluates_ema(meta) else "trained"
    if choice is not None and WEIGHT_KINDS[choice] != kind:
        raise WeightsError(f"--weights {choice}: {path} holds the run's {kind} weights only; pass the run's "
                           f"checkpoints/best.pt or last.pt, which hold both")
    return kind


def build_trained_model(trained: Trained, model_name: str, what: str = "--checkpoint", width: int = 64) -> nn.Module:
    """The model of ``trained`` with its weights loaded (on the CPU, eval mode)."""
    from ..models import build_model

    ds = trained.dataset
    model = build_model(model_name, len(ds.classes), ds.channels, width=width)
    problem = describe_mismatch(model.state_dict(), trained.weights)
    if problem:
        raise WeightsError(f"{what}: {trained.path} does not fit {model_name} with {ds.channels} channels and "
                           f"{len(ds.classes)} classes: {problem}")
    model.load_state_dict(trained.weights)
    return model.eval()
