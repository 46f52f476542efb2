"""``python -m ddp_train predict --checkpoint PATH FILE...``: the top-k classes of image files.

Each file (PNG, JPEG or any format Pillow reads, or a ``.npy`` uint8 array, H x W or H x W x C)
is converted to the model's channels (grayscale <-> RGB, alpha dropped) and square size
(bilinear, as image_folder training data is), then normalised with the training statistics:
the same evaluation transform as ``eval``. One process, fp32. A file that cannot be used gets
one line on stderr and the exit code 2; the other files are still reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .config import UserError
from .evaluate import SubcommandParser, fail

CHUNK = 64  # files per forward pass


class InputError(Exception):
    """One input file cannot be used."""


def _parser() -> SubcommandParser:
    p = SubcommandParser(
        prog="ddp_train predict",
        usage="python -m ddp_train predict --checkpoint PATH FILE... [--top-k K] [--json] [--device DEVICE]",
        description="Top-k class names with probabilities for image files (PNG, JPEG, ...) and .npy uint8 arrays "
                    "(HxW or HxWxC), with the model's evaluation transform (size, channels, normalisation).",
        epilog="""examples:
  python -m ddp_train predict --checkpoint runs/demo/checkpoints/best.pt cat.png dog.jpg
  python -m ddp_train predict --checkpoint runs/demo/checkpoints/model.pth --top-k 5 --json images/*.png > preds.json""",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a full checkpoint (checkpoints/best.pt, last.pt, step-*.pt), or model.pth with best.pt "
                        "or last.pt beside it (for the class names and normalisation)")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files or .npy uint8 arrays")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to show per file (default 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:1, ...")
    return p


def load_input(path: str | Path, channels: int, size: int) -> Any:
    """The file as a uint8 C x H x W tensor at the model's channels and size; raises InputError."""
    import torch
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:  # bad header, truncated data, a pickled object
            raise InputError(f"{path}: not a readable .npy array ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:100]})") from None
        if arr.dtype != np.uint8:
            raise InputError(f"{path}: expected a uint8 array (0-255 pixels), got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
            raise InputError(f"{path}: expected an HxW or HxWxC array with C 1, 3 or 4, got shape {tuple(arr.shape)}")
        image = Image.fromarray(np.ascontiguousarray(arr))
    else:
        try:
            with Image.open(p) as im:
                im.load()
                image = im.copy()
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError ... on bad files
            detail = (str(e).splitlines() or [type(e).__name__])[0][:100]
            raise InputError(f"{path}: not a readable image ({detail})") from None
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    out = np.asarray(image, dtype=np.uint8)
    if out.ndim == 2:
        out = out[:, :, None]
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: no CUDA GPU is available; use --device cpu")
    return device


def predict(model: Any, inputs: list[Any], transform: Any, device: Any) -> Any:
    """Class probabilities (N x classes, CPU, fp32) of uint8 CHW tensors."""
    import torch

    with torch.no_grad():
        batch = torch.stack([transform(x) for x in inputs]).to(device)
        return torch.softmax(model(batch).float(), 1).cpu()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        return fail(f"--top-k: expected an integer >= 1, got {args.top_k}")
    from .data.transforms import eval_transform
    from .pretrained import build_trained_model, load_trained

    try:
        device = _device(args.device)
        trained = load_trained(args.checkpoint)
        model = build_trained_model(trained, trained.config.get("model", {}).get("name", "resnet18")).to(device)
    except UserError as e:
        return fail(str(e))
    meta, classes = trained.dataset, trained.classes
    channels, size = int(meta["channels"]), int(meta["image_size"])
    transform = eval_transform(meta["mean"], meta["std"])
    k = min(args.top_k, len(classes))
    results: list[dict[str, Any]] = []
    failed = 0
    for start in range(0, len(args.files), CHUNK):
        chunk, inputs, good = args.files[start:start + CHUNK], [], []
        for path in chunk:
            try:
                inputs.append(load_input(path, channels, size))
                good.append(path)
            except InputError as e:
                failed += 1
                print(f"ddp_train: predict: {e}", file=sys.stderr, flush=True)
                results.append({"file": path, "error": str(e)})
        probs = predict(model, inputs, transform, device) if inputs else None
        for i, path in enumerate(good):
            top = probs[i].topk(k)
            entry = {"file": path, "top_k": [{"class": classes[c], "index": int(c), "prob": float(p)}
                                             for p, c in zip(top.values.tolist(), top.indices.tolist())]}
            results.append(entry)
            if not args.json:
                print(f"{path}: " + ", ".join(f"{t['class']} {t['prob']:.4f}" for t in entry["top_k"]), flush=True)
    if args.json:
        order = {path: i for i, path in enumerate(args.files)}
        results.sort(key=lambda r: order[r["file"]])  # stable: the command line's order
        json.dump({"checkpoint": str(trained.path), "classes": classes, "results": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 2 if failed else 0
