"""Preflight: before training, every rank checks that it runs the same code, config and data as rank 0.

A node with another checkout, another torch, one different ``key=value`` or a stale copy of the
data would otherwise train silently on something else: DDP only averages gradients, it never
compares what produced them. Each rank builds a :class:`Fingerprint`; one ``all_gather_object``
gives every rank all of them, and every rank compares each to rank 0's. A mismatch stops every
rank with one line (printed by rank 0) naming the ranks, their nodes and what differs.

What is compared:

- torch: ``torch.__version__`` (build suffix included: ``2.14.1+cu130`` is not ``2.14.1+cpu``);
- ddp_train: its version and a digest of each ``ddp_train/**/*.py`` (sorted by relative path), so
  the line names the files that differ;
- the resolved config, less :data:`NODE_LOCAL_KEYS`;
- the loaded dataset: name, classes, channels, image size, and per split (train, valid, test)
  its size and a SHA-256 of its label array's bytes (60,000 labels: about a millisecond). Image
  contents are not hashed (an image_folder would have to read every file).

:data:`NODE_LOCAL_KEYS` may differ from node to node, because they describe the machine rather
than the training: ``data.root`` (mount points differ; the data found there is compared
instead), ``data.download`` (one node may hold the files that another fetches),
``data.num_workers`` (cores differ; augmentation is seeded per sample, so the batches do not
depend on it) and ``model.init_from`` (a path; DDP starts every rank from rank 0's weights).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import Config, flat_keys
from ..data import Dataset
from ..distributed.context import DistContext, environ
from ..errors import UserError

NODE_LOCAL_KEYS = ("data.root", "data.download", "data.num_workers", "model.init_from")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the ddp_train package
DIGEST_CHARS = 12  # of a SHA-256, in the message: enough to tell two apart at a glance
MAX_ITEMS = 4  # differences named per group of ranks; the rest are counted


class PreflightError(UserError):
    """This rank's code, torch, config or data differs from rank 0's."""


@dataclass(frozen=True)
class Fingerprint:
    """What one rank runs: compared field by field with rank 0's."""

    rank: int
    node: str  # "node 1, host gpu07": where the rank runs, for the message
    torch: str
    package: str  # ddp_train.__version__
    source: dict[str, str]  # "ddp_train/training/trainer.py" -> SHA-256 of its bytes
    config: dict[str, Any]  # flat keys ("train.lr") without NODE_LOCAL_KEYS
    dataset: dict[str, Any]  # see dataset_summary


