"""The sparse weight-diff format: encode, decode, fingerprint, verify, and write atomically (spec: docs/FORMAT.md).

Pure tensor code with no peft: the peft glue (``checkpoint.py``) maps adapter state to and from these records.

Example:
    >>> import torch
    >>> diff = torch.zeros(4, 3); diff[1] = 1.0
    >>> record = encode_diff(diff, storage="rows")
    >>> sorted(record.tensors)
    ['cofi_diff', 'cofi_diff_rows']
    >>> torch.equal(decode_diff(record.tensors, record.info), diff)
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT_NAME = "peft-cofi-diff"
FORMAT_VERSION = "1"
STORAGES = ("dense", "rows", "topk")
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The header key holding the per-module records (JSON), beside the plain string keys.
MODULES_KEY = "cofi_modules"
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


class CheckpointError(ValueError):
    """A diff checkpoint that cannot be applied: wrong base, corrupt or truncated file, unknown version, ..."""


@dataclass
class EncodedDiff:
    """One module's diff as stored: tensors keyed by suffix, plus its record in the header."""

    tensors: dict[str, torch.Tensor]
    info: dict


def _smallest_index_dtype(max_value: int) -> torch.dtype:
    # Signed types only: unsigned 16/32-bit tensors have little operator support in torch.
    for dtype in _INDEX_DTYPES:
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"index {max_value} does not fit in int64")


def encode_diff(
    diff: torch.Tensor,
    storage: str = "dense",
    density: float | None = None,
    value_dtype: str = "float32",
    row_tolerance: float = 1e-6,
) -> EncodedDiff:
    """Encode a 2-D diff ``(out_features, in_features)`` in one storage mode.

    - ``dense``: every entry (exact in float32).
    - ``rows``: the rows whose L2 norm exceeds ``row_tolerance`` times the largest row norm, or, with ``density``,
      the ``density`` fraction of rows with the largest norms.
    - ``topk``: the ``density`` fraction of entries with the largest magnitudes, as flat indices + values.

    The record holds the shape, the storage, the kept fraction and the relative Frobenius reconstruction error
    against the dense float32 diff.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is not supported; use one of {STORAGES}.")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value dtype {value_dtype!r} is not supported; use one of {sorted(VALUE_DTYPES)}.")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r} must be in (0, 1].")
    if storage == "topk" and density is None:
        raise ValueError("storage='topk' needs a density in (0, 1], e.g. 0.1 to keep 10% of the entries.")
    diff = diff.detach().to("cpu", torch.float32).contiguous()
    if diff.dim() != 2:
        raise ValueError(f"a diff must be 2-D (out_features, in_features); got shape {tuple(diff.shape)}.")
    dtype = VALUE_DTYPES[value_dtype]
    tensors: dict[str, torch.Tensor]
    if storage == "dense":
        tensors = {"cofi_diff": diff.to(dtype)}
    elif storage == "rows":
        norms = diff.norm(dim=1)
        if density is None:
            keep = (norms > row_tolerance * norms.max()).nonzero().flatten()
        else:
            count = max(1, round(density * diff.shape[0]))
            keep = norms.topk(count).indices.sort().values
        tensors = {
            "cofi_diff_rows": keep.to(_smallest_index_dtype(diff.shape[0] - 1)),
            "cofi_diff": diff[keep].to(dtype).contiguous(),
        }
    else:
        flat = diff.flatten()
        count = max(1, round(density * flat.numel()))
        keep = flat.abs().topk(count).indices.sort().values
        tensors = {"cofi_diff_idx": keep.to(_smallest_index_dtype(flat.numel() - 1)), "cofi_diff": flat[keep].to(dtype)}
    info = {"shape": list(diff.shape), "storage": storage, "value_dtype": value_dtype}
    decoded = decode_diff(tensors, info)
    norm = diff.norm().item()
    info["kept"] = tensors["cofi_diff"].numel() / max(diff.numel(), 1)
    info["rel_error"] = (decoded - diff).norm().item() / norm if norm > 0 else 0.0
    return EncodedDiff(tensors, info)


def decode_diff(tensors: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    """Rebuild the dense float32 diff from its stored tensors and record.

    Raises:
        CheckpointError: when the tensors do not fit the record (missing, wrong shape, index out of range).
    """
    try:
        rows, cols = (int(n) for n in info["shape"])
        storage = info["storage"]
        values = tensors["cofi_diff"].to(torch.float32)
        if storage == "dense":
            if values.shape != (rows, cols):
                raise CheckpointError(f"dense diff has shape {tuple(values.shape)}, record says {(rows, cols)}")
            return values
        out = torch.zeros(rows, cols)
        if storage == "rows":
            index = tensors["cofi_diff_rows"].to(torch.int64)
            if values.shape != (index.numel(), cols) or (
                index.numel() and not 0 <= int(index.min()) <= int(index.max()) < rows
            ):
                raise CheckpointError("row-sparse diff: row indices or values do not fit the record's shape")
            out[index] = values
            return out
        if storage == "topk":
            index = tensors["cofi_diff_idx"].to(torch.int64)
            if values.shape != index.shape or (
                index.numel() and not 0 <= int(index.min()) <= int(index.max()) < rows * cols
            ):
                raise CheckpointError("top-k diff: indices or values do not fit the record's shape")
            out.view(-1)[index] = values
            return out
        raise CheckpointError(f"unknown storage {storage!r}; this peft-cofi reads {STORAGES}")
    except KeyError as error:
        raise CheckpointError(f"the diff record or tensors lack {error}") from error


def fingerprint(weight: torch.Tensor) -> str:
    """A cheap hash of a tensor's dtype, shape and bytes: any change of any bit changes it.

    Example:
        >>> w = torch.ones(2, 2)
        >>> fingerprint(w) == fingerprint(w.clone()), fingerprint(w) == fingerprint(w * 1.0000001)
        (True, False)
    """
    tensor = weight.detach().to("cpu").contiguous()
    # A zero-copy view of the raw bytes: hashing is the only pass over the data.
    payload = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
    return _digest(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode(), payload)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of a module's stored tensors (names, dtypes, shapes, bytes), to detect corrupted files.

    Example:
        >>> checksum({"a": torch.zeros(3)}) != checksum({"a": torch.ones(3)})
        True
    """
    crc = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        crc = zlib.crc32(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode(), crc)
        if tensor.numel():
            crc = zlib.crc32(memoryview(tensor.view(-1).view(torch.uint8).numpy()), crc)
    return f"{crc:08x}"


