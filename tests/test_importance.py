"""compute_importance: exactness properties, architecture coverage, model hygiene, bad input."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers.pytorch_utils import Conv1D

from peft_cofi import CoFiConfig, CoFiLayer, UnitImportance
from peft_cofi.scoring import compute_importance
from peft_cofi.targets import resolve_targets
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_neox, tiny_opt, tiny_qwen2

ALL = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "opt": tiny_opt, "neox": tiny_neox}


def make_batches(count: int = 3, size: int = 2, length: int = 9, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random batches; the second row of each is right-padded (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (size, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, length - 3 :] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def importance(model, data=None, **kwargs) -> UnitImportance:
    return compute_importance(model, make_batches() if data is None else data, progress=False, **kwargs)


def rows_of(module: torch.nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view (Conv1D stores it transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


@pytest.mark.parametrize("arch", sorted(ALL))
def test_default_targets_match_cofi_training_and_zero_rows_score_exactly_zero(arch):
    model = ALL[arch]()
    config = CoFiConfig(layers_to_transform="bottom2")
    targets = [t.name for t in resolve_targets(model, config)]
    trained = get_peft_model(ALL[arch](), config).base_model.targeted_module_names
    assert sorted(targets) == sorted(trained)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in targets:
            rows_of(modules[name])[3].zero_()
            if modules[name].bias is not None:
                modules[name].bias[3] = 0.0
    result = importance(model, config=config)
    assert sorted(result.scores) == sorted(targets)
    assert result.tokens == 3 * (2 * 9 - 3)
    for name in targets:
        scores = result[name]
        assert scores.shape == (rows_of(modules[name]).shape[0],)
        assert scores[3] == 0.0 and bool((scores[torch.arange(len(scores)) != 3] > 0).all())


def test_resolution_follows_config_selection_rules():
    model = tiny_llama()
    exclude = CoFiConfig(target_modules=["up_proj", "down_proj"], exclude_modules=["model.layers.0.mlp.up_proj"])
    assert "model.layers.0.mlp.up_proj" not in [t.name for t in resolve_targets(model, exclude)]
    regex = [t.name for t in resolve_targets(model, CoFiConfig(target_modules=r".*\.[23]\.self_attn\.(q|v)_proj"))]
    assert regex == [f"model.layers.{i}.self_attn.{p}_proj" for i in (2, 3) for p in "qv"]
    assert len(resolve_targets(model, CoFiConfig(target_modules="all-linear"))) == 4 * 7
    named = resolve_targets(model, modules=["base_model.model.model.layers.1.mlp.up_proj"])
    assert [t.name for t in named] == ["model.layers.1.mlp.up_proj"]


def test_permuting_units_permutes_scores():
    model, permuted = tiny_llama(), tiny_llama()
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    mlp = permuted.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    names = ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"]
    base = importance(model, modules=names, method="loss")
    moved = importance(permuted, modules=names, method="loss")
    torch.testing.assert_close(moved[names[0]], base[names[0]][perm], rtol=1e-4, atol=1e-9)
    for name in names[1:]:
        torch.testing.assert_close(moved[name], base[name], rtol=1e-4, atol=1e-9)


def test_seed_makes_scores_reproducible_and_independent_of_pad_ids():
    model = tiny_qwen2()
    first, again = importance(model, seed=7), importance(model, seed=7)
    assert all(torch.equal(first[n], again[n]) for n in first.scores)
    other = importance(model, seed=8)
    assert not all(torch.equal(first[n], other[n]) for n in first.scores)
    # Padding is excluded from the KL: what the pad positions hold does not matter.
    repadded = [{**b, "input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 5)} for b in make_batches()]
    padded_differently = importance(model, repadded, seed=7)
    for name in first.scores:
        torch.testing.assert_close(padded_differently[name], first[name], rtol=1e-5, atol=0)


def direct_head_gate_scores(model, name: str, head_dim: int, batches) -> torch.Tensor:
    """Reference: one gate per head (repeated over its rows), the summed LM loss, |grad| per batch / tokens."""
    module = dict(model.named_modules())[name]
    heads = rows_of(module).shape[0] // head_dim
    gate = torch.ones(heads, requires_grad=True)
    handle = module.register_forward_hook(lambda m, a, out: out * gate.repeat_interleave(head_dim))
    total, tokens = torch.zeros(heads, dtype=torch.float64), 0
    model.requires_grad_(False)
    try:
        for batch in batches:
            logits = model(**batch).logits[:, :-1]
            labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            keep = labels != -100
            torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").backward()
            total += gate.grad.double().abs()
            gate.grad = None
            tokens += int(keep.sum())
    finally:
        handle.remove()
    return (total / tokens).float()


@pytest.mark.parametrize(
    ("factory", "names"),
    [
        (tiny_qwen2, ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]),
        (tiny_gpt2, ["transformer.h.2.attn.c_attn"]),
        (tiny_neox, ["gpt_neox.layers.0.attention.query_key_value"]),
    ],
)
def test_pooled_head_scores_equal_a_direct_per_head_gate(factory, names):
    model = factory()
    pooled = importance(model, modules=names, method="loss")
    for name in names:
        expected = direct_head_gate_scores(factory(), name, head_dim=8, batches=make_batches())
        torch.testing.assert_close(pooled[name], expected, rtol=1e-5, atol=1e-9)
    per_row = importance(model, modules=names, method="loss", head_pooling=False)
    assert per_row[names[0]].numel() == 8 * pooled[names[0]].numel()
    assert pooled.metadata["head_pooled"] == ",".join(names)


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def mixed_state_model(wrapped: bool) -> torch.nn.Module:
    """A tiny Llama (CoFi-wrapped or bare) in mixed train/eval modes, a frozen parameter and a stale gradient: the
    state a pass over the model must leave exactly as found."""
    model = tiny_llama()
    if wrapped:
        model = get_peft_model(model, CoFiConfig(layers_to_transform="bottom2", init_weights=False))
    model.train()
    base = model.base_model.model if wrapped else model
    base.model.layers[2].eval()  # mixed modes
    base.model.embed_tokens.weight.requires_grad_(False)
    base.lm_head.weight.grad = torch.ones_like(base.lm_head.weight)
    return model


def assert_same(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["requires_grad"] == before["requires_grad"] and after["training"] == before["training"]
    assert all(after["grads"][n] is g for n, g in before["grads"].items())
    assert after["hooks"] == before["hooks"] and torch.equal(after["rng"], before["rng"])


@pytest.mark.parametrize("wrapped", [False, True])
def test_model_is_left_exactly_as_found_also_after_an_interruption(wrapped):
    model = mixed_state_model(wrapped)
    before = snapshot(model)
    importance(model, make_batches(count=1))
    assert_same(model, before)

    def interrupted():
        yield from make_batches(count=1)
        raise RuntimeError("data source failed")

    with pytest.raises(RuntimeError, match="data source failed"):
        importance(model, interrupted())
    assert_same(model, before)


def test_wrapped_model_scores_the_cofi_layers_under_base_model_names():
    config = CoFiConfig(layers_to_transform="bottom2")
    bare = importance(tiny_gpt2(), config=config)
    peft_model = get_peft_model(tiny_gpt2(), config)
    wrapped = importance(peft_model)  # default: the adapter's own config
    assert sorted(wrapped.scores) == sorted(bare.scores) == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    for name in bare.scores:
        torch.testing.assert_close(wrapped[name], bare[name], rtol=1e-4, atol=1e-9)
    targets = resolve_targets(peft_model)
    assert all(isinstance(t.module, CoFiLayer) for t in targets)


def test_result_feeds_cofi_config_including_pooled_gqa_heads(tmp_path):
    config = CoFiConfig(target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], layers_to_transform=[1])
    result = importance(tiny_qwen2(), config=config, method="loss")
    assert result["model.layers.1.self_attn.q_proj"].shape == (4,)
    assert result["model.layers.1.self_attn.k_proj"].shape == (2,)  # grouped-query: 2 k/v heads
    path = tmp_path / "importance.safetensors"
    result.save(path)
    loaded = UnitImportance.load(path)
    assert loaded.tokens == result.tokens and loaded.metadata["method"] == "loss"
    for source in (result, str(path), [result, loaded]):
        config.importance = source
        model = get_peft_model(tiny_qwen2(), config)
        layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, CoFiLayer)}
        factors = layers["model.layers.1.self_attn.k_proj"].cofi_mask["default"]
        assert factors.shape == (16,) and torch.equal(factors[:8], factors[:8].flip(0))  # one factor per head
        assert float(factors.min()) < 1.0


def test_streams_a_dataloader_with_max_batches_and_loss_labels():
    examples = [{"input_ids": torch.randint(1, VOCAB, (7,)), "labels": torch.full((7,), -100)} for _ in range(10)]
    for example in examples:
        example["labels"][4:] = example["input_ids"][4:]
    loader = DataLoader(examples, batch_size=2)
    result = importance(tiny_opt(), loader, method="loss", max_batches=3)
    assert result.metadata["batches"] == "3" and result.tokens == 3 * 2 * 3  # labels 4..6 are predicted from 3..5


def test_a_module_with_zero_output_warns():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    with pytest.warns(UserWarning, match="1 module.* got zero importance.*model.layers.0.mlp.up_proj"):
        importance(model, modules=["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"])


def all_padding():
    return [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"data": []}, ValueError, "the data yielded no batch"),
        ({"data": all_padding()}, ValueError, "hold no token to score"),
        ({"modules": ["model.layers.9.mlp.up_proj"]}, ValueError, r"no module named \['model.layers.9.mlp.up_proj'\]"),
        ({"config": CoFiConfig(target_modules=["w_in"])}, ValueError, r"matched no module.*'down_proj', 'gate_proj'"),
        ({"modules": ["model.norm"]}, TypeError, r"neither: \['model.norm \(LlamaRMSNorm\)'\]"),
        ({"dropout": 0.0}, ValueError, "dropout=0 scores every unit 0"),
        ({"dropout": 1.0}, ValueError, r"dropout=1.0 must lie in \[0, 1\)"),
        ({"method": "fisher"}, ValueError, "method='fisher' is not supported"),
        ({"max_batches": 0}, ValueError, "max_batches=0 must be a positive"),
        ({"data": make_batches(length=65)}, ValueError, "65 tokens, longer than the model's context of 64"),
        ({"data": [{"input_ids": torch.tensor([[1, 200]])}]}, ValueError, r"outside the model's vocabulary \[0, 97\)"),
        ({"data": [torch.ones(2, 3, dtype=torch.long)]}, TypeError, "batch 0 must be a mapping with 'input_ids'"),
    ],
)
def test_bad_input_fails_clearly(kwargs, error, message):
    model = tiny_llama()
    data = kwargs.pop("data", make_batches(count=1))
    with pytest.raises(error, match=message):
        importance(model, data, **kwargs)


def test_degenerate_models_fail_instead_of_returning_zeros_or_nan():
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    with pytest.raises(ValueError, match="every importance score is zero"):
        importance(model, make_batches(count=1))
    broken = tiny_llama()
    with torch.no_grad():
        broken.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="loss of batch 0 is nan"):
        importance(broken, make_batches(count=1))


def test_normalized_flag_survives_save_and_load(tmp_path):
    raw = importance(tiny_llama(), make_batches(count=1), modules=["model.layers.0.mlp.up_proj"])
    combined = UnitImportance.combine([raw, raw])
    combined.save(tmp_path / "combined.safetensors")
    assert UnitImportance.load(tmp_path / "combined.safetensors").normalized


def test_lean_kl_matches_autograd_and_skips_masked_rows():
    from peft_cofi.losses import logits_kl

    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(2, 3, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    z2 = torch.randn(2, 3, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    keep = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.autograd.gradcheck(lambda a, b: logits_kl(a, b, keep), (z1, z2))
    log_p, log_q = z1[keep].log_softmax(-1), z2[keep].log_softmax(-1)
    expected = (log_p.exp() * (log_p - log_q)).sum()
    torch.testing.assert_close(logits_kl(z1, z2, keep), expected)
    logits_kl(z1, z2, keep).backward()
    assert not z1.grad[~keep].any() and not z2.grad[~keep].any()


def test_modules_outside_the_forward_pass_fail_clearly():
    model = tiny_llama()
    model.unused = torch.nn.Linear(32, 8)
    with pytest.raises(ValueError, match="not called in the model's forward pass"):
        importance(model, make_batches(count=1), modules=["unused"])
