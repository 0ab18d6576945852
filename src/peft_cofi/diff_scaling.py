"""Rescale a diff checkpoint without retraining: a new adapter folder whose diff is the old one times factors.

:func:`scale_diff` writes ``W0 + f ⊙ ΔW`` for per-row factors ``f`` (a number, or per layer / module / glob / row,
see :func:`peft_cofi.scales.expand_scales`); :func:`rewrite_diff` is the general form behind it (any new ``D`` per
module that is zero where the source stores nothing, e.g. DARE / TIES sparsification) that
:func:`peft_cofi.calibration.calibrate` uses to write its pick.

Each stored value of ``D`` is replaced by the new ``D`` at the same place, in the same value dtype, so the storage
layout (dense, rows, topk: the kept indices), the mask factors and the base fingerprints are the source's: scaling
``D`` by a row factor scales the weight diff by it in both mask modes. The folder is written like
``save_pretrained`` writes one (:func:`peft_cofi.atomic_io.staged_folder`, :func:`~peft_cofi.diff_format.build_header`,
per-module checksums, the model card), with the source's ``adapter_config.json``, and the header records the scaling
(``cofi_scaling``) and the XXH3-64 checksum of the source weights file (``cofi_source_checksum``; docs/FORMAT.md).

Example:
    scale_diff("out/adapter", "out/adapter-half", 0.5)
    scale_diff("out/adapter", "out/adapter-lines", {"*": 0.5, "model.layers.1[0-4].*": 1.0})
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open

from .atomic_io import recover_adapter_folder, staged_folder, write_atomic
from .checkpoint import read_config_file
from .diff_format import (
    _TABLE_CHECKSUM_KEY,
    CONFIG_NAME,
    DELTA,
    INDEX,
    MODULES_KEY,
    OTHERS_KEY,
    PEFT_PREFIX,
    ROWS,
    WEIGHTS_NAME,
    build_header,
    checksum,
    decode_delta,
    in_model_order,
    parse_header,
    read_diff_file,
    read_header,
)
from .hub import write_model_card
from .scales import Scales, describe_scales, expand_scales, summarize_vector

SCALING_KEY = "cofi_scaling"  # header key: JSON record of how the diff was rescaled
SOURCE_CHECKSUM_KEY = "cofi_source_checksum"  # header key: XXH3-64 of the source adapter_model.safetensors
# Header fields a rewrite sets itself rather than copying from the source.
_REPLACED = (
    "cofi_format",
    "cofi_format_version",
    "peft_cofi_version",
    MODULES_KEY,
    OTHERS_KEY,
    _TABLE_CHECKSUM_KEY,
    SCALING_KEY,
    SOURCE_CHECKSUM_KEY,
)
NewDelta = Callable[[str, torch.Tensor], torch.Tensor]


def file_checksum(path: str | os.PathLike) -> str:
    """XXH3-64 of a file's bytes, 16 hex digits (what ``cofi_source_checksum`` records).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "f")
        >>> _ = open(path, "wb").write(b"abc")
        >>> file_checksum(path) == xxhash.xxh3_64(b"abc").hexdigest()
        True
    """
    digest = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def not_cofi_advice(folder: str | os.PathLike, peft_type: object) -> str:
    """The error text for an adapter folder that holds another peft method's adapter: what it is and what would
    be needed to rescale or calibrate it.

    Example:
        >>> not_cofi_advice("lora", "LORA").split(";")[0]
        "'lora' holds a LORA adapter, not a CoFi diff checkpoint"
    """
    return (
        f"{str(folder)!r} holds a {peft_type} adapter, not a CoFi diff checkpoint; scaling and calibration work on "
        "the weight diff that a CoFi adapter stores. To calibrate it, merge it into its base "
        "(PeftModel.from_pretrained(base, folder).merge_and_unload()) and write the change as a CoFi diff with "
        "peft_cofi.full_diff.diff_from_models(base, merged, out_dir), then calibrate that folder"
        + (" (one global factor on a LoRA adapter is also just lora_alpha scaled)." if peft_type == "LORA" else ".")
    )


def cofi_weights_path(adapter: str | os.PathLike) -> Path:
    """The ``adapter_model.safetensors`` of a local CoFi adapter folder, after finishing an interrupted save.

    Raises:
        FileNotFoundError: no such folder, or no weights file in it.
        ValueError: the folder holds another peft method's adapter (see :func:`not_cofi_advice`) or no readable
            ``adapter_config.json``.

    Example:
        cofi_weights_path("out/adapter")
        PosixPath('out/adapter/adapter_model.safetensors')
    """
    folder = Path(adapter)
    if folder.is_file() and folder.name == WEIGHTS_NAME:
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(adapter)!r} is not an adapter folder (no such folder).")
    recover_adapter_folder(folder)
    config = read_config_file(folder)
    if config is None:
        raise ValueError(f"{str(folder)!r} has no readable {CONFIG_NAME}; give the folder save_pretrained wrote.")
    if config.get("peft_type") != "COFI":
        raise ValueError(not_cofi_advice(folder, config.get("peft_type")))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS_NAME} (CoFi adapters are stored as safetensors).")
    return weights


def module_rows(adapter: str | os.PathLike) -> dict[str, int]:
    """Module name -> number of output rows of a CoFi adapter's diff, in model order (from the header only).

    Example:
        module_rows("out/adapter")
        {'model.layers.8.mlp.down_proj': 576, 'model.layers.8.mlp.up_proj': 1536, ...}
    """
    weights = cofi_weights_path(adapter)
    records = parse_header(read_header(weights), repr(str(weights))).records
    return {name: records[name]["shape"][0] for name in in_model_order(records)}


def _stored_values(delta: torch.Tensor, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The entries of a dense ``D`` at the places a module's stored tensors keep (dense, rows or topk)."""
    if ROWS in stored:
        return delta[stored[ROWS].to(torch.int64)]
    if INDEX in stored:
        return delta.reshape(-1)[stored[INDEX].to(torch.int64)]
    return delta


