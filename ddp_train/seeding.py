"""Seeds: the same model initialisation on every rank, distinct randomness per rank afterwards."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed; distinct for distinct ranks."""
    return int(np.random.SeedSequence([seed, rank, 0x5EED]).generate_state(1)[0])


def set_determinism(deterministic: bool) -> None:
    """The seed recipe's cudnn switches (deterministic, no benchmark), as a config option (it costs speed on GPU)."""
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    # fp32 matmuls on TF32 tensor cores (Ampere and later) unless bit-stable results were asked for.
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def get_rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain types (loadable with weights_only=True)."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
