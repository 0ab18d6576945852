"""``peft-cofi importance`` and ``importance-plot`` on a tiny saved model and tokenizer (offline)."""

from __future__ import annotations

import json

import pytest

from peft_cofi import UnitImportance
from peft_cofi.cli import main
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer

RECORDS = [
    {"instruction": "translate the cat", "input": "", "output": "the cat"},
    {"text": "the old house by the river was big and blue"},
    {"messages": [{"role": "user", "content": "what is two and two"}, {"role": "assistant", "content": "four"}]},
] * 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return root


def test_importance_then_plot(saved, tmp_path, capsys):
    out = tmp_path / "imp.safetensors"
    argv = ["importance", str(saved / "model"), str(saved / "data.jsonl"), "--out", str(out), "--layers", "bottom2"]
    assert main([*argv, "--max-batches", "2", "--batch-size", "3", "--no-progress"]) == 0
    assert "wrote importance of 2 modules" in capsys.readouterr().out
    result = UnitImportance.load(out)
    assert sorted(result.scores) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    assert result.metadata["batches"] == "2" and result.metadata["method"] == "kl-dropout"
    png, dist = tmp_path / "imp.png", tmp_path / "dist.png"
    assert main(["importance-plot", str(out), "--out", str(png), "--distributions", str(dist)]) == 0
    assert png.read_bytes()[:4] == dist.read_bytes()[:4] == b"\x89PNG"


def test_loss_method_with_explicit_modules_and_layer_indices(saved, tmp_path):
    out = tmp_path / "attn.safetensors"
    argv = ["importance", str(saved / "model"), str(saved / "data.jsonl"), "--out", str(out), "--method", "loss"]
    argv += ["--target-modules", "k_proj", "v_proj", "--layers", "0,3", "--max-length", "16", "--no-progress"]
    assert main(argv) == 0
    result = UnitImportance.load(out)
    assert {n: tuple(s.shape) for n, s in result.scores.items()} == {
        f"model.layers.{i}.self_attn.{p}_proj": (4,) for i in (0, 3) for p in "kv"
    }
    assert result.metadata["max_length"] == "16"


@pytest.mark.parametrize("command", ["importance", "importance-plot"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: peft-cofi {command}" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(saved, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert main(["importance", str(tmp_path / "nowhere"), str(saved / "data.jsonl"), "--out", out]) == 2
    assert "not a local model directory" in capsys.readouterr().err
    argv = ["importance", str(saved / "model"), str(saved / "data.jsonl"), "--out", out, "--no-progress"]
    assert main([*argv, "--target-modules", "w_in"]) == 2
    assert "matched no module" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--layers", "lower-half"])
    assert "is not a layer window" in capsys.readouterr().err
    assert main(["importance-plot", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