def rewrite_diff(
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    new_delta: NewDelta,
    scaling: Mapping[str, Any],
) -> Path:
    """Write a copy of a CoFi adapter folder whose ``D`` is ``new_delta(module, D)`` for every module.

    ``D`` comes dense in float32; the new one must have its shape and be zero wherever the source stores nothing
    (only the stored places are written). Values are cast to the source's value dtype; ``scaling`` (JSON-able)
    becomes the header's ``cofi_scaling`` record (with the source's own record as ``previous`` when the source was
    itself rescaled). Tensors other than the CoFi modules' (``modules_to_save``) are copied unchanged.

    Raises:
        ValueError: ``out_dir`` is the source folder, a new ``D`` has the wrong shape, or a value overflows the
            value dtype (float16).

    Example:
        rewrite_diff("out/adapter", "out/half", lambda name, delta: delta * 0.5, {"method": "scale", "scales": 0.5})
    """
    weights = cofi_weights_path(adapter)
    source_folder, target = weights.parent, Path(out_dir)
    if target.resolve() == source_folder.resolve():
        raise ValueError(f"the output {str(target)!r} is the source adapter folder; write to another folder.")
    source = read_diff_file(weights)
    with safe_open(str(weights), framework="pt") as handle:
        prefix = PEFT_PREFIX if any(key.startswith(PEFT_PREFIX) for key in handle.keys()) else ""  # noqa: SIM118
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    for name in in_model_order(source.records):
        stored, record = source.tensors[name], source.records[name]
        shape = tuple(record["shape"])
        new = new_delta(name, decode_delta(stored, shape)).detach().to("cpu", torch.float32)
        if tuple(new.shape) != shape:
            raise ValueError(f"module {name}: the new delta has shape {tuple(new.shape)}, the module {shape}.")
        dtype = stored[DELTA].dtype
        values = _stored_values(new, stored).to(dtype).contiguous()
        if not torch.isfinite(values).all():
            raise ValueError(
                f"module {name}: the rescaled values do not fit {str(dtype).removeprefix('torch.')} (overflow or "
                "NaN); use smaller factors, or re-save the source with storage_dtype='float32' first."
            )
        written = {**stored, DELTA: values}
        records[name] = {**record, "checksum": checksum(written)}
        tensors.update({f"{prefix}{name}.{suffix}": tensor.contiguous() for suffix, tensor in written.items()})
    tensors.update({f"{prefix}{key}": tensor.contiguous() for key, tensor in source.others.items()})
    record = dict(scaling)
    if SCALING_KEY in source.header.fields:
        record["previous"] = json.loads(source.header.fields[SCALING_KEY])
    fields = {key: value for key, value in source.header.fields.items() if key not in _REPLACED}
    fields[SCALING_KEY] = json.dumps(record, sort_keys=True)
    fields[SOURCE_CHECKSUM_KEY] = file_checksum(weights)
    header = build_header(records, source.header.others, **fields)
    with staged_folder(target) as staging:
        shutil.copy2(source_folder / CONFIG_NAME, staging / CONFIG_NAME)
        if (source_folder / "README.md").is_file():
            shutil.copy2(source_folder / "README.md", staging / "README.md")
        write_atomic(tensors, staging / WEIGHTS_NAME, header)
        write_model_card(staging, header)
    return target


def scale_diff(
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    scales: Scales,
    *,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write a new CoFi adapter folder whose weight diff is the old one scaled: ``W0 + f ⊙ ΔW``.

    Args:
        adapter: the source CoFi adapter folder (as ``save_pretrained`` wrote it).
        out_dir: the new adapter folder (not the source's); files already there and not written are kept.
        scales: a number (every row of every module; ``0`` gives the base model exactly, ``1`` the same tensors
            byte for byte), or a mapping applied in order (later entries win) from a layer index, a glob on the
            module name, or a module name / dotted suffix to a number or a per-row vector (see
            :func:`peft_cofi.scales.expand_scales`).
        record: extra JSON-able fields for the header's scaling record (``calibrate`` stores its choice there).

    Scaling multiplies each stored value of ``D`` (dense, or the kept rows / entries of sparse storage) by its
    row's factor; mask factors and base fingerprints are kept, and the diff scales by ``f`` in both mask modes.
    ``modules_to_save`` tensors are whole modules, not diffs: they are copied unscaled (so with them, ``0`` is not
    the base). Returns the output folder.

    Raises:
        ValueError / TypeError: a bad ``scales`` spec (see :func:`~peft_cofi.scales.expand_scales`), a non-CoFi
            adapter (what would be needed is said), or a scaled value that overflows the stored dtype.

    Example:
        scale_diff("out/adapter", "out/wise-0.6", 0.6)
        scale_diff("out/adapter", "out/per-layer", {"*": 0.5, 9: 0.0, "model.layers.1[0-4].mlp.up_proj": 1.0})
    """
    factors = expand_scales(scales, module_rows(adapter))
    scaling = {
        "method": "scale",
        "scales": describe_scales(scales),
        "modules": {name: summarize_vector(vector) for name, vector in factors.items()},
        **dict(record or {}),
    }

    def scaled(name: str, delta: torch.Tensor) -> torch.Tensor:
        return delta * factors[name].unsqueeze(1)

    return rewrite_diff(adapter, out_dir, scaled, scaling)
