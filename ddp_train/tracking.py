"""What a run reports: console lines, metrics.json, TensorBoard and the W&B/MLflow sinks, from rank 0 only.

Other ranks get a :class:`NullTracker` whose methods do nothing, so the training loop has no
``if rank == 0`` in it.

The W&B and MLflow sinks (:mod:`ddp_train.trackers`) get the same scalars, batched in rows: one per
global step for the step's training values, then one for what the step's epoch end adds (validation,
test, figures); a sink that fails is dropped with a warning line and never stops the run.

A write of metrics.json or TensorBoard that fails (full disk, permissions, the run folder removed)
does not stop the tracker's caller: the first failure is kept as one line (:class:`TrackerWriteError`),
later writes are skipped, and the trainer ends every rank with it at the next step's agreement
(:attr:`failed`, :meth:`check`) or at :meth:`close`.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .files import atomic_write_text, clean_json, write_error_advice, write_error_reason
from .errors import UserError
from .persistence.runrecord import read_record
from .trackers import Sinks


class TrackerWriteError(UserError):
    """metrics.json or the TensorBoard event file could not be written."""


def _quiet_tensorboard_thread() -> None:
    """Keep a failed write of TensorBoard's writer thread from printing a traceback.

    The thread keeps its error for the writer's next call in the main thread, where the tracker
    turns it into one line, then re-raises it, which Python prints (``Exception in thread``).
    Installed once per process; every other thread's exception is printed as before.
    """
    previous = threading.excepthook
    if getattr(previous, "ddp_train_quiet_tensorboard", False):
        return

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.ddp_train_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _figures_text(figures: dict[str, Any] | None) -> str:
    """The epoch line's end: the largest peak memory of the ranks, the achieved GFLOP/s and the MFU."""
    if not figures:
        return ""
    memory = figures.get("peak_mem_mb") or [0.0]
    text = f" | peak mem {max(memory):.0f} MB" + (f" (max of {len(memory)} ranks)" if len(memory) > 1 else "")
    if "gflop_per_s" in figures:
        text += f" | {figures['gflop_per_s']:.1f} GFLOP/s"
    if "mfu" in figures:
        text += f" | MFU {100 * figures['mfu']:.1f}%"
    return text


class NullTracker:
    """The tracker of ranks other than 0: every method is a no-op."""

    history: list[dict[str, Any]]

    def __init__(self) -> None:
        self.history = []

    def info(self, message: str) -> None: ...
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def log_epoch(self, record: dict[str, Any], step: int, figures: dict[str, Any] | None = None) -> None: ...
    def log_test(self, result: dict[str, Any]) -> None: ...
    def log_config(self, config_yaml: str) -> None: ...
    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...
    def end(self) -> None: ...
    def check(self) -> None: ...

    @property
    def failed(self) -> bool:
        """A write has failed (:meth:`check` raises it); cheap, never blocks."""
        return False

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        return iterable


