"""Gradient clipping by global norm, once per optimizer step, with the norms kept for the log.

:meth:`GradClip.__call__` runs in ``engine.train_step`` after the last micro-batch's backward (the
one that all-reduces under DDP), so the gradient it measures is the whole global batch's, the same
on every rank, and it clips once per optimizer step however many micro-batches there are. Under
the fp16 loss scaler the gradients are unscaled first (``GradScaler.unscale_``; its ``step`` then
does not unscale again), so the threshold is in true gradient units, as in torch's AMP recipe.
"""

from __future__ import annotations

from typing import Any

import torch


class GradClip:
    """Clips to ``max_norm``; keeps the last norm before clipping (device tensor) and the epoch's sum of them.

    The sums are one part of the checkpoint (key ``grad_norm``): an epoch resumed in its middle
    reports the same mean as an uninterrupted one.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.last: torch.Tensor | None = None  # the norm before clipping of the latest step
        self.calls = 0  # clippings done by this process (a count for tests; not checkpointed)
        self.norm_sum = torch.zeros((), dtype=torch.float64)  # finite norms of the epoch so far, summed
        self.count = torch.zeros((), dtype=torch.float64)  # their number

    def __call__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        """Unscale (fp16), clip the global norm of ``params``' gradients; returns the norm before clipping."""
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm).detach()
        self.calls += 1
        self.last = norm
        # An overflowed fp16 step (inf/nan norm, skipped by the scaler) is left out of the mean; no host sync here.
        finite = torch.isfinite(norm)
        device = norm.device
        self.norm_sum = self.norm_sum.to(device) + torch.where(finite, norm.double(), 0.0)
        self.count = self.count.to(device) + finite.double()
        return norm

    def take_epoch(self) -> float:
        """The epoch's mean norm before clipping (nan when no finite one); the sums start again for the next epoch."""
        mean = float((self.norm_sum / self.count).item()) if float(self.count.item()) else float("nan")
        self.norm_sum, self.count = torch.zeros_like(self.norm_sum), torch.zeros_like(self.count)
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"norm_sum": self.norm_sum.detach().cpu().clone(), "count": self.count.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norm_sum = torch.as_tensor(state["norm_sum"], dtype=torch.float64).clone()
        self.count = torch.as_tensor(state["count"], dtype=torch.float64).clone()
