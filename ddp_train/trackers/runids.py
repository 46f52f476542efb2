"""``<run>/trackers.json``: the id of each tracker's run, so that every start of a run folder continues it.

Written by rank 0 alone, atomically (a crash leaves the old file or the new one, never half of one).
It holds ids and where the run lives (project, tracking URI), never a credential.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

FILE = "trackers.json"


def read_ids(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The recorded runs by tracker name (empty when none is recorded or the file is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_id(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Record ``entry`` (the run's id and where it lives) for tracker ``name``, keeping the others'."""
    data = read_ids(run_dir)
    data[name] = entry
    atomic_write_text(Path(run_dir) / FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")
