"""The one registry of what a checkpoint holds: save and restore are the same walk in two directions.

Every thing saved is one object with ``state_dict()``/``load_state_dict()`` (the model, optimizer,
schedule and loss scaler are torch's own; :class:`~ddp_train.persistence.state.TrainState` holds the
run's position; the config and dataset metadata are recorded so a checkpoint is usable alone),
registered under its checkpoint key (:data:`~ddp_train.persistence.checkpoint.KEYS`, the one
declaration of the format). :meth:`CheckpointParts.state_dict` puts a checkpoint together from them;
:meth:`CheckpointParts.load_state_dict` hands each its entry back. A new kind of state (an EMA
copy, a stopping counter) becomes one more registered part: nothing else learns its key.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .checkpoint import KEYS


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class PartError(Exception):
    """A registered part refused its entry (shapes, keys, types): ``key`` says which."""

    def __init__(self, key: str | None, error: Exception) -> None:
        super().__init__(str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__)
        self.key = key


class CheckpointParts:
    """Checkpoint keys -> the objects that fill them. A part registered with key None is flat: its
    ``state_dict()`` entries are top-level keys themselves (TrainState's position, best epoch, ...),
    and it is given the whole checkpoint back."""

    def __init__(self) -> None:
        self._parts: dict[str | None, Stateful] = {}

    def register(self, key: str | None, part: Stateful) -> None:
        if key is not None and key not in KEYS:
            raise ValueError(f"{key!r} is not a checkpoint key (checkpoint.KEYS)")
        if key in self._parts:
            raise ValueError(f"checkpoint key {key!r} registered twice")
        self._parts[key] = part

    def state_dict(self) -> dict[str, Any]:
        """The whole checkpoint, its keys in the order of :data:`KEYS`; every key filled exactly once."""
        contents: dict[str, Any] = {}
        for key, part in self._parts.items():
            entries = part.state_dict() if key is None else {key: part.state_dict()}
            twice = set(entries) & set(contents)
            if twice:
                raise ValueError(f"checkpoint keys {sorted(twice)} filled by two parts")
            contents.update(entries)
        if set(contents) != set(KEYS):
            raise ValueError(f"checkpoint parts fill {sorted(set(contents) ^ set(KEYS))} differently from checkpoint.KEYS")
        return {key: contents[key] for key in KEYS}

    def load_state_dict(self, checkpoint: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
        """Give each registered part its entry of ``checkpoint`` (flat parts: the whole of it), except the
        keys in ``skip`` (a part a resume rebuilds instead). An entry absent from an older file of the same
        format (an optional key of :data:`KEYS`) leaves its part as it is. A part that refuses its
        entry raises :class:`PartError` naming the key (a one-line ``UserError`` passes as it is)."""
        for key, part in self._parts.items():
            if key in skip or (key is not None and checkpoint.get(key) is None):
                continue
            try:
                part.load_state_dict(checkpoint if key is None else checkpoint[key])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise PartError(key, e) from None


class Scaler:
    """The fp16 loss scaler's part: None while the scaler is off (bf16, fp32, fp64), as format 2 stores it."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


class Recorded:
    """A value stored so the checkpoint is usable alone: the run's config and its dataset metadata
    (:class:`~ddp_train.persistence.meta.DatasetMeta`), as dicts. Loading keeps the saved value in
    :attr:`saved` and changes nothing: the run's own config and data win, after ``resume.check_config``
    and ``resume.check_fit`` have compared them with the saved ones."""

    def __init__(self, value: Any) -> None:
        self.value, self.saved = value, None

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.saved = state

