"""Every failure ends the job promptly: one line naming the cause, a non-zero exit, and no process
left behind (ranks or loader workers), under plain python and under torchrun.

Loader workers ignore stop signals (their rank must get them first), so a crash that leaves a
DataLoader alive used to hang at exit, joining workers that never ended.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import numpy as np

from .helpers import ROOT, clean_env

pytestmark = pytest.mark.slow  # left out of the fast tier: pytest -m 'not slow'

FAST = ["train.precision=fp32", "train.optimizer=sgd", "train.lr=0.002", "model.channels_last=false",
        "train.epochs=1", "data.num_workers=2"]


def _png(seed: int, side: int = 8) -> bytes:
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _image_folder(root: Path, bad: str) -> Path:
    """train/, val/ and test/ with classes a and b, 8 x 8 PNGs; the file ``bad`` (relative) is truncated."""
    for split, per_class in (("train", 12), ("val", 4), ("test", 4)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                (root / split / c / f"{i:02d}.png").write_bytes(_png(i))
    data = _png(0, side=64)  # big enough that half of it still has a valid header
    (root / bad).write_bytes(data[: len(data) // 2])
    return root / bad


def _leftovers(marker: str, kill: bool = False) -> list[str]:
    """Processes whose command line mentions ``marker`` (ranks and their forked loader workers do)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline.replace(chr(0), ' ')[:200]}")
            if kill:
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
    return found


def _run_timed(cmd: list[str], timeout: float, marker: str,
               crash_line: str = "ddp_train: error:") -> tuple[int, str, float, float | None]:
    """Run ``cmd``; (exit code, stderr, seconds from start to exit, seconds from the first line
    holding ``crash_line`` to exit). A run still going after ``timeout`` fails the test, and its
    processes (those whose command line holds ``marker``) are killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    start, lines, error_at = time.monotonic(), [], []

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            if crash_line in line and not error_at:
                error_at.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _leftovers(marker, kill=True)  # torchrun starts ranks in sessions of their own: found by marker
        raise AssertionError(f"still running after {timeout} s; stderr:\n{''.join(lines)[-3000:]}") from None
    end = time.monotonic()
    reader.join(5)
    return proc.returncode, "".join(lines), end - start, (end - error_at[0]) if error_at else None


def _bad_fashion(src: Path, dst: Path, index: int = 5, label: int = 200) -> Path:
    """A Fashion-MNIST folder whose training label ``index`` is ``label``."""
    dst.mkdir()
    for f in src.glob("*.gz"):
        (dst / f.name).symlink_to(f)
    labels = dst / "train-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    data[8 + index] = label  # 8 header bytes: magic and one dimension
    labels.unlink()
    labels.write_bytes(gzip.compress(bytes(data)))
    return labels


def test_bad_label_with_loader_workers_exits_with_one_line(fashion_root, tmp_path):
    labels = _bad_fashion(fashion_root, tmp_path / "fm")
    cmd = [sys.executable, "-m", "ddp_train", *FAST, "data.name=fashion_mnist", f"data.root={tmp_path / 'fm'}",
           "data.subset=64", "train.batch_size=16", f"out_dir={tmp_path / 'out'}"]
    code, err, seconds, _ = _run_timed(cmd, timeout=60, marker=str(tmp_path))
    assert code == 2, err[-3000:]
    assert err.strip().splitlines() == [
        f"ddp_train: error: data: {labels} holds label 200 at index 5, but fashion_mnist has 10 classes; "
        f"the file is damaged, fetch it again"], err[-3000:]
    assert not _leftovers(str(tmp_path))


def test_truncated_png_read_by_a_loader_worker_is_one_line_and_a_prompt_exit(tmp_path):
    bad = _image_folder(tmp_path / "imgs", "test/b/02.png")  # read in the test phase, by a worker
    cmd = [sys.executable, "-m", "ddp_train", *FAST, "data.name=image_folder", f"data.root={tmp_path / 'imgs'}",
           "data.image_size=8", "train.batch_size=8", f"out_dir={tmp_path / 'out'}"]
    code, err, seconds, after_error = _run_timed(cmd, timeout=90, marker=str(tmp_path))
    print(f"truncated PNG, plain python: exit {after_error:.1f} s after the error line ({seconds:.1f} s in all)")
    assert code == 2, err[-3000:]
    assert err.strip().splitlines() == [
        f"ddp_train: error: cannot read image {bad}: image file is truncated; remove or replace the file"], err[-3000:]
    assert after_error < 10, f"the process took {after_error:.1f} s to exit after its error"
    assert not _leftovers(str(tmp_path))


def test_data_error_on_one_rank_ends_the_torchrun_job_within_seconds(tmp_path):
    # Validation shards are strided: position 1 of val/ is read by rank 1 only, in a loader worker,
    # while rank 0 waits for it in the validation all-reduce.
    bad = _image_folder(tmp_path / "imgs", "val/a/01.png")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ddp_train", *FAST, "data.name=image_folder", f"data.root={tmp_path / 'imgs'}",
           "data.image_size=8", "train.batch_size=8", f"out_dir={tmp_path / 'out'}"]
    code, err, seconds, after_error = _run_timed(cmd, timeout=150, marker=str(tmp_path))
    print(f"data error on rank 1 under torchrun: job ended {after_error} s after the error line ({seconds:.1f} s in all)")
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("ddp_train: error:")]
    assert errors == [f"ddp_train: error: cannot read image {bad}: image file is truncated; "
                      f"remove or replace the file"], err[-4000:]
    # Rank 0, left waiting in the validation all-reduce, says in one line why it stops too.
    others = [line for line in err.splitlines() if line.startswith("ddp_train:") and line not in errors]
    assert others == [] or (len(others) == 1 and re.fullmatch(
        r"ddp_train: rank 0: lost (the rank at \S+ \(its process|a peer \(its process|rank \d+ \(its process, pid \d+ on "
        r"this machine,) ended: a crash, a kill or a lost node\) "
        r"after global step \d+; the job ends \(the first error above, if any, says why\); run it again with "
        r"resume=auto to continue from the newest checkpoint in the run folder", others[0])), err[-4000:]
    # No rank prints a traceback; torchrun's own launcher does, for the failure it reports.
    assert err.count("Traceback (most recent") == err.count("errors.ChildFailedError:"), err[-4000:]
    assert after_error is not None and after_error < 30, f"the job took {after_error} s to end after the error"
    assert not _leftovers(str(tmp_path))


# A bug, not a bad input: validation raises while the training loader's persistent workers are up.
_BUG = """
import sys
from ddp_train.training import trainer
from ddp_train.cli import main

def evaluate(*args, **kwargs):
    print("injected bug now", file=sys.stderr, flush=True)
    raise ZeroDivisionError("injected bug")

trainer.evaluate = evaluate
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_with_loader_workers_still_ends_the_process(tmp_path):
    from .helpers import TINY

    cmd = [sys.executable, "-c", _BUG, *TINY, "train.epochs=1", "data.num_workers=2", f"out_dir={tmp_path / 'out'}"]
    code, err, seconds, after_crash = _run_timed(cmd, timeout=90, marker=str(tmp_path), crash_line="injected bug now")
    print(f"bug in validation, plain python: exit {after_crash:.1f} s after the crash ({seconds:.1f} s in all)")
    assert code == 1, err[-3000:]
    assert err.rstrip().endswith("ZeroDivisionError: injected bug"), err[-3000:]  # a bug keeps its traceback
    assert after_crash < 10, f"the process took {after_crash:.1f} s to exit after the crash"
    assert not _leftovers(str(tmp_path))
