"""Everything ``import peft_cofi`` changes in peft and transformers, in one place, with why.

A CoFi file holds exactly the layers' own tensors, so any loader that maps keys onto parameters reads a dense one
right. What loaders cannot do by themselves is decode sparse storage, check a file against its base model, undo a
failed load, or write a folder atomically; these entry points are wrapped for that. Each wrapper acts on CoFi
adapters only and passes every other method through untouched; :func:`install` is idempotent (a reloaded
peft_cofi wraps the originals again, never its own wrappers).

1. ``peft.utils.PeftType`` gains a ``COFI`` member before ``register_peft_method`` (which only accepts members of
   peft's closed enum) registers config, tuner and prefix.
2. ``PeftModel.save_pretrained`` of CoFi models is :func:`peft_cofi.checkpoint.save_adapters`: the configured
   storage, a header with checksums, and one atomic commit of config, weights and card (peft writes them one by one,
   in place); safetensors only.
3. ``PeftModel.from_pretrained`` and 4. ``PeftModel.load_adapter`` (also how Trainer resumes): take ``verify_base``
   from the caller only, finish an interrupted save first, refuse pickled CoFi files and resuming across mask modes,
   and on *any* failure remove what the call added, so the model is left as it was.
5. ``peft.utils.save_and_load.safe_load_file``: records the header of the file read during a CoFi load, which peft
   does not pass on to the tuner (the tuner's checks need its checksums).
6. ``PeftModel.push_to_hub``: transformers' push replaces the model card by a generic one; CoFi models go through
   :func:`peft_cofi.hub.push_to_hub`, which keeps it.
7. transformers' ``PeftAdapterMixin.load_adapter`` (``model.load_adapter``, ``AutoModel*.from_pretrained(adapter)``,
   ``pipeline(model=adapter)``): transformers' own loader would report sparse keys as unexpected and carry on; CoFi
   adapters are injected and loaded through peft's ``set_peft_model_state_dict`` instead (same checks as 3-4).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft.utils.save_and_load as save_and_load
import torch
from peft import PeftConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file
from transformers.integrations.peft import PeftAdapterMixin
from transformers.utils import cached_file
from transformers.utils.loading_report import LoadStateDictInfo

from . import checkpoint, hub
from .atomic_io import recover_adapter_folder
from .config import METHOD_NAME, PEFT_TYPE_NAME, CoFiConfig
from .diff_format import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from .layer import CoFiLayer
from .model import CoFiModel

_ORIGINAL = "__peft_cofi_original__"
_HUB_KWARGS = ("revision", "cache_dir", "token", "force_download", "proxies", "local_files_only", "subfolder")


def _ensure_peft_type_member() -> PeftType:
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


def _wrap(owner: Any, name: str, make: Callable[[Callable], Callable], kind: type | None = None) -> None:
    """Replace ``owner.name`` by ``make(original)``, always wrapping the original (never an earlier wrapper)."""
    current = owner.__dict__.get(name) if isinstance(owner, type) else None
    current = current if current is not None else getattr(owner, name)
    if kind is not None and isinstance(current, kind):
        current = current.__func__
    original = getattr(current, _ORIGINAL, current)
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _ORIGINAL, original)
    setattr(owner, name, kind(wrapper) if kind is not None else wrapper)


def _is_cofi(model: Any) -> bool:
    return any(isinstance(c, CoFiConfig) for c in getattr(model, "peft_config", {}).values())


def _saved_peft_type(model_id: str | os.PathLike, hub_kwargs: dict) -> str | None:
    """The ``peft_type`` of the adapter at ``model_id`` (local folder or Hub id); ``None`` when it cannot be read."""
    local = Path(model_id, hub_kwargs.get("subfolder") or "", CONFIG_NAME)
    try:
        path = local if local.is_file() else cached_file(str(model_id), CONFIG_NAME, **hub_kwargs)
        return json.loads(Path(path).read_text()).get("peft_type") if path else None
    except (OSError, ValueError):
        return None


def _snapshot(model: torch.nn.Module) -> tuple[set[int], dict | None]:
    wrappers = {id(m) for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}
    config = getattr(model, "peft_config", None)
    return wrappers, (dict(config) if isinstance(config, dict) else None)


def _rollback(model: torch.nn.Module, adapter_name: str, snapshot: tuple[set[int], dict | None]) -> None:
    """Undo what a failed load added to ``model``: new adapter layers and wrappers, the adapter in old layers, its
    config entry."""
    existing, configs = snapshot
    for name, module in list(model.named_modules()):
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        if id(module) not in existing:
            parent_name, _, child = name.rpartition(".")
            original = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module
            setattr(model.get_submodule(parent_name), child, original)
        elif isinstance(module, CoFiLayer) and adapter_name in module.cofi_delta:
            module.delete_adapter(adapter_name)
    if configs is None:
        if hasattr(model, "peft_config"):
            del model.peft_config
    else:
        model.peft_config.clear()
        model.peft_config.update(configs)


def _one_line(error: BaseException, model_id: Any) -> CheckpointError:
    """Any failure while loading a CoFi adapter, as one line that names the file."""
    if isinstance(error, CheckpointError):
        return error
    what = (
        f"a tensor it needs is missing: {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
    )
    return CheckpointError(f"cannot load the CoFi adapter at {str(model_id)!r}: {what}")


def _refuse_pickle(model_id: str | os.PathLike, subfolder: str | None) -> None:
    folder = Path(model_id, subfolder or "")
    if folder.is_dir() and not (folder / WEIGHTS_NAME).is_file() and (folder / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{str(folder)!r} holds adapter_model.bin (a pickle); CoFi adapters are read from safetensors only. "
            f"Re-save it with save_pretrained (which writes {WEIGHTS_NAME})."
        )


# Fields of a saved adapter_config.json that decide which modules an adapter has and how its diff is parametrised.
_STRUCTURE_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "mask_mode")


def _fix_advice(model_id: Any) -> str:
    return (
        f"Build the model from the checkpoint's own config, PeftModel.from_pretrained(base, {str(model_id)!r}, "
        "is_trainable=True), before resuming from it, or resume from a checkpoint of this configuration."
    )


def _normalised(field: str, value: Any) -> Any:
    if field in ("target_modules", "exclude_modules") and isinstance(value, (list, tuple, set)):
        return sorted(value)
    if field == "layers_to_transform" and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return list(value) if isinstance(value, (tuple, set)) else value


def _config_mismatch_hint(config: CoFiConfig, saved: dict | None, model_id: Any) -> str:
    """What differs between a checkpoint's config and the adapter it is loaded into, and how to fix it."""
    current = config.to_dict()
    pairs = {f: (_normalised(f, (saved or {}).get(f)), _normalised(f, current.get(f))) for f in _STRUCTURE_FIELDS}
    differences = [f"{f}: checkpoint {a!r}, this adapter {b!r}" for f, (a, b) in pairs.items() if saved and a != b]
    return (
        f" Its adapter_config.json differs from this adapter's in {'; '.join(differences)}. {_fix_advice(model_id)}"
        if differences
        else ""
    )


