"""``CoFiModel``: the peft tuner that places CoFi layers and maps their state to and from checkpoints.

Every check (module matching, layer window, module types, importance shapes, input-subspace bases) runs before the
first module is replaced, so a bad config leaves the model untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checkpoint import decode_adapter_state, is_loading
from .config import CHECKPOINT_IMPORTANCE, CHECKPOINT_SUBSPACE, CoFiConfig
from .diff_format import DELTA, FINGERPRINT
from .distributed import gather_adapter_state, weight_shape
from .importance import as_importance
from .layer import SUPPORTED_LAYERS, CoFiLayer, Linear, untrainable_reason
from .mask import mask_factors
from .selection import (
    DEFAULT_ATTENTION_MODULES,
    DEFAULT_TARGET_MODULES,
    head_geometry,
    matched_modules,
    matches_suffix,
    resolve_selection,
)
from .subspace import describe, select_bases


class CoFiModel(BaseTuner):
    """Creates a CoFiTune model from a pretrained transformers model (use ``get_peft_model``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from peft import get_peft_model
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...                                     num_attention_heads=4, vocab_size=100))
        >>> model = get_peft_model(base, CoFiConfig(layers_to_transform="bottom2"))
        >>> sorted(model.base_model.targeted_module_names)
        ['model.layers.1.mlp.down_proj', 'model.layers.1.mlp.up_proj']
    """

    prefix: str = "cofi_"
    tuner_layer_cls = CoFiLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: CoFiConfig, model_config: dict) -> CoFiConfig:
        peft_config = resolve_selection(peft_config, self.model, model_config)
        targets = self._find_targets(peft_config)
        self._pending_mask_factors = self._compute_mask_factors(peft_config, targets, model_config)
        self._pending_subspaces = self._select_subspaces(peft_config, targets)
        return peft_config

    def _select_subspaces(self, config: CoFiConfig, targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Each trained module's protected input basis (none without ``input_subspace``, or when it is already in
        the checkpoint's ``D``); records what the saved adapter will say about it."""
        if config.input_subspace is None or config.input_subspace == CHECKPOINT_SUBSPACE:
            return {}
        widths = {
            name: weight_shape(module.weight)[0 if isinstance(module, Conv1D) else 1]
            for name, module in targets.items()
        }
        bases = select_bases(config.input_subspace, widths)
        config.input_subspace_source = describe(config.input_subspace, bases)
        return bases

    def _find_targets(self, config: CoFiConfig) -> dict[str, nn.Module]:
        """The modules the config selects, validated: at least one, all trainable (see :func:`untrainable_reason`)."""
        targets: dict[str, nn.Module] = {}
        unsupported: list[str] = []
        untrainable: dict[str, list[str]] = {}  # reason -> modules
        model_is_loaded = any(not p.is_meta for p in self.model.parameters())
        for name, module in matched_modules(self.model, config).items():
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(module, BaseTunerLayer) and not isinstance(module, CoFiLayer):
                unsupported.append(f"{name} (already adapted by {type(module).__name__})")
            elif not isinstance(base, SUPPORTED_LAYERS):
                unsupported.append(f"{name} ({type(base).__name__})")
            elif reason := untrainable_reason(base, model_is_loaded):
                untrainable.setdefault(reason, []).append(f"{name} ({type(base).__name__})")
            else:
                targets[name] = base
        if unsupported:
            raise TypeError(
                f"CoFi can only adapt nn.Linear and transformers Conv1D modules; these selected modules are not: "
                f"{unsupported[:8]}. If they are quantised layers (bitsandbytes, GPTQ, AWQ, ...), load the model "
                "unquantised or dequantise it first; otherwise narrow target_modules or add them to exclude_modules."
            )
        if untrainable:
            problems = "; ".join(f"{names[:8]}: {reason}" for reason, names in untrainable.items())
            raise ValueError(
                f"CoFi cannot train a weight diff on {sum(map(len, untrainable.values()))} selected module(s): "
                f"{problems}. Load the model unquantised in float32/bfloat16/float16 (or dequantise it) with the "
                "trained modules fully on a device, or add these modules to exclude_modules."
            )
        return targets

    def _compute_mask_factors(
        self, config: CoFiConfig, targets: dict[str, nn.Module], model_config: dict
    ) -> dict[str, torch.Tensor]:
        out_features = {
            name: weight_shape(module.weight)[1 if isinstance(module, Conv1D) else 0]
            for name, module in targets.items()
        }
        if config.importance is None or config.importance == CHECKPOINT_IMPORTANCE:
            # No fine-level mask, or factors that the checkpoint being loaded will overwrite.
            return {name: torch.ones(n) for name, n in out_features.items()}
        sources = config.importance if isinstance(config.importance, (list, tuple)) else [config.importance]
        importances = [as_importance(source) for source in sources]
        missing = sorted(name for name in targets for imp in importances if name not in imp)
        if missing:
            raise ValueError(
                f"the importance does not cover {len(missing)} trained module(s), e.g. {missing[:5]}; compute "
                "importance for the same target_modules and layers (compute_importance does so by default)."
            )
        head_dim, num_heads = head_geometry(model_config)
        attention = config.attention_modules or DEFAULT_ATTENTION_MODULES
        factors = {}
        for name, n_out in out_features.items():
            pooled = config.head_pooling and head_dim is not None and matches_suffix(name, attention)
            try:
                factors[name] = mask_factors(
                    [imp[name] for imp in importances],
                    sharpness=config.mask_sharpness,
                    normalization=config.mask_normalization,
                    head_dim=head_dim if pooled else None,
                    num_query_heads=num_heads if pooled else None,
                    out_features=n_out,
                    normalized=[imp.normalized for imp in importances],
                )
            except ValueError as error:
                raise ValueError(f"importance of module {name!r}: {error}") from error
            if factors[name].shape != (n_out,):
                raise ValueError(
                    f"importance of module {name!r} has {factors[name].numel()} scores but the module has {n_out} "
                    "output units; the importance was computed for another model or module."
                )
        return factors

    def _create_and_replace(
        self,
        peft_config: CoFiConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        factors = self._pending_mask_factors[current_key]
        subspace = self._pending_subspaces.get(current_key)
        if isinstance(target, CoFiLayer):
            target.update_layer(adapter_name, factors, config=peft_config, subspace=subspace)
            layer = target
        else:
            layer = Linear(target, adapter_name, factors, config=peft_config, subspace=subspace)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)  # an added adapter is not trainable until it is activated
            self._replace_module(parent, target_name, layer, target)
        if layer.has_full_base_weight() and not layer.merged and not is_loading():
            # The base this diff applies to, taken now (a load brings its own; a sharded base is taken on save).
            layer.base_fingerprint(adapter_name)

    # --- checkpoint mapping: the file holds the layers' own state (docs/FORMAT.md), checked on every load ---

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # FSDP2 / ZeRO-3: full copies of sharded or partitioned tensors (a collective: save on every rank).
        selected, state_dict = gather_adapter_state(model, adapter_name, selected, state_dict)
        for name, module in model.named_modules():
            key = f"{name}.{FINGERPRINT}.{adapter_name}"
            if isinstance(module, CoFiLayer) and key in selected:
                # Taken now if it was not yet (from the gathered base weight when sharded), and kept by the layer.
                selected[key] = module.base_fingerprint(adapter_name, state_dict.get(f"{name}.base_layer.weight"))
            delta_key = f"{name}.{DELTA}.{adapter_name}"
            if isinstance(module, CoFiLayer) and adapter_name in module.cofi_subspace and delta_key in selected:
                # The file holds the projected D: the effective diff, loadable without the subspace.
                with torch.no_grad():
                    selected[delta_key] = module.projected_delta(adapter_name, selected[delta_key].detach())
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        checked = decode_adapter_state(model, config, adapter_name, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, checked)
