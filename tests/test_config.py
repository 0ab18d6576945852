"""CoFiConfig validation and its JSON round trip."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, get_peft_model

from peft_cofi import CoFiConfig, UnitImportance
from tiny_models import tiny_llama


def test_json_round_trip(tmp_path):
    config = CoFiConfig(
        target_modules=["up_proj"],
        exclude_modules=["model.layers.0.mlp.up_proj"],
        layers_to_transform=[0, 2],
        mask_mode="grad",
        mask_sharpness=0.25,
        mask_normalization="positive",
        head_pooling=False,
        attention_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CoFiConfig)
    assert loaded.to_dict() == config.to_dict()


def test_window_is_recorded_as_explicit_indices(tmp_path):
    model = get_peft_model(tiny_llama(num_layers=12), CoFiConfig(layers_to_transform="bottom2"))
    model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).layers_to_transform == [3, 4, 5]


def test_importance_is_recorded_as_provenance(tmp_path):
    path = tmp_path / "imp.safetensors"
    UnitImportance({"model.layers.1.mlp.up_proj": torch.rand(48)}, tokens=10).save(path)
    as_dict = CoFiConfig(importance=str(path)).to_dict()
    assert as_dict["importance"] == "checkpoint"
    assert as_dict["importance_source"] == str(path)
    assert CoFiConfig(importance={"a": torch.ones(2)}).to_dict()["importance_source"] == "in-memory"
    assert CoFiConfig().to_dict()["importance"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_mode": "adam"}, r"mask_mode='adam'.*'update', 'grad'"),
        ({"mask_sharpness": 0}, r"mask_sharpness=0 must be a finite number > 0"),
        ({"mask_sharpness": float("nan")}, r"mask_sharpness=nan"),
        ({"mask_normalization": "relu"}, r"mask_normalization='relu'.*'abs', 'positive'"),
        ({"layers_to_transform": "bottom9"}, r"'bottom9' is not a layer window; use one of"),
        ({"layers_to_transform": "0.6:0.2"}, r"'0.6:0.2' is not a layer window"),
        ({"layers_to_transform": [1, -2]}, r"non-empty list of layer indices >= 0"),
        ({"layers_to_transform": []}, r"non-empty list"),
        ({"layers_pattern": "layers"}, r"layers_pattern only applies together with layers_to_transform"),
        ({"target_modules": [3]}, r"target_modules=\[3\] must be a list of module names or a regex"),
        ({"importance": 3.0}, r"importance must be a path.*got float"),
        ({"importance": []}, r"importance=\[\] holds no importance set"),
        ({"target_parameters": ["w"]}, r"target_parameters is not supported"),
    ],
)
def test_invalid_values_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CoFiConfig(**kwargs)


def test_missing_importance_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        CoFiConfig(importance=str(tmp_path / "nope.safetensors"))
