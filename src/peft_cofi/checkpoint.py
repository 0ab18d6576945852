"""peft glue for diff checkpoints: adapter state <-> the diff format, validated, atomic, and rolled back on failure.

peft writes and reads ``adapter_model.safetensors`` itself, with fixed header metadata and a non-atomic write. Two
small wrappers around peft's own safetensors calls (installed once by ``import peft_cofi``) move the CoFi header
between the file and the state dict, and write CoFi files atomically; every other peft method passes through
unchanged. ``CoFiModel`` calls :func:`encode_adapter_state` when saving and :func:`decode_adapter_state` when
loading; the latter validates everything (format, checksums, modules, shapes, base fingerprints) before a single
weight is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .diff_format import (
    CheckpointError,
    build_header,
    checksum,
    decode_diff,
    encode_diff,
    fingerprint,
    parse_header,
    write_atomic,
)

HEADER_KEY = "__cofi_header__"  # carries the header through peft's state-dict plumbing as a uint8 tensor
ERROR_KEY = "__cofi_read_error__"  # carries a read failure to the tuner, which can roll the model back
_PEFT_PREFIX = "base_model.model."
_DIFF_SUFFIXES = ("cofi_diff", "cofi_diff_rows", "cofi_diff_idx")


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def _tensor_text(tensor: torch.Tensor) -> str:
    return bytes(tensor.to(torch.uint8).tolist()).decode()


def encode_adapter_state(
    model: torch.nn.Module, config: Any, adapter_name: str, selected: dict[str, torch.Tensor], full_state: dict
) -> dict[str, torch.Tensor]:
    """Turn an adapter's ``cofi_delta``/``cofi_mask`` entries into stored diff tensors plus the header carrier."""
    from .layer import CoFiLayer

    delta_tag, mask_tag = f".cofi_delta.{adapter_name}", f".cofi_mask.{adapter_name}"
    out = {k: v for k, v in selected.items() if not (k.endswith(delta_tag) or k.endswith(mask_tag))}
    modules: dict[str, dict] = {}
    for key in sorted(k for k in selected if k.endswith(delta_tag)):
        prefix = key[: -len(delta_tag)]
        layer = _find_module(model, prefix)
        if isinstance(layer, CoFiLayer) and layer.merged:
            raise ValueError(
                f"{prefix} has its adapter merged into the base weight; call unmerge_adapter() before saving so the "
                "checkpoint records the true base weights."
            )
        mask = selected[prefix + mask_tag].detach().to("cpu", torch.float32)
        diff = selected[key].detach().to("cpu", torch.float32)
        if config.mask_mode == "update":
            diff = diff * mask.unsqueeze(1)
        encoded = encode_diff(
            diff, config.storage, config.storage_density, config.storage_dtype, config.storage_tolerance
        )
        stored = {**encoded.tensors, "cofi_mask": mask.contiguous()}
        for suffix, tensor in stored.items():
            out[f"{prefix}.{suffix}.{adapter_name}"] = tensor
        base_weight = full_state.get(prefix + ".base_layer.weight")
        if base_weight is None:
            raise ValueError(f"cannot find the base weight of {prefix} to fingerprint it.")
        modules[prefix.removeprefix(_PEFT_PREFIX)] = {
            **encoded.info,
            "base_fingerprint": fingerprint(base_weight),
            "layout": "conv1d" if getattr(layer, "is_conv1d", False) else "linear",
            "checksum": checksum(stored),
        }
    header = build_header(
        modules,
        storage=config.storage,
        density=config.storage_density,
        value_dtype=config.storage_dtype,
        mask_mode=config.mask_mode,
        base_model=config.base_model_name_or_path or _name_or_path(model),
        base_revision=config.revision,
    )
    out[HEADER_KEY] = _bytes_tensor(json.dumps(header))
    return out


