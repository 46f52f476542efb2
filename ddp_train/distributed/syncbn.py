"""Synchronised batch norm that also runs on CPU/gloo.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and the CUDA-only kernels it is built on
(``batch_norm_stats`` and friends) have no CPU version. This module does the same maths with
kernels that exist on CPU:

- forward: per-rank mean and variance (``batch_norm_update_stats``, fp32 even for bf16 input,
  fp64 for fp64 input),
  one all-gather of [count, mean, var], combined without cancellation, then the fused
  inference-mode ``native_batch_norm`` with the global statistics;
- backward: the fused ``native_batch_norm_backward`` gives the local sums of dy and dy*x_hat in
  one reduction pass, one all-reduce makes them global, then the input gradient is the fused
  inference batch-norm kernel (for the two global-mean terms) plus k * dy, in two more passes.

Both collectives go through shared memory when every rank is on one machine
(:mod:`ddp_train.distributed.localcomm`: tens of microseconds where gloo's loopback round trip took 1-3 ms,
24 times a ResNet-10 step), through the process group otherwise; the results are the same bits.

Parameter and buffer names match ``nn.BatchNorm2d`` so state dicts load into a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .localcomm import LocalGroup
from ..resilience.steptime import CLOCK


def _gather_stats(count: float, mean: torch.Tensor, var: torch.Tensor, group: Any,
                  shm: LocalGroup | None) -> torch.Tensor:
    """Every rank's [count, mean, var] (one row per rank): through shared memory straight from the
    statistics when it can, else concatenated and all-gathered over the process group."""
    with CLOCK.waiting_for_peers():
        if shm is not None and shm.fits_numbers(1 + 2 * mean.numel(), mean):
            return shm.all_gather_parts([count, mean, var], mean.dtype)
        local = torch.cat([torch.full((1,), count, dtype=mean.dtype, device=mean.device), mean, var])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        return torch.stack(gathered)


def _sum_sums(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, group: Any, shm: LocalGroup | None) -> torch.Tensor:
    """The sum over ranks of [sum_dy, sum_dy_xhat]."""
    with CLOCK.waiting_for_peers():
        if shm is not None and shm.fits_numbers(2 * sum_dy.numel(), sum_dy):
            return shm.sum_in_rank_order(shm.all_gather_parts([sum_dy, sum_dy_xhat], sum_dy.dtype))
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=group)
        return sums


_SCRATCH: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _scratch(c: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros and ones for ``batch_norm_update_stats``' running-statistics arguments. With momentum 0 it
    never writes them, so one pair per shape serves every call (allocating them cost two ops a layer)."""
    key = (c, dtype, device)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.zeros(c, dtype=dtype, device=device), torch.ones(c, dtype=dtype, device=device)
    return _SCRATCH[key]


@dataclass(frozen=True)
class _SyncSettings:
    """The non-tensor inputs of one synchronised batch norm: the layer's constants and where to gather."""

    momentum: float
    eps: float
    group: Any  # the process group (None: the default one)
    shm: LocalGroup | None  # the shared-memory shortcut, when every rank is on one machine