def _check_resumable(config: CoFiConfig, saved: dict | None, model_id: Any, adapter_name: str, trainable: bool) -> None:
    """Refuse to continue training from a checkpoint of the other mask mode: ``D`` means something else there, so
    the optimizer state would not fit it."""
    theirs = (saved or {}).get("mask_mode", config.mask_mode)
    if trainable and theirs != config.mask_mode:
        raise CheckpointError(
            f"cannot resume training of adapter {adapter_name!r} (mask_mode={config.mask_mode!r}) from "
            f"{str(model_id)!r}, which was trained with mask_mode={theirs!r}: the trained parameter D is the diff "
            "divided by the mask factors in 'update' mode and the diff itself in 'grad' mode, so the checkpoint's "
            f"optimizer state would not fit it. {_fix_advice(model_id)}"
        )


def _from_pretrained(original: Callable) -> Callable:
    def from_pretrained(cls, model, model_id, *args, verify_base: bool | None = None, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = kwargs.get("config")
        if not isinstance(config, CoFiConfig) and _saved_peft_type(model_id, hub_kwargs) != PEFT_TYPE_NAME:
            return original(cls, model, model_id, *args, **kwargs)
        recover_adapter_folder(model_id, kwargs.get("subfolder"))
        _refuse_pickle(model_id, kwargs.get("subfolder"))
        snapshot = _snapshot(model)
        try:
            with checkpoint.loading(verify_base=verify_base):
                return original(cls, model, model_id, *args, **kwargs)
        except Exception as error:
            _rollback(model, kwargs.get("adapter_name", args[0] if args else "default"), snapshot)
            raise _one_line(error, model_id) from error

    return from_pretrained


def _load_adapter(original: Callable) -> Callable:
    def load_adapter(self, model_id, adapter_name, *args, verify_base: bool | None = None, **kwargs):
        existing = self.peft_config.get(adapter_name)
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        if not isinstance(existing, CoFiConfig) and _saved_peft_type(model_id, hub_kwargs) != PEFT_TYPE_NAME:
            return original(self, model_id, adapter_name, *args, **kwargs)
        recover_adapter_folder(model_id, kwargs.get("subfolder"))
        _refuse_pickle(model_id, kwargs.get("subfolder"))
        trainable = args[0] if args else kwargs.get("is_trainable", False)
        saved = checkpoint.read_config_file(model_id, kwargs.get("subfolder"))
        if existing is not None:
            _check_resumable(existing, saved, model_id, adapter_name, trainable)
        snapshot = _snapshot(self.base_model.model)
        try:
            with checkpoint.loading(verify_base=verify_base):
                return original(self, model_id, adapter_name, *args, **kwargs)
        except Exception as error:
            if existing is None:
                _rollback(self.base_model.model, adapter_name, snapshot)
            hint = _config_mismatch_hint(existing, saved, model_id) if existing is not None else ""
            raise CheckpointError(f"{_one_line(error, model_id)}{hint}") from error

    return load_adapter


def _safe_load_file(original: Callable) -> Callable:
    def safe_load_file(filename, *args, **kwargs):
        checkpoint.record_header(filename)
        return original(filename, *args, **kwargs)

    return safe_load_file


def _save_pretrained(original: Callable) -> Callable:
    def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                        save_embedding_layers="auto", is_main_process: bool = True, **kwargs):  # fmt: skip
        if not _is_cofi(self):
            return original(self, save_directory, safe_serialization, selected_adapters, save_embedding_layers,
                            is_main_process, **kwargs)  # fmt: skip
        if not safe_serialization:
            raise ValueError("CoFi adapters are saved as safetensors only; drop safe_serialization=False.")
        unsupported = sorted(k for k, v in kwargs.items() if k != "state_dict" and v is not None)
        if unsupported:
            raise ValueError(f"save_pretrained of a CoFi model does not support {unsupported}.")
        checkpoint.save_adapters(
            self,
            save_directory,
            selected_adapters=selected_adapters,
            is_main_process=is_main_process,
            state_dict=kwargs.get("state_dict"),
            save_embedding_layers=save_embedding_layers,
        )
        return None

    return save_pretrained


