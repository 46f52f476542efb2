"""ddp_train: a distributed training launcher for image classifiers (torchrun, SLURM, one process)."""

from typing import Any

__version__ = "0.1.0"


def train(*args: Any, **kwargs: Any) -> Any:
    """``ddp_train.train(config, overrides)``: :func:`ddp_train.api.train`, imported on the first call (torch is heavy)."""
    from .api import train as api_train

    return api_train(*args, **kwargs)
