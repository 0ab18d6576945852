"""The soft mask in training: exact gradient scaling in "grad" mode, protected rows in "update" mode."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_cofi import CoFiConfig, CoFiLayer
from tiny_models import VOCAB, random_importance, tiny_gpt2, tiny_llama


def layers_of(model) -> dict[str, CoFiLayer]:
    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, CoFiLayer)}


def half_protected_importance(model, names):
    """Raw scores that give factor ~0.1 (sharpness chosen below) to the odd rows and exactly 1 to the even rows."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules[name]
        rows = module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]
        scores = torch.zeros(rows)
        scores[1::2] = 1.0
        out[name] = scores
    return out


def sharpness_for_factor(factor: float) -> float:
    # two-valued scores in equal numbers have |z| = 1 everywhere ("abs"); "positive" keeps only the high half
    return 1.0 / float(torch.atanh(torch.tensor(1.0 - factor)))


def batches(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 12), generator=generator) for _ in range(n)]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_grad_mode_scales_gradient_rows_exactly(factory):
    names = list(layers_of(get_peft_model(factory(), CoFiConfig())))
    importance = random_importance(factory(), names)
    tokens = batches(1)[0]
    grads = {}
    for label, config in {
        "plain": CoFiConfig(init_weights=False),
        "masked": CoFiConfig(init_weights=False, importance=importance, mask_mode="grad"),
    }.items():
        model = get_peft_model(factory(), config)
        model(tokens, labels=tokens).loss.backward()
        grads[label] = {n: (m.cofi_delta["default"].grad, m.cofi_mask["default"]) for n, m in layers_of(model).items()}
    assert sorted(grads["masked"]) == sorted(names)
    for name, (grad, mask) in grads["masked"].items():
        plain = grads["plain"][name][0]
        assert not torch.equal(mask, torch.ones_like(mask))
        assert torch.equal(grad, plain * mask.unsqueeze(1))


def row_change_ratio(mask_mode: str, optimizer: str, steps: int = 20) -> float:
    """Mean |weight change| of rows with factor 0.1 over that of rows with factor 1.0, after `steps` steps."""
    names = list(layers_of(get_peft_model(tiny_llama(), CoFiConfig())))
    importance = half_protected_importance(tiny_llama(), names)
    config = CoFiConfig(
        importance=importance,
        mask_mode=mask_mode,
        mask_normalization="positive",
        mask_sharpness=sharpness_for_factor(0.1),
    )
    model = get_peft_model(tiny_llama(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.5)
    model.train()
    for tokens in batches(steps):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    protected, free = [], []
    for layer in layers_of(model).values():
        factors = layer.cofi_mask["default"]
        change = layer.get_delta_weight("default").abs().mean(dim=1)
        assert torch.allclose(factors[1::2], torch.tensor(0.1), atol=1e-5) and (factors[0::2] == 1).all()
        protected.append(change[1::2])
        free.append(change[0::2])
    return float(torch.cat(protected).mean() / torch.cat(free).mean())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_update_mode_protects_rows_under_any_optimizer(optimizer):
    assert row_change_ratio("update", optimizer) <= 0.15


def test_grad_mode_protects_rows_under_sgd_but_adamw_erases_it():
    assert row_change_ratio("grad", "sgd") <= 0.15
    # Adam normalises each element's step by its own gradient scale: the paper's gradient mask barely acts.
    assert row_change_ratio("grad", "adamw") >= 0.5


def test_bottom2_trains_exactly_the_window_and_nothing_else_changes():
    model = get_peft_model(tiny_llama(num_layers=12), CoFiConfig(layers_to_transform="bottom2"))
    expected = {f"model.layers.{i}.mlp.{p}" for i in (3, 4, 5) for p in ("up_proj", "down_proj")}
    assert set(model.base_model.targeted_module_names) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}.cofi_delta.default" for n in expected}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tokens = batches(1)[0]
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
