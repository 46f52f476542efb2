"""Early stopping on a validation metric, decided the same way on every rank.

The metric is the exact global one (``evaluate`` all-reduces the sums before dividing), the same
number on every rank; the trainer still passes the decision through one all-reduce with the
stop-signal flag it already sends at each epoch's end, so the ranks cannot part ways (a rank that
stops alone would leave the others waiting in a collective: Lightning#379, yolov5 PR#8345).
The counter is one part of the checkpoint (key ``early_stop``): a resumed run counts on.
"""

from __future__ import annotations

from typing import Any


class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` epochs in a row.

    Lower is better for ``valid_loss``, higher for ``valid_acc`` (the mode follows the metric).
    """

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "valid_loss") -> None:
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.mode = "min" if metric == "valid_loss" else "max"
        self.best: float | None = None
        self.best_epoch = 0  # 1-based epoch of self.best; 0 before the first
        self.bad_epochs = 0  # epochs in a row without an improvement
        self.reason: str | None = None  # why the run stopped, once it has

    @property
    def stop(self) -> bool:
        return self.reason is not None

    def improves(self, value: float) -> bool:
        """Better than the best so far by more than ``min_delta`` (the first value always is)."""
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Count epoch ``epoch`` (1-based) with its metric ``value``; True when the run stops after it."""
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.patience and self.reason is None:
            self.reason = (f"early stop after epoch {epoch}: {self.metric} has not improved by more than "
                           f"{self.min_delta:g} for {self.bad_epochs} epochs (train.early_stop_patience "
                           f"{self.patience}); best {self.best:.6g} at epoch {self.best_epoch}")
        return self.stop

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], int(state["best_epoch"])
        self.bad_epochs, self.reason = int(state["bad_epochs"]), state["reason"]