def _push_to_hub(original: Callable) -> Callable:
    def push_to_hub(self, repo_id, *args, **kwargs):
        if _is_cofi(self):
            return hub.push_to_hub(self, repo_id, *args, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    return push_to_hub


def _transformers_load_adapter(original: Callable) -> Callable:
    def load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None,
                     *args, verify_base: bool | None = None, **kwargs):  # fmt: skip
        hub_kwargs = _transformers_hub_kwargs(kwargs)
        config = peft_config
        if (
            config is None
            and peft_model_id is not None
            and _saved_peft_type(peft_model_id, hub_kwargs) == PEFT_TYPE_NAME
        ):
            config = PeftConfig.from_pretrained(peft_model_id, **hub_kwargs)
        if not isinstance(config, CoFiConfig):
            return original(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, *args, **kwargs)
        if args or kwargs.get("hotswap") is True:
            raise ValueError("model.load_adapter of a CoFi adapter takes keyword arguments only, and no hotswap.")
        name = adapter_name or "default"
        if name in (getattr(self, "peft_config", None) or {}):
            raise ValueError(f"Adapter with name {name} already exists. Please use a different name.")
        config.inference_mode = not kwargs.get("is_trainable", False)
        snapshot = _snapshot(self)
        try:
            with checkpoint.loading(verify_base=verify_base):
                if adapter_state_dict is None:
                    recover_adapter_folder(peft_model_id, hub_kwargs.get("subfolder"))
                    _refuse_pickle(peft_model_id, hub_kwargs.get("subfolder"))
                    path = cached_file(str(peft_model_id), WEIGHTS_NAME, **hub_kwargs)
                    checkpoint.record_header(path)
                    adapter_state_dict = load_file(path)
                inject_adapter_in_model(config, self, name, low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False))
                set_peft_model_state_dict(self, adapter_state_dict, adapter_name=name,
                                          low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False))  # fmt: skip
        except Exception as error:
            _rollback(self, name, snapshot)
            raise _one_line(error, peft_model_id) from error
        self._hf_peft_config_loaded = True
        if config.inference_mode:
            self.eval()
            for module in self.modules():
                if isinstance(module, BaseTunerLayer):
                    module.requires_grad_(False)
        return LoadStateDictInfo(
            missing_keys=set(),
            unexpected_keys=set(),
            mismatched_keys=set(),
            error_msgs=[],
            conversion_errors={},
            skipped_pp_keys=set(),
        )

    return load_adapter


def _transformers_hub_kwargs(kwargs: dict) -> dict:
    """The download arguments of transformers' ``load_adapter`` call (direct, ``adapter_kwargs``, ``load_config``)."""
    load_config = kwargs.get("load_config")
    merged = dict(getattr(load_config, "download_kwargs", None) or {})
    merged.update({k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    merged.update(kwargs.get("adapter_kwargs") or {})
    if kwargs.get("local_files_only"):
        merged["local_files_only"] = True
    return {k: v for k, v in merged.items() if k in _HUB_KWARGS and v is not None}


def install() -> None:
    """Register CoFi with peft and install the wrappers above (idempotent)."""
    member = _ensure_peft_type_member()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is not CoFiModel:
        # A reloaded peft_cofi: replace the stale classes instead of failing on the duplicate name.
        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(member, None)
        register_peft_method(name=METHOD_NAME, config_cls=CoFiConfig, model_cls=CoFiModel, prefix=CoFiModel.prefix)
    _wrap(PeftModel, "from_pretrained", _from_pretrained, classmethod)
    _wrap(PeftModel, "load_adapter", _load_adapter)
    _wrap(PeftModel, "save_pretrained", _save_pretrained)
    _wrap(PeftModel, "push_to_hub", _push_to_hub)
    _wrap(save_and_load, "safe_load_file", _safe_load_file)
    _wrap(PeftAdapterMixin, "load_adapter", _transformers_load_adapter)