class Tracker(NullTracker):
    """Rank 0's tracker: prints, keeps ``metrics.json`` and a TensorBoard event stream in ``tb/`` (one event
    file per start of the run: a resumed run adds one, and TensorBoard reads the folder's files as one run)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None,
                 sinks: Sinks | None = None) -> None:
        super().__init__()
        self.sinks = sinks if sinks is not None else Sinks([])
        # The sinks' row being filled: its scalars, global step and part (False: the step's training values,
        # True: its epoch end's). Sent when either changes; a resumed start's first row follows the checkpoint's step.
        self._pending: dict[str, float] = {}
        self._pending_step = 0 if purge_step is None else purge_step - 1
        self._pending_end = False
        self._finished = False
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.json"
        self.test: dict[str, Any] | None = None
        # A run resumed from another run's checkpoint says so in metrics.json too (see runrecord).
        self.resumed_from = (read_record(self.run_dir) or {}).get("resumed_from")
        self.tty = sys.stderr.isatty()
        self.writer = None
        self.error: TrackerWriteError | None = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            # On resume, purge_step hides points the interrupted process logged after its checkpoint.
            self.writer = self._board(lambda: SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step))

    @property
    def failed(self) -> bool:
        return self.error is not None

    def check(self) -> None:
        """Raise the first failed write, if any (:class:`TrackerWriteError`, one line)."""
        if self.error is not None:
            raise self.error

    def _attempt(self, what: str, path: Path, write: Callable[[], Any]) -> Any:
        """``write()``, keeping an OSError as the tracker's error (the first one); skipped after a failure."""
        if self.error is not None:
            return None
        try:
            return write()
        except OSError as e:
            kept = "the checkpoints written so far are kept; " if self.run_dir.is_dir() else ""
            self.error = TrackerWriteError(f"{what}: cannot write {path}: {write_error_reason(e, self.run_dir)}; "
                                           f"{kept}{write_error_advice(self.run_dir)}")
            return None

    def _board(self, write: Callable[[], Any]) -> Any:
        """A TensorBoard write (to ``tb/``) through :meth:`_attempt`."""
        return self._attempt("TensorBoard", self.run_dir / "tb", write)

    def info(self, message: str) -> None:
        print(message, flush=True)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self._board(lambda: self.writer.add_scalar(tag, value, step))
        if self.sinks.sinks:
            # Once a step's epoch end has begun, later scalars of that step (timings) join the epoch end's row.
            self._queue({tag: float(value)}, step, self._pending_end and step == self._pending_step)

    def _queue(self, values: dict[str, float], step: int, epoch_end: bool) -> None:
        """Add ``values`` to the sinks' row of (``step``, ``epoch_end``), sending the pending row first if it differs."""
        if (step, epoch_end) != (self._pending_step, self._pending_end):
            self._flush_sinks()
        self._pending_step, self._pending_end = step, epoch_end
        self._pending.update(values)

    def _flush_sinks(self) -> None:
        """Send the pending row to the sinks (one call each)."""
        pending, self._pending = self._pending, {}
        self.sinks.scalars(pending, self._pending_step, self._pending_end)

    def log_epoch(self, record: dict[str, Any], step: int, figures: dict[str, Any] | None = None) -> None:
        """Report an epoch's record (already in ``history``): console line, metrics.json, TensorBoard and the
        sinks at ``step``; ``figures`` (peak memory per rank, GFLOP/s, MFU: ddp_train/profiling.py) go to the
        line and the trackers, not to metrics.json (they differ between equal runs)."""
        self._write_metrics()
        figures = figures or {}
        values = {tag: float(record[key]) for tag, key in (
            ("train/loss_epoch", "train_loss"), ("valid/loss", "valid_loss"), ("valid/acc", "valid_acc"),
            ("lr", "lr"), ("throughput/img_per_s", "img_per_s"))}
        values.update({f"memory/peak_mb/rank{rank}": mb for rank, mb in enumerate(figures.get("peak_mem_mb", []))})
        values.update({tag: figures[key] for tag, key in (("throughput/gflop_per_s", "gflop_per_s"),
                                                          ("throughput/mfu", "mfu")) if key in figures})
        for tag, value in values.items():
            if self.writer is not None:
                self._board(lambda tag=tag, value=value: self.writer.add_scalar(tag, value, step))
        if self.sinks.sinks:  # the epoch end's row: a resume after a stop on the epoch's last step sends it then
            self._queue(values, step, True)
        if self.writer is not None:
            self._board(self.writer.flush)
        self.info(
            f"epoch {record['epoch']:>3} | train_loss {record['train_loss']:.4f} | valid_loss "
            f"{record['valid_loss']:.4f} | valid_acc {record['valid_acc']:.4f} | lr {record['lr']:.3g} | "
            f"{record['img_per_s']:.0f} img/s | {record['epoch_s']:.1f} s"
            + (f" | samples {record['sample_digest']}" if record.get("sample_digest") else "")
            + _figures_text(figures)
        )

    def log_test(self, result: dict[str, Any]) -> None:
        self.test = result
        self._write_metrics()
        if self.sinks.sinks:  # in the last epoch end's row (TensorBoard has them in the hparams)
            self._queue({"test/loss": float(result["loss"]), "test/acc": float(result["acc"])}, self._pending_step, True)
        self.info(f"test | loss {result['loss']:.4f} | acc {result['acc']:.4f} | count {result['count']} "
                  f"| {result.get('weights', 'best')} weights")
        worst = sorted(result["per_class_acc"].items(), key=lambda kv: kv[1])
        self.info("test per-class acc: " + ", ".join(f"{k} {v:.3f}" for k, v in worst))

    def log_config(self, config_yaml: str) -> None:
        if self.writer is not None:
            # Indented: TensorBoard renders text as markdown, and this keeps the YAML a code block.
            text = "    " + config_yaml.replace("\n", "\n    ")
            self._board(lambda: self.writer.add_text("config", text, 0))

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Hyperparameters and final metrics into the run's one event file.

        ``SummaryWriter.add_hparams`` would open a second event file in a sub-folder; writing the
        three hparams summaries to the run's own writer keeps one stream per run. The sinks got the
        hyperparameters when they opened, and get the final metrics at the last step.
        """
        if self.sinks.sinks:
            self._queue({k: float(v) for k, v in metrics.items()}, self._pending_step, True)
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        writer = self.writer

        def write() -> None:
            exp, ssi, sei = hparams_summary(hparams, metrics)
            file_writer = writer._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary)
            for key, value in metrics.items():
                writer.add_scalar(key, value, 0)
            writer.flush()

        self._board(write)

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        if not self.tty:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def close(self) -> None:
        """Flush and close the event file and the sinks (their runs marked finished); then raise the first failed
        write, if any (:meth:`check`)."""
        self._finished = True
        self.end()
        self.check()

    def end(self) -> None:
        """Flush and close the event file if still open (on every way out of a run); never raises, a failure
        is kept for :meth:`check`. The sinks' runs are marked finished after :meth:`close`, stopped otherwise."""
        if self.sinks.sinks:
            self._flush_sinks()
            self.sinks.close(self._finished)
        writer, self.writer = self.writer, None
        if writer is None:
            return
        if self.error is None:
            self._board(writer.close)
            return
        try:  # its thread may be gone after a failure: closed all the same, its error is already kept
            writer.close()
        except OSError:
            pass

    def _write_metrics(self) -> None:
        data: dict[str, Any] = {"history": self.history}
        if self.resumed_from:
            data["resumed_from"] = self.resumed_from
        if self.test is not None:
            data["test"] = self.test
        text = json.dumps(clean_json(data), indent=2) + "\n"
        self._attempt("metrics", self.metrics_path, lambda: atomic_write_text(self.metrics_path, text))
