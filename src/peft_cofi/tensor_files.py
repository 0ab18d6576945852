"""Reading the package's own safetensors files (importance, input subspaces): one check of format and version.

Each file kind writes ``format`` and ``format_version`` into the safetensors header; a reader refuses another kind
or another version with a message that says what to do.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/x.safetensors"
    >>> save_file({"a": torch.zeros(1)}, path, metadata={"format": "demo", "format_version": "1", "k": "v"})
    >>> tensors, metadata = read_tagged_file(path, "demo", "1", "demo")
    >>> list(tensors), metadata
    (['a'], {'k': 'v'})
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def read_tagged_file(
    path: str | os.PathLike, format_name: str, format_version: str, kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header (without ``format``/``format_version``) of a ``kind`` file written by this package.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not a readable safetensors file, another kind of file, or another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a readable safetensors {kind} file: {error}") from error
    if metadata.get("format") != format_name:
        raise ValueError(f"{str(path)!r} is not a peft-cofi {kind} file (format={metadata.get('format')!r}).")
    if metadata.get("format_version") != format_version:
        raise ValueError(
            f"{str(path)!r} has {kind} format version {metadata.get('format_version')!r}; this peft-cofi reads "
            f"version {format_version}. Upgrade peft-cofi or recompute the {kind}."
        )
    del metadata["format"], metadata["format_version"]
    return tensors, metadata
