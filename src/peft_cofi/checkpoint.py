"""Adapter state <-> diff files: what a CoFi adapter writes, and the validation every load goes through.

The layer's own state (``cofi_delta``, ``cofi_mask``, ``cofi_base_fingerprint``) is what peft's
``get_peft_model_state_dict`` returns and what a dense file stores, so any loader that maps file keys onto
parameters gets it right. On top of that, :func:`save_adapters` (``PeftModel.save_pretrained`` of CoFi models)
encodes the chosen storage, writes a header with checksums and commits the folder atomically, and
:func:`decode_adapter_state` (called by ``CoFiModel`` for every load) checks a file against the model before a
single weight changes: exactly the expected tensors, sound values, intact bytes, the right base weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper

from .atomic_io import staged_folder, write_atomic
from .config import CoFiConfig
from .diff_format import (
    CONFIG_NAME,
    DELTA,
    FINGERPRINT,
    FINGERPRINT_BYTES,
    MASK,
    PEFT_PREFIX,
    SUBSPACE_KEY,
    WEIGHTS_NAME,
    CheckpointError,
    Header,
    build_header,
    checksum,
    decode_delta,
    encode_delta,
    is_cofi_header,
    parse_header,
    read_header,
    same_base,
    split_key,
)
from .hub import write_model_card
from .layer import CoFiLayer
from .mask import delta_from_diff, masked_diff


@dataclass
class LoadContext:
    """What one loading call knows beyond the tensors: the caller's base-check choice and the headers of the files
    peft read during the call (recorded by the patched ``safe_load_file``)."""

    verify_base: bool = True
    headers: list[dict[str, str]] = field(default_factory=list)


_LOADING: contextvars.ContextVar[LoadContext | None] = contextvars.ContextVar("peft_cofi_loading", default=None)


@contextlib.contextmanager
def loading(verify_base: bool | None = None) -> Iterator[LoadContext]:
    """Scope one loading call: files read inside it have their headers checked by :func:`decode_adapter_state`.
    ``verify_base=None`` keeps the choice of an enclosing call (``PeftModel.from_pretrained`` calls ``load_adapter``),
    else checks the base."""
    outer = _LOADING.get()
    if verify_base is None:
        verify_base = outer.verify_base if outer is not None else True
    token = _LOADING.set(LoadContext(verify_base=verify_base))
    try:
        yield _LOADING.get()
    finally:
        _LOADING.reset(token)


def is_loading() -> bool:
    """Whether a loading call is in progress (its file brings the adapter's base fingerprints)."""
    return _LOADING.get() is not None


def record_header(path: str | os.PathLike) -> None:
    """Remember the header of a file read inside a :func:`loading` scope (no-op outside one)."""
    context = _LOADING.get()
    if context is not None:
        context.headers.append(read_header(path))


def adapter_layers(model: torch.nn.Module, adapter_name: str) -> dict[str, CoFiLayer]:
    """The CoFi layers that hold ``adapter_name``, by module name without peft's prefix, in model order."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, CoFiLayer) and adapter_name in module.cofi_delta
    }


def auxiliary_keys(model: torch.nn.Module, adapter_name: str) -> dict[str, str]:
    """The adapter's ``modules_to_save`` (and other auxiliary) tensors: the key peft hands to the tuner when loading
    -> the key in the file, both without peft's prefix."""
    return {
        f"{name}.{model_key}": f"{name}.{file_key}"
        for name, module in ((n.removeprefix(PEFT_PREFIX), m) for n, m in model.named_modules())
        if isinstance(module, AuxiliaryTrainingWrapper)
        for file_key, model_key in module.adapter_state_dict_load_map(adapter_name).items()
    }


def encode_adapter_state(
    model: torch.nn.Module, config: CoFiConfig, adapter_name: str, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file form of an adapter's state dict (as ``get_peft_model_state_dict`` returns it): the tensors in the
    config's storage mode, and the header (docs/FORMAT.md).

    Raises:
        ValueError: a module's state is not finite or overflows the storage dtype (the module is named).
    """
    layers = adapter_layers(model, adapter_name)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, suffix = split_key(key)
        if suffix:
            grouped.setdefault(module, {})[suffix] = tensor
        else:
            tensors[key] = tensor
    others = {key.removeprefix(PEFT_PREFIX): checksum({key.removeprefix(PEFT_PREFIX): t}) for key, t in tensors.items()}
    prefix = PEFT_PREFIX if any(key.startswith(PEFT_PREFIX) for key in state) else ""
    records = {}
    for module, stored in grouped.items():
        mask = stored[MASK].detach().to("cpu", torch.float32)
        try:
            encoded = encode_delta(
                stored[DELTA], mask, config.mask_mode, config.storage, config.storage_density,
                config.storage_dtype, config.storage_tolerance,
            )  # fmt: skip
        except ValueError as error:
            raise ValueError(f"cannot save adapter {adapter_name!r}: module {module}: {error}") from error
        written = {**encoded.tensors, MASK: mask.contiguous(), FINGERPRINT: stored[FINGERPRINT].detach().cpu()}
        tensors.update({f"{prefix}{module}.{suffix}": tensor for suffix, tensor in written.items()})
        layout = "conv1d" if getattr(layers.get(module), "is_conv1d", False) else "linear"
        records[module] = {**encoded.info, "layout": layout, "checksum": checksum(written)}
    source = config.input_subspace_source  # trained with an input subspace: say so (docs/FORMAT.md)
    subspace_record = {SUBSPACE_KEY: json.dumps(source, sort_keys=True)} if source else {}
    header = build_header(
        records,
        others,
        storage=config.storage,
        density=config.storage_density,
        value_dtype=config.storage_dtype,
        mask_mode=config.mask_mode,
        base_model=config.base_model_name_or_path,
        base_revision=config.revision,
        **subspace_record,
    )
    return tensors, header


@dataclass(frozen=True)
class Target:
    """What a loaded module's tensors are checked against: the diff's shape and the base weight."""

    shape: tuple[int, int]
    weight: torch.Tensor


def decode_adapter_state(
    model: torch.nn.Module, config: CoFiConfig, adapter_name: str, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Check a loaded file's tensors against the model and return them as the layers' state (dense ``D``).

    Uses the header and base-check choice of the enclosing :func:`loading` scope, if any (a state dict passed
    directly to ``set_peft_model_state_dict`` has no header: its structure and fingerprints are still checked).

    Raises:
        CheckpointError: one line saying what is wrong with the file, before any weight is touched.
    """
    context = _LOADING.get() or LoadContext()
    metadata = next((h for h in reversed(context.headers) if is_cofi_header(h)), None)
    header = parse_header(metadata, "the checkpoint") if metadata is not None else None
    layers = adapter_layers(model, adapter_name)
    targets = {
        name: Target((layer.out_features, layer.in_features), layer.get_base_layer().weight)
        for name, layer in layers.items()
    }
    checked = check_state(targets, auxiliary_keys(model, adapter_name), state, header, context.verify_base)
    protected = any(adapter_name in layer.cofi_subspace for layer in layers.values())
    if header is not None and SUBSPACE_KEY in header.fields and not config.inference_mode and not protected:
        warnings.warn(
            f"adapter {adapter_name!r} was trained with input-subspace protection; it loads exactly, but further "
            "training is unprotected. To keep training protected, load it into a model created with "
            "CoFiConfig(input_subspace=...) or pass such a config to the loading call.",
            stacklevel=2,
        )
    if header is not None and header.mask_mode != config.mask_mode:
        # The diff applies in either mode (resuming training across modes is refused by the loading call).
        for key in [k for k in checked if split_key(k)[1] == DELTA]:
            mask = checked[key.removesuffix(DELTA) + MASK]
            diff = masked_diff(checked[key], mask, header.mask_mode)
            checked[key] = delta_from_diff(diff, mask, config.mask_mode)
    return checked


def check_state(
    targets: dict[str, Target],
    auxiliary: dict[str, str],
    state: dict[str, torch.Tensor],
    header: Header | None,
    verify_base: bool,
) -> dict[str, torch.Tensor]:
    """The validation behind :func:`decode_adapter_state`, against explicit ``targets`` and auxiliary keys."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}  # by key in the file, without prefix
    prefix = PEFT_PREFIX if any(key.startswith(PEFT_PREFIX) for key in state) else ""
    for key, tensor in state.items():
        module, suffix = split_key(key)
        if suffix:
            grouped.setdefault(module, {})[suffix] = tensor
        else:
            bare = key.removeprefix(PEFT_PREFIX)
            others[auxiliary.get(bare, bare)] = tensor
    missing, extra = sorted(set(targets) - set(grouped)), sorted(set(grouped) - set(targets))
    if missing or extra:
        raise CheckpointError(
            f"the checkpoint does not fit the adapter's modules: missing {len(missing)} (e.g. {missing[:5]}), "
            f"unexpected {len(extra)} (e.g. {extra[:5]}). Load it with the adapter_config.json saved beside it."
        )
    declared = header.others if header is not None else {}
    stray = sorted(set(others) - set(auxiliary.values()) - set(declared))
    if stray:
        raise CheckpointError(
            f"the checkpoint holds tensors this adapter does not have, e.g. {stray[:5]}: loading them would overwrite "
            "other weights. Remove them from the file, or load it with the adapter_config.json saved beside it."
        )
    if header is not None:
        _check_checksums(header, grouped, others)
    out, wrong_base = {}, []
    for name, target in targets.items():
        if header is not None and tuple(header.records[name]["shape"]) != target.shape:
            raise CheckpointError(
                f"{name}: the checkpoint holds a {tuple(header.records[name]['shape'])} diff, the model {target.shape}."
            )
        try:
            delta, mask, stored_print = _module_state(grouped[name], target.shape)
        except CheckpointError as error:
            raise CheckpointError(f"{name}: {error}") from error
        if verify_base and stored_print.any() and not same_base(stored_print, target.weight):
            wrong_base.append(name)
        out[f"{prefix}{name}.{DELTA}"] = delta
        out[f"{prefix}{name}.{MASK}"] = mask
        # A diff applied to other weights (verify_base=False) no longer belongs to its old base: re-fingerprint.
        out[f"{prefix}{name}.{FINGERPRINT}"] = stored_print if verify_base else torch.zeros_like(stored_print)
    if wrong_base:
        raise CheckpointError(
            f"the diff was made for other base weights: {len(wrong_base)} module(s) differ, e.g. {wrong_base[:5]}"
            f"{_expected_base(header)}. Load the matching base model, or pass verify_base=False to the loading call "
            "to apply it anyway."
        )
    return {**{k: v for k, v in state.items() if not split_key(k)[1]}, **out}


def _expected_base(header: Header | None) -> str:
    return f" (expected base: {header.fields['base_model']})" if header and header.fields.get("base_model") else ""


def _check_checksums(header: Header, grouped: dict[str, dict[str, torch.Tensor]], others: dict) -> None:
    undescribed = sorted(set(grouped) - set(header.records))
    if undescribed:
        raise CheckpointError(f"the checkpoint's header does not describe modules {undescribed[:5]}.")
    for name, stored in grouped.items():
        if checksum(stored) != header.records[name]["checksum"]:
            raise CheckpointError(f"the stored diff of {name} is corrupt (checksum mismatch); the file was damaged.")
    for key, tensor in others.items():
        if key in header.others and checksum({key: tensor}) != header.others[key]:
            raise CheckpointError(f"the stored tensor {key} is corrupt (checksum mismatch); the file was damaged.")


def _module_state(stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    if MASK not in stored:
        raise CheckpointError(f"it has no {MASK} tensor")
    mask = stored[MASK]
    if not mask.is_floating_point() or mask.shape != (shape[0],):
        raise CheckpointError(f"its {MASK} is {mask.dtype} {tuple(mask.shape)}, expected float ({shape[0]},)")
    mask = mask.to(torch.float32)
    if not (torch.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1):
        raise CheckpointError(f"its {MASK} holds factors outside [0, 1]; mask factors are 1 - importance")
    stored_print = stored.get(FINGERPRINT, torch.zeros(FINGERPRINT_BYTES, dtype=torch.uint8))
    if stored_print.dtype != torch.uint8 or stored_print.shape != (FINGERPRINT_BYTES,):
        raise CheckpointError(f"its {FINGERPRINT} must be {FINGERPRINT_BYTES} uint8 bytes")
    return decode_delta(stored, shape), mask, stored_print


def save_adapters(
    model: Any,
    save_directory: str | os.PathLike,
    *,
    selected_adapters: list[str] | None = None,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: str | bool = "auto",
) -> None:
    """``PeftModel.save_pretrained`` for CoFi models: every adapter's diff in its configured storage, with header,
    config and model card, committed to ``save_directory`` as one atomic step (see :mod:`peft_cofi.atomic_io`).

    Under FSDP2 / ZeRO-3 call it on every rank (the state is gathered collectively); only the main process writes.
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} do not exist; this model has {list(model.peft_config)}.")
    merged = sorted(n for n, m in model.named_modules() if isinstance(m, CoFiLayer) and m.merged)
    if merged:
        raise ValueError(
            f"{merged[0]} (and {len(merged) - 1} more) has its adapter merged into the base weight; call "
            "unmerge_adapter() before saving, so the checkpoint records the true base weights."
        )
    states = {
        name: get_peft_model_state_dict(
            model, state_dict=state_dict, adapter_name=name, save_embedding_layers=save_embedding_layers
        )
        for name in names
    }
    if not is_main_process:
        return
    files = {name: encode_adapter_state(model, model.peft_config[name], name, states[name]) for name in names}
    target = Path(save_directory)
    with staged_folder(target) as staging:
        if (target / "README.md").is_file():  # keep the user's card; only the CoFi section is refreshed
            shutil.copy2(target / "README.md", staging / "README.md")
        model.create_or_update_model_card(str(staging))
        for name, (tensors, header) in files.items():
            folder = staging if name == "default" else staging / name
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS_NAME, header)
            _save_config(model, model.peft_config[name], folder)
        write_model_card(staging, files[names[0]][1])


