"""peft's adapter contract for CoFi on tiny Llama, Qwen2 (GQA), GPT-2 (Conv1D) and OPT models."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from peft import PeftModel, get_peft_model

from peft_cofi import CoFiConfig, CoFiLayer
from tiny_models import random_importance, tiny_gpt2, tiny_llama

DEFAULT_TARGETS = {
    "llama": {"up_proj", "down_proj"},
    "qwen2": {"up_proj", "down_proj"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
    "opt": {"fc1", "fc2"},
}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_default_targets_are_the_ffn_projections(factory):
    model = get_peft_model(factory(), CoFiConfig())
    names = model.base_model.targeted_module_names
    arch = model.config.model_type
    assert len(names) == 2 * 4
    assert all(any(n.endswith("." + t) for t in DEFAULT_TARGETS[arch]) for n in names)
    assert all(isinstance(m, CoFiLayer) for n, m in model.base_model.model.named_modules() if n in names)


def test_zero_init_equals_base_and_disable_is_exact(factory, tokens):
    expected = logits(factory(), tokens)
    model = get_peft_model(factory(), CoFiConfig())
    assert torch.equal(logits(model, tokens), expected)
    random = get_peft_model(factory(), CoFiConfig(init_weights=False))
    assert not torch.allclose(logits(random, tokens), expected)
    with random.disable_adapter():
        assert torch.equal(logits(random, tokens), expected)
    assert not torch.allclose(logits(random, tokens), expected)


def test_merge_unmerge_and_unload(factory, tokens):
    expected_base = logits(factory(), tokens)
    model = get_peft_model(factory(), CoFiConfig(init_weights=False))
    adapted = logits(model, tokens)
    model.merge_adapter()
    assert torch.allclose(logits(model, tokens), adapted, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(logits(model, tokens), adapted, atol=1e-6)
    model.base_model.merge_adapter(safe_merge=True)
    assert torch.allclose(logits(model, tokens), adapted, atol=1e-5)
    model.unmerge_adapter()
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, CoFiLayer) for m in merged.modules())
    assert torch.allclose(logits(merged, tokens), adapted, atol=1e-5)
    unloaded = model.unload()
    assert torch.allclose(logits(unloaded, tokens), expected_base, atol=1e-6)


def test_safe_merge_refuses_non_finite_weights(tokens):
    model = get_peft_model(tiny_llama(), CoFiConfig(init_weights=False))
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.cofi_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.base_model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_save_load_restores_outputs_bit_for_bit(factory, tokens, tmp_path):
    names = [
        n
        for n, _ in get_peft_model(factory(), CoFiConfig()).base_model.model.named_modules()
        if n.endswith(tuple(DEFAULT_TARGETS[factory().config.model_type]))
    ]
    importance = random_importance(factory(), names)
    for mode in ("update", "grad"):
        model = get_peft_model(factory(), CoFiConfig(importance=importance, mask_mode=mode, init_weights=False))
        expected = logits(model, tokens)
        model.save_pretrained(tmp_path / mode)
        loaded = PeftModel.from_pretrained(factory(), tmp_path / mode)
        assert torch.equal(logits(loaded, tokens), expected)
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, CoFiLayer):
                other = loaded.base_model.model.get_submodule(name)
                assert torch.equal(other.cofi_mask["default"], module.cofi_mask["default"])


def test_loading_into_a_trained_adapter_sets_absolute_values(tokens, tmp_path):
    """Trainer's resume path: load_adapter(..., is_trainable=True) into the existing adapter."""
    saved = get_peft_model(tiny_llama(), CoFiConfig(init_weights=False))
    expected = logits(saved, tokens)
    saved.save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), CoFiConfig(init_weights=False))
    model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert torch.equal(logits(model, tokens), expected)
    model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert torch.equal(logits(model, tokens), expected)
    assert all(p.requires_grad for n, p in model.named_parameters() if "cofi_delta" in n)


def test_several_adapters_switch_and_delete(tokens):
    base_out = logits(tiny_llama(), tokens)
    model = get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=[0, 1], init_weights=False))
    first = logits(model, tokens)
    model.add_adapter("other", CoFiConfig(layers_to_transform=[2, 3], init_weights=False))
    assert torch.equal(logits(model, tokens), first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, tokens)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".cofi_delta.other" in n for n in trainable)
    model.base_model.set_adapter(["default", "other"])
    both = logits(model, tokens)
    assert not torch.allclose(both, first) and not torch.allclose(both, second)
    model.set_adapter("default")
    assert torch.equal(logits(model, tokens), first)
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    with model.disable_adapter():
        assert torch.equal(logits(model, tokens), base_out)


def test_print_trainable_parameters_counts_only_the_diffs(capsys):
    model = get_peft_model(tiny_llama(num_layers=12), CoFiConfig(layers_to_transform="bottom2"))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 3 * 2 * 32 * 48
    assert total == sum(p.numel() for n, p in model.named_parameters() if "cofi_" not in n) + trainable
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_creation_on_the_meta_device(tokens, tmp_path):
    saved = get_peft_model(tiny_llama(), CoFiConfig(init_weights=False))
    expected = logits(saved, tokens)
    saved.save_pretrained(tmp_path)
    with init_empty_weights():
        meta_model = get_peft_model(tiny_llama(), CoFiConfig())
    assert all(p.device.type == "meta" for n, p in meta_model.named_parameters() if "cofi_delta" in n)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(logits(loaded, tokens), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_state_and_autocast_works(dtype, tokens):
    model = get_peft_model(tiny_llama().to(dtype), CoFiConfig())
    deltas = [p for n, p in model.named_parameters() if "cofi_delta" in n]
    assert deltas and all(p.dtype == torch.float32 for p in deltas)
    assert all(m.cofi_mask["default"].dtype == torch.float32 for m in model.modules() if isinstance(m, CoFiLayer))
    out = model(tokens, labels=tokens)
    assert out.logits.dtype == dtype
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in deltas)
    fp32 = get_peft_model(tiny_llama(), CoFiConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fp32(tokens, labels=tokens).loss
    loss.backward()
    assert all(p.grad is not None for n, p in fp32.named_parameters() if "cofi_delta" in n)


def test_gradient_checkpointing_gives_the_same_gradients(tokens):
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_gpt2(), CoFiConfig(init_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_modules_to_save_train_and_round_trip(tokens, tmp_path):
    model = get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=[1], modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save.default" in n for n in trainable)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, tokens), expected)
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, tokens), logits(tiny_llama(), tokens))
