"""``python -m ddp_train eval --checkpoint PATH [split=test|valid] [key=value ...]``: exact metrics of a trained model.

Runs as one process or under ``torchrun``/``srun`` like training: every rank evaluates a strided
shard of the split (no padding) and the sums are all-reduced, so loss, accuracy, counts and the
confusion matrix are exact at any world size. The config comes from the checkpoint; ``key=value``
overrides go on top (``data.root=...``, ``data.subset=...``, ``train.batch_size=...``). Rank 0
prints a table, writes JSON (``--output FILE``, or stdout with ``--json``) and, when the
checkpoint lies in a run folder (or ``--run-dir`` names one), logs the confusion matrix to that
run's TensorBoard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, ConfigError, config_from_dict
from ..errors import UserError
from ..persistence.meta import DatasetMeta
from .common import SubcommandParser, add_weights_option

SPLITS = ("test", "valid")


def _parser(rank: int) -> SubcommandParser:
    p = SubcommandParser(
        prog="ddp_train eval",
        usage="python -m ddp_train eval --checkpoint PATH [split=test|valid] [--output FILE] [--json] "
              "[--run-dir DIR] [--weights trained|ema] [key=value ...]\n"
              "       torchrun --nproc_per_node=N -m ddp_train eval --checkpoint PATH ...",
        description="Exact loss, accuracy, per-class accuracy and confusion matrix of a trained model on a "
                    "whole split, at any world size (every sample counted once).",
        epilog="""arguments after the options:
  split=test|valid   the split to evaluate (default test); valid is drawn from the training set with
                     the run's train.seed, exactly as in training
  key=value          config overrides on top of the checkpoint's config, e.g. data.root=/data/cifar10,
                     data.subset=500, train.batch_size=256, data.num_workers=4, train.precision=fp32

examples:
  python -m ddp_train eval --checkpoint runs/demo/checkpoints/best.pt
  torchrun --nproc_per_node=2 -m ddp_train eval --checkpoint runs/demo/checkpoints/best.pt split=valid --output valid.json
  python -m ddp_train eval --checkpoint runs/demo/checkpoints/model.pth --json > test.json""",
        rank=rank,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a full checkpoint (checkpoints/best.pt, last.pt, step-*.pt), or model.pth with best.pt "
                        "or last.pt beside it")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of the table")
    p.add_argument("--run-dir", metavar="DIR",
                   help="log the confusion matrix to DIR/tb (default: the run folder holding the checkpoint, "
                        "if it lies in one)")
    add_weights_option(p)
    p.add_argument("args", nargs="*", metavar="split=...|key=value", help="the split and config overrides")
    return p


def split_and_overrides(args: list[str]) -> tuple[str, list[str]]:
    split, overrides = "test", []
    for arg in args:
        if arg.startswith("split="):
            split = arg.split("=", 1)[1]
            if split not in SPLITS:
                raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        else:
            overrides.append(arg)
    return split, overrides


def default_run_dir(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint lies in (``<run>/checkpoints/<file>``), if any."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


# --------------------------------------------------------------------------- the evaluation


def _dataset(cfg: Config, trained: Any, ctx: Any) -> Any:
    """The dataset, checked against the checkpoint, normalised with the training statistics."""
    from ..data import load_dataset_agreed

    dataset = load_dataset_agreed(cfg.data, ctx)
    return ctx.run_agreed(_as_trained, dataset, trained.dataset)


def _as_trained(dataset: Any, meta: DatasetMeta) -> Any:
    """``dataset`` with the statistics the model was trained with; UserError when it is not the model's data."""
    if tuple(dataset.classes) != meta.classes:
        raise UserError(f"the data's classes ({', '.join(dataset.classes[:12])}) are not the checkpoint's "
                        f"({', '.join(meta.classes[:12])}); point data.name/data.root at the data "
                        f"the model was trained on")
    if dataset.channels != meta.channels or dataset.image_size != meta.image_size:
        raise UserError(f"the data has {dataset.channels} channels of size {dataset.image_size}, the checkpoint "
                        f"was trained on {meta.channels} of size {meta.image_size} (data.image_size?)")
    # The statistics the model was trained with (image_folder measures them on the data it sees).
    return dataclasses.replace(dataset, mean=meta.mean, std=meta.std)


