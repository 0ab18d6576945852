"""A full fine-tuning result as a CoFi diff checkpoint, so post-hoc calibration applies to it as to a CoFi adapter.

:func:`diff_from_models` writes ``W_tuned - W_base`` of chosen linear modules as a CoFi adapter (mask factors all
ones, ``update`` mask mode, base fingerprints of ``base``): loading it onto the base reproduces the tuned weights of
those modules, and :func:`peft_cofi.scale_diff` / :func:`peft_cofi.calibrate` rescale it like any CoFi diff. Other
changed parameters (embeddings, norms, biases, an output head left out) are not in the diff; the returned
:class:`FullDiff` lists them with their relative change, so a comparison can say what it dropped.

Example:
    report = diff_from_models(base, tuned, "out/full-ft-diff")
    report.modules[:2], report.left_out
    (['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj'], {'model.norm.weight': 0.0031})
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .checkpoint import adapter_layers
from .config import CoFiConfig
from .layer import SUPPORTED_LAYERS


@dataclass
class FullDiff:
    """What :func:`diff_from_models` wrote.

    Attributes:
        path: the adapter folder.
        modules: the modules whose diff it holds, in model order.
        left_out: parameters that differ between the models but are not in the diff -> ``‖Δ‖ / ‖W_base‖``.

    Example:
        >>> FullDiff(Path("x"), ["m.fc"]).left_out
        {}
    """

    path: Path
    modules: list[str]
    left_out: dict[str, float] = field(default_factory=dict)


def linear_module_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` / ``Conv1D`` of a model except its output head (as peft's ``"all-linear"``), in order.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> linear_module_names(model)
        ['0', '2']
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS) and m is not head]


def _select(model: nn.Module, modules: str | Sequence[str] | None) -> list[str]:
    linear = linear_module_names(model)
    if modules is None:
        if not linear:
            raise ValueError("the base model has no nn.Linear / Conv1D module besides its output head.")
        return linear
    patterns = [modules] if isinstance(modules, str) else list(modules)
    every = {name: m for name, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)}
    chosen = []
    for pattern in patterns:
        hits = [
            name
            for name in every
            if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)
        ]
        if not hits:
            raise ValueError(
                f"modules entry {pattern!r} matches no nn.Linear / Conv1D module of the base model; e.g. "
                f"{linear[:4]} (give names, dotted suffixes such as 'mlp.up_proj', or globs)."
            )
        chosen += [name for name in hits if name not in chosen]
    return [name for name in every if name in chosen]  # model order


def diff_from_models(
    base: nn.Module,
    tuned: nn.Module,
    out_dir: str | os.PathLike,
    modules: str | Sequence[str] | None = None,
) -> FullDiff:
    """Write the weight change of ``tuned`` against ``base`` on linear modules as a CoFi adapter folder.

    Args:
        base: the model before fine-tuning (left exactly as it was: the adapter is injected, filled, saved and
            removed again).
        tuned: the fine-tuned model with the same architecture (not modified).
        out_dir: the adapter folder to write (``save_pretrained``'s atomic commit, header, checksums, model card).
        modules: which modules: names, dotted suffixes (``"mlp.up_proj"``) or globs; default every ``nn.Linear`` /
            ``Conv1D`` except the output head.

    The diff is ``W_tuned - W_base`` in float32, stored dense, mask factors 1, ``update`` mode; the fingerprints
    name ``base``'s weights, so loading onto other weights is refused as for any CoFi diff.

    Raises:
        ValueError: a model already wrapped by peft, a module missing from ``tuned`` or of another shape, or a
            ``modules`` entry that matches nothing.

    Example:
        diff_from_models(base, full_ft_model, "out/full-ft-diff", modules=["mlp.up_proj", "mlp.down_proj"])
    """
    for what, model in (("base", base), ("tuned", tuned)):
        if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                f"the {what} model holds peft adapter layers; pass plain transformers models (merge_and_unload() a "
                "tuned PeftModel first)."
            )
    names = _select(base, modules)
    tuned_modules = dict(tuned.named_modules())
    base_modules = dict(base.named_modules())
    for name in names:
        other = tuned_modules.get(name)
        if other is None or getattr(other, "weight", None) is None:
            raise ValueError(f"the tuned model has no module {name!r} with a weight; are they the same architecture?")
        if other.weight.shape != base_modules[name].weight.shape:
            raise ValueError(
                f"{name}: the tuned weight is {tuple(other.weight.shape)}, the base's "
                f"{tuple(base_modules[name].weight.shape)}."
            )
    covered = {f"{name}.weight" for name in names}
    tuned_parameters = dict(tuned.named_parameters())
    left_out = {}
    for key, parameter in base.named_parameters():
        other = tuned_parameters.get(key)
        if key in covered or other is None or other.shape != parameter.shape:
            continue
        weight = parameter.detach().float().cpu()
        change = (other.detach().float().cpu() - weight).norm()
        if change > 0:
            left_out[key] = float(change / weight.norm().clamp(min=1e-30))
    requires_grad = {key: p.requires_grad for key, p in base.named_parameters()}
    was_training = base.training
    peft_model = get_peft_model(base, CoFiConfig(target_modules=names))
    try:
        for name, layer in adapter_layers(peft_model, "default").items():
            delta = layer.cofi_delta["default"]
            tuned_weight = tuned_modules[name].weight.detach().to(delta.device, torch.float32)
            change = tuned_weight - layer.get_base_layer().weight.detach().float()
            with torch.no_grad():
                delta.copy_(layer._oriented(change))
        peft_model.save_pretrained(str(out_dir))
    finally:
        restored = peft_model.unload()
        for key, parameter in restored.named_parameters():
            parameter.requires_grad_(requires_grad.get(key, parameter.requires_grad))
        restored.train(was_training)
    return FullDiff(Path(out_dir), names, left_out)
