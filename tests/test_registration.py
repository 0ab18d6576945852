"""`import peft_cofi` makes `cofi` a first-class peft method."""

from __future__ import annotations

import importlib

import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from transformers import AutoModelForCausalLM

import peft_cofi
from peft_cofi import CoFiConfig, CoFiModel
from tiny_models import tiny_llama


def test_real_enum_member_and_mappings():
    assert isinstance(PeftType.COFI, PeftType)
    assert PeftType("COFI") is PeftType.COFI
    assert PeftType.COFI.value == "COFI"
    assert PeftType.COFI in list(PeftType)
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.COFI] is CoFiModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.COFI] is CoFiConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.COFI] == "cofi_"


def test_registration_is_idempotent():
    members, save = list(PeftType), PeftModel.save_pretrained
    peft_cofi.patches.install()
    reloaded = importlib.reload(importlib.import_module("peft_cofi.patches"))
    reloaded.install()
    assert list(PeftType) == members
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.COFI] is CoFiModel
    # every wrapper wraps peft's original, never an earlier wrapper
    assert PeftModel.save_pretrained.__peft_cofi_original__ is save.__peft_cofi_original__


def test_all_peft_entry_points(tmp_path, tokens):
    base_dir, adapter_dir, second_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "second"
    tiny_llama().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, CoFiConfig(layers_to_transform="bottom2", init_weights=False))
    expected = model(tokens).logits
    model.save_pretrained(adapter_dir)
    get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=[3], init_weights=False)).save_pretrained(second_dir)

    assert isinstance(PeftConfig.from_pretrained(adapter_dir), CoFiConfig)
    loaded = PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    assert torch.equal(loaded(tokens).logits, expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert torch.equal(auto(tokens).logits, expected)

    loaded.load_adapter(second_dir, adapter_name="second")
    loaded.set_adapter("second")
    assert not torch.equal(loaded(tokens).logits, expected)
    loaded.set_adapter("default")
    assert torch.equal(loaded(tokens).logits, expected)

    loaded.add_adapter("third", CoFiConfig(layers_to_transform=[0]))
    assert "third" in loaded.peft_config
    assert any(".cofi_delta.third" in name for name, _ in loaded.named_parameters())
