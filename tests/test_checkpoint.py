"""Diff checkpoints: storage modes, validation before any weight changes, atomic saves."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

import peft_cofi
from peft_cofi import CoFiConfig, CoFiLayer
from peft_cofi.diff_format import CheckpointError, read_diff_file
from tiny_models import random_importance, tiny_gpt2, tiny_llama

FFN = [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("up_proj", "down_proj")]


def trained(factory=tiny_llama, **config):
    """A CoFi model with a random non-zero diff and a random mask."""
    names = [n for n in FFN] if factory is tiny_llama else None
    importance = random_importance(factory(), names) if names else None
    return get_peft_model(factory(), CoFiConfig(init_weights=False, importance=importance, **config))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def diffs(model) -> dict[str, torch.Tensor]:
    return {
        n: m.get_delta_weight("default").float()
        for n, m in model.base_model.model.named_modules()
        if isinstance(m, CoFiLayer)
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, state) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("storage", "density"), [("dense", None), ("rows", None), ("rows", 0.5), ("topk", 0.1), ("topk", 0.5)]
)
def test_round_trip_every_storage_and_dtype(storage, density, dtype, tokens, tmp_path):
    model = trained(storage=storage, storage_density=density, storage_dtype=dtype)
    expected = diffs(model)
    model.save_pretrained(tmp_path)
    records = read_diff_file(tmp_path / "adapter_model.safetensors").records
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name, diff in diffs(loaded).items():
        error = (diff - expected[name]).norm() / expected[name].norm()
        assert abs(float(error) - records[name]["rel_error"]) < 1e-3  # the header states the true error
        if storage == "dense" and dtype == "float32":
            assert torch.equal(diff, expected[name])
        elif storage == "dense":
            assert float(error) < 1e-2
        if storage == "topk":
            assert records[name]["kept"] == pytest.approx(density, abs=1e-3)
    if storage == "dense" and dtype == "float32":
        assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_topk_index_dtype_is_the_smallest_that_fits(tmp_path):
    trained(storage="topk", storage_density=0.1).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        idx = [handle.get_tensor(k).dtype for k in handle.keys() if k.endswith("cofi_delta_idx")]  # noqa: SIM118
    assert idx and set(idx) == {torch.int16}  # 48 x 32 = 1536 entries fit int16


def test_dense_size_is_the_trained_parameter_bytes_plus_a_small_constant(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    trainable_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    layers = [m for m in model.modules() if isinstance(m, CoFiLayer)]
    mask_and_print_bytes = sum(m.cofi_mask["default"].numel() * 4 + 32 for m in layers)
    overhead = (tmp_path / "adapter_model.safetensors").stat().st_size - trainable_bytes - mask_and_print_bytes
    assert 0 < overhead < 800 * len(FFN)  # header: a few hundred bytes per module, whatever its size


def test_header_metadata(tmp_path):
    model = trained(storage="rows", storage_dtype="bfloat16")
    model.save_pretrained(tmp_path)
    diff_file = read_diff_file(tmp_path / "adapter_model.safetensors")
    header = diff_file.header.fields
    assert header["cofi_format"] == "peft-cofi-diff" and header["cofi_format_version"] == "2"
    assert header["peft_cofi_version"] == peft_cofi.__version__
    assert header["storage"] == "rows" and header["value_dtype"] == "bfloat16" and header["mask_mode"] == "update"
    assert sorted(diff_file.records) == sorted(FFN)
    weight = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    stored = diff_file.tensors["model.layers.0.mlp.up_proj"]["cofi_base_fingerprint"]
    assert torch.equal(stored, peft_cofi.diff_format.fingerprint(weight))


def corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped":
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "version":
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            metadata = {**handle.metadata(), "cofi_format_version": "99"}
        save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "not a readable safetensors file"),
        ("flipped", "corrupt \\(checksum mismatch\\)"),
        ("version", "diff format version '99'; this peft-cofi reads version 2"),
    ],
)
def test_damaged_files_raise_and_leave_the_model_untouched(how, message, tmp_path, tokens):
    trained().save_pretrained(tmp_path)
    corrupt(tmp_path / "adapter_model.safetensors", how)
    base = tiny_llama()
    state, expected = snapshot(base), logits(base, tokens)
    with pytest.raises(CheckpointError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, CoFiLayer) for m in base.modules()) and not hasattr(base, "peft_config")
    assert_same_state(base, state)
    assert torch.equal(logits(base, tokens), expected)


def test_wrong_base_is_refused_with_the_modules_named_unless_opted_out(tmp_path, tokens):
    model = trained()
    model.save_pretrained(tmp_path)
    other = tiny_llama(seed=1)
    state = snapshot(other)
    with pytest.raises(CheckpointError, match=r"other base weights: 8 module\(s\) differ, e.g. \['model.layers.0"):
        PeftModel.from_pretrained(other, tmp_path)
    assert_same_state(other, state)
    forced = PeftModel.from_pretrained(other, tmp_path, verify_base=False)
    for name, diff in diffs(forced).items():
        assert torch.equal(diff, diffs(model)[name])


def test_resume_into_a_trained_adapter_keeps_it_on_failure(tmp_path, tokens):
    trained().save_pretrained(tmp_path)
    corrupt(tmp_path / "adapter_model.safetensors", "flipped")
    model = trained()
    state, expected = snapshot(model), logits(model, tokens)
    with pytest.raises(CheckpointError):
        model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert_same_state(model, state)
    assert torch.equal(logits(model, tokens), expected)


def test_missing_extra_and_wrong_shape_modules(tmp_path):
    get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=[0, 1], init_weights=False)).save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=[1, 2]))
    state = snapshot(model)
    with pytest.raises(CheckpointError, match=r"missing 2 \(e.g. \['model.layers.2.mlp.down_proj'.*unexpected 2"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert_same_state(model, state)
    wide = tiny_llama()
    wide.model.layers[0].mlp.up_proj = torch.nn.Linear(32, 50, bias=False)
    wide.model.layers[0].mlp.down_proj = torch.nn.Linear(50, 32, bias=False)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj: the checkpoint holds a \(48, 32\) diff"):
        PeftModel.from_pretrained(wide, tmp_path)
    assert not any(isinstance(m, CoFiLayer) for m in wide.modules())


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    first = trained()
    first.save_pretrained(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = get_peft_model(tiny_llama(), CoFiConfig(init_weights=False, layers_to_transform=[0]))
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def failing_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # half-written, then the disk fills up
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr("peft_cofi.atomic_io.save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        second.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    assert (tmp_path / "adapter_config.json").read_bytes() == files["adapter_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert all(torch.equal(d, diffs(first)[n]) for n, d in diffs(loaded).items())


def test_save_diff_chooses_storage_at_save_time(tmp_path):
    model = trained()
    peft_cofi.save_diff(model, tmp_path, storage="topk", density=0.2, dtype="float16")
    assert model.peft_config["default"].storage == "dense"
    header = read_diff_file(tmp_path / "adapter_model.safetensors").header.fields
    assert (header["storage"], header["density"], header["value_dtype"]) == ("topk", "0.2", "float16")
    assert PeftConfig.from_pretrained(tmp_path).storage == "topk"


def test_grad_mode_and_conv1d_round_trip(tmp_path, tokens):
    model = trained(tiny_gpt2, mask_mode="grad")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))
    assert {r["layout"] for r in read_diff_file(tmp_path / "adapter_model.safetensors").records.values()} == {"conv1d"}


def test_saving_a_merged_adapter_is_refused(tmp_path):
    model = trained()
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.save_pretrained(tmp_path)
