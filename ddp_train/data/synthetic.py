"""A built-in, procedurally generated, learnable 10-class 32x32 RGB dataset.

Each image is one shape or textured patch of a random colour, at a random position and
scale, on a random background with a brightness gradient and pixel noise. It is generated
from a fixed seed in chunks, so the first N images are the same whatever N is, and needs no
download: the default run works offline.
"""

from __future__ import annotations

import numpy as np

CLASSES = (
    "disk", "square", "triangle", "ring", "plus",
    "x_cross", "h_stripes", "v_stripes", "checker", "diamond",
)
SIZE = 32
_CHUNK = 1000
_SEEDS = {"train": 1234, "test": 5678}


def _masks(label: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Boolean (n, H, W) shape masks; dx, dy are pixel offsets from each centre."""
    adx, ady = np.abs(dx), np.abs(dy)
    dist = np.sqrt(dx * dx + dy * dy)
    box = np.maximum(adx, ady) < r
    bar = r / 3.0
    shapes = [
        dist < r,                                                   # disk
        box,                                                        # square
        (dy < r) & (dy > -r) & (adx < (dy + r) * 0.5),              # triangle (apex up)
        (dist < r) & (dist > 0.55 * r),                             # ring
        ((adx < bar) & (ady < r)) | ((ady < bar) & (adx < r)),      # plus
        (np.abs(adx - ady) < bar * 0.8) & box,                      # x_cross
        box & (np.sin(dy * freq) > 0),                              # h_stripes
        box & (np.sin(dx * freq) > 0),                              # v_stripes
        box & (np.sin(dx * freq) * np.sin(dy * freq) > 0),          # checker
        (adx + ady) < r,                                            # diamond
    ]
    out = np.zeros(dx.shape, dtype=bool)
    for k, mask in enumerate(shapes):
        sel = label == k  # (n,)
        out[sel] = mask[sel]
    return out


def _chunk(split: str, index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([_SEEDS[split], index])
    label = rng.integers(0, len(CLASSES), n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx = rng.uniform(9, SIZE - 9, (n, 1, 1)).astype(np.float32)
    cy = rng.uniform(9, SIZE - 9, (n, 1, 1)).astype(np.float32)
    r = rng.uniform(5.5, 10.0, (n, 1, 1)).astype(np.float32)
    freq = rng.uniform(1.2, 1.8, (n, 1, 1)).astype(np.float32)
    mask = _masks(label, xx[None] - cx, yy[None] - cy, r, freq)

    bg = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
    # Foreground at least 70 levels away from the background on some channel: visible, not trivial.
    offset = (rng.uniform(70, 160, (n, 1, 1, 3)) * rng.choice([-1.0, 1.0], (n, 1, 1, 3))).astype(np.float32)
    fg = np.where(bg + offset > 255, bg - np.abs(offset), np.where(bg + offset < 0, bg + np.abs(offset), bg + offset))
    gx, gy = rng.uniform(-1.5, 1.5, (2, n, 1, 1, 1)).astype(np.float32)
    gradient = gx * (xx[None, :, :, None] - SIZE / 2) + gy * (yy[None, :, :, None] - SIZE / 2)
    img = np.where(mask[..., None], fg, bg) + gradient
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(5, 25, (n, 1, 1, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), label.astype(np.int64)


def generate(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, N x 32 x 32 x 3) and labels of ``split`` ("train" or "test")."""
    if split not in _SEEDS:
        raise ValueError(f"split must be one of {sorted(_SEEDS)}, got {split!r}")
    images, labels = [], []
    for index in range((n + _CHUNK - 1) // _CHUNK):
        x, y = _chunk(split, index, _CHUNK)
        images.append(x)
        labels.append(y)
    if not images:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]
