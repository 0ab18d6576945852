"""compute_input_subspace: what it measures (padding out, token-weighted, contrast), model hygiene, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from peft_cofi import CoFiConfig, InputSubspace, compute_input_subspace
from peft_cofi.subspace_math import kept_energy, projector
from test_importance import assert_same, make_batches, mixed_state_model, snapshot
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

CONFIG = CoFiConfig(layers_to_transform="bottom2")  # layer 1 of 4: up_proj (32 inputs), down_proj (48 inputs)


def subspace(model, data=None, **kwargs) -> InputSubspace:
    kwargs.setdefault("config", CONFIG)
    return compute_input_subspace(model, make_batches() if data is None else data, progress=False, **kwargs)


def inputs_of(model, name: str, batches) -> torch.Tensor:
    """The non-padding inputs of a module over the batches, ``[tokens, in_features]`` (float64)."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    rows = []
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                rows.append(seen.pop()[keep])
    finally:
        handle.remove()
    return torch.cat(rows).double()


def test_energy_is_the_share_of_the_non_padding_inputs_second_moment():
    model, batches = tiny_llama(), make_batches()
    result = subspace(model, batches, energy=0.8)
    assert result.tokens == 3 * (2 * 9 - 3) and result.metadata["kind"] == "plain"
    assert sorted(result) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    for name, basis in result.items():
        x = inputs_of(model, name, batches)
        c = x.T @ x / x.shape[0]
        assert basis.shape == (x.shape[1], result.rank[name])
        assert math.isclose(kept_energy(c, basis), result.energy[name], abs_tol=1e-5)
        assert result.energy[name] >= 0.8 - 1e-6
        # one direction fewer would not hold the energy: the curve says so, and so do the inputs
        assert float(result.curves[name][result.rank[name] - 2]) < 0.8


def test_padding_is_left_out_whatever_its_values():
    model, batches = tiny_llama(), make_batches(count=2)
    unpadded = [
        {"input_ids": b["input_ids"][i : i + 1, : int(b["attention_mask"][i].sum())]} for b in batches for i in range(2)
    ]
    repadded = [{**b, "input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 55)} for b in batches]
    reference = subspace(model, unpadded, rank=5)
    for other in (subspace(model, batches, rank=5), subspace(model, repadded, rank=5)):
        assert other.tokens == reference.tokens
        for name, basis in reference.items():
            torch.testing.assert_close(other.curves[name], reference.curves[name], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(projector(other[name]), projector(basis), atol=1e-4, rtol=0)


def test_token_weighting_counts_each_token_once():
    model, batches = tiny_llama(), make_batches(count=2)
    doubled = subspace(model, batches + batches[:1], rank=4)
    pooled = subspace(model, [batches[0], batches[0], batches[1]], rank=4)
    assert doubled.tokens == pooled.tokens
    for name in doubled:
        torch.testing.assert_close(doubled.curves[name], pooled.curves[name], atol=1e-6, rtol=1e-6)
    # a sequence repeated counts twice as much as one seen once: the energy moves towards it
    once = subspace(model, batches, rank=4)
    assert any(not torch.allclose(once.curves[n], doubled.curves[n], atol=1e-4) for n in once)


def test_contrast_protects_what_general_text_uses_more_than_the_task():
    model = tiny_llama()
    general = make_batches(count=2, seed=1)
    task = [{"input_ids": torch.randint(1, 8, (2, 9), generator=torch.Generator().manual_seed(4))}]
    plain = subspace(model, general, energy=0.95)
    contrast = subspace(model, general, contrast=task, energy=0.95)
    assert contrast.metadata["kind"] == "contrast" and int(contrast.metadata["task_tokens"]) == 18
    for name in plain:
        x = inputs_of(model, name, task)
        c_task = x.T @ x
        # the plain span holds much of the task's input energy; the contrastive one much less
        assert kept_energy(c_task, contrast[name]) < 0.5 * kept_energy(c_task, plain[name])


def test_wrapped_model_measures_under_base_model_names_and_conv1d_inputs():
    config = CoFiConfig(layers_to_transform="bottom2")
    bare = subspace(tiny_gpt2(), config=config, rank=3)
    wrapped = compute_input_subspace(get_peft_model(tiny_gpt2(), config), make_batches(), rank=3, progress=False)
    assert sorted(wrapped) == sorted(bare) == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert {n: tuple(b.shape) for n, b in bare.items()} == {
        "transformer.h.1.mlp.c_fc": (32, 3),
        "transformer.h.1.mlp.c_proj": (128, 3),
    }
    for name in bare:
        torch.testing.assert_close(projector(wrapped[name]), projector(bare[name]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("wrapped", [False, True])
def test_model_is_left_exactly_as_found_also_after_an_interruption(wrapped):
    model = mixed_state_model(wrapped)
    before = snapshot(model)
    subspace(model, make_batches(count=1), config=None if wrapped else CONFIG, contrast=make_batches(count=1))
    assert_same(model, before)

    def interrupted():
        yield from make_batches(count=1)
        raise RuntimeError("data source failed")

    with pytest.raises(RuntimeError, match="data source failed"):
        subspace(model, interrupted(), config=None if wrapped else CONFIG)
    assert_same(model, before)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):  # a bad batch in the task data
        subspace(model, make_batches(count=1), contrast=[{"input_ids": torch.tensor([[1, 500]])}])
    assert_same(model, before)


def all_padding() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"energy": 0.0}, ValueError, r"energy=0.0 must be a fraction in \(0, 1\]"),
        ({"energy": 1.5}, ValueError, r"energy=1.5 must be a fraction in \(0, 1\]"),
        ({"energy": math.nan}, ValueError, r"energy=nan must be a fraction"),
        ({"rank": 0}, ValueError, "rank=0 must be a positive number"),
        ({"rank": 32}, ValueError, r"rank=32 would protect every input direction of \['model.layers.1.mlp.up_proj"),
        ({"max_batches": 0}, ValueError, "max_batches=0 must be a positive"),
        ({"data": []}, ValueError, "the general data yielded no batch"),
        ({"data": all_padding()}, ValueError, "hold no token"),
        ({"contrast": all_padding()}, ValueError, r"the 1 task batch\(es\) hold no token"),
        ({"modules": ["model.layers.9.mlp.up_proj"]}, ValueError, r"no module named \['model.layers.9.mlp.up_proj'\]"),
        ({"data": make_batches(length=65)}, ValueError, "65 tokens, longer than the model's context of 64"),
        ({"data": [torch.ones(2, 3, dtype=torch.long)]}, TypeError, "batch 0 must be a mapping with 'input_ids'"),
    ],
)
def test_bad_input_fails_clearly(kwargs, error, message):
    data = kwargs.pop("data", make_batches(count=1))
    with pytest.raises(error, match=message):
        subspace(tiny_llama(), data, **kwargs)


def test_inputs_that_leave_nothing_to_train_or_no_energy_name_the_module():
    model = tiny_llama()
    many = [{"input_ids": torch.randint(1, VOCAB, (8, 40), generator=torch.Generator().manual_seed(0))}]
    with pytest.raises(ValueError, match=r"module 'model.layers.1.mlp.up_proj'.*energy=1 needs all 32 input"):
        subspace(model, many, energy=1.0)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.zero_()  # up_proj's inputs are all zero
    with pytest.raises(ValueError, match=r"module 'model.layers.1.mlp.up_proj'.*zero energy"):
        subspace(model, make_batches(count=1))
