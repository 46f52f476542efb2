"""Reading image files: the one reader of training, ``eval``, ``predict`` and ``demo``.

Every mode below is read with its full range mapped onto the model's input, the same way in
every command; any other mode is refused with one line naming the file and its mode, never
converted by a guess (Pillow's own conversion clips 16-bit grey to 255: a 0-65535 gradient
became 99.6% white).

- 8-bit modes give uint8 values, unchanged: ``L``, ``RGB``; ``1`` (0 or 255); ``P`` and ``PA``
  (palette expanded); ``CMYK`` (Pillow's conversion, without a colour profile). Alpha (``LA``,
  ``RGBA``, ``PA``) is dropped: the colour as stored, as torchvision's ImageFolder reads it.
- Deeper grey modes give float32 values in 0..1, so that their precision survives to the model:
  ``I;16`` (and its byte orders ``I;16L``, ``I;16B``, ``I;16N``) value / 65535; ``I`` (32-bit
  int, how older Pillow opened 16-bit PNGs and what ``I;16`` converts to) also value / 65535,
  refusing a value outside 0..65535 rather than guessing a scale; ``F`` (float) as 0..1 data,
  refusing a value outside 0..1, NaN or infinite rather than clipping it.

What reads these tensors scales uint8 by 1/255 and keeps floats as they are (as
``v2.ToDtype(scale=True)`` does), so a pixel means the same 0..1 to the model whichever kind it
came as, and a folder may mix them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError

EIGHT_BIT = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
DEEP = (*SIXTEEN_BIT, "I", "F")  # read as float32 in 0..1
MODES = EIGHT_BIT + DEEP
GREY = ("1", "L", "LA", *DEEP)  # one channel: an image_folder whose first image is one of these is grayscale


class ImageError(DataError):
    """One image file cannot be used. ``detail`` is the message without the leading "cannot read image PATH: ",
    for callers that report per file (``predict``)."""

    def __init__(self, message: str = "", detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = message if detail is None else detail


def refuse(path: str | Path, detail: str) -> ImageError:
    """The one-line error for ``path``: "cannot read image PATH: DETAIL"."""
    return ImageError(f"cannot read image {path}: {detail}", detail)


def _check_mode(mode: str, path: str | Path) -> None:
    if mode not in MODES:
        raise refuse(path, f"mode {mode} is not supported (supported: {', '.join(MODES)}); convert it to RGB, "
                           f"L or 16-bit grey (I;16)")


def image_mode(path: str | Path) -> str:
    """The Pillow mode of the image file at ``path`` (reads its header only); ImageError when unusable."""
    with _opened(path) as im:
        _check_mode(im.mode, path)
        return im.mode


def read_image(path: str | Path, channels: int, size: int | None) -> torch.Tensor:
    """The file as a C x H x W tensor with ``channels`` channels, resized (bilinear) to ``size`` x ``size``.

    uint8 (0-255) for 8-bit modes, float32 (0-1) for deeper ones (see the module docstring);
    raises ImageError, one line naming the file, for a file that cannot be read faithfully.
    """
    with _opened(path) as im:
        _check_mode(im.mode, path)
        try:
            im.load()
        except Exception as e:  # noqa: BLE001 (Pillow's decoders raise OSError, ValueError, SyntaxError, ...)
            raise _unreadable(path, e) from None
        return to_model_input(im, channels, size, path)


def to_model_input(im: Image.Image, channels: int, size: int | None, path: str | Path) -> torch.Tensor:
    """A loaded image of a supported mode as the model's input tensor (see :func:`read_image`)."""
    _check_mode(im.mode, path)
    if im.mode in DEEP:
        grey = _unit_grey(im, path)
        if size is not None and grey.shape != (size, size):
            # Pillow resizes float images with the same filter (antialiased bilinear) as 8-bit ones.
            grey = np.asarray(Image.fromarray(grey, "F").resize((size, size), Image.BILINEAR))
        out = torch.from_numpy(grey.copy())[None]
        return out.expand(channels, -1, -1).contiguous()
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _unit_grey(im: Image.Image, path: str | Path) -> np.ndarray:
    """A deep grey image's values on 0..1 (float32, H x W); ImageError for values outside its documented range."""
    values = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise refuse(path, f"mode F (float) images must hold values in 0..1, this one holds "
                               f"{_range(values)}; rescale it to 0..1, or save it as 16-bit grey (I;16)")
        return values.astype(np.float32)
    if im.mode == "I" and (values.min() < 0 or values.max() > 65535):
        raise refuse(path, f"mode I (32-bit int) images are read as 16-bit data (0..65535), this one holds "
                           f"{_range(values)}; rescale it to 0..65535 (I;16), or to 0..1 as float (F)")
    # float64 division, then float32: the correctly rounded value / 65535, whatever the byte order.
    return (values.astype(np.float64) / 65535).astype(np.float32)


def _range(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    span = f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite values"
    return span + (" and NaN or infinite values" if finite.size < values.size else "")


@contextmanager
def _opened(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open(path)``, closed afterwards, with every failure to open as one ImageError naming the file."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{pixels.group(1)} pixels, " if pixels else ""
        raise refuse(path, f"refused as a possible decompression bomb ({size}over Pillow's limit of "
                           f"{2 * Image.MAX_IMAGE_PIXELS} pixels); shrink the image or remove the file") from None
    except FileNotFoundError:
        raise refuse(path, "no such file") from None
    except Exception as e:  # noqa: BLE001 (not an image, a truncated header, ...)
        raise _unreadable(path, e) from None
    with im:
        yield im


def _unreadable(path: str | Path, e: Exception) -> ImageError:
    """Pillow could not decode the file: its reason, in one line."""
    reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return ImageError(f"cannot read image {path}: {reason}; remove or replace the file",
                      f"not a readable image ({reason})")
