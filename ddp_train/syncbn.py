"""Synchronised batch norm that also runs on CPU/gloo.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so on CPU the batch statistics are summed
across ranks here with the autograd-aware ``torch.distributed.nn.functional.all_reduce``:
its backward all-reduces the gradients of the statistics, which is exactly the extra term
the gradient of a globally-normalised batch needs. Parameter and buffer names match
``nn.BatchNorm2d`` so state dicts load into a plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch: statistics summed over every rank of the default group."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        local_count = x.numel() // x.size(1)
        # One collective for [sum, sum of squares, count] per channel.
        stats = torch.cat([
            xf.sum(dims),
            (xf * xf).sum(dims),
            torch.full((1,), float(local_count), device=x.device, dtype=torch.float32),
        ])
        stats = dist_fn.all_reduce(stats)
        c = x.size(1)
        count = stats[2 * c]
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean * mean).clamp_min(0.0)  # biased, as BN normalises

        with torch.no_grad():
            if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
                self.num_batches_tracked.add_(1)  # type: ignore[operator]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1.0).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)

        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm layer of ``module`` (recursively) by this class."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            with torch.no_grad():
                if module.affine:
                    new.weight.copy_(module.weight)
                    new.bias.copy_(module.bias)
                if module.track_running_stats:
                    new.running_mean.copy_(module.running_mean)
                    new.running_var.copy_(module.running_var)
                    new.num_batches_tracked.copy_(module.num_batches_tracked)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """torch's SyncBatchNorm on CUDA, :class:`CPUSyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return CPUSyncBatchNorm.convert(model)
