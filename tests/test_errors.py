"""Every bad input fails with a message naming the value, before any module is replaced."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_cofi import CoFiConfig, CoFiLayer, UnitImportance
from tiny_models import tiny_llama, tiny_qwen2

FFN = [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("up_proj", "down_proj")]


def assert_untouched(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, CoFiLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def full_importance(rows: int = 48, hidden: int = 32, **overrides) -> dict[str, torch.Tensor]:
    scores = {n: torch.rand(rows if n.endswith("up_proj") else hidden) for n in FFN}
    scores.update(overrides)
    return scores


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            CoFiConfig(target_modules=["w_in"]),
            ValueError,
            r"matched no module. Adaptable module names in this model: \['down_proj', 'gate_proj', 'k_proj'",
        ),
        (CoFiConfig(layers_to_transform=[7]), ValueError, r"layer indices \[7\] are outside the model's 4 layers"),
        (
            CoFiConfig(target_modules=["input_layernorm"]),
            TypeError,
            r"only adapt nn.Linear and transformers Conv1D.*model.layers.0.input_layernorm \(LlamaRMSNorm\)",
        ),
        (
            CoFiConfig(importance={"model.layers.0.mlp.up_proj": torch.rand(48)}),
            ValueError,
            r"does not cover 7 trained module\(s\), e.g. \['model.layers.0.mlp.down_proj'",
        ),
        (
            CoFiConfig(importance=full_importance(**{"model.layers.2.mlp.up_proj": torch.rand(47)})),
            ValueError,
            r"module 'model.layers.2.mlp.up_proj' has 47 scores but the module has 48 output units",
        ),
        (
            CoFiConfig(importance=full_importance(**{"model.layers.3.mlp.down_proj": torch.full((32,), torch.nan)})),
            ValueError,
            r"importance of module 'model.layers.3.mlp.down_proj': importance scores contain NaN",
        ),
    ],
)
def test_bad_configs_leave_the_model_untouched(config, error, message):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        get_peft_model(model, config)
    assert_untouched(model, state)


def test_unknown_architecture_without_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no default target modules for model_type='custom'; set target_modules"):
        get_peft_model(model, CoFiConfig())


def test_head_pooled_importance_must_fit_the_heads():
    # q_proj of the GQA model: 4 heads of 8 rows; k_proj: 2 heads. 3 scores fit neither.
    config = CoFiConfig(
        target_modules=["k_proj"], importance={f"model.layers.{i}.self_attn.k_proj": torch.rand(3) for i in range(4)}
    )
    with pytest.raises(ValueError, match=r"got 3 scores for a projection with 16 rows; expected one of \[2, 4, 16\]"):
        get_peft_model(tiny_qwen2(), config)


def test_gqa_importance_per_query_head_is_pooled_by_max():
    importance = {f"model.layers.{i}.self_attn.k_proj": torch.tensor([0.0, 0.0, 0.0, 9.0]) for i in range(4)}
    model = get_peft_model(tiny_qwen2(), CoFiConfig(target_modules=["k_proj"], importance=importance))
    factors = model.base_model.model.model.layers[0].self_attn.k_proj.cofi_mask["default"]
    # query heads (0,1) -> kv head 0 (max 0), (2,3) -> kv head 1 (max 9); two heads, |z| = 1 each
    assert factors.shape == (16,)
    assert torch.allclose(factors, torch.full((16,), 1 - float(torch.tanh(torch.tensor(1.0)))))


def test_importance_file_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "imp.safetensors"
    UnitImportance(full_importance(), tokens=77, method="test").save(path)
    loaded = UnitImportance.load(path)
    assert loaded.tokens == 77 and loaded.metadata["method"] == "test"
    model = get_peft_model(tiny_llama(), CoFiConfig(importance=str(path)))
    assert not torch.equal(model.base_model.model.model.layers[0].mlp.up_proj.cofi_mask["default"], torch.ones(48))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors importance file"):
        UnitImportance.load(path)
    with pytest.raises(ValueError, match="one score per unit"):
        UnitImportance({"a": torch.rand(2, 2)})
