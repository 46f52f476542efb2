"""``python -m ddp_train plot RUN_DIR``: the training curves of a run as ``RUN_DIR/curves.png``.

Train loss and validation loss (left), validation accuracy (right) per epoch, read from the
run's ``metrics.json``; the best epoch (lowest validation loss, the weights in ``best.pt``) is
marked. matplotlib is an optional extra (``pip install 'ddp_train[plot]'``); it draws with the
Agg canvas, so no display is needed and no global backend is changed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .common import SubcommandParser, fail

FIGSIZE = (10.0, 4.0)  # inches
DPI = 100  # -> a 1000 x 400 PNG
INSTALL = "pip install 'ddp_train[plot]' (or: pip install matplotlib)"


def _parser() -> SubcommandParser:
    p = SubcommandParser(
        prog="ddp_train plot",
        usage="python -m ddp_train plot RUN_DIR [--output FILE]",
        description="Plot train loss, valid loss and valid accuracy per epoch from RUN_DIR/metrics.json "
                    f"into a {int(FIGSIZE[0] * DPI)}x{int(FIGSIZE[1] * DPI)} PNG. Needs matplotlib: {INSTALL}.",
        epilog="""examples:
  python -m ddp_train plot runs/demo                        # writes runs/demo/curves.png
  python -m ddp_train plot runs/demo --output demo.png""",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding metrics.json)")
    p.add_argument("--output", metavar="FILE", help="where to write the PNG (default RUN_DIR/curves.png)")
    return p


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``run_dir/metrics.json``; ValueError with the reason when unusable."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{path} not found; RUN_DIR must be a run folder (out_dir/run_name) that has "
                         f"finished at least one epoch")
    try:
        history = json.loads(path.read_text())["history"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(history, list) or not history:
        raise ValueError(f"{path} has no epochs yet")
    return history


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan  # null (NaN/inf) -> a gap


def draw(history: list[dict[str, Any]], title: str) -> Any:
    """The figure (matplotlib Figure on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [int(h["epoch"]) for h in history]
    train_loss = [_num(h.get("train_loss")) for h in history]
    valid_loss = [_num(h.get("valid_loss")) for h in history]
    valid_acc = [_num(h.get("valid_acc")) for h in history]
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, train_loss, "o-", label="train loss")
    loss_ax.plot(epochs, valid_loss, "o-", label="valid loss")
    finite = [(v, e) for v, e in zip(valid_loss, epochs) if not math.isnan(v)]
    if finite:
        best_loss, best_epoch = min(finite)
        loss_ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss")
    loss_ax.legend()
    acc_ax.plot(epochs, valid_acc, "o-", color="tab:green", label="valid accuracy")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_title("validation accuracy")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        history = read_history(run_dir)
    except ValueError as e:
        return fail(str(e))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return fail(f"plot needs matplotlib, which is not installed; install it with: {INSTALL}")
    from ..files import atomic_write_bytes

    out = Path(args.output) if args.output else run_dir / "curves.png"
    fig = draw(history, run_dir.resolve().name)
    try:
        atomic_write_bytes(out, lambda f: fig.savefig(f, format="png", dpi=DPI))
    except OSError as e:
        return fail(f"cannot write {out}: {e.strerror or e}")
    print(f"wrote {out} ({len(history)} epochs)")
    return 0
