"""Which modules a ``CoFiConfig`` selects in a model: architecture defaults, layer windows, peft's name matching.

One implementation shared by the tuner (what trains) and importance estimation (what gets scored), so the two
always agree.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft.tuners.tuners_utils import BaseTuner
    >>> from peft_cofi import CoFiConfig
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, vocab_size=100))
    >>> config = resolve_selection(CoFiConfig(layers_to_transform="top"), model, BaseTuner.get_model_config(model))
    >>> sorted(matched_modules(model, config))
    ['model.layers.3.mlp.down_proj', 'model.layers.3.mlp.up_proj']
"""

from __future__ import annotations

import re
from typing import Any

from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from .layer import SUPPORTED_LAYERS
from .windows import resolve_layers

# Roles a module can hold: attention projections q k v o, FFN projections up gate down.
ROLES = ("q", "k", "v", "o", "up", "gate", "down")
_LLAMA_LIKE = {
    "q_proj": ("q",),
    "k_proj": ("k",),
    "v_proj": ("v",),
    "o_proj": ("o",),
    "up_proj": ("up",),
    "gate_proj": ("gate",),
    "down_proj": ("down",),
}
_GPT2_LIKE = {"attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "mlp.c_fc": ("up",), "mlp.c_proj": ("down",)}
_SEPARATE_QKV = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",)}
_OPT_LIKE = {**_SEPARATE_QKV, "out_proj": ("o",), "fc1": ("up",), "fc2": ("down",)}
_FUSED_QKV_DENSE = {
    "query_key_value": ("q", "k", "v"),
    "self_attention.dense": ("o",),
    "dense_h_to_4h": ("up",),
    "dense_4h_to_h": ("down",),
}
# The one table of module names: per ``config.model_type``, module name (matched as a dotted suffix) -> its roles.
# Default targets (the FFN's up and down projections, the paper's pick), the attention projections whose rows are
# heads, and the search's module groups all come from it, so every architecture that trains by default can be
# searched. Mixture-of-experts FFNs (Mixtral, DeepSeek) keep their experts in fused parameters, not modules.
ARCH_MODULE_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite"],
        _LLAMA_LIKE,
    ),
    **dict.fromkeys(["smollm3", "cohere", "stablelm"], _LLAMA_LIKE),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], _GPT2_LIKE),
    "starcoder2": {**_SEPARATE_QKV, "o_proj": ("o",), "mlp.c_fc": ("up",), "mlp.c_proj": ("down",)},
    **dict.fromkeys(["opt", "biogpt", "xglm"], _OPT_LIKE),
    "phi": {**_SEPARATE_QKV, "self_attn.dense": ("o",), "fc1": ("up",), "fc2": ("down",)},
    "phi3": {"qkv_proj": ("q", "k", "v"), "o_proj": ("o",), "gate_up_proj": ("gate", "up"), "down_proj": ("down",)},
    "gptj": {**_SEPARATE_QKV, "out_proj": ("o",), "fc_in": ("up",), "fc_out": ("down",)},
    "codegen": {"qkv_proj": ("q", "k", "v"), "out_proj": ("o",), "fc_in": ("up",), "fc_out": ("down",)},
    "gpt_neox": {**_FUSED_QKV_DENSE, "attention.dense": ("o",)},
    **dict.fromkeys(["falcon", "bloom"], _FUSED_QKV_DENSE),
}
# The FFN input and output projections: the paper's coarse-level pick, per architecture.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    model_type: tuple(name for name, roles in table.items() if {"up", "down"} & set(roles))
    for model_type, table in ARCH_MODULE_ROLES.items()
}
# Projections whose output rows are attention heads (head_dim consecutive rows each, also for fused q/k/v).
DEFAULT_ATTENTION_MODULES = sorted(
    {name for table in ARCH_MODULE_ROLES.values() for name, roles in table.items() if set(roles) <= {"q", "k", "v"}}
)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # where a config states its depth
_HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "num_heads")
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")


def resolve_selection(config: Any, model: nn.Module, model_config: dict) -> Any:
    """Fill in a config's selection for ``model`` (in place): default target modules of the architecture,
    ``"all-linear"``, and layer windows as explicit indices. Returns the config.

    Raises:
        ValueError: no default target modules for this architecture, or a window that does not fit the model.
    """
    if config.target_modules is None:
        model_type = model_config.get("model_type")
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"peft-cofi has no default target modules for model_type={model_type!r}; set target_modules "
                f"(e.g. the FFN projections). Known defaults: {sorted(DEFAULT_TARGET_MODULES)}."
            )
        config.target_modules = set(DEFAULT_TARGET_MODULES[model_type])
    config = _maybe_include_all_linear_layers(config, model)
    if config.layers_to_transform is not None:
        config.layers_to_transform = resolve_layers(config.layers_to_transform, num_layers(model_config, model, config))
    return config


def matched_modules(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """The modules a resolved config selects, in model order (modules inside tuner layers are skipped).

    Raises:
        ValueError: nothing matches; the message lists the adaptable module names the model has.
    """
    tuner_layers = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    selected = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(layer + ".") for layer in tuner_layers):
            continue
        match = check_target_module_exists(config, name)
        if match and not isinstance(match, _ExcludedModule):
            selected[name] = module
    if not selected:
        targets = config.target_modules
        shown = sorted(targets) if isinstance(targets, set) else targets
        raise ValueError(
            f"target_modules={shown!r} with layers_to_transform={config.layers_to_transform} matched no module. "
            f"Adaptable module names in this model: {adaptable_names(model)}."
        )
    return selected


def num_layers(model_config: dict, model: nn.Module, config: Any) -> int:
    """The model's depth, from its config or else from its numbered layer list."""
    for key in LAYER_COUNT_KEYS:
        if isinstance(model_config.get(key), int):
            return model_config[key]
    pattern = config.layers_pattern or r"[^.]+"
    patterns = [pattern] if isinstance(pattern, str) else pattern
    indices = [
        int(m["idx"])
        for name, _ in model.named_modules()
        for p in patterns
        if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)(?:\.|$)", name))
    ]
    if not indices:
        raise ValueError(
            "cannot tell the model's depth to resolve a layer window: its config has none of "
            f"{LAYER_COUNT_KEYS} and no numbered layer list was found; pass layers_to_transform as indices."
        )
    return max(indices) + 1


def head_geometry(model_config: dict) -> tuple[int | None, int | None]:
    """``(head_dim, num_attention_heads)`` from a transformers config dict, ``(None, None)`` when unknown."""
    num_heads = next((model_config[k] for k in _HEAD_COUNT_KEYS if isinstance(model_config.get(k), int)), None)
    if num_heads is None:
        return None, None
    head_dim = model_config.get("head_dim")
    if not isinstance(head_dim, int):
        hidden = next((model_config[k] for k in _HIDDEN_SIZE_KEYS if isinstance(model_config.get(k), int)), None)
        head_dim = hidden // num_heads if hidden else None
    return head_dim, num_heads


def matches_suffix(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def adaptable_names(model: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)}
    return sorted(names)