def _save_config(model: Any, config: CoFiConfig, folder: Path) -> None:
    """The config as peft's ``save_pretrained`` writes it: base model filled in, inference mode, auto mapping."""
    inference_mode, base = config.inference_mode, config.base_model_name_or_path
    if base is None:
        config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path", None) or None
    auto_mapping = None
    if config.task_type is None:
        base_class = model._get_base_model_class(is_prompt_tuning=False)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    config.inference_mode = True
    try:
        config.save_pretrained(str(folder), auto_mapping_dict=auto_mapping)
    finally:
        config.inference_mode = inference_mode


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
    configs = [c for c in model.peft_config.values() if isinstance(c, CoFiConfig)]
    saved = [(c.storage, c.storage_density, c.storage_dtype) for c in configs]
    try:
        for config in configs:
            config.storage = storage or config.storage
            config.storage_density = density if density is not None else config.storage_density
            config.storage_dtype = dtype or config.storage_dtype
            config.check_storage()
        model.save_pretrained(str(save_directory), **kwargs)
    finally:
        for config, (mode, kept, value_dtype) in zip(configs, saved, strict=True):
            config.storage, config.storage_density, config.storage_dtype = mode, kept, value_dtype


def read_config_file(folder: str | os.PathLike, subfolder: str | None = None) -> dict | None:
    """The ``adapter_config.json`` of a local adapter folder as a dict; ``None`` if there is none or it is not JSON."""
    try:
        return json.loads(Path(folder, subfolder or "", CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