def _digest(*parts: bytes | memoryview) -> str:
    # SHA-256 (hardware-accelerated on common CPUs, ~2x BLAKE2b here), truncated to 128 bits.
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:32]


def build_header(modules: dict[str, dict], **fields: str | None) -> dict[str, str]:
    """The safetensors header metadata: string fields plus the per-module records as JSON."""
    from . import __version__

    header = {"cofi_format": FORMAT_NAME, "cofi_format_version": FORMAT_VERSION, "peft_cofi_version": __version__}
    header.update({key: str(value) for key, value in fields.items() if value is not None})
    header[MODULES_KEY] = json.dumps(modules, sort_keys=True)
    header["cofi_modules_checksum"] = _digest(header[MODULES_KEY].encode())
    return header


def parse_header(metadata: dict[str, str] | None, source: str) -> dict[str, dict]:
    """Validate the format name and version of a header and return its per-module records.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    metadata = metadata or {}
    if metadata.get("cofi_format") != FORMAT_NAME:
        raise CheckpointError(
            f"{source} is not a peft-cofi diff checkpoint (cofi_format={metadata.get('cofi_format')!r}); re-save it "
            "with peft-cofi >= 0.1."
        )
    if metadata.get("cofi_format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has diff format version {metadata.get('cofi_format_version')!r}; this peft-cofi reads version "
            f"{FORMAT_VERSION}. Upgrade peft-cofi to read it."
        )
    table = metadata.get(MODULES_KEY, "")
    if _digest(table.encode()) != metadata.get("cofi_modules_checksum"):
        raise CheckpointError(f"{source} has a damaged module table in its header (checksum mismatch).")
    try:
        return json.loads(table)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{source} has a damaged module table in its header: {error}") from error


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file, with a clear error for truncated or corrupt files."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from (error)


def write_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that a failure at any point leaves the previous file whole.

    The tensors go to a temporary file in the target folder, which is flushed to disk and then renamed over the
    target (an atomic operation on POSIX and Windows).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class DiffFile:
    """A diff checkpoint read from disk without a model: header, per-module records, stored tensors."""

    header: dict[str, str]
    records: dict[str, dict]
    tensors: dict[str, dict[str, torch.Tensor]]

    def diff(self, module: str) -> torch.Tensor:
        """The dense float32 diff ``(out_features, in_features)`` of one module."""
        return decode_diff(self.tensors[module], self.records[module])

    def mask(self, module: str) -> torch.Tensor:
        """The per-row mask factors the module was trained with."""
        return self.tensors[module]["cofi_mask"]


def read_diff_file(path: str | os.PathLike, prefix: str = "base_model.model.") -> DiffFile:
    """Read and verify (format, version, checksums) a diff checkpoint file.

    Example:
        read_diff_file("adapter/adapter_model.safetensors").records.keys()
    """
    source = repr(str(path))
    header = read_header(path)
    records = parse_header(header, source)
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in records}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                module, _, suffix = key.removeprefix(prefix).rpartition(".")
                if module in tensors:
                    tensors[module][suffix] = handle.get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{source} is truncated or corrupt: {error}") from error
    for name, stored in tensors.items():
        if checksum(stored) != records[name].get("checksum"):
            raise CheckpointError(f"{source}: the stored diff of {name} is corrupt (checksum mismatch).")
    return DiffFile(header, records, tensors)
