"""CoFiConfig(input_subspace=...): protected outputs hold under AdamW, the contrastive variant leaves the task's
directions trainable, the adapter saves as its effective diff (loadable without any subspace), and the usual peft
contract (merge, disable, several adapters, checkpointing, bf16 autocast) holds."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_cofi import CoFiConfig, CoFiLayer, InputSubspace, compute_input_subspace, read_diff_file
from test_importance import make_batches
from tiny_models import VOCAB, random_importance, tiny_gpt2, tiny_llama

LAYERS = [1, 2]
NAMES = [f"model.layers.{i}.mlp.{p}" for i in LAYERS for p in ("up_proj", "down_proj")]


def general_batches() -> list[dict[str, torch.Tensor]]:
    """Few tokens (2 x 9 - 3 real ones per batch): their inputs span a small subspace of every module."""
    return make_batches(count=1, seed=3)


def task_tokens(seed: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(seed))


def train(model, steps: int = 12, lr: float = 1e-2, autocast: bool = False, tokens: torch.Tensor | None = None):
    """AdamW with weight decay: its element-wise steps would leak into protected directions without the
    parametrisation."""
    tokens = task_tokens() if tokens is None else tokens
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def measure(model, data, config: CoFiConfig | None = None, **kwargs) -> InputSubspace:
    config = CoFiConfig(layers_to_transform=LAYERS) if config is None else config
    return compute_input_subspace(model, data, config=config, progress=False, **kwargs)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def cofi_layers(model) -> dict[str, CoFiLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, CoFiLayer)}


@pytest.mark.parametrize(
    ("factory", "fine"),
    [
        (tiny_llama, {}),
        (tiny_llama, {"mask_mode": "update", "importance": "random"}),
        (tiny_llama, {"mask_mode": "grad", "importance": "random"}),
        (tiny_gpt2, {}),  # Conv1D: transposed weights
    ],
    ids=["llama-no-mask", "llama-update-mask", "llama-grad-mask", "gpt2-no-mask"],
)
def test_full_energy_subspace_holds_protected_outputs_under_adamw(factory, fine):
    model, batch = factory(), general_batches()[0]
    subspace = measure(model, [batch], energy=1.0)
    assert all(rank <= 15 for rank in subspace.rank.values())  # at most the 15 real tokens' directions
    if fine:
        fine = {**fine, "importance": random_importance(model, list(subspace))}
    before_general, before_task = logits(model, batch), logits(model, {"input_ids": task_tokens()})
    tuned = train(get_peft_model(model, CoFiConfig(layers_to_transform=LAYERS, input_subspace=subspace, **fine)))
    keep = batch["attention_mask"].bool()
    # every protected module's output on those inputs is unchanged, so the whole model's is (padding aside) ...
    torch.testing.assert_close(logits(tuned, batch)[keep], before_general[keep], atol=2e-5, rtol=1e-5)
    # ... while the task's outputs moved
    assert (logits(tuned, {"input_ids": task_tokens()}) - before_task).abs().max() > 0.05
    for name, layer in cofi_layers(tuned).items():
        assert layer.effective_delta("default").detach().matmul(subspace[name]).abs().max() < 1e-5
        # Adam's element-wise steps and weight decay moved D itself inside the protected span: only the
        # parametrisation keeps the effective update out of it
        assert layer.cofi_delta["default"].detach().matmul(subspace[name]).abs().max() > 1e-4


def embedding_split_model() -> torch.nn.Module:
    """A tiny Llama whose layer-0 ``up_proj`` sees general tokens in input dims 0-15 (and weakly in 16-23) and task
    tokens only in dims 16-23; nothing uses 24-31 (layer 0's attention output is switched off, so its inputs are the
    normalised embeddings)."""
    model = tiny_llama(num_layers=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings.zero_()
        embeddings[1:48, :16] = torch.randn(47, 16, generator=generator)
        embeddings[1:48, 16:24] = 0.3 * torch.randn(47, 8, generator=generator)
        embeddings[48:, 16:24] = torch.randn(VOCAB - 48, 8, generator=generator)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    return model


def task_output_change(variant: str) -> tuple[float, InputSubspace | None]:
    """Relative change of the trained module's output on the task's inputs after training on the task."""
    general = [{"input_ids": torch.randint(1, 48, (8, 12), generator=torch.Generator().manual_seed(1))}]
    task = torch.randint(48, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
    model = embedding_split_model()
    config = CoFiConfig(target_modules=["model.layers.0.mlp.up_proj"])
    subspace = None
    if variant != "none":  # plain: every direction general text uses at all, the task's included
        contrast = [{"input_ids": task}] if variant == "contrast" else None
        subspace = measure(model, general, config, contrast=contrast, energy=1.0)
    inputs = []
    module = model.model.layers[0].mlp.up_proj
    handle = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    model(input_ids=task)
    handle.remove()
    x = inputs[0].reshape(-1, 32)
    config = CoFiConfig(target_modules=["model.layers.0.mlp.up_proj"], input_subspace=subspace)
    tuned = train(get_peft_model(model, config), tokens=task)
    delta = cofi_layers(tuned)["model.layers.0.mlp.up_proj"].get_delta_weight("default")
    return float((x @ delta.T).norm() / (x @ module.weight.T).norm()), subspace


def test_contrast_keeps_the_task_directions_trainable():
    free, _ = task_output_change("none")
    contrast, subspace = task_output_change("contrast")
    plain, plain_subspace = task_output_change("plain")
    basis = subspace["model.layers.0.mlp.up_proj"]
    assert plain_subspace.rank["model.layers.0.mlp.up_proj"] == 24
    assert basis[:16].norm() ** 2 > 15.99 and basis[16:24].norm() ** 2 < 1.5  # general-heavy directions only
    assert plain < 1e-5 * free  # the plain subspace holds the task's outputs still ...
    assert contrast > 0.5 * free  # ... the contrastive one lets them move about as much as no protection does


def trained_with_subspace(**config_kwargs):
    model = tiny_llama()
    subspace = measure(model, general_batches(), rank=6)
    config = CoFiConfig(layers_to_transform=LAYERS, input_subspace=subspace, **config_kwargs)
    return train(get_peft_model(model, config), steps=4), subspace


def test_saved_adapter_is_the_effective_diff_and_loads_without_any_subspace(tmp_path):
    tuned, subspace = trained_with_subspace(storage="dense")
    tuned.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["input_subspace"] == "checkpoint"
    recorded = saved["input_subspace_source"]["modules"]
    assert sorted(recorded) == sorted(NAMES) and all(recorded[n]["rank"] == 6 for n in NAMES)
    assert all(recorded[n]["energy"] == pytest.approx(subspace.energy[n], abs=1e-6) for n in NAMES)
    diff = read_diff_file(tmp_path / "a" / "adapter_model.safetensors")
    header = json.loads(diff.header.fields["cofi_input_subspace"])
    assert header["kind"] == "plain" and header["rank"] == 6 and header["source"] == "in-memory"
    for name, layer in cofi_layers(tuned).items():
        assert torch.equal(diff.delta(name), layer.projected_delta("default").detach())  # D (I - U U^T) is stored
        assert diff.diff(name).matmul(subspace[name]).abs().max() < 1e-5
    # a fresh base, no subspace anywhere: identical logits, no warning
    tokens = {"input_ids": task_tokens(9)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert not [w for w in caught if "input-subspace" in str(w.message)]
    assert torch.equal(logits(loaded, tokens), logits(tuned, tokens))
    assert not any(layer.cofi_subspace for layer in cofi_layers(loaded).values())
    # re-saved without the subspace: the same tensors, bit for bit, and the record is kept
    loaded.save_pretrained(tmp_path / "b")
    again = read_diff_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(again.tensors[n][k], t) for n in NAMES for k, t in diff.tensors[n].items())
    assert json.loads(again.header.fields["cofi_input_subspace"]) == header


def test_resuming_keeps_the_protection_and_the_effective_weights(tmp_path):
    tuned, subspace = trained_with_subspace()
    tuned.save_pretrained(tmp_path / "a")
    # Trainer's resume: load_adapter into the model built with the subspace
    resumed = get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=LAYERS, input_subspace=subspace))
    config = CoFiConfig(layers_to_transform=LAYERS, input_subspace=subspace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_adapter(str(tmp_path / "a"), adapter_name="default", is_trainable=True)
        passed = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", config=config, is_trainable=True)
    assert not [w for w in caught if "input-subspace" in str(w.message)]
    for model in (resumed, passed):
        for name, layer in cofi_layers(model).items():
            assert layer.cofi_subspace["default"].rank == 6
            expected = cofi_layers(tuned)[name].effective_delta("default").detach()
            torch.testing.assert_close(layer.effective_delta("default").detach(), expected, atol=1e-6, rtol=1e-5)
        train(model, steps=2)
        for name, layer in cofi_layers(model).items():
            assert layer.effective_delta("default").detach().matmul(subspace[name]).abs().max() < 1e-5
    # loading it to train on without the subspace works, and says that training is no longer protected
    with pytest.warns(UserWarning, match="trained with input-subspace protection"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", is_trainable=True)


def test_merge_unmerge_disable_and_several_adapters():
    model = tiny_llama()
    subspace = measure(model, general_batches(), rank=20)  # 20 of 32 inputs: stored as the complement
    tokens = {"input_ids": task_tokens()}
    base = logits(model, tokens)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in NAMES}
    protected = CoFiConfig(layers_to_transform=LAYERS, input_subspace=subspace, init_weights=False)
    peft_model = get_peft_model(model, protected, adapter_name="a")
    peft_model.add_adapter("b", CoFiConfig(layers_to_transform=LAYERS, init_weights=False))
    layers = cofi_layers(peft_model)
    assert {layer.cofi_subspace["a"].keep for layer in layers.values()} == {True, False}  # 20 of 32, 20 of 48
    assert all("b" not in layer.cofi_subspace for layer in layers.values())
    for name, layer in layers.items():
        assert layer.effective_delta("a").detach().matmul(subspace[name]).abs().max() < 1e-5
        assert layer.effective_delta("b").detach().matmul(subspace[name]).abs().max() > 1e-3
    peft_model.set_adapter("a")
    unmerged = logits(peft_model, tokens)
    assert (unmerged - base).abs().max() > 1e-3
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, tokens), base)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, tokens), unmerged, atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()
    for name in NAMES:
        torch.testing.assert_close(layers[name].get_base_layer().weight, weights[name], atol=1e-6, rtol=0)
    peft_model.base_model.set_adapter(["a", "b"])  # both active: the diffs add, each as its own
    both = logits(peft_model, tokens)
    peft_model.base_model.set_adapter("a")
    peft_model.delete_adapter("a")
    assert all("a" not in layer.cofi_subspace for layer in layers.values())
    assert (logits(peft_model, tokens) - both).abs().max() > 1e-3


def test_gradient_checkpointing_and_bf16_autocast_keep_the_projection_exact():
    model, batch = tiny_llama(), general_batches()[0]
    subspace = measure(model, [batch], energy=1.0)
    before = logits(model, batch)
    peft_model = get_peft_model(model, CoFiConfig(layers_to_transform=LAYERS, input_subspace=subspace))
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned = train(peft_model, autocast=True)
    keep = batch["attention_mask"].bool()
    # trained under bf16 autocast, evaluated in float32: the projection itself ran in float32 (a bf16 one leaks)
    torch.testing.assert_close(logits(tuned, batch)[keep], before[keep], atol=2e-5, rtol=1e-5)
    for name, layer in cofi_layers(tuned).items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            effective = layer.effective_delta("default").detach()
        assert effective.dtype == torch.float32 and effective.matmul(subspace[name]).abs().max() < 1e-5