def decode_adapter_state(
    model: torch.nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Validate a loaded checkpoint against the model and return ``cofi_delta``/``cofi_mask`` entries for peft.

    Raises :class:`CheckpointError` before any weight is touched; the wrappers of ``PeftModel.from_pretrained`` and
    ``load_adapter`` then remove what that call injected, so the model is left exactly as it was.
    """
    from .layer import CoFiLayer

    if ERROR_KEY in state_dict:
        raise CheckpointError(_tensor_text(state_dict[ERROR_KEY]))
    if HEADER_KEY not in state_dict:
        raise CheckpointError(
            "the checkpoint has no peft-cofi header: it was not written by peft-cofi's save_pretrained, or was "
            "re-saved by another tool; re-save it with peft-cofi."
        )
    header = json.loads(_tensor_text(state_dict[HEADER_KEY]))
    records = parse_header(header, "the checkpoint")
    rest = {k: v for k, v in state_dict.items() if k not in (HEADER_KEY, ERROR_KEY)}
    layers = {
        name.removeprefix(_PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, CoFiLayer) and adapter_name in module.cofi_delta
    }
    missing, extra = sorted(set(layers) - set(records)), sorted(set(records) - set(layers))
    if missing or extra:
        raise CheckpointError(
            f"the checkpoint does not fit the adapter's modules: missing {len(missing)} (e.g. {missing[:5]}), "
            f"unexpected {len(extra)} (e.g. {extra[:5]}). Load it with the adapter_config.json saved beside it."
        )
    converted, mismatched = {}, []
    for name, record in sorted(records.items()):
        layer = layers[name]
        stored = {
            suffix: rest.pop(f"{_PEFT_PREFIX}{name}.{suffix}")
            for suffix in (*_DIFF_SUFFIXES, "cofi_mask")
            if f"{_PEFT_PREFIX}{name}.{suffix}" in rest
        }
        if checksum(stored) != record.get("checksum"):
            raise CheckpointError(f"the stored diff of {name} is corrupt (checksum mismatch); the file was damaged.")
        shape = (layer.out_features, layer.in_features)
        if tuple(record["shape"]) != shape or stored["cofi_mask"].shape != (shape[0],):
            raise CheckpointError(f"{name}: the checkpoint holds a {tuple(record['shape'])} diff, the model {shape}.")
        if config.verify_base and record.get("base_fingerprint") != fingerprint(layer.get_base_layer().weight):
            mismatched.append(name)
        diff, mask = decode_diff(stored, record), stored["cofi_mask"].to(torch.float32)
        delta = _diff_to_delta(diff, mask) if config.mask_mode == "update" else diff
        converted[f"{_PEFT_PREFIX}{name}.cofi_delta"] = delta
        converted[f"{_PEFT_PREFIX}{name}.cofi_mask"] = mask
    if mismatched:
        raise CheckpointError(
            f"the diff was made for other base weights: {len(mismatched)} module(s) differ, e.g. {mismatched[:5]} "
            f"(expected base: {header.get('base_model', 'unknown')}). Load the matching base model, or pass a config "
            "with verify_base=False to apply it anyway."
        )
    return {**rest, **converted}


def _diff_to_delta(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Invert ``diff = mask * delta`` row-wise; rows with factor 0 cannot move, so their delta is 0."""
    scale = mask.unsqueeze(1)
    return torch.where(scale > 0, diff / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(diff))


def save_diff(
    model: Any,
    save_directory: str | os.PathLike,
    storage: str | None = None,
    density: float | None = None,
    dtype: str | None = None,
    **kwargs: Any,
) -> None:
    """``model.save_pretrained`` with the storage of every CoFi adapter chosen at save time.

    The adapters' configs are restored afterwards, so training checkpoints can stay dense while the final adapter
    is shipped sparse.

    Example:
        save_diff(model, "out/adapter", storage="topk", density=0.1, dtype="bfloat16")
    """
    from .config import CoFiConfig

    configs = [c for c in model.peft_config.values() if isinstance(c, CoFiConfig)]
    saved = [(c.storage, c.storage_density, c.storage_dtype) for c in configs]
    try:
        for config in configs:
            config.storage = storage or config.storage
            config.storage_density = density if density is not None else config.storage_density
            config.storage_dtype = dtype or config.storage_dtype
            config._check_storage()
        model.save_pretrained(str(save_directory), **kwargs)
    finally:
        for config, (mode, kept, value_dtype) in zip(configs, saved, strict=True):
            config.storage, config.storage_density, config.storage_dtype = mode, kept, value_dtype


def _find_module(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _name_or_path(model: torch.nn.Module) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "name_or_path", None) or None


# --- wrappers around peft's safetensors calls ---


def _is_cofi_directory(filename: str | os.PathLike) -> bool:
    config_path = Path(filename).with_name("adapter_config.json")
    try:
        return json.loads(config_path.read_text()).get("peft_type") == "COFI"
    except (OSError, ValueError):
        return False


def _wrap_save(original):
    def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict | None = None) -> None:
        if HEADER_KEY not in tensors:
            return original(tensors, filename, metadata=metadata)
        tensors = dict(tensors)
        header = json.loads(_tensor_text(tensors.pop(HEADER_KEY)))
        write_atomic(tensors, filename, {**(metadata or {}), **header})
        from .hub import write_model_card

        write_model_card(Path(filename).parent, header)
        return None

    save_file.__wrapped_by_peft_cofi__ = original
    return save_file


def _wrap_load(original):
    def load_file(filename: str, device: str | int = "cpu") -> dict[str, torch.Tensor]:
        if not _is_cofi_directory(filename):
            return original(filename, device=device)
        try:
            with safe_open(str(filename), framework="pt") as handle:
                header = dict(handle.metadata() or {})
            tensors = original(filename, device=device)
        except (SafetensorError, OSError) as error:
            message = f"{str(filename)!r} is not a readable safetensors file (truncated or corrupt?): {error}"
            return {ERROR_KEY: _bytes_tensor(message)}
        tensors[HEADER_KEY] = _bytes_tensor(json.dumps(header))
        return tensors

    load_file.__wrapped_by_peft_cofi__ = original
    return load_file


