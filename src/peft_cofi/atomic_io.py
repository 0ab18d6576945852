"""Crash-safe writes: one file (temporary file + rename), and a whole adapter folder (stage, commit, roll forward).

An adapter is two files read as a pair (``adapter_config.json`` and ``adapter_model.safetensors``, plus a model
card); two renames are not one atomic step. So a save writes every file into a staging folder inside the target,
renames that folder to ``.cofi-commit`` (the single atomic commit point), then moves the files into place. A process
killed before the commit leaves the old checkpoint (and a staging folder, removed by the next save); one killed
after it leaves a commit folder that :func:`recover` rolls forward: every peft-cofi save and load calls it first, so
each sees the old checkpoint or the new one, whole, whatever instant the writer died.

Example:
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp())
    >>> with staged_folder(target) as staging:
    ...     _ = (staging / "a.txt").write_text("new")
    >>> (target / "a.txt").read_text(), sorted(p.name for p in target.iterdir())
    ('new', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

COMMIT_DIR = ".cofi-commit"
STAGING_PREFIX = ".cofi-staging-"


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (``mkstemp`` always uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that a failure at any point leaves the previous file whole.

    The tensors go to a temporary file in the target folder, flushed to disk, given the mode a normal write would
    give, and renamed over the target (atomic on POSIX and Windows).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recover(folder: str | os.PathLike) -> None:
    """Finish a committed save that was interrupted (move the commit folder's files into place) and remove the
    staging folders of saves that died before committing. A no-op for folders without either; read-only folders and
    paths that are not local folders (Hub ids) are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    commit = folder / COMMIT_DIR
    if commit.is_dir():
        _move_into_place(commit, folder)
    for leftover in folder.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


def recover_adapter_folder(path: str | os.PathLike, subfolder: str | None = None) -> None:
    """:func:`recover` for an adapter folder and its parent (a non-default adapter is saved in a subfolder of the
    save folder, where the commit folder lives)."""
    folder = Path(path, subfolder or "")
    for candidate in (folder, folder.parent):
        with contextlib.suppress(OSError):
            recover(candidate)


def _move_into_place(commit: Path, target: Path) -> None:
    files = sorted(p for p in commit.rglob("*") if p.is_file())
    for source in files:
        destination = target / source.relative_to(commit)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another process finishing the same commit moved it first
            os.replace(source, destination)
    _fsync(target)
    shutil.rmtree(commit, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit, replace the files of ``target`` by the staged ones as one
    commit (files not staged are kept). On an exception nothing in ``target`` changes."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                os.chmod(path, _umask_mode())
                _fsync(path)
        _fsync(staging)
        os.replace(staging, target / COMMIT_DIR)  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(target / COMMIT_DIR, target)
