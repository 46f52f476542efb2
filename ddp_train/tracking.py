"""What a run reports: console lines, metrics.json and TensorBoard, from rank 0 only.

Other ranks get a :class:`NullTracker` whose methods do nothing, so the training loop has no
``if rank == 0`` in it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class NullTracker:
    """The tracker of ranks other than 0: every method is a no-op."""

    history: list[dict[str, Any]]

    def __init__(self) -> None:
        self.history = []

    def info(self, message: str) -> None: ...
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def log_epoch(self, record: dict[str, Any], step: int) -> None: ...
    def log_test(self, result: dict[str, Any]) -> None: ...
    def log_config(self, config_yaml: str) -> None: ...
    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        return iterable


class Tracker(NullTracker):
    """Rank 0's tracker: prints, keeps ``metrics.json`` and one TensorBoard event stream in ``tb/``."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.json"
        self.test: dict[str, Any] | None = None
        self.tty = sys.stderr.isatty()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, purge_step hides points the interrupted process logged after its checkpoint.
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    def info(self, message: str) -> None:
        print(message, flush=True)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        """Report an epoch's record (already in ``history``): console line, metrics.json, TensorBoard at ``step``."""
        self._write_metrics()
        for tag, key in (("train/loss_epoch", "train_loss"), ("valid/loss", "valid_loss"),
                         ("valid/acc", "valid_acc"), ("lr", "lr"), ("throughput/img_per_s", "img_per_s")):
            self.scalar(tag, record[key], step)
        if self.writer is not None:
            self.writer.flush()
        self.info(
            f"epoch {record['epoch']:>3} | train_loss {record['train_loss']:.4f} | valid_loss "
            f"{record['valid_loss']:.4f} | valid_acc {record['valid_acc']:.4f} | lr {record['lr']:.3g} | "
            f"{record['img_per_s']:.0f} img/s | {record['epoch_s']:.1f} s"
            + (f" | samples {record['sample_digest']}" if record.get("sample_digest") else "")
        )

    def log_test(self, result: dict[str, Any]) -> None:
        self.test = result
        self._write_metrics()
        self.info(f"test | loss {result['loss']:.4f} | acc {result['acc']:.4f} | count {result['count']} "
                  f"| {result.get('weights', 'best')} weights")
        worst = sorted(result["per_class_acc"].items(), key=lambda kv: kv[1])
        self.info("test per-class acc: " + ", ".join(f"{k} {v:.3f}" for k, v in worst))

    def log_config(self, config_yaml: str) -> None:
        if self.writer is not None:
            # Indented: TensorBoard renders text as markdown, and this keeps the YAML a code block.
            self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Hyperparameters and final metrics into the run's one event file.

        ``SummaryWriter.add_hparams`` would open a second event file in a sub-folder; writing the
        three hparams summaries to the run's own writer keeps one stream per run.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        exp, ssi, sei = hparams_summary(hparams, metrics)
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.flush()

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        if not self.tty:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _write_metrics(self) -> None:
        data: dict[str, Any] = {"history": self.history}
        if self.test is not None:
            data["test"] = self.test
        atomic_write_text(self.metrics_path, json.dumps(_clean(data), indent=2) + "\n")