def _pick_split(dataset: Any, cfg: Config, split: str) -> Any:
    from ..data import build_splits

    _, valid, test = build_splits(dataset, cfg)
    chosen = valid if split == "valid" else test
    if chosen is None:
        raise UserError(f"{dataset.name} has no test split here (image_folder needs a test/ folder); "
                        f"evaluate split=valid, or point data.root at data with test/")
    return chosen


def run_eval(cfg: Config, trained: Any, model: Any, split: str, ctx: Any) -> tuple[Any, dict[str, Any]]:
    """Evaluate ``split`` on every rank; returns (EvalResult, the JSON-ready report)."""
    import torch

    from ..data.loaders import eval_loader
    from ..training.engine import Batcher, autocast_dtype, evaluate, param_dtype, precision_name

    dataset = _dataset(cfg, trained, ctx)
    ds = ctx.run_agreed(_pick_split, dataset, cfg, split)
    per_rank = max(1, math.ceil(cfg.train.batch_size / ctx.world_size))
    workers = cfg.data.num_workers if ds.source.paths is not None else 0  # in-memory: no worker processes
    loader = eval_loader(ds, per_rank, ctx.rank, ctx.world_size, workers, ctx.device.type == "cuda",
                         (dataset.mean, dataset.std, ctx.device))
    precision = cfg.train.precision
    if precision == "fp16" and ctx.device.type == "cpu":  # a GPU fp16 run evaluated on CPU: fp16 is emulated here
        precision = "fp32"
    model = model.to(ctx.device, param_dtype(precision))  # an fp64 run is evaluated in fp64, as in training
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(precision, ctx.device)
    classes = trained.classes
    result = evaluate(model, loader, ctx, Batcher(ctx.device, cfg.model.channels_last), amp_dtype, len(classes))
    report = {
        "checkpoint": str(trained.path), "global_step": trained.global_step, "split": split, "weights": trained.kind,
        "world_size": ctx.world_size, "precision": precision_name(amp_dtype),
        "loss": result.loss, "acc": result.acc, "count": result.count, "classes": classes,
        "per_class_acc": dict(zip(classes, result.per_class_acc())),
        "per_class_count": dict(zip(classes, (int(n) for n in result.confusion.sum(1)))),
        "confusion": result.confusion.tolist(),
    }
    return result, report


# --------------------------------------------------------------------------- reporting (rank 0)


def format_table(report: dict[str, Any], header: str) -> str:
    classes, confusion = report["classes"], np.asarray(report["confusion"])
    lines = [header, f"loss {report['loss']:.4f} | acc {report['acc']:.4f} | count {report['count']}", ""]
    width = max(5, *(len(c) for c in classes))
    lines.append(f"{'':>3} {'class':<{width}}  {'acc':>6}  correct / total")
    for k, name in enumerate(classes):
        total = int(confusion[k].sum())
        acc = f"{confusion[k, k] / total:.4f}" if total else "   n/a"
        lines.append(f"{k:>3} {name:<{width}}  {acc:>6}  {int(confusion[k, k]):>7} / {total}")
    if len(classes) <= 30:
        cell = max(4, len(str(int(confusion.max()))) + 1)
        lines += ["", "confusion matrix (rows: true class, columns: predicted class, numbered as above)",
                  f"{'':>3} {'':<{width}}" + "".join(f"{k:>{cell}}" for k in range(len(classes)))]
        for k, name in enumerate(classes):
            lines.append(f"{k:>3} {name:<{width}}" + "".join(f"{int(v):>{cell}}" for v in confusion[k]))
    else:
        lines.append(f"confusion matrix: {len(classes)} classes, see the JSON (--output FILE)")
    return "\n".join(lines)


