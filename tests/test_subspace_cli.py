"""``peft-cofi subspace`` / ``subspace-plot`` end to end, InputSubspace files (round trip, validation, bad
configs refused before any module is replaced) and a Hub round trip of a protected adapter, all offline."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_cofi import CoFiConfig, CoFiLayer, InputSubspace
from peft_cofi.cli import main
from peft_cofi.plots import plot_subspace_spectrum
from test_hub import local_hub  # noqa: F401 (a fixture)
from test_importance import make_batches
from test_subspace import measure, train
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer

GENERAL = [{"text": "the old house by the river was big and blue"}, {"text": "what is two and two"}] * 3
TASK = [{"instruction": "translate the cat", "input": "", "output": "the cat"}] * 3
UP, DOWN = "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("subspace-cli")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    for name, records in (("general", GENERAL), ("task", TASK)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


def test_subspace_then_plot(saved, tmp_path, capsys):
    out = tmp_path / "sub.safetensors"
    argv = ["subspace", str(saved / "model"), str(saved / "general.jsonl"), "--out", str(out), "--layers", "bottom2"]
    assert main([*argv, "--energy", "0.8", "--batch-size", "2", "--no-progress"]) == 0
    assert "wrote a plain input subspace of 2 modules" in capsys.readouterr().out
    result = InputSubspace.load(out)
    assert sorted(result) == [DOWN, UP] and result.metadata["energy"] == "0.8"
    assert all(energy >= 0.8 - 1e-6 for energy in result.energy.values())
    contrasted = tmp_path / "contrast.safetensors"
    argv = ["subspace", str(saved / "model"), str(saved / "general.jsonl"), "--out", str(contrasted)]
    argv += ["--contrast", str(saved / "task.jsonl"), "--rank", "3", "--target-modules", "up_proj", "--layers", "0,3"]
    assert main([*argv, "--no-progress"]) == 0
    result = InputSubspace.load(contrasted)
    assert result.rank == {"model.layers.0.mlp.up_proj": 3, "model.layers.3.mlp.up_proj": 3}
    assert result.metadata["kind"] == "contrast" and result.metadata["task_data"] == str(saved / "task.jsonl")
    for source in (out, contrasted):
        png = tmp_path / f"{source.stem}.png"
        assert main(["subspace-plot", str(source), "--out", str(png)]) == 0
        assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--energy", "1.5"], r"energy=1.5 must be a fraction in \(0, 1\]"),
        (["--rank", "32"], r"rank=32 would protect every input direction of \['model.layers.1.mlp.up_proj"),
        (["--contrast", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
    ],
)
def test_bad_arguments_fail_with_one_line(saved, tmp_path, capsys, extra, message):
    argv = ["subspace", str(saved / "model"), str(saved / "general.jsonl"), "--out", str(tmp_path / "s.safetensors")]
    assert main([*argv, "--layers", "bottom2", "--no-progress", *extra]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar, if the model loaded
    assert error.startswith("peft-cofi subspace: error: ")
    assert re.search(message, error)
    assert not (tmp_path / "s.safetensors").exists()


def test_energy_and_rank_exclude_each_other_and_commands_have_help(saved, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["subspace", "m", "d", "--out", "o", "--energy", "0.5", "--rank", "2"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    for command in ("subspace", "subspace-plot"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_subspace_file_round_trips_bit_identically_and_is_validated(tmp_path):
    subspace = measure(tiny_llama(), make_batches(), rank=5)
    subspace.save(tmp_path / "a.safetensors")
    loaded = InputSubspace.load(tmp_path / "a.safetensors")
    assert loaded == subspace and loaded.energy == subspace.energy
    loaded.save(tmp_path / "b.safetensors")
    first, second = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert InputSubspace.load(tmp_path / "b.safetensors") == subspace
    tensors = load_file(tmp_path / "a.safetensors")
    metadata = {"format": "peft-cofi-subspace", "format_version": "1", "tokens": "3"}
    broken = {
        "nan": ({**tensors, f"basis/{UP}": torch.full_like(tensors[f"basis/{UP}"], float("nan"))}, metadata),
        "skewed": ({**tensors, f"basis/{UP}": tensors[f"basis/{UP}"] * 2}, metadata),
        "stray": ({**tensors, "weights/x": torch.zeros(2)}, metadata),
        "curve": ({**tensors, f"curve/{UP}": torch.zeros(3)}, metadata),
        "version": (tensors, {**metadata, "format_version": "7"}),
        "importance": ({UP: torch.ones(3)}, {"format": "peft-cofi-importance", "format_version": "1"}),
    }
    messages = {
        "nan": f"module '{UP}'.*NaN or inf",
        "skewed": f"module '{UP}'.*not orthonormal",
        "stray": "holds a tensor 'weights/x' that is not part of a subspace file",
        "curve": f"module '{UP}': its curve must hold 32 finite values",
        "version": "subspace format version '7'",
        "importance": "is not a peft-cofi subspace file",
    }
    for name, (content, meta) in broken.items():
        save_file(content, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=messages[name]):
            InputSubspace.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InputSubspace.load(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="holds no energy curves"):
        plot_subspace_spectrum(InputSubspace({UP: torch.eye(32)[:, :2]}), tmp_path / "x.png")


TWO_DOWN = torch.eye(48)[:, :2]


@pytest.mark.parametrize(
    ("subspace", "error", "message"),
    [
        ({UP: torch.eye(32)[:, :2]}, ValueError, rf"does not cover 1 trained module\(s\), e.g. \['{DOWN}'\]"),
        (
            {UP: torch.eye(16)[:, :2], DOWN: TWO_DOWN},
            ValueError,
            f"'{UP}': the basis has 16 rows but the module has 32",
        ),
        ({UP: torch.eye(32), DOWN: TWO_DOWN}, ValueError, f"'{UP}'.*rank 32 of 32"),
        ({UP: torch.eye(32)[:, :0], DOWN: TWO_DOWN}, ValueError, f"'{UP}'.*rank 0"),
        ({UP: torch.full((32, 2), float("inf")), DOWN: TWO_DOWN}, ValueError, f"'{UP}'.*NaN or inf"),
        ("missing.safetensors", FileNotFoundError, "subspace file 'missing.safetensors' does not exist"),
        (torch.eye(3), TypeError, "input_subspace must be a path to a subspace file"),
    ],
)
def test_bad_subspaces_are_refused_before_any_module_is_replaced(subspace, error, message):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        get_peft_model(model, CoFiConfig(layers_to_transform="bottom2", input_subspace=subspace))
    assert not any(isinstance(m, CoFiLayer) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_hub_round_trip_loads_the_protected_adapter_without_its_subspace(local_hub, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    subspace = measure(model, make_batches(), config=CoFiConfig(layers_to_transform="bottom2"), rank=4)
    config = CoFiConfig(layers_to_transform="bottom2", input_subspace=subspace)
    tuned = train(get_peft_model(model, config), steps=3)
    tokens = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tuned(tokens).logits
    tuned.push_to_hub("me/protected")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), "me/protected")
    assert loaded.peft_config["default"].input_subspace == "checkpoint"
    assert loaded.peft_config["default"].input_subspace_source["modules"][UP]["rank"] == 4
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)


def test_config_records_the_subspace_and_its_saved_form_loads_without_it(tmp_path):
    subspace = InputSubspace({UP: torch.eye(32)[:, :2]}, tokens=5, kind="plain", energy=0.9)
    subspace.save(tmp_path / "s.safetensors")
    assert CoFiConfig().to_dict()["input_subspace"] is None
    from_dict = CoFiConfig(input_subspace={UP: torch.eye(32)[:, :2]})
    assert isinstance(from_dict.input_subspace, InputSubspace)  # validated when the config is made
    as_dict = CoFiConfig(input_subspace=str(tmp_path / "s.safetensors")).to_dict()
    assert as_dict["input_subspace"] == "checkpoint"
    assert as_dict["input_subspace_source"] == {"source": str(tmp_path / "s.safetensors")}
    recorded = CoFiConfig(input_subspace=subspace).to_dict()["input_subspace_source"]
    assert recorded == {
        "source": "in-memory",
        "kind": "plain",
        "energy": 0.9,
        "rank": None,
        "tokens": 5,
        "modules": {UP: {"rank": 2, "energy": None}},
    }
    CoFiConfig(input_subspace=subspace).save_pretrained(str(tmp_path / "cfg"))
    loaded = CoFiConfig.from_pretrained(str(tmp_path / "cfg"))
    assert loaded.input_subspace == "checkpoint" and loaded.input_subspace_source == recorded
    with pytest.raises(TypeError, match="input_subspace_source must be a dict"):
        CoFiConfig(input_subspace_source="somewhere")
