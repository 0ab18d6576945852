"""Which modules unit importance is computed for, and how many scores each gets.

By default the modules a :class:`~peft_cofi.config.CoFiConfig` trains, resolved exactly as
:class:`~peft_cofi.model.CoFiModel` resolves them (per-architecture default ``target_modules``, ``"all-linear"``,
layer windows, ``exclude_modules``, peft's own name matching), so importance and training agree; or an explicit
list of module names. Names are relative to the base transformers model (no ``base_model.model.`` prefix), also
when the model is a CoFi-wrapped ``PeftModel``; there the unit is the CoFi layer's output.

Attention projections (``CoFiConfig.attention_modules``, default ``DEFAULT_ATTENTION_MODULES``) can be pooled per
head: their ``head_dim`` consecutive output rows form one unit, as in :func:`peft_cofi.mask.pool_heads`. A
grouped-query k/v projection has fewer rows, hence fewer heads than q: it gets one score per k/v head.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, vocab_size=100))
    >>> [t.name for t in resolve_targets(model, CoFiConfig(layers_to_transform="bottom2"))]
    ['model.layers.1.mlp.up_proj', 'model.layers.1.mlp.down_proj']
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from peft import PeftModel
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import CoFiConfig
from .importance import strip_wrapper_prefix
from .layer import SUPPORTED_LAYERS
from .selection import DEFAULT_ATTENTION_MODULES, head_geometry, matched_modules, matches_suffix, resolve_selection


@dataclass(frozen=True)
class ImportanceTarget:
    """One module whose output units get importance scores.

    Attributes:
        name: module name relative to the base model.
        module: the module whose output is gated (a CoFi layer when the model is wrapped).
        units: output rows of the module (the length of its gate).
        head_dim: rows per head when scores are pooled per head, else ``None``.

    Example:
        >>> target = ImportanceTarget("attn.q_proj", nn.Linear(4, 8), units=8, head_dim=2)
        >>> target.num_scores
        4
    """

    name: str
    module: nn.Module
    units: int
    head_dim: int | None = None

    @property
    def num_scores(self) -> int:
        """Scores stored for this module: one per head when pooled, else one per output row."""
        return self.units // self.head_dim if self.head_dim else self.units


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model``: unwraps ``DistributedDataParallel``, ``PeftModel`` and peft tuners.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> base_model_of(layer) is layer
        True
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def output_units(module: nn.Module) -> int | None:
    """Output rows of an ``nn.Linear``, a transformers ``Conv1D`` or a peft tuner layer wrapping one, else ``None``.

    Example:
        >>> output_units(nn.Linear(3, 5))
        5
    """
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if isinstance(base, Conv1D):
        return int(base.nf)
    if isinstance(base, nn.Linear):
        return int(base.out_features)
    return None


def default_config(model: nn.Module) -> CoFiConfig:
    """The config whose modules importance covers when none is given.

    The active CoFi adapter's config for a CoFi-wrapped ``PeftModel``, else ``CoFiConfig()`` (the architecture's FFN
    projections in every layer).

    Example:
        >>> default_config(nn.Linear(2, 2)).layers_to_transform is None
        True
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, PeftModel):
        config = model.peft_config.get(model.active_adapter)
        if isinstance(config, CoFiConfig):
            return config
    return CoFiConfig()


def resolve_targets(
    model: nn.Module,
    config: CoFiConfig | None = None,
    modules: Sequence[str] | None = None,
    head_pooling: bool | None = None,
) -> list[ImportanceTarget]:
    """The modules to score, in model order.

    Args:
        model: a transformers model, or a ``PeftModel`` / tuner wrapping one.
        config: select the modules this config trains (default: :func:`default_config`). Ignored with ``modules``.
        modules: exact module names (with or without the ``base_model.model.`` prefix) instead of a config.
        head_pooling: pool attention projections per head; default ``config.head_pooling`` (``True``).

    Raises:
        ValueError: no module matches, a name is unknown, or the config cannot be resolved for this model.
        TypeError: a selected module is not an ``nn.Linear`` / ``Conv1D`` (or a tuner layer wrapping one).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
        >>> [(t.name, t.num_scores) for t in resolve_targets(gpt2, modules=["transformer.h.0.attn.c_attn"])]
        [('transformer.h.0.attn.c_attn', 6)]
    """
    if config is None:
        config = default_config(model)
    base = base_model_of(model)
    model_config = BaseTuner.get_model_config(base)
    tuner_layers = [name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)]
    candidates = {
        name: module
        for name, module in base.named_modules()
        if name and not any(name.startswith(layer + ".") for layer in tuner_layers)
    }
    if modules is not None:
        selected = _named_modules(candidates, modules)
    else:
        selected = _configured_modules(base, config, model_config)
    unsupported = [f"{name} ({type(module).__name__})" for name, module in selected if output_units(module) is None]
    if unsupported:
        raise TypeError(
            "importance gates the outputs of nn.Linear and transformers Conv1D modules (or peft layers wrapping "
            f"them); these selected modules are neither: {unsupported[:8]}."
        )
    pool = config.head_pooling if head_pooling is None else head_pooling
    head_dim, _ = head_geometry(model_config)
    attention = config.attention_modules or DEFAULT_ATTENTION_MODULES
    targets = []
    for name, module in selected:
        units = output_units(module)
        pooled = pool and head_dim is not None and matches_suffix(name, attention) and units % head_dim == 0
        targets.append(ImportanceTarget(name, module, units, head_dim if pooled else None))
    return targets


def _named_modules(candidates: dict[str, nn.Module], names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    if isinstance(names, str):
        names = [names]
    wanted = list(dict.fromkeys(strip_wrapper_prefix(name) for name in names))
    if not wanted:
        raise ValueError("modules=[] names no module; pass module names or None to use the config's modules.")
    unknown = [name for name in wanted if name not in candidates]
    if unknown:
        examples = [n for n, m in candidates.items() if isinstance(m, (*SUPPORTED_LAYERS, BaseTunerLayer))][:4]
        raise ValueError(f"the model has no module named {unknown[:5]}; module names look like {examples}.")
    return [(name, candidates[name]) for name in wanted]


def _configured_modules(base: nn.Module, config: CoFiConfig, model_config: dict) -> list[tuple[str, nn.Module]]:
    # The tuner's own selection, on a copy so the caller's config is untouched.
    return list(matched_modules(base, resolve_selection(copy.copy(config), base, model_config)).items())
