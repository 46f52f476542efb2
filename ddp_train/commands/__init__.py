"""The subcommands that use a trained run: ``eval``, ``predict``, ``plot``, ``demo``.

Each module has a ``main(argv) -> exit code``; they share :mod:`.common` (parser, ``fail``).
"""

from __future__ import annotations

import importlib

# command word -> module in this package (imported only when used: demo needs gradio, plot matplotlib)
SUBCOMMANDS = {"eval": "evaluate", "predict": "predict", "plot": "plot", "demo": "demo"}


def run(name: str, argv: list[str]) -> int:
    """Run subcommand ``name`` with its arguments; returns its exit code."""
    return importlib.import_module(f".{SUBCOMMANDS[name]}", __name__).main(argv)
