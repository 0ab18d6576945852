"""LoRA export, merged full models, and the inspect / merge / export-lora commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_cofi import CoFiConfig, export_lora
from peft_cofi.cli import main
from tiny_models import tiny_gpt2, tiny_llama


@pytest.fixture
def saved(tmp_path):
    """A base model folder and a CoFi adapter trained on it (random non-zero diff)."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), CoFiConfig(init_weights=False))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


PLAIN_PEFT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
assert "peft_cofi" not in sys.modules
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])
assert "peft_cofi" not in sys.modules
tokens = torch.tensor(eval(sys.argv[3]))
with torch.no_grad():
    torch.save(model(tokens).logits, sys.argv[4])
"""


@pytest.mark.slow
def test_lora_export_loads_in_plain_peft_and_matches_the_diff(saved, tokens, tmp_path):
    base_dir, adapter_dir, model = saved
    report = export_lora(adapter_dir, tmp_path / "lora", rank=32)  # full rank of a 32 x 48 diff: exact
    assert report.max_rel_error < 1e-5 and set(report.ranks.values()) == {32}
    out = tmp_path / "logits.pt"
    subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, str(base_dir), str(tmp_path / "lora"), str(tokens.tolist()), str(out)],
        check=True,
        env={**os.environ, "PEFT_COFI_AUTOLOAD": "0"},  # plain peft: without peft-cofi registered
    )
    torch.testing.assert_close(torch.load(out), logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_low_rank_export_reports_its_error(saved, tmp_path):
    _, adapter_dir, model = saved
    report = export_lora(adapter_dir, tmp_path / "lora", rank=4)
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "cofi_delta"):
            exact = module.get_delta_weight("default")
            approx = lora.base_model.model.get_submodule(name).get_delta_weight("default")
            error = float((approx - exact).norm() / exact.norm())
            assert error == pytest.approx(report.rel_errors[name], rel=1e-3) and 0 < error < 1
    energy = export_lora(adapter_dir, tmp_path / "energy", energy=0.5)
    assert all(1 <= r < 32 for r in energy.ranks.values())
    assert all(e <= 0.71 for e in energy.rel_errors.values())  # keeping 50% of ||D||^2 leaves <= sqrt(0.5)


def test_conv1d_export_sets_fan_in_fan_out(tmp_path, tokens):
    model = get_peft_model(tiny_gpt2(), CoFiConfig(init_weights=False))
    model.save_pretrained(tmp_path / "cofi")
    export_lora(tmp_path / "cofi", tmp_path / "lora", rank=32)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    lora = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, tokens), logits(model, tokens), atol=1e-4, rtol=1e-4)
    merged = lora.merge_and_unload()
    torch.testing.assert_close(logits(merged, tokens), logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_merge_command_writes_a_full_model(saved, tokens, tmp_path, capsys):
    base_dir, adapter_dir, model = saved
    out = tmp_path / "merged"
    assert main(["merge", str(base_dir), str(adapter_dir), str(out), "--max-shard-size", "20KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, tokens), logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_inspect_command(saved, capsys):
    _, adapter_dir, _ = saved
    assert main(["inspect", str(adapter_dir)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.3.mlp.up_proj" in text and "48x32" in text and "peft-cofi-diff" in text
    assert main(["inspect", str(adapter_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["modules"]) == 8
    module = report["modules"]["model.layers.0.mlp.down_proj"]
    assert module["shape"] == [32, 48] and module["bytes"] == 32 * 48 * 4 + 32 * 4 + 32 and module["mask_mean"] == 1.0
    assert list(report["modules"])[:3] == [f"model.layers.0.mlp.{p}" for p in ("down_proj", "up_proj")] + [
        "model.layers.1.mlp.down_proj"
    ]


def test_export_command_and_errors(saved, tmp_path, capsys):
    _, adapter_dir, _ = saved
    assert main(["export-lora", str(adapter_dir), str(tmp_path / "lora"), "--rank", "8"]) == 0
    assert "max relative error" in capsys.readouterr().out
    assert main(["export-lora", str(adapter_dir), str(tmp_path / "x")]) == 2
    assert "give --rank" in capsys.readouterr().err
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    assert main(["inspect", str(tmp_path / "broken.safetensors")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "merge", "export-lora"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: peft-cofi" in capsys.readouterr().out
