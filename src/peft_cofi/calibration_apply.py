"""The loaded-model side of calibration: load the adapter folder onto a model and put the model back afterwards,
and apply a candidate by swapping the loaded layers' ``D`` for a changed copy and restoring the original.

No reload and no weight is ever modified in place: :func:`replaced_deltas` rebinds each layer's ``cofi_delta``
parameter to a new tensor for the duration of a block and rebinds the original tensor afterwards (the same storage,
bit for bit), so the base weights and the loaded diff are exactly as loaded between candidates.

Example:
    with attached(base, "out/adapter") as (peft_model, name):
        layers = adapter_layers(peft_model, name)
        with replaced_deltas(layers, name, lambda module, delta: delta * 0.5):
            print(loss_evaluator(validation)(peft_model))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import CoFiConfig
from .layer import CoFiLayer

TEMPORARY_ADAPTER = "cofi-calibration"
NewDelta = Callable[[str, torch.Tensor], torch.Tensor | None]


@contextlib.contextmanager
def replaced_deltas(layers: Mapping[str, CoFiLayer], adapter_name: str, new_delta: NewDelta) -> Iterator[None]:
    """Within the block, each layer's ``D`` of ``adapter_name`` is ``new_delta(module, D)`` (``None``: unchanged);
    afterwards the original tensors are put back as they were (the same storage, bit for bit).

    Example:
        with replaced_deltas(adapter_layers(model, "default"), "default", lambda name, delta: delta * 0.5):
            loss = model(**batch).loss
    """
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                parameter = layer.cofi_delta[adapter_name]
                new = new_delta(name, parameter.data)
                if new is not None:
                    saved[name] = parameter.data
                    parameter.data = new.to(device=parameter.device, dtype=parameter.dtype)
        yield
    finally:
        for name, data in saved.items():
            layers[name].cofi_delta[adapter_name].data = data


@contextlib.contextmanager
def attached(model: nn.Module, adapter: str | os.PathLike, verify_base: bool = True) -> Iterator[tuple[PeftModel, str]]:
    """The model with the adapter folder loaded and active, and the adapter's name; the model is put back afterwards
    (see the module docstring for a plain model vs a ``PeftModel``).

    Raises:
        ValueError: a ``PeftModel`` with non-CoFi adapters, or a model with adapter layers but no ``PeftModel``.
        peft_cofi.CheckpointError: the diff was made for other base weights (with ``verify_base``), or a bad file.

    Example:
        with attached(base, "out/adapter") as (peft_model, name):
            print(peft_model.active_adapter == name)
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    if isinstance(model, PeftModel):
        foreign = sorted({type(c).__name__ for c in model.peft_config.values() if not isinstance(c, CoFiConfig)})
        if foreign:
            raise ValueError(
                f"the model is a PeftModel with {foreign} adapters; calibrate needs the base model (e.g. "
                "peft_model.unload()) or a PeftModel of CoFi adapters."
            )
        previous, name = model.active_adapter, TEMPORARY_ADAPTER
        while name in model.peft_config:
            name += "-"
        model.load_adapter(str(adapter), adapter_name=name, verify_base=verify_base)
        try:
            model.set_adapter(name)
            yield model, name
        finally:
            model.set_adapter(previous)
            model.delete_adapter(name)
            _restore(model, flags, was_training)
        return
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the model already holds adapter layers (added with model.add_adapter?); pass the plain base model, or a "
            "PeftModel of CoFi adapters."
        )
    peft_model = PeftModel.from_pretrained(model, str(adapter), verify_base=verify_base)
    try:
        yield peft_model, "default"
    finally:
        _restore(peft_model.unload(), flags, was_training)


def _restore(model: nn.Module, flags: Mapping[str, bool], was_training: bool) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags.get(name, parameter.requires_grad))
    model.train(was_training)
