"""What a trained model needs to know about its data, kept in every checkpoint: the typed metadata.

Eval, predict, the demo and a resume rebuild the model (classes, channels) and its input transform
(image size, mean, std) from a checkpoint alone; :class:`DatasetMeta` is that record, written as the
checkpoint's ``"dataset"`` entry (a plain dict, so ``weights_only`` loads read it) and read back
typed, so no reader looks anything up by a string key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing data here would load the dataset readers
    from ..data import Dataset

FIELDS = ("name", "classes", "channels", "image_size", "mean", "std")


@dataclass(frozen=True)
class DatasetMeta:
    """The dataset a model was trained on, as far as using the model needs it."""

    name: str
    classes: tuple[str, ...]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetMeta:
        return cls(dataset.name, tuple(dataset.classes), dataset.channels, dataset.image_size,
                   tuple(dataset.mean), tuple(dataset.std))

    @classmethod
    def from_dict(cls, saved: Any) -> DatasetMeta | None:
        """The metadata in a checkpoint's ``"dataset"`` entry, or None when it is not complete."""
        if not isinstance(saved, dict) or not set(FIELDS) <= set(saved):
            return None
        return cls(str(saved["name"]), tuple(saved["classes"]), int(saved["channels"]), int(saved["image_size"]),
                   tuple(float(v) for v in saved["mean"]), tuple(float(v) for v in saved["std"]))

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint entry (lists, as checkpoint format 2 has always stored them)."""
        return {"name": self.name, "classes": list(self.classes), "channels": self.channels,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    def misfit(self, classes: list[str] | tuple[str, ...], channels: int) -> str:
        """Why a model trained on this data cannot continue on data with ``classes`` and ``channels`` ('' if it can)."""
        if tuple(classes) != self.classes:
            return (f"it was trained on {len(self.classes)} classes ({', '.join(self.classes[:5])}...), the data has "
                    f"{len(classes)} ({', '.join(classes[:5])}...)")
        if channels != self.channels:
            return f"it was trained on {self.channels}-channel images, the data has {channels}"
        return ""