def _wrap_load_adapter(original):
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        is_new = adapter_name not in self.peft_config
        saved = None if is_new else _saved_config(model_id, kwargs.get("subfolder"))
        if saved is not None and saved.get("peft_type") == "COFI":
            is_trainable = args[0] if args else kwargs.get("is_trainable", False)
            _check_resumable(self.peft_config[adapter_name], saved, model_id, adapter_name, is_trainable)
        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except CheckpointError as error:
            if is_new and adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)
            if saved is not None and (hint := _config_mismatch_hint(self.peft_config[adapter_name], saved, model_id)):
                raise CheckpointError(f"{error} {hint}") from error
            raise

    load_adapter.__wrapped_by_peft_cofi__ = original
    load_adapter.__doc__ = original.__doc__
    return load_adapter


# Fields of a saved adapter_config.json that decide which modules an adapter has and how its diff is parametrised.
_STRUCTURE_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "mask_mode")


def _saved_config(model_id: str | os.PathLike, subfolder: str | None) -> dict | None:
    """The ``adapter_config.json`` of a local checkpoint directory as a dict; ``None`` if there is none."""
    path = Path(model_id, subfolder or "", "adapter_config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _normalised(field: str, value: Any) -> Any:
    if field in ("target_modules", "exclude_modules") and isinstance(value, (list, tuple, set)):
        return sorted(value)
    if field == "layers_to_transform" and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return list(value) if isinstance(value, (tuple, set)) else value


def _config_differences(config: Any, saved: dict) -> list[str]:
    """``"field: checkpoint X, this adapter Y"`` for every structural field that differs."""
    current = config.to_dict()
    out = []
    for field in _STRUCTURE_FIELDS:
        theirs, ours = _normalised(field, saved.get(field)), _normalised(field, current.get(field))
        if theirs != ours:
            out.append(f"{field}: checkpoint {theirs!r}, this adapter {ours!r}")
    return out


def _fix_advice(model_id: str | os.PathLike) -> str:
    return (
        f"Build the model from the checkpoint's own config, PeftModel.from_pretrained(base, {str(model_id)!r}, "
        "is_trainable=True), before resuming from it, or resume from a checkpoint of this configuration."
    )


def _config_mismatch_hint(config: Any, saved: dict, model_id: str | os.PathLike) -> str:
    """What differs between the checkpoint's config and the adapter it is loaded into, and how to fix it."""
    differences = _config_differences(config, saved)
    if not differences:
        return ""
    return f"Its adapter_config.json differs from this adapter's in {'; '.join(differences)}. {_fix_advice(model_id)}"


def _check_resumable(config: Any, saved: dict, model_id: str | os.PathLike, adapter_name: str, trainable: bool) -> None:
    """Refuse to continue training an adapter from a checkpoint of the other mask mode: the diff would load, but
    ``D`` means ``diff / s`` in one mode and ``diff`` in the other, so the optimizer state would not fit it."""
    theirs = saved.get("mask_mode", "update")
    if trainable and theirs != config.mask_mode:
        raise CheckpointError(
            f"cannot resume training of adapter {adapter_name!r} (mask_mode={config.mask_mode!r}) from "
            f"{str(model_id)!r}, which was trained with mask_mode={theirs!r}: the trained parameter D is the diff "
            "divided by the mask factors in 'update' mode and the diff itself in 'grad' mode, so the checkpoint's "
            "optimizer state would not fit it. "
            f"{_fix_advice(model_id)}"
        )


def _wrap_from_pretrained(original):
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        from .layer import CoFiLayer

        existing = {id(m) for m in model.modules() if isinstance(m, CoFiLayer)}
        had_config = hasattr(model, "peft_config")
        try:
            return original(cls, model, model_id, *args, **kwargs)
        except CheckpointError:
            _unwrap_new_layers(model, existing)
            if not had_config and hasattr(model, "peft_config"):
                del model.peft_config
            raise

    from_pretrained.__wrapped_by_peft_cofi__ = original
    from_pretrained.__doc__ = original.__doc__
    return classmethod(from_pretrained)


def _unwrap_new_layers(model: torch.nn.Module, existing: set[int]) -> None:
    """Put back the original modules where CoFi layers (other than ``existing``) were injected."""
    from .layer import CoFiLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, CoFiLayer) and id(module) not in existing:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())


def install_io_hooks() -> None:
    """Wrap peft's save/load entry points once (idempotent); non-CoFi adapters pass through unchanged."""
    import peft.peft_model as peft_model_module
    import peft.utils.save_and_load as save_and_load_module
    from peft import PeftModel

    for name, wrap in (("load_adapter", _wrap_load_adapter), ("from_pretrained", _wrap_from_pretrained)):
        current = PeftModel.__dict__[name]
        current = current.__func__ if isinstance(current, classmethod) else current
        setattr(PeftModel, name, wrap(getattr(current, "__wrapped_by_peft_cofi__", current)))
    for module, name, wrap in (
        (peft_model_module, "safe_save_file", _wrap_save),
        (save_and_load_module, "safe_load_file", _wrap_load),
    ):
        current = getattr(module, name)
        original = getattr(current, "__wrapped_by_peft_cofi__", current)
        setattr(module, name, wrap(original))
