"""Every way a user loads or saves a CoFi adapter gives the same model, for every storage mode and value dtype.

Paths: ``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, ``inject_adapter_in_model`` +
``set_peft_model_state_dict``, transformers' ``model.load_adapter``, ``AutoModelForCausalLM.from_pretrained(adapter)``,
``pipeline("text-generation", model=adapter)``, ``model.add_adapter`` + ``model.save_pretrained`` and back, and Trainer
checkpoints; the real loaders run (transformers' own loading code), also in a fresh process that never imports
peft_cofi (the autoload registers it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, pipeline

from peft_cofi import CoFiConfig, CoFiLayer, save_diff
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from training_helpers import trainer_for, training_args

STORAGES = [
    ("dense", None, "float32"),
    ("dense", None, "bfloat16"),
    ("dense", None, "float16"),
    ("rows", None, "float32"),
    ("rows", 0.5, "bfloat16"),
    ("topk", 0.3, "float32"),
    ("topk", 0.3, "float16"),
]
CONFIG = {"layers_to_transform": [1, 2], "init_weights": False}


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def trained_model() -> PeftModel:
    """A CoFi model with a random non-zero diff and a non-trivial mask."""
    model = get_peft_model(tiny_llama(), CoFiConfig(**CONFIG))
    for layer in (m for m in model.modules() if isinstance(m, CoFiLayer)):
        layer.cofi_mask["default"] = torch.linspace(0.2, 1.0, layer.out_features)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """One adapter folder per storage mode, all of the same trained model, plus that model's logits."""
    model = trained_model()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    folders = {}
    for storage, density, dtype in STORAGES:
        folders[storage, density, dtype] = tmp_path_factory.mktemp(f"{storage}-{dtype}")
        save_diff(model, folders[storage, density, dtype], storage=storage, density=density, dtype=dtype)
    return folders, logits(model, tokens), tokens


def reference(folder, tokens) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(tiny_llama(), folder), tokens)


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: "-".join(map(str, s)))
def test_every_loading_path_gives_the_same_model(adapters, base_dir, storage):
    folders, trained, tokens = adapters
    folder = folders[storage]
    expected = reference(folder, tokens)
    if storage == ("dense", None, "float32"):
        assert torch.equal(expected, trained)  # the exact storage reproduces the trained model bit for bit
    else:
        assert not torch.equal(expected, logits(tiny_llama(), tokens))  # the diff is applied (lossy, but there)

    two = PeftModel.from_pretrained(tiny_llama(), folders["dense", None, "float32"], adapter_name="other")
    two.load_adapter(folder, adapter_name="default")
    two.set_adapter("default")
    paths = {"PeftModel.load_adapter": two}

    config = CoFiConfig.from_pretrained(folder)
    injected = inject_adapter_in_model(config, tiny_llama())
    result = set_peft_model_state_dict(injected, load_file(folder / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    paths["inject + set_peft_model_state_dict"] = injected

    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    plain.load_adapter(str(folder))
    paths["transformers load_adapter"] = plain
    paths["AutoModelForCausalLM(adapter)"] = AutoModelForCausalLM.from_pretrained(folder)
    paths["pipeline(model=adapter)"] = pipeline("text-generation", model=str(folder), tokenizer=str(base_dir)).model
    for path, model in paths.items():
        assert torch.equal(logits(model, tokens), expected), path


def test_transformers_add_adapter_save_and_back(base_dir, tmp_path, tokens):
    """transformers' own adapter API writes the layer state with its own writer; every loader reads it back."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.add_adapter(CoFiConfig(**CONFIG))
    assert any(isinstance(m, CoFiLayer) for m in model.modules())
    torch.manual_seed(3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("cofi_delta" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "COFI"
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), tokens), expected)
    again = AutoModelForCausalLM.from_pretrained(base_dir)
    again.load_adapter(str(tmp_path))
    assert torch.equal(logits(again, tokens), expected)


@pytest.mark.parametrize("storage", [("dense", None, "float32"), ("rows", None, "bfloat16")], ids=["dense", "rows"])
def test_trainer_checkpoints_load_on_every_path(base_dir, tmp_path, tokens, storage):
    mode, density, dtype = storage
    config = CoFiConfig(layers_to_transform=[1], storage=mode, storage_density=density, storage_dtype=dtype)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    trainer_for(model, training_args(tmp_path, steps=2, save_steps=2)).train()
    checkpoint = tmp_path / "checkpoint-2"
    expected = reference(checkpoint, tokens)
    if mode == "dense":
        assert torch.equal(expected, logits(model, tokens))
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    plain.load_adapter(str(checkpoint))
    assert torch.equal(logits(plain, tokens), expected)


FRESH_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM, pipeline
torch.set_num_threads(1)  # as in the tests, so the sums run in the same order
folder, base, out = sys.argv[1:4]
tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
results = {}
with torch.no_grad():
    results["auto"] = AutoModelForCausalLM.from_pretrained(folder)(tokens).logits
    results["pipeline"] = pipeline("text-generation", model=folder, tokenizer=base).model(tokens).logits
    plain = AutoModelForCausalLM.from_pretrained(base)
    plain.load_adapter(folder)
    results["load_adapter"] = plain(tokens).logits
    from peft import PeftModel
    results["peft"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)(tokens).logits
torch.save(results, out)
"""


@pytest.mark.slow
def test_a_fresh_process_loads_without_importing_peft_cofi(adapters, base_dir, tmp_path):
    """The autoload (``peft_cofi_autoload.pth``) registers CoFi when peft is imported, also inside transformers."""
    folders, _, tokens = adapters
    folder = folders["rows", 0.5, "bfloat16"]
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(base_dir), str(out)], check=True)
    expected = reference(folder, tokens)
    for path, value in torch.load(out).items():
        assert torch.equal(value, expected), path


def test_autoload_can_be_switched_off(adapters, tmp_path):
    folders, _, _ = adapters
    code = (
        "import sys\nfrom peft import PeftConfig\nassert 'peft_cofi' not in sys.modules\n"
        f"PeftConfig.from_pretrained({str(folders['dense', None, 'float32'])!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PEFT_COFI_AUTOLOAD": "0"}, capture_output=True
    )
    assert result.returncode != 0 and b"KeyError: 'COFI'" in result.stderr


def test_autoload_registers_when_transformers_imports_peft_halfway():
    """``from transformers import Trainer`` imports peft from inside ``transformers.trainer_utils``; registering there
    must not need the trainer modules that are still half-imported (the Trainer callbacks load lazily)."""
    code = (
        "import sys\nfrom transformers import Trainer\nfrom peft import PeftType\n"
        "assert 'peft_cofi' in sys.modules and PeftType.COFI.value == 'COFI'\n"
        "from peft_cofi import ForgettingMonitor, attach_retention_anchor\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "could not register" not in result.stderr
