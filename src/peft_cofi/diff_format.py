"""The diff checkpoint format (spec: docs/FORMAT.md): stored tensors, header, fingerprints, checksums, reading.

Pure tensor and file code with no peft: :mod:`peft_cofi.checkpoint` maps an adapter's state to and from it.

A module's trained state is ``D`` (``cofi_delta``) and the mask factors ``s`` (``cofi_mask``); its weight diff is
:func:`peft_cofi.mask.masked_diff` of the two. Storage keeps all of ``D`` (``dense``) or only the rows / entries where
the *diff* is largest (``rows`` / ``topk``), in a chosen value dtype.

Example:
    >>> import torch
    >>> delta = torch.zeros(4, 3); delta[1] = 1.0
    >>> encoded = encode_delta(delta, torch.ones(4), "update", storage="rows")
    >>> sorted(encoded.tensors)
    ['cofi_delta', 'cofi_delta_rows']
    >>> torch.equal(decode_delta(encoded.tensors, (4, 3)), delta)
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open

from ._version import __version__
from .atomic_io import recover_adapter_folder
from .mask import MASK_MODES, masked_diff

FORMAT_NAME = "peft-cofi-diff"
FORMAT_VERSION = "2"
STORAGES = ("dense", "rows", "topk")
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_PREFIX = "base_model.model."  # peft's key prefix for the wrapped model's modules
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# Stored tensor names: exactly the CoFi layer's own parameter and buffer names (minus the adapter name), so every
# loader that maps file keys onto parameters (peft's, transformers') sees the same thing.
DELTA, ROWS, INDEX, MASK, FINGERPRINT = (
    "cofi_delta",
    "cofi_delta_rows",
    "cofi_delta_idx",
    "cofi_mask",
    "cofi_base_fingerprint",
)
SUFFIXES = (DELTA, ROWS, INDEX, MASK, FINGERPRINT)
MODULES_KEY = "cofi_modules"  # header key of the per-module records (JSON)
OTHERS_KEY = "cofi_other"  # header key of the non-CoFi tensors (modules_to_save, embeddings) -> checksum (JSON)
SUBSPACE_KEY = "cofi_input_subspace"  # optional header key: the input subspace the adapter was trained with (JSON)
_TABLE_CHECKSUM_KEY = "cofi_header_checksum"
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
FINGERPRINT_BYTES = 32


class CheckpointError(ValueError):
    """A diff checkpoint that cannot be applied: wrong base, corrupt or truncated file, unknown version, ..."""


@dataclass
class EncodedModule:
    """One module's ``D`` as stored: tensors keyed by suffix, plus its header record."""

    tensors: dict[str, torch.Tensor]
    info: dict


def _smallest_index_dtype(max_value: int) -> torch.dtype:
    # Signed types only: unsigned 16/32-bit tensors have little operator support in torch.
    return next(d for d in _INDEX_DTYPES if max_value <= torch.iinfo(d).max)


