from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import FASHION_ROOT, TINY_125, assert_ok, run_cli


@pytest.fixture
def fashion_root() -> Path:
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
    return FASHION_ROOT


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One trained run (TINY_125) shared by the eval, predict and fine-tune tests: its run folder."""
    out = tmp_path_factory.mktemp("tiny_run")
    assert_ok(run_cli([*TINY_125, f"out_dir={out}", "run_name=r"]))
    return out / "r"