def source_digests(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """SHA-256 of every ``*.py`` under ``package_dir``, keyed by its path relative to the package's parent, sorted."""
    files = sorted(package_dir.rglob("*.py"), key=lambda p: p.relative_to(package_dir.parent).as_posix())
    return {p.relative_to(package_dir.parent).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def labels_digest(labels: np.ndarray) -> str:
    """SHA-256 of the labels as int64 bytes (the loaders' dtype; a uint8 copy of the same labels hashes the same)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def dataset_summary(dataset: Dataset) -> dict[str, Any]:
    """Name, classes, channels, image size, and each split's size and labels digest (None for a split it lacks)."""
    summary: dict[str, Any] = {"name": dataset.name, "classes": list(dataset.classes), "channels": dataset.channels,
                               "image size": dataset.image_size}
    for split in ("train", "valid", "test"):
        source = getattr(dataset, split)
        summary[f"{split} size"] = None if source is None else len(source)
        summary[f"{split} labels hash"] = None if source is None else labels_digest(source.labels)
    return summary


def config_summary(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat keys, without the node-local ones."""
    return {k: v for k, v in flat_keys(cfg.to_dict()).items() if k not in NODE_LOCAL_KEYS}


def node_name(env: Mapping[str, str]) -> str:
    """Where this process runs: torchrun's node rank (GROUP_RANK) or SLURM's node id, and the host name."""
    node = env.get("GROUP_RANK") or env.get("SLURM_NODEID")
    host = f"host {socket.gethostname()}"
    return f"node {node}, {host}" if node is not None else host


def fingerprint(cfg: Config, dataset: Dataset, rank: int, node: str, package_dir: Path = PACKAGE_DIR) -> Fingerprint:
    """This rank's fingerprint (reads the package's source files: a few hundred KiB)."""
    return Fingerprint(rank, node, torch.__version__, __version__, source_digests(package_dir), config_summary(cfg),
                       dataset_summary(dataset))


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:DIGEST_CHARS]  # a digest
    return "null" if value is None else str(value)


def _mapping_diffs(kind: str, mine: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    return [f"{kind}: {key} {_short(mine.get(key))} vs rank 0's {_short(ref.get(key))}"
            for key in [*ref, *(k for k in mine if k not in ref)] if mine.get(key) != ref.get(key)]


def _source_diffs(mine: dict[str, str], ref: dict[str, str]) -> list[str]:
    changed = [p for p in ref if p in mine and mine[p] != ref[p]]
    missing = [p for p in ref if p not in mine]
    extra = [p for p in mine if p not in ref]
    named = [*(f"{p} differs" for p in changed), *(f"{p} only on rank 0" for p in missing),
             *(f"{p} only here" for p in extra)]
    if not named:
        return []
    more = f" and {len(named) - 3} more" if len(named) > 3 else ""
    return [f"source: {', '.join(named[:3])}{more}"]


def differences(mine: Fingerprint, ref: Fingerprint) -> list[str]:
    """What ``mine`` has that ``ref`` (rank 0's) does not, each as ``"kind: what X vs rank 0's Y"``; empty when they agree."""
    found = []
    if mine.torch != ref.torch:
        found.append(f"torch {mine.torch} vs rank 0's {ref.torch}")
    if mine.package != ref.package:
        found.append(f"ddp_train {mine.package} vs rank 0's {ref.package}")
    found += _source_diffs(mine.source, ref.source)
    found += _mapping_diffs("config", mine.config, ref.config)
    found += _mapping_diffs("dataset", mine.dataset, ref.dataset)
    return found


def _ranks(ranks: list[int]) -> str:
    """[1, 2, 3, 7] -> "ranks 1-3, 7"."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


_ADVICE = (("torch", "install the same torch on every node"),
           ("ddp_train", "install the same ddp_train on every node"),
           ("source", "run the same ddp_train checkout on every node"),
           ("config", "give every node the same arguments"),
           ("dataset", "give every node the same data (data.root may differ, the files it holds may not)"))


def mismatch_message(fingerprints: list[Fingerprint]) -> str | None:
    """The one line naming every rank that differs from rank 0 and how (grouped by node), or None when all agree."""
    ref = fingerprints[0]
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for fp in fingerprints[1:]:
        found = differences(fp, ref)
        if found:
            groups.setdefault((fp.node, tuple(found)), []).append(fp.rank)
    if not groups:
        return None
    parts, kinds = [], set()
    for (node, found), ranks in groups.items():
        kinds.update(item.split(" ")[0].rstrip(":") for item in found)
        more = f"; and {len(found) - MAX_ITEMS} more" if len(found) > MAX_ITEMS else ""
        parts.append(f"{_ranks(ranks)} ({node}): {'; '.join(found[:MAX_ITEMS])}{more}")
    advice = "; ".join(text for kind, text in _ADVICE if kind in kinds)
    return (f"preflight: not every rank runs what rank 0 ({ref.node}) runs: {' | '.join(parts)}. "
            f"To fix: {advice} (docs/troubleshooting.md: \"Ranks that do not agree (preflight)\")")


def check_agreement(cfg: Config, ctx: DistContext, dataset: Dataset) -> None:
    """Collective: every rank compares its fingerprint with rank 0's; any difference stops every rank.

    Every rank raises :class:`PreflightError` with the same message, only rank 0's marked
    ``report=True``, so the job prints one line. Nothing to compare in a single process.
    """
    if not ctx.distributed:
        return
    mine = fingerprint(cfg, dataset, ctx.rank, node_name(environ()))
    message = mismatch_message(ctx.all_gather_object(mine))
    if message is not None:
        error = PreflightError(message)
        error.report = ctx.is_main  # type: ignore[attr-defined]
        raise error