# Why so few operations: the maths below runs twice a layer a step (24 times a ResNet-10 step), on
# per-channel vectors of a few dozen numbers, so its cost is the number of tensor operations (a few
# microseconds each from Python), not their arithmetic. Counts are Python numbers; the combination of
# the ranks' statistics is 7 operations, the backward's scaling 5.
class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                settings: _SyncSettings) -> torch.Tensor:
        c = x.size(1)
        # Statistics in fp32 for bf16/fp16/fp32 input, fp64 for fp64. The scratch buffers' dtype selects
        # the kernel (fp32 statistics for bf16 input); momentum 0 leaves them alone.
        zeros, ones = _scratch(c, torch.promote_types(x.dtype, torch.float32), x.device)
        mean, var = torch.batch_norm_update_stats(x, zeros, ones, 0.0)
        # Gather each rank's (count, mean, var) and combine them as torch's CUDA SyncBN does:
        # var = sum n_r (var_r + (mean_r - mean)^2) / N avoids the cancellation of E[x^2] - mean^2.
        table = _gather_stats(float(x.numel() // c), mean, var, settings.group, settings.shm)
        count = float(table[:, 0].sum())
        share = table[:, :1] / count  # n_r / N
        means, vars_ = table[:, 1 : c + 1], table[:, c + 1 :]
        gmean = (share * means).sum(0)
        spread = means - gmean
        gvar = (share * torch.addcmul(vars_, spread, spread)).sum(0)
        if running_mean is not None and running_var is not None:
            unbiased = gvar * (count / max(count - 1.0, 1.0))
            running_mean.lerp_(gmean.to(running_mean.dtype), settings.momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), settings.momentum)
        y = torch.native_batch_norm(x, weight, bias, gmean, gvar, False, 0.0, settings.eps)[0]
        ctx.save_for_backward(x, weight, gmean, gvar)
        ctx.count, ctx.eps, ctx.group, ctx.shm = count, settings.eps, settings.group, settings.shm
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, gmean, gvar = ctx.saved_tensors
        gy = gy.contiguous(memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                           else torch.contiguous_format)
        # Pass 1, a reduction only: the local sums of dy and dy * x_hat (no gradient tensor written).
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, gmean, gvar, None, None, False, ctx.eps, [False, True, True])
        stat_dtype = gmean.dtype  # fp32, or fp64 for fp64 input
        sums = _sum_sums(sum_dy.to(stat_dtype), sum_dy_xhat.to(stat_dtype), ctx.group, ctx.shm)
        c = x.size(1)
        invstd = torch.rsqrt(gvar + ctx.eps)
        k = invstd * weight.to(stat_dtype) if weight is not None else invstd
        # Rows: -k * mean(dy), -k * mean(dy * x_hat), the global means.
        shift, scale = sums.view(2, c).mul(k).mul_(-1.0 / ctx.count)
        # grad_x = k * dy - k * mean_dy - k * mean_dy_xhat * x_hat, with x_hat = (x - mean) * invstd.
        # Pass 2: the last two terms are a per-channel affine map of x_hat, which is what the fused
        # inference batch-norm kernel computes (subtracting the mean first, so no cancellation
        # when |mean| >> std). Pass 3: one addcmul adds k * dy. Three passes instead of five.
        correction = torch.native_batch_norm(x, scale, shift, gmean, gvar, False, 0.0, ctx.eps)[0]
        grad_x = correction.addcmul_(gy, k.to(x.dtype).view([1, c] + [1] * (x.dim() - 2)))
        # Parameter gradients stay local: DDP averages them over ranks like any other.
        grad_w = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch: statistics summed over every rank of ``process_group``.

    Outside training, or without several ranks, it is plain batch norm (no collective).
    """

    process_group: Any = None  # None: the default group
    shm: LocalGroup | None = None  # the default group's ranks through shared memory, when on one machine

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        momentum = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)  # type: ignore[operator,union-attr]
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        running = self.track_running_stats
        settings = _SyncSettings(momentum, self.eps, self.process_group,
                                 self.shm if self.process_group is None else None)
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean if running else None,
                                      self.running_var if running else None, settings)

    @classmethod
    def convert(cls, module: nn.Module, process_group: Any = None, shm: LocalGroup | None = None) -> nn.Module:
        """Replace every BatchNorm layer of ``module`` (recursively) by this class."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            like = module.weight if module.affine else module.running_mean  # keep the dtype (fp64) and device
            factory = {"device": like.device, "dtype": like.dtype} if like is not None else {}
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      **factory)
            new.process_group, new.shm = process_group, shm
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
            module.add_module(name, cls.convert(child, process_group, shm))
        return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device, shm: LocalGroup | None = None) -> nn.Module:
    """torch's SyncBatchNorm on CUDA, :class:`CPUSyncBatchNorm` elsewhere (through ``shm`` when given)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return CPUSyncBatchNorm.convert(model, shm=shm)
