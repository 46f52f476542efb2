"""Seeds: the same model initialisation on every rank, distinct randomness per rank afterwards."""

from __future__ import annotations

import os
import random

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
    """The notebook's cudnn switches, as a config option (deterministic costs speed on GPU)."""
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
