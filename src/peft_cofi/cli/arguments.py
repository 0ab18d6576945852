"""Argument types and the argument block shared by the commands that stream a JSONL file through a local model.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_model_data_arguments(parser, "module names or suffixes")
    >>> args = parser.parse_args(["--layers", "3,4", "--batch-size", "4"])
    >>> args.layers, args.batch_size, args.max_length
    ([3, 4], 4, None)
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..scoring import context_length
from ..windows import parse_window
from . import local_model_dir

DEFAULT_MAX_LENGTH = 512


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1.

    Example:
        >>> positive_int("3")
        3
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer.")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0.

    Example:
        >>> positive_float("0.5")
        0.5
    """
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number.")
    return value


def parse_layers(spec: str) -> str | list[int]:
    """A ``--layers`` value: a window name or fraction range (kept as a string) or comma-separated indices.

    Example:
        >>> parse_layers("3, 4,5"), parse_layers("bottom2")
        ([3, 4, 5], 'bottom2')
    """
    if re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", spec):
        return [int(part) for part in spec.split(",")]
    try:
        parse_window(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return spec


def add_model_data_arguments(parser: argparse.ArgumentParser, targets_help: str) -> None:
    """``--max-batches --batch-size --max-length --layers --target-modules --device --no-progress``."""
    parser.add_argument("--max-batches", type=positive_int, default=None, metavar="N", help="N batches per data file")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="default: %(default)s")
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"truncate examples to N tokens (default: {DEFAULT_MAX_LENGTH} or the model's context if shorter)",
    )
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        metavar="WINDOW",
        help="layer window: bottom1, bottom2, middle, top, bottom-plus, middle-plus, top-plus, a fraction range "
        "'0.25:0.5', or indices '3,4,5' (default: all layers)",
    )
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"{targets_help} (default: the architecture's FFN projections, e.g. up_proj down_proj)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def load_model(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """``args.model`` (a local folder) on ``args.device``, its tokenizer, and the ``--max-length`` to use."""
    model_dir = local_model_dir(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    max_length = args.max_length or min(DEFAULT_MAX_LENGTH, context_length(model) or DEFAULT_MAX_LENGTH)
    return model, tokenizer, max_length