def confusion_image(confusion: np.ndarray, classes: list[str], title: str) -> np.ndarray:
    """An RGB uint8 picture of the confusion matrix (row-normalised colours, counts in the cells).

    Drawn with matplotlib when it is installed; otherwise a plain heat map (one 16-px block per cell).
    """
    rows = confusion.sum(1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        cells = (255 * (1 - norm)).astype(np.uint8)  # white = 0, dark blue = all of the row
        rgb = np.stack([cells, cells, np.full_like(cells, 255)], -1)
        return np.kron(rgb, np.ones((16, 16, 1), dtype=np.uint8))
    n = len(classes)
    side = min(max(4.0, 0.5 * n + 2), 20.0)
    fig = Figure(figsize=(side, side), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_to_tensorboard(run_dir: Path, report: dict[str, Any]) -> str:
    """Confusion matrix image and the metrics into ``run_dir/tb``; returns the tag of the image."""
    from torch.utils.tensorboard import SummaryWriter

    split, step = report["split"], report["global_step"] or 0
    tag = f"eval/{split}/confusion_matrix"
    image = confusion_image(np.asarray(report["confusion"]), report["classes"],
                            f"{split}: acc {report['acc']:.4f}, {report['count']} samples (step {step})")
    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    try:
        writer.add_image(tag, image, step, dataformats="HWC")
        writer.add_scalar(f"eval/{split}/loss", report["loss"], step)
        writer.add_scalar(f"eval/{split}/acc", report["acc"], step)
    finally:
        writer.close()
    return tag


def _publish(report: dict[str, Any], header: str, args: argparse.Namespace, run_dir: Path | None) -> None:
    from ..files import atomic_write_text, clean_json

    text = json.dumps(clean_json(report), indent=2) + "\n"
    if args.output:
        atomic_write_text(Path(args.output), text)
    if args.json:
        sys.stdout.write(text)
    else:
        print(format_table(report, header))
        if args.output:
            print(f"results written to {args.output}")
    if run_dir is not None:
        tag = log_to_tensorboard(run_dir, report)
        print(f"confusion matrix logged to {run_dir / 'tb'} ({tag})", file=sys.stderr if args.json else sys.stdout)
    sys.stdout.flush()


# --------------------------------------------------------------------------- entry point


def main(argv: list[str]) -> int:
    from ..envelope import exit_code_of

    return exit_code_of(_main, argv)


def _main(argv: list[str]) -> int:
    """The evaluation in the envelope (ddp_train/envelope.py), as training runs in it."""
    from ..distributed.context import environ
    from ..envelope import checked_input, launch_info, process_group
    from ..persistence.weights import build_trained_model, load_trained

    env = environ()
    launch = launch_info(env)
    args = _parser(launch.rank).parse_args(argv)
    # Everything that can be wrong with the input is found here, identically on every rank,
    # before any process group: one line from rank 0, exit 2 everywhere, no hang.
    with checked_input(launch.rank):
        split, overrides = split_and_overrides(args.args)
        trained = load_trained(args.checkpoint, choice=args.weights)
        cfg = config_from_dict(trained.config, overrides)
        model = build_trained_model(trained, cfg.model.name, width=cfg.model.width)
        if args.output and Path(args.output).is_dir():
            raise UserError(f"--output {args.output} is a folder; name a file")
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(trained.path)

    with process_group(launch, cfg.dist.backend, cfg.dist.timeout_s, env) as ctx:
        result, report = run_eval(cfg, trained, model, split, ctx)
        if ctx.is_main:
            step = f" (global step {trained.global_step})" if trained.global_step is not None else ""
            header = (f"eval {trained.path}{step} | {split} split: {result.count} samples, {len(trained.classes)} "
                      f"classes | {trained.kind} weights | {ctx.launcher} x{ctx.world_size} on {ctx.device} | "
                      f"{report['precision']}")
            try:
                _publish(report, header, args, run_dir)
            except OSError as e:
                raise UserError(f"cannot write the results: {e}") from None
    return 0