def check_storage(storage: str, density: float | None, value_dtype: str, tolerance: float = 0.0) -> None:
    """Validate storage settings (the one home of these checks; ``CoFiConfig`` and ``save_diff`` call it).

    Raises:
        ValueError: naming the setting and the accepted values.

    Example:
        >>> check_storage("topk", None, "float32")
        Traceback (most recent call last):
        ...
        ValueError: storage='topk' needs storage_density, the fraction of entries to keep (e.g. 0.1).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is not supported; use one of {STORAGES}.")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"storage_dtype={value_dtype!r} is not supported; use one of {sorted(VALUE_DTYPES)}.")
    if density is not None and (
        isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1
    ):
        raise ValueError(f"storage_density={density!r} must be a fraction in (0, 1], e.g. 0.1.")
    if storage == "topk" and density is None:
        raise ValueError("storage='topk' needs storage_density, the fraction of entries to keep (e.g. 0.1).")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"storage_tolerance={tolerance!r} must be in [0, 1).")


def encode_delta(
    delta: torch.Tensor,
    mask: torch.Tensor,
    mask_mode: str,
    storage: str = "dense",
    density: float | None = None,
    value_dtype: str = "float32",
    row_tolerance: float = 0.0,
) -> EncodedModule:
    """Encode one module's ``D`` ``(out_features, in_features)`` in one storage mode.

    - ``dense``: every entry.
    - ``rows``: the rows whose diff norm exceeds ``row_tolerance`` times the largest, or with ``density`` that
      fraction of rows with the largest diff norms.
    - ``topk``: the ``density`` fraction of entries with the largest diff magnitudes, as flat indices + values.

    Rows and entries are chosen by the size of the weight *diff* (``masked_diff``), not of ``D``: a protected row
    can have a large ``D`` and a tiny effect. The record holds shape, storage, kept fraction and the relative
    Frobenius error of the decoded diff against the exact one.

    Raises:
        ValueError: ``D`` holds NaN or inf, or a value the lossy value dtype cannot represent (it would load as inf).
    """
    check_storage(storage, density, value_dtype, row_tolerance)
    delta = delta.detach().to("cpu", torch.float32).contiguous()
    if delta.dim() != 2 or mask.shape != (delta.shape[0],):
        raise ValueError(f"cannot encode a {tuple(delta.shape)} delta with a {tuple(mask.shape)} mask.")
    if not torch.isfinite(delta).all():
        raise ValueError("the trained delta holds NaN or inf values; training diverged, so it is not saved.")
    dtype = VALUE_DTYPES[value_dtype]
    largest, limit = (delta.abs().max().item() if delta.numel() else 0.0), torch.finfo(dtype).max
    if largest > limit:
        raise ValueError(
            f"the trained delta holds values up to {largest:.3g}, beyond {value_dtype}'s largest ({limit:.3g}); store "
            "it as storage_dtype='bfloat16' or 'float32'."
        )
    diff = masked_diff(delta, mask.to(torch.float32), mask_mode)
    tensors: dict[str, torch.Tensor]
    if storage == "dense":
        tensors = {DELTA: delta.to(dtype)}
    elif storage == "rows":
        norms = diff.norm(dim=1)
        if density is None:
            keep = (norms > row_tolerance * norms.max()).nonzero().flatten() if norms.max() > 0 else norms.new_zeros(0)
        else:
            keep = norms.topk(max(1, round(density * diff.shape[0]))).indices.sort().values
        keep = keep.to(torch.int64)
        tensors = {ROWS: keep.to(_smallest_index_dtype(diff.shape[0] - 1)), DELTA: delta[keep].to(dtype).contiguous()}
    else:
        flat = diff.flatten()
        keep = flat.abs().topk(max(1, round(density * flat.numel()))).indices.sort().values
        tensors = {INDEX: keep.to(_smallest_index_dtype(flat.numel() - 1)), DELTA: delta.flatten()[keep].to(dtype)}
    decoded = masked_diff(decode_delta(tensors, tuple(delta.shape)), mask.to(torch.float32), mask_mode)
    norm = diff.norm().item()
    info = {
        "shape": list(delta.shape),
        "storage": storage,
        "value_dtype": value_dtype,
        "kept": tensors[DELTA].numel() / max(delta.numel(), 1),
        "rel_error": (decoded - diff).norm().item() / norm if norm > 0 else 0.0,
    }
    return EncodedModule(tensors, info)


def storage_of(tensors: dict[str, torch.Tensor]) -> str:
    """The storage mode a module's stored tensors are in, from which index tensor they have."""
    return "rows" if ROWS in tensors else "topk" if INDEX in tensors else "dense"


