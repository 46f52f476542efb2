"""The data's error: what cannot be found or read, reported as one line (exit 2)."""

from __future__ import annotations

from ..errors import UserError


class DataError(UserError):
    """The data cannot be found or read; the message says how to fix it."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker's DataError comes back to the rank as DataError("Caught DataError in
        # DataLoader worker process N.\nOriginal Traceback ...\n<module>.DataError: <message>"): the
        # worker's traceback says nothing the message does not, so only the message is kept.
        marker = f"\n{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker") and marker in message:
            message = message[message.rindex(marker) + len(marker):].strip()
        super().__init__(message)
