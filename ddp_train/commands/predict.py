"""``python -m ddp_train predict --checkpoint PATH FILE...``: the top-k classes of image files.

Each file (PNG, JPEG or any format Pillow reads, or a ``.npy`` uint8 array, H x W or H x W x C)
is read by the training data's own reader (:func:`ddp_train.data.images.read_image`: every mode
with its full range, 16-bit grey included; the model's channels, grayscale <-> RGB, alpha
dropped; its square size, bilinear), then normalised with the training statistics: the same
evaluation transform as ``eval``. One process, fp32. A file that cannot be used (not an image,
an unsupported mode, a decompression bomb) gets one line on stderr and the exit code 2; the
other files are still reported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .common import SubcommandParser, add_weights_option, fail

CHUNK = 64  # files per forward pass


class InputError(Exception):
    """One input file cannot be used."""


def _parser() -> SubcommandParser:
    p = SubcommandParser(
        prog="ddp_train predict",
        usage="python -m ddp_train predict --checkpoint PATH FILE... [--top-k K] [--json] [--device DEVICE] "
              "[--weights trained|ema]",
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
    add_weights_option(p)
    return p


def load_input(path: str | Path, channels: int, size: int) -> Any:
    """The file as a C x H x W tensor at the model's channels and size, exactly as training reads it (uint8,
    or float32 in 0..1 for images deeper than 8 bits); raises InputError."""
    from PIL import Image

    from ..data.images import ImageError, read_image, to_model_input

    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path}: is a directory, expected an image file")
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    if p.suffix.lower() != ".npy":
        try:
            return read_image(p, channels, size)
        except ImageError as e:
            raise InputError(f"{path}: {e.detail}") from None
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
    return to_model_input(image, channels, size, p)


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


@dataclass
class Classifier:
    """A trained model with its evaluation transform: image files -> top-k classes.

    The one path from a file to probabilities, shared by ``predict`` and ``demo`` (which hands it
    the uploaded file as it arrived): :func:`load_input` -> :func:`predict` -> top-k.
    """

    trained: Any  # weights.Trained
    model: Any
    transform: Any
    device: Any

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", weights: str | None = None) -> Classifier:
        """The checkpoint's model (``weights``: trained, ema, or None for those its run evaluated) in eval mode
        on ``device``; raises UserError (one line) when unusable."""
        from ..data.transforms import eval_transform
        from ..persistence.weights import build_trained_model, load_trained

        dev = _device(device)
        trained = load_trained(checkpoint, choice=weights)
        model_cfg = trained.config.get("model", {})
        model = build_trained_model(trained, model_cfg.get("name", "resnet18"),
                                    width=int(model_cfg.get("width", 64))).to(dev)
        meta = trained.dataset
        return cls(trained, model, eval_transform(meta.mean, meta.std), dev)

    @property
    def classes(self) -> list[str]:
        return self.trained.classes

    def classify(self, files: list[str], k: int) -> list[dict[str, Any]]:
        """``{"file", "top_k": [{"class", "index", "prob"}]}`` or ``{"file", "error"}`` per file, in order."""
        channels, size = self.trained.dataset.channels, self.trained.dataset.image_size
        k = min(k, len(self.classes))
        inputs, errors = [], {}
        for path in files:
            try:
                inputs.append(load_input(path, channels, size))
            except InputError as e:
                errors[path] = str(e)
        probs = iter(predict(self.model, inputs, self.transform, self.device) if inputs else [])
        results = []
        for path in files:
            if path in errors:
                results.append({"file": path, "error": errors[path]})
                continue
            top = next(probs).topk(k)
            results.append({"file": path, "top_k": [{"class": self.classes[c], "index": int(c), "prob": float(p)}
                                                    for p, c in zip(top.values.tolist(), top.indices.tolist())]})
        return results


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        return fail(f"--top-k: expected an integer >= 1, got {args.top_k}")
    try:
        classifier = Classifier.load(args.checkpoint, args.device, args.weights)
    except UserError as e:
        return fail(str(e))
    results: list[dict[str, Any]] = []
    for start in range(0, len(args.files), CHUNK):
        chunk = classifier.classify(args.files[start:start + CHUNK], args.top_k)
        results += chunk
        for entry in chunk:
            if "error" in entry:
                print(f"ddp_train: predict: {entry['error']}", file=sys.stderr, flush=True)
            elif not args.json:
                print(f"{entry['file']}: " + ", ".join(f"{t['class']} {t['prob']:.4f}" for t in entry["top_k"]),
                      flush=True)
    if args.json:
        json.dump({"checkpoint": str(classifier.trained.path), "weights": classifier.trained.kind,
                   "classes": classifier.classes, "results": results},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 2 if any("error" in r for r in results) else 0
