"""One function per phase: train one epoch, evaluate a split. Both run on every rank."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..config import check_precision
from ..distributed.context import DistContext
from ..resilience.steptime import CLOCK

if TYPE_CHECKING:  # learner.py imports this module
    from .clipping import GradClip
    from .learner import Learner


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype for ``train.precision`` on ``device``: None is fp32 and float64 is fp64 (both
    without autocast; fp64 models are float64 throughout, see :func:`param_dtype`); bf16/fp16 autocast."""
    if precision == "fp64":
        return torch.float64
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        check_precision(precision, device.type)  # refused on CPU
        return torch.float16
    # auto: bf16 where the hardware does it natively; fp16 (with a scaler) on GPUs before bf16.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the model's parameters and buffers: float64 for ``fp64``, else float32 (autocast or not)."""
    return torch.float64 if precision == "fp64" else torch.float32


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (whose gradients underflow without one); a disabled pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (bf16 autocast about 2x faster there, slower elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float64:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype batches must have for ``model``: its parameters' (float64 for an fp64 model).

    Taken from the model, not the config, so that an fp32 model evaluating an fp64 run's
    checkpoint (eval, predict) gets fp32 batches.
    """
    return next(model.parameters()).dtype


@dataclass
class Batcher:
    """Moves a batch to the device in the layout and dtype the model was built for.

    Both input paths (DataLoader and device-resident) make fp32 batches, the same values bit for
    bit; an fp64 model gets them cast here, so the two paths stay equal in fp64 too.
    """

    device: torch.device
    channels_last: bool

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True).to(dtype)  # cast on the device: half the copy
        # Always the configured layout (device-resident batches come in either): convolution
        # kernels, and so the rounding, differ by layout.
        images = images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return images, labels.to(self.device, non_blocking=True)


@dataclass
class TrainResult:
    loss: float  # mean training loss over the epoch's global samples (restored partial sums included)
    samples: int  # global samples in the epoch so far
    seconds: float  # time spent in this call
    new_samples: int  # global samples processed in this call

    @property
    def img_per_s(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else 0.0


StepHook = Callable[[int, torch.Tensor, torch.Tensor, int], None]


@dataclass(frozen=True)
class StepOptions:
    """How each optimizer step runs: these travel together from the config and the learner to every step."""

    amp_dtype: torch.dtype | None  # autocast's dtype (None: no autocast)
    label_smoothing: float = 0.0
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaler (None or disabled: no scaling)
    micro_batch_size: int | None = None  # gradient accumulation (None: the whole batch at once)
    clip: GradClip | None = None  # gradient clipping by global norm, once per step (None: off)


@dataclass(frozen=True)
class EpochStart:
    """Where :func:`train_one_epoch` starts: a fresh epoch, or a resumed one at ``step`` with this rank's
    running sums ``partial`` (loss sum, samples) of the steps already taken."""

    step: int = 0
    partial: tuple[float, int] = (0.0, 0)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               options: StepOptions) -> torch.Tensor:
    """Forward, backward and optimizer step on one batch already on the device; returns the batch's mean loss.

    With ``options.micro_batch_size`` the batch runs as several forward-backward passes (:func:`micro_batches`)
    whose gradients add up to the whole batch's: each micro-batch's mean loss is weighted by its share
    of the batch. Only the last backward all-reduces (DDP's ``no_sync`` around the others).
    """
    amp_dtype, label_smoothing, scaler = options.amp_dtype, options.label_smoothing, options.scaler
    optimizer.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    parts = micro_batches(images, labels, options.micro_batch_size)
    shares = []  # each micro-batch's loss times its share of the batch: their sum is the batch's loss
    for i, (x, y) in enumerate(parts):
        last = i == len(parts) - 1
        with contextlib.nullcontext() if last else _no_sync(model):
            with _autocast(images.device, amp_dtype):
                logits = model(x)
            loss = _loss(_at_least_fp32(logits), y, label_smoothing)
            share = loss if len(parts) == 1 else loss * (len(y) / len(labels))
            (scaler.scale(share) if scaling else share).backward()  # type: ignore[union-attr]
        shares.append(share.detach())
    CLOCK.backward_done()  # after the last (all-reducing) backward: the wait for its buckets is timed
    if options.clip is not None:  # once per optimizer step, on the global batch's gradient (the same on every rank)
        options.clip([p for group in optimizer.param_groups for p in group["params"]], optimizer, scaler)
    if scaling:
        scaler.step(optimizer)  # type: ignore[union-attr]  # skipped when the scaled gradients overflowed
        scaler.update()  # type: ignore[union-attr]
    else:
        optimizer.step()
    # Without accumulation the batch's loss as it always was (no extra rounding).
    return loss if len(parts) == 1 else torch.stack(shares).double().sum()


def micro_batches(images: torch.Tensor, labels: torch.Tensor,
                  micro_batch_size: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batch as ``k = len / micro_batch_size`` micro-batches, strided: micro-batch i holds
    samples i, i + k, i + 2k, ... (the whole batch when ``micro_batch_size`` is None or not smaller).

    Strided, not in consecutive runs, because a rank's sample j is the global batch's sample
    ``j * W + r`` (rank r of W, see ``EpochDistributedSampler``): micro-batch i of rank r is then the
    global batch's samples ``= i * W + r (mod B / micro_batch_size)``, groups that depend on the micro-batch
    size alone. Batch norm without SyncBN normalises over exactly these groups, so a run keeps its
    results at any world size as long as ``train.micro_batch_size`` stays the same.
    """
    n = len(labels)
    if micro_batch_size is None or micro_batch_size >= n:
        return [(images, labels)]
    k = n // micro_batch_size
    # Each micro-batch dense, with the batch's own strides (the Batcher's layout: kernels, so rounding,
    # depend on it): empty_like keeps the strides of a dense tensor such as images[:micro_batch_size].
    return [(torch.empty_like(images[:micro_batch_size]).copy_(images[i::k]), labels[i::k]) for i in range(k)]


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync``: gradients accumulate on this rank without an all-reduce (reached through a
    ``torch.compile`` wrapper too); DataParallel and a bare module have no all-reduce to skip."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def _loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class indices, or against mixup/cutmix's soft targets (B, K) in the logits'
    dtype; label smoothing then applies to the mixed targets (as timm and torchvision compose them)."""
    if targets.dim() == 2:
        targets = targets.to(logits.dtype)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: autocast's bf16/fp16 widened to fp32, fp64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def train_one_epoch(
    learner: Learner,
    loader: DataLoader | Iterable,
    ctx: DistContext,
    options: StepOptions,
    on_step: StepHook | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    start: EpochStart = EpochStart(),
) -> TrainResult:
    """One pass over this rank's shard with the learner's model, optimizer, schedule and batcher (from
    ``start.step`` when resuming mid-epoch); each step runs with ``options`` (precision, loss scaler,
    label smoothing, micro-batches), not with the learner's own ``amp_dtype`` and ``scaler``.

    ``on_step(steps_done, loss, loss_sum, samples)`` runs on every rank after each optimizer
    step, with this rank's running sums (what a mid-epoch checkpoint must keep). Losses are
    summed on the device; the host reads them once, at the end (no per-step sync).
    """
    model, optimizer, schedule, batcher = learner.model, learner.optimizer, learner.schedule, learner.batcher
    model.train()
    ema = learner.ema
    if ema is not None:
        ema.begin()
    loss_sum = torch.tensor(start.partial[0], device=ctx.device, dtype=torch.float64)
    samples = start.partial[1]
    new_samples = 0
    steps = start.step
    dtype = input_dtype(model)
    began = time.perf_counter()
    batches = iter(progress(loader))
    while True:
        with CLOCK.phase_of("data"):  # what the straggler report calls data: waiting for the next batch
            batch = next(batches, None)
        if batch is None:
            break
        with CLOCK.phase_of("compute"):
            images, labels = batcher(*batch, dtype)
            loss = train_step(model, images, labels, optimizer, options)
            schedule.step_batch()
            if ema is not None:  # before on_step: a checkpoint written there holds this step's average
                ema.step()
            loss_sum += loss.detach().double() * len(labels)
        samples += len(labels)
        new_samples += len(labels)
        steps += 1
        if on_step is not None:
            on_step(steps, loss.detach(), loss_sum, samples)
    totals = ctx.all_reduce_sum(torch.stack([
        loss_sum, torch.tensor(float(samples), device=ctx.device, dtype=torch.float64),
        torch.tensor(float(new_samples), device=ctx.device, dtype=torch.float64)]))
    seconds = time.perf_counter() - began
    global_samples = int(totals[1].item())
    return TrainResult(float(totals[0].item()) / max(global_samples, 1), global_samples, seconds,
                       int(totals[2].item()))


@dataclass
class EvalResult:
    """Exact metrics over a whole split: every sample counted once, across all ranks."""

    loss: float
    acc: float
    count: int
    confusion: np.ndarray = field(repr=False)  # [true, predicted] counts

    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1)
        return [float(self.confusion[k, k] / totals[k]) if totals[k] else float("nan") for k in range(len(totals))]

    def to_dict(self, classes: list[str]) -> dict:
        return {
            "loss": self.loss,
            "acc": self.acc,
            "count": self.count,
            "per_class_acc": dict(zip(classes, self.per_class_acc())),
        }


def evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext, batcher: Batcher,
             amp_dtype: torch.dtype | None, num_classes: int) -> EvalResult:
    """Loss, accuracy and confusion matrix over ``loader``'s split, reduced across ranks.

    Pass the unwrapped model: the DDP wrapper broadcasts buffers in forward, and ranks may
    hold different numbers of evaluation batches.
    """
    with CLOCK.phase_of("eval"):
        return _evaluate(model, loader, ctx, batcher, amp_dtype, num_classes)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext, batcher: Batcher,
              amp_dtype: torch.dtype | None, num_classes: int) -> EvalResult:
    model.eval()
    loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=ctx.device, dtype=torch.float64)
    dtype = input_dtype(model)
    for images, labels in loader:
        images, labels = batcher(images, labels, dtype)
        with _autocast(ctx.device, amp_dtype):
            logits = model(images)
        loss_sum += F.cross_entropy(_at_least_fp32(logits), labels, reduction="sum").double()
        pred = logits.argmax(1)
        # scatter_add, not bincount: bincount on CUDA reads the maximum back to the host every batch.
        # (Sums of ones in float64 are exact in any order.)
        cells = labels * num_classes + pred
        confusion.scatter_add_(0, cells, torch.ones_like(cells, dtype=torch.float64))
        CLOCK.progressed()  # for the hang watchdog: an evaluation batch is progress too
    # One collective for everything; float64 holds counts exactly up to 2**53.
    totals = ctx.all_reduce_sum(torch.cat([loss_sum.view(1), confusion])).cpu()
    matrix = totals[1:].view(num_classes, num_classes).round().long().numpy()
    count = int(matrix.sum())
    return EvalResult(float(totals[0]) / max(count, 1), float(np.trace(matrix)) / max(count, 1), count, matrix)
