from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import FASHION_ROOT


@pytest.fixture
def fashion_root() -> Path:
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
    return FASHION_ROOT
