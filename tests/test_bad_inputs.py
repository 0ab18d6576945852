"""Targeted modules that cannot carry a weight diff (quantised, untrainable dtype, not loaded) fail at get_peft_model
with the module, its type or dtype and the fix named, before any module is replaced: the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload
from peft import get_peft_model
from torch import nn

from peft_cofi import CoFiConfig, CoFiLayer
from tiny_models import tiny_llama

TARGET = "model.layers.1.mlp.up_proj"


class QuantLinear(nn.Module):
    """A GPTQ/AWQ-style quantised linear layer: packed integer weights and scales, no ``nn.Linear`` base."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scales", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.float() * self.scales).T


class Int8Linear(nn.Linear):
    """A bitsandbytes ``Linear8bitLt``-style layer: an ``nn.Linear`` subclass holding an int8 weight."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.int8) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(torch.zeros(linear.weight.shape, dtype=dtype), requires_grad=False)


def swap(model: nn.Module, name: str, build) -> nn.Module:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, build(model.get_submodule(name)))
    return model


def float8(linear: nn.Linear) -> nn.Linear:
    linear.weight = nn.Parameter(linear.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    return linear


def on_meta(linear: nn.Linear) -> nn.Linear:
    linear.weight = nn.Parameter(torch.empty(linear.weight.shape, device="meta"))
    return linear


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    """Module types, and every state entry's dtype/device/shape plus its values (meta tensors have none)."""
    types = {name: type(module) for name, module in model.named_modules()}
    state = {
        key: (value.dtype, value.device, value.shape, None if value.is_meta else value.detach().clone())
        for key, value in model.state_dict().items()
    }
    return types, state


def assert_unchanged(model: nn.Module, before: tuple[dict, dict]) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    for key, (dtype, device, shape, values) in state.items():
        old = before[1][key]
        assert (dtype, device, shape) == old[:3], key
        assert (values is None and old[3] is None) or torch.equal(values, old[3]), key
    assert not hasattr(model, "peft_config")
    assert not any(isinstance(m, CoFiLayer) for m in model.modules())


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            QuantLinear,
            TypeError,
            rf"only adapt nn.Linear and transformers Conv1D.*'{TARGET} \(QuantLinear\)'\]. If they are quantised "
            r"layers.*dequantise it first; otherwise narrow target_modules or add them to exclude_modules",
        ),
        (
            Int8Linear,
            ValueError,
            rf"cannot train a weight diff on 1 selected module\(s\): \['{TARGET} \(Int8Linear\)'\]: its weight has "
            r"dtype torch.int8 \(quantised\?\); a diff needs a floating-point base weight.*dequantise it.*"
            r"exclude_modules",
        ),
        (
            lambda linear: Int8Linear(linear, torch.uint8),  # bitsandbytes 4-bit packs two values per uint8
            ValueError,
            rf"\['{TARGET} \(Int8Linear\)'\]: its weight has dtype torch.uint8",
        ),
        (float8, ValueError, rf"\['{TARGET} \(Linear\)'\]: its weight has dtype torch.float8_e4m3fn"),
        (
            on_meta,
            ValueError,
            rf"\['{TARGET} \(Linear\)'\]: its weight is on the meta device: not loaded, or offloaded by accelerate.*"
            r"with the trained modules fully on a device, or add these modules to exclude_modules",
        ),
    ],
    ids=["quantised-module", "int8-linear", "packed-4bit", "float8", "meta-in-loaded-model"],
)
def test_untrainable_target_is_refused_and_the_model_untouched(build, error, message):
    model = swap(tiny_llama(), TARGET, build)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        get_peft_model(model, CoFiConfig())
    assert_unchanged(model, before)
    # the advice works: excluding the module adapts the others
    adapted = get_peft_model(model, CoFiConfig(exclude_modules=[TARGET]))
    assert len(adapted.base_model.targeted_module_names) == 7 and TARGET not in adapted.base_model.targeted_module_names


def test_accelerate_offloaded_model_is_refused_and_untouched():
    # cpu_offload keeps every weight on the meta device and loads it in a forward hook: no diff could be trained
    model = tiny_llama()
    cpu_offload(model, execution_device="cpu")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot train a weight diff on 8 selected module\(s\).*meta device"):
        get_peft_model(model, CoFiConfig())
    assert_unchanged(model, before)
