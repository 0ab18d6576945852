"""The ``peft-cofi`` command line: one subcommand module per concern, each exposing ``register(subparsers)``.

Example:
    main(["--version"])
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__

# Subcommand modules, each with ``register(subparsers)`` that adds its commands and their handlers.
_COMMAND_MODULES: tuple[str, ...] = (
    "checkpoint_commands",
    "importance_commands",
    "search_commands",
    "example_commands",
    "calibrate_commands",
    "subspace_commands",
)


def local_model_dir(path: str) -> Path:
    """A local transformers model folder, or a clear error (the commands read local models only).

    Example:
        >>> local_model_dir("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: '/nonexistent' is not a local model directory (no config.json).
    """
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path!r} is not a local model directory (no config.json).")
    return Path(path)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="peft-cofi", description="CoFiTune adapters for Hugging Face peft.")
    parser.add_argument("--version", action="version", version=f"peft-cofi {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code. Errors in the user's input or files print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the error's own line breaks
        print(f"peft-cofi {args.command}: error: {message}", file=sys.stderr)
        return 2
