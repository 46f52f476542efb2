"""An exponential moving average (EMA) of the model's weights, kept beside the trained ones.

As torchvision's reference recipe (``--model-ema``, ``ExponentialMovingAverage``) and timm's
``ModelEmaV3`` keep one: after every ``every`` optimizer steps, ``ema = decay * ema + (1 - decay) * w``
for every floating-point entry of the model's state dict. BatchNorm's running statistics are
floating-point buffers and are averaged the same way, as both anchors do by default (torchvision's
``use_buffers=True``, timm's ``ModelEmaV3`` without ``exclude_buffers``); integer buffers
(``num_batches_tracked``) are copied. With warm-up the decay of update ``t`` (counted from 0) is
``min(decay, 1 - (1 + t) ** (-2/3))``, timm's formula (``warmup_gamma=1``, ``warmup_power=2/3``): the
first update copies the weights, and the average forgets the random start quickly.

Every rank holds the same copy and updates it the same way (the weights are identical after each
step), so no collective is needed. The copy is one part of the checkpoint (key ``ema``, see
:meth:`ModelEma.state_dict`), so a resumed run continues it bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

Weights = dict[str, torch.Tensor]
WARMUP_POWER = 2 / 3  # timm ModelEmaV3's default warmup_power (with warmup_gamma 1)


class ModelEma:
    """The EMA copy of ``model``'s state dict (the bare module: no DDP prefix), on its device and in its dtype.

    ``evaluated``: whether the run validates, selects "best", tests and exports these weights
    (``train.eval_weights: ema``) instead of the trained ones.
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False,
                 evaluated: bool = False) -> None:
        self.model, self.decay, self.every, self.warmup, self.evaluated = model, decay, every, warmup, evaluated
        self._weights: Weights | None = None  # taken from the model when first needed (after a resume's load)
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # averaging updates made

    @property
    def weights(self) -> Weights:
        """The averaged state dict; a copy of the model's own until the first update (or a checkpoint's)."""
        if self._weights is None:
            self._weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self._weights

    def begin(self) -> None:
        """Start the average from the model as it stands, unless it has started (call before the first step).

        A resumed run has loaded the checkpoint's copy by then; one resumed from a checkpoint written
        without EMA starts it from the resumed weights.
        """
        _ = self.weights

    def decay_at(self, update: int) -> float:
        """The decay of update number ``update`` (from 0): :attr:`decay`, or less during the warm-up."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + update) ** -WARMUP_POWER)

    @torch.no_grad()
    def step(self) -> None:
        """Called after every optimizer step: averages the model in on every ``every``-th."""
        ema = self.weights
        self.steps += 1
        if self.steps % self.every:
            return
        weight = 1.0 - self.decay_at(self.updates)
        own = self.model.state_dict()
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        # lerp: ema + weight * (w - ema), one fused kernel per dtype and device; deterministic.
        torch._foreach_lerp_([ema[k] for k in floats], [own[k].detach() for k in floats], weight)
        for k, v in ema.items():
            if not v.is_floating_point():
                v.copy_(own[k])
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The model with the EMA weights in it for the duration (evaluation); its own weights put back after,
        bit for bit, even after an error. Copies in place: the DDP wrapper keeps the same parameters."""
        kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.weights)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(kept)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entry ``ema``: the averaged weights, the counters, and whether they are the run's
        evaluated weights (what ``checkpoint.evaluated_weights`` exports to ``model.pth``)."""
        return {"weights": self.weights, "steps": self.steps, "updates": self.updates, "evaluated": self.evaluated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's entry; ValueError when its weights do not fit the model."""
        from ..persistence.weights import describe_mismatch

        saved = state["weights"]
        own = self.model.state_dict()
        problem = describe_mismatch(own, saved)
        if problem:
            raise ValueError(f"its EMA weights do not fit the model: {problem}")
        self._weights = {k: v.detach().clone().copy_(saved[k]) for k, v in own.items()}
        self.steps, self.updates = int(state["steps"]), int(state["updates"])


def evaluated_weights_of(model: nn.Module, ema: ModelEma | None) -> Weights:
    """A private copy of the weights the run evaluates: the EMA copy when it is evaluated, else the model's."""
    source = ema.weights if ema is not None and ema.evaluated else model.state_dict()
    return {k: v.detach().clone() for k, v in source.items()}
