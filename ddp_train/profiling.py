"""Where the time and memory go: the torch.profiler window, peak memory per rank, and model FLOP utilisation.

- :class:`ProfileWindow` traces global steps A-B (``track.profile_steps``) on the ranks of
  ``track.profile_ranks`` into ``<run>/profile/rank<r>.steps<A>-<B>.pt.trace.json.gz``, a gzipped
  Chrome trace that Perfetto (ui.perfetto.dev) and TensorBoard's profile plugin open. Each step is a
  ``ProfilerStep#<global step>`` span, from the end of the step before to the end of the step's own
  loss all-reduce and checkpoint (docs/tracking.md: "Profiler window"). Off (``None``), the loop pays
  one comparison per step.
- :func:`peak_memory_mb`: CUDA's max allocated bytes on GPU, the process's peak RSS on CPU.
- :func:`train_flops_per_image`: counted once with ``FlopCounterMode`` on one forward, times 3
  (forward + backward, whose two matmuls per layer cost twice the forward).
- MFU is the achieved FLOP/s over the peak of the ranks' devices: ``track.peak_tflops`` when given,
  else a known GPU's dense bf16/fp16 peak under autocast; none on CPU (docs/tracking.md: "Memory and MFU").
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrackConfig, profile_window
from .distributed.context import DistContext

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts), matched in the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


class ProfileWindow:
    """torch.profiler over global steps ``first``..``last`` on this rank. :meth:`at` is called with the
    global step before the first step of the run and at the end of every step (after its loss all-reduce
    and its checkpoint, when one is due)."""

    def __init__(self, first: int, last: int, out: Path) -> None:
        self.first, self.last, self.out = first, last, out
        self.profiler: torch.profiler.profile | None = None

    def at(self, global_step: int) -> None:
        """``global_step`` steps are done: start before step ``first``, mark each step, stop after ``last``."""
        if self.profiler is None:
            if global_step == self.first - 1:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=True,
                                                       profile_memory=True)
                # Without a schedule torch marks no steps; these two name each step's span ProfilerStep#<global step>.
                self.profiler.record_steps = True
                self.profiler.step_num = self.first
                self.profiler.start()
            return
        if global_step < self.last:
            self.profiler.step()
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.out))
        self.first = -1  # done: never again in this process

    def close(self) -> None:
        """Stop a window the run left early (a stop signal, an error); nothing is written for it."""
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()


def profile_window_for(track: TrackConfig, ctx: DistContext, run_dir: Path) -> ProfileWindow | None:
    """This rank's window, or None when ``track.profile_steps`` is off or this rank is not chosen."""
    window = profile_window(track)
    if window is None:
        return None
    ranks = str(track.profile_ranks)
    if ranks != "all" and ctx.rank not in {int(r) for r in ranks.split(",")}:
        return None
    first, last = window
    # Gzipped: a few steps of a large model trace to hundreds of MB of JSON, and both viewers read .gz.
    return ProfileWindow(first, last,
                         Path(run_dir) / "profile" / f"rank{ctx.rank}.steps{first}-{last}.pt.trace.json.gz")


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far in MiB: CUDA max allocated on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_flops_per_image(model: nn.Module, shape: tuple[int, int, int], dtype: torch.dtype,
                          device: torch.device) -> float | None:
    """Training FLOPs per image (3x one forward's, counted by FlopCounterMode on 2 images in eval mode);
    None when the model cannot be counted (e.g. compiled)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    try:
        model.eval()  # batch-norm from its running statistics: nothing is updated, nothing synchronised
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(2, *shape, dtype=dtype, device=device))
        return 3 * counter.get_total_flops() / 2
    except Exception:  # a FLOP figure is never worth the run
        return None
    finally:
        model.train(was_training)


def peak_tflops(track: TrackConfig, device: torch.device, autocast: bool) -> float | None:
    """One rank's peak TFLOP/s for MFU: ``track.peak_tflops``, or a known GPU's tensor-core peak under
    bf16/fp16 autocast; None otherwise (CPU, fp32, an unknown GPU)."""
    if track.peak_tflops is not None:
        return track.peak_tflops
    if device.type != "cuda" or not autocast:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)


def epoch_figures(ctx: DistContext, flops_per_image: float | None, img_per_s: float,
                  peak: float | None) -> dict[str, Any]:
    """Every rank's peak memory (one small all-gather, on every rank), the achieved GFLOP/s and the MFU."""
    memory = ctx.all_gather_host(torch.tensor([peak_memory_mb(ctx.device)], dtype=torch.float64))
    figures: dict[str, Any] = {"peak_mem_mb": [float(v) for v in memory[:, 0].tolist()]}
    if flops_per_image is not None:
        achieved = flops_per_image * img_per_s  # img_per_s is the global rate: all ranks together
        figures["gflop_per_s"] = achieved / 1e9
        if peak is not None:
            figures["mfu"] = achieved / (peak * 1e12 * ctx.world_size)
    return figures


class Measures:
    """What a run measures besides its losses: the profiler window, FLOPs per image and the peak for MFU."""

    def __init__(self, track: TrackConfig, ctx: DistContext, run_dir: Path, model: nn.Module,
                 shape: tuple[int, int, int], autocast: bool) -> None:
        self.window = profile_window_for(track, ctx, run_dir)
        self.flops_per_image = train_flops_per_image(model, shape, next(model.parameters()).dtype, ctx.device)
        self.peak = peak_tflops(track, ctx.device, autocast)

    def figures(self, ctx: DistContext, img_per_s: float) -> dict[str, Any]:
        """The epoch's figures (on every rank: one all-gather): see :func:`epoch_figures`."""
        return epoch_figures(ctx, self.flops_per_image, img_per_s, self.peak)

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