def decode_delta(tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Rebuild the dense float32 ``D`` of shape ``shape`` from a module's stored tensors.

    Raises:
        CheckpointError: the tensors do not fit the shape (missing values, wrong sizes, indices out of range or not
            ascending and unique, non-float values, NaN or inf).
    """
    rows, cols = shape
    if DELTA not in tensors:
        raise CheckpointError(f"it has no {DELTA} tensor")
    if ROWS in tensors and INDEX in tensors:
        raise CheckpointError(f"it has both {ROWS} and {INDEX}; a module is stored in one mode")
    values = tensors[DELTA]
    if not values.is_floating_point():
        raise CheckpointError(f"its {DELTA} has dtype {values.dtype}, not a float dtype")
    values = values.to(torch.float32)
    if not torch.isfinite(values).all():
        raise CheckpointError(f"its {DELTA} holds NaN or inf values")
    storage = storage_of(tensors)
    if storage == "dense":
        if values.shape != (rows, cols):
            raise CheckpointError(f"its dense {DELTA} has shape {tuple(values.shape)}, the module {(rows, cols)}")
        return values
    index_name, limit, expected = (ROWS, rows, (-1, cols)) if storage == "rows" else (INDEX, rows * cols, (-1,))
    index = tensors[index_name]
    if index.is_floating_point() or index.dim() != 1:
        raise CheckpointError(
            f"its {index_name} must be a 1-D integer tensor; it is {index.dtype} {tuple(index.shape)}"
        )
    index = index.to(torch.int64)
    if values.dim() != len(expected) or values.shape[0] != index.numel() or values.shape[1:] != expected[1:]:
        raise CheckpointError(f"its {DELTA} {tuple(values.shape)} does not fit {index.numel()} {storage} indices")
    if index.numel() and not (int(index[0]) >= 0 and int(index[-1]) < limit and bool((index.diff() > 0).all())):
        raise CheckpointError(f"its {index_name} must be ascending, unique indices in [0, {limit})")
    out = torch.zeros(rows, cols)
    if storage == "rows":
        out[index] = values
    else:
        out.view(-1)[index] = values
    return out


def _xxh3_128(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    digest = xxhash.xxh3_128(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(memoryview(tensor.view(-1).view(torch.uint8).numpy()))  # zero-copy: one pass over the bytes
    return digest.digest()


_ROUNDINGS = (torch.bfloat16, torch.float16)  # one 16-byte hash per precision, in this order


def fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Identify a base weight: 128-bit hashes (XXH3) of it rounded to bfloat16 and to float16, as 32 ``uint8``.

    The same model loaded in float32, bfloat16 or float16 keeps a matching hash (see :func:`same_base`), so a diff
    trained on a float32 base applies to its bfloat16 copy; any change the roundings can see changes both. It is no
    defence against someone crafting a colliding base.

    Example:
        >>> w = torch.linspace(-1, 1, 6).reshape(2, 3)
        >>> torch.equal(fingerprint(w), fingerprint(w.clone())), torch.equal(fingerprint(w), fingerprint(w + 0.01))
        (True, False)
    """
    return torch.frombuffer(bytearray(b"".join(_xxh3_128(weight.to(dtype)) for dtype in _ROUNDINGS)), dtype=torch.uint8)


def same_base(stored: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``weight`` is the base a stored :func:`fingerprint` names: equal at bfloat16 or at float16 precision
    (a float32 base and its bfloat16 copy agree on the first; the float16 hash covers float16 bases).

    Example:
        >>> w = torch.randn(4, 4)
        >>> same_base(fingerprint(w), w.to(torch.bfloat16)), same_base(fingerprint(w), w.to(torch.float16))
        (True, True)
    """
    parts = stored.view(len(_ROUNDINGS), -1)
    return any(
        bytes(part.tolist()) == _xxh3_128(weight.to(dtype)) for part, dtype in zip(parts, _ROUNDINGS, strict=True)
    )


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A 64-bit hash (XXH3) of named tensors (names, dtypes, shapes, bytes), to detect corrupted files.

    Example:
        >>> checksum({"a": torch.zeros(3)}) != checksum({"a": torch.ones(3)})
        True
    """
    digest = xxhash.xxh3_64()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _table_checksum(metadata: dict[str, str]) -> str:
    table = "|".join(metadata.get(k, "") for k in (MODULES_KEY, OTHERS_KEY, "mask_mode"))
    return xxhash.xxh3_64(table.encode()).hexdigest()


def build_header(modules: dict[str, dict], others: dict[str, str], **fields: str | None) -> dict[str, str]:
    """The safetensors header metadata: string fields, the per-module records and the other tensors' checksums."""
    header = {"format": "pt", "cofi_format": FORMAT_NAME, "cofi_format_version": FORMAT_VERSION}
    header["peft_cofi_version"] = __version__
    header.update({key: str(value) for key, value in fields.items() if value is not None})
    header[MODULES_KEY] = json.dumps(modules, sort_keys=True)
    header[OTHERS_KEY] = json.dumps(others, sort_keys=True)
    header[_TABLE_CHECKSUM_KEY] = _table_checksum(header)
    return header


@dataclass
class Header:
    """A parsed, validated header: per-module records, the other tensors' checksums, and the string fields."""

    records: dict[str, dict]
    others: dict[str, str]
    fields: dict[str, str]

    @property
    def mask_mode(self) -> str:
        return self.fields.get("mask_mode", "update")


def is_cofi_header(metadata: dict[str, str] | None) -> bool:
    """Whether safetensors metadata carries a peft-cofi header (of any version)."""
    return bool(metadata) and metadata.get("cofi_format") == FORMAT_NAME


def parse_header(metadata: dict[str, str] | None, source: str) -> Header:
    """Validate a header (format, version, table checksum, record structure) and return it parsed.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    metadata = metadata or {}
    if not is_cofi_header(metadata):
        raise CheckpointError(f"{source} is not a peft-cofi diff checkpoint (no peft-cofi header).")
    version = metadata.get("cofi_format_version")
    if version == "1":
        raise CheckpointError(
            f"{source} has diff format version 1 (peft-cofi 0.1, which stored the diff itself under 'cofi_diff'); "
            f"this peft-cofi reads version {FORMAT_VERSION} only. Retrain, or load it with peft-cofi 0.1 and apply it "
            "with merge_and_unload()."
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has diff format version {version!r}; this peft-cofi reads version {FORMAT_VERSION}. "
            "Upgrade peft-cofi to read it."
        )
    if _table_checksum(metadata) != metadata.get(_TABLE_CHECKSUM_KEY):
        raise CheckpointError(f"{source} has a damaged module table in its header (checksum mismatch).")
    try:
        records = json.loads(metadata.get(MODULES_KEY, ""))
        others = json.loads(metadata.get(OTHERS_KEY, "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{source} has a damaged module table in its header: {error}") from error
    if not isinstance(records, dict) or not isinstance(others, dict):
        raise CheckpointError(f"{source}: the header's module tables must be JSON objects.")
    for name, record in records.items():
        if not isinstance(record, dict):
            raise CheckpointError(f"{source}: the header record of {name} is {record!r}, not an object.")
        shape = record.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
            raise CheckpointError(f"{source}: the header record of {name} has no valid shape (got {shape!r}).")
        if not isinstance(record.get("checksum"), str):
            raise CheckpointError(f"{source}: the header record of {name} has no checksum.")
    mask_mode = metadata.get("mask_mode", "update")
    if mask_mode not in MASK_MODES:
        raise CheckpointError(f"{source}: unknown mask_mode {mask_mode!r} in the header (known: {MASK_MODES}).")
    fields = {k: v for k, v in metadata.items() if k not in (MODULES_KEY, OTHERS_KEY)}
    return Header(records, {k: str(v) for k, v in others.items()}, fields)


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file, with a clear error for missing, truncated or corrupt files."""
    if not os.path.exists(path):
        raise CheckpointError(f"{str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from (error)


def in_model_order(names: Iterable[str]) -> list[str]:
    """Module names sorted as a model lists them: numbered parts by number (layer 8 before layer 10).

    Example:
        >>> in_model_order(["layers.10.up", "layers.8.up", "layers.8.down"])
        ['layers.8.down', 'layers.8.up', 'layers.10.up']
    """
    return sorted(names, key=lambda name: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")])


def split_key(key: str) -> tuple[str, str]:
    """``(module, suffix)`` of a stored key without peft's prefix; suffix ``""`` for a non-CoFi tensor.

    Example:
        >>> split_key("base_model.model.model.layers.1.mlp.up_proj.cofi_delta")
        ('model.layers.1.mlp.up_proj', 'cofi_delta')
    """
    module, _, suffix = key.removeprefix(PEFT_PREFIX).rpartition(".")
    return (module, suffix) if suffix in SUFFIXES else (key.removeprefix(PEFT_PREFIX), "")


@dataclass
class DiffFile:
    """A diff checkpoint read from disk without a model: header, per-module records, stored tensors."""

    header: Header
    tensors: dict[str, dict[str, torch.Tensor]]
    others: dict[str, torch.Tensor]

    @property
    def records(self) -> dict[str, dict]:
        return self.header.records

    def delta(self, module: str) -> torch.Tensor:
        """The dense float32 trained state ``D`` of one module."""
        return decode_delta(self.tensors[module], tuple(self.records[module]["shape"]))

    def mask(self, module: str) -> torch.Tensor:
        """The per-row mask factors the module was trained with."""
        return self.tensors[module][MASK].to(torch.float32)

    def diff(self, module: str) -> torch.Tensor:
        """The dense float32 weight diff ``W_tuned - W_base`` ``(out_features, in_features)`` of one module."""
        return masked_diff(self.delta(module), self.mask(module), self.header.mask_mode)


def read_diff_file(path: str | os.PathLike) -> DiffFile:
    """Read and verify (format, version, structure, checksums) a diff checkpoint file written by peft-cofi.

    Example:
        read_diff_file("adapter/adapter_model.safetensors").records.keys()
    """
    source = repr(str(path))
    recover_adapter_folder(Path(path).parent)  # finish a save that was interrupted after its commit
    header = parse_header(read_header(path), source)
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in header.records}
    others: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                module, suffix = split_key(key)
                if suffix and module in tensors:
                    tensors[module][suffix] = handle.get_tensor(key)
                elif key.removeprefix(PEFT_PREFIX) in header.others:
                    others[key.removeprefix(PEFT_PREFIX)] = handle.get_tensor(key)
                else:
                    raise CheckpointError(f"{source} holds a tensor {key!r} that its header does not describe.")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{source} is truncated or corrupt: {error}") from error
    for name, stored in tensors.items():
        if checksum(stored) != header.records[name]["checksum"]:
            raise CheckpointError(f"{source}: the stored diff of {name} is corrupt (checksum mismatch).")
    for key, tensor in others.items():
        if checksum({key: tensor}) != header.others[key]:
            raise CheckpointError(f"{source}: the stored tensor {key} is corrupt (checksum mismatch).")
    missing = sorted(set(header.others) - set(others))
    if missing:
        raise CheckpointError(f"{source} lacks tensors its header lists: {missing[:5]}.")
    return DiffFile(header, tensors, others)
