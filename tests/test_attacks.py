"""Attacks on the package, as a careful user and as a hostile file would make them: each must be refused clearly,
losing nothing (the model is left as it was, a checkpoint is never half-written). Add new attacks here."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from peft_cofi import CheckpointError, CoFiConfig, CoFiLayer, read_diff_file
from peft_cofi.cli import main
from peft_cofi.diff_format import _table_checksum, build_header, checksum, split_key
from peft_cofi.search_trials import TrialCache
from tiny_models import tiny_llama

WEIGHTS = "adapter_model.safetensors"


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def saved(folder, **config) -> PeftModel:
    """A trained-looking (random, non-zero) CoFi adapter on ``tiny_llama()``, saved to ``folder``."""
    model = get_peft_model(tiny_llama(), CoFiConfig(**{"layers_to_transform": [1], "init_weights": False, **config}))
    model.save_pretrained(folder)
    return model


def read(folder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())  # noqa: SIM118


def rewrite(folder, tensors, metadata, records=None, others=None) -> None:
    """Write a crafted file whose header is consistent with its tensors (checksums recomputed), so the check under
    test is the one that must catch it."""
    grouped: dict[str, dict] = {}
    for key, tensor in tensors.items():
        module, suffix = split_key(key)
        if suffix:
            grouped.setdefault(module, {})[suffix] = tensor
    records = records if records is not None else json.loads(metadata["cofi_modules"])
    for name, record in records.items() if isinstance(records, dict) else ():
        if isinstance(record, dict) and name in grouped:
            record["checksum"] = checksum(grouped[name])
    fields = {k: v for k, v in metadata.items() if not k.startswith("cofi_") and k != "peft_cofi_version"}
    header = build_header({}, others or {}, **fields)
    header["cofi_modules"] = json.dumps(records)  # as given, even when malformed, with a matching table checksum
    header["cofi_header_checksum"] = _table_checksum(header)
    save_file(tensors, str(folder / WEIGHTS), metadata=header)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_refused_untouched(folder, match: str, tokens) -> CheckpointError:
    """Loading ``folder`` onto a fresh base raises one line matching ``match``; the base is exactly as before."""
    base = tiny_llama()
    state, before = snapshot(base), logits(base, tokens)
    with pytest.raises(CheckpointError, match=match) as info:
        PeftModel.from_pretrained(base, folder)
    assert "\n" not in str(info.value)
    assert not any(isinstance(m, CoFiLayer) for m in base.modules()) and not hasattr(base, "peft_config")
    after = base.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(logits(base, tokens), before)
    return info.value


# 1. tensors the adapter does not own are never written into the model


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.model.layers.1.mlp.up_proj.base_layer.weight",
        "base_model.model.model.layers.1.mlp.up_proj.cofi_delta.default",
        "__cofi_read_error__",
    ],
)
@pytest.mark.parametrize("with_header", [True, False])
def test_extra_tensors_are_refused_and_named(tmp_path, tokens, key, with_header):
    saved(tmp_path)
    tensors, metadata = read(tmp_path)
    tensors[key] = torch.zeros(97, 32) if "embed" in key else torch.full((48, 32), 7.0)
    if with_header:
        rewrite(tmp_path, tensors, metadata)
    else:
        save_file(tensors, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    error = assert_refused_untouched(tmp_path, "tensors this adapter does not have", tokens)
    assert key.removeprefix("base_model.model.") in str(error)
    if with_header:
        with pytest.raises(CheckpointError, match="its header does not describe"):
            read_diff_file(tmp_path / WEIGHTS)


# 2. a save is atomic across its files, whatever instant the writer dies

# tiny_models comes from tests/, which the parent passes on PYTHONPATH.
CRASH_WRITER = """
import sys, torch
import peft_cofi
from peft import get_peft_model
from peft_cofi import CoFiConfig
from tiny_models import tiny_llama
def model(layers, seed):
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=layers, init_weights=False))
models = [model([0, 1], 1), model([2, 3], 2)]
print("ready", flush=True)
while True:
    for m in models:
        m.save_pretrained(sys.argv[1])
"""


@pytest.mark.slow
def test_a_killed_save_leaves_the_old_or_the_new_checkpoint_whole(tmp_path, tokens):
    folder = tmp_path / "adapter"
    expected = []
    for layers, seed in (([0, 1], 1), ([2, 3], 2)):
        torch.manual_seed(seed)
        model = get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=layers, init_weights=False))
        expected.append(logits(model, tokens))
        if not expected[1:]:
            model.save_pretrained(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(0)
    kills = 16
    for _ in range(kills):
        writer = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(folder)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        loaded = logits(PeftModel.from_pretrained(tiny_llama(), folder), tokens)
        assert any(torch.equal(loaded, e) for e in expected)
    saved(folder)  # the next save cleans up what killed saves left behind
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS]


# 3. merge -> unmerge -> save: the adapter still names the base it was trained on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_save_loads_on_the_original_base(tmp_path, tokens, dtype):
    model = get_peft_model(tiny_llama().to(dtype), CoFiConfig(layers_to_transform=[1], init_weights=False))
    expected = logits(model, tokens)
    model.merge_adapter()
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    torch.testing.assert_close(logits(loaded, tokens), expected, rtol=0, atol=1e-2 if dtype != torch.float32 else 1e-5)


# 4. every malformed file is refused in one line and rolled back


def drop_mask(tensors, metadata):
    return {k: v for k, v in tensors.items() if not k.endswith("up_proj.cofi_mask")}, None


def table_is_a_list(tensors, metadata):
    return tensors, list(json.loads(metadata["cofi_modules"]).values())


def null_record(tensors, metadata):
    records = json.loads(metadata["cofi_modules"])
    records["model.layers.1.mlp.up_proj"] = None
    return tensors, records


def record_without_shape(tensors, metadata):
    records = json.loads(metadata["cofi_modules"])
    del records["model.layers.1.mlp.up_proj"]["shape"]
    return tensors, records


def two_dimensional_row_index(tensors, metadata):
    key = "base_model.model.model.layers.1.mlp.up_proj.cofi_delta_rows"
    return {**tensors, key: tensors[key].reshape(-1, 1)}, None


def short_mask(tensors, metadata):
    key = "base_model.model.model.layers.1.mlp.up_proj.cofi_mask"
    return {**tensors, key: tensors[key][:, None]}, None


@pytest.mark.parametrize(
    ("craft", "match"),
    [
        (drop_mask, "model.layers.1.mlp.up_proj: it has no cofi_mask tensor"),
        (table_is_a_list, "module tables must be JSON objects"),
        (null_record, "header record of model.layers.1.mlp.up_proj is None"),
        (record_without_shape, "has no valid shape"),
        (two_dimensional_row_index, "cofi_delta_rows must be a 1-D integer tensor"),
        (short_mask, r"its cofi_mask is torch.float32 \(48, 1\), expected float \(48,\)"),
    ],
)
def test_malformed_files_are_refused_in_one_line_and_rolled_back(tmp_path, tokens, craft, match):
    saved(tmp_path, storage="rows", storage_tolerance=0.0)
    tensors, metadata = read(tmp_path)
    tensors, records = craft(tensors, metadata)
    rewrite(tmp_path, tensors, metadata, records)
    assert_refused_untouched(tmp_path, match, tokens)


def test_modules_to_save_missing_from_the_file_is_refused(tmp_path, tokens):
    saved(tmp_path, modules_to_save=["lm_head"])
    tensors, _ = read(tmp_path)
    kept = {k: v for k, v in tensors.items() if "lm_head" not in k}
    save_file(kept, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    assert_refused_untouched(tmp_path, "lm_head", tokens)


def test_pickle_is_neither_written_nor_read(tmp_path, tokens):
    model = saved(tmp_path / "a")
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert not (tmp_path / "pickle").exists()
    (tmp_path / "a" / WEIGHTS).rename(tmp_path / "a" / "adapter_model.bin")
    assert_refused_untouched(tmp_path / "a", "adapter_model.bin \\(a pickle\\)", tokens)


# 5. NaN, inf and overflow never pass silently


def test_non_finite_and_overflowing_diffs_are_refused_at_save(tmp_path):
    model = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.cofi_delta["default"][3, 4] = float("nan")
    for storage in ("dense", "rows"):
        model.peft_config["default"].storage = storage
        with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.up_proj: the trained delta holds NaN")):
            model.save_pretrained(tmp_path)
    with torch.no_grad():
        layer.cofi_delta["default"][3, 4] = 1e5
    model.peft_config["default"].storage, model.peft_config["default"].storage_dtype = "dense", "float16"
    with pytest.raises(ValueError, match=r"up to 1e\+05, beyond float16's largest .*'bfloat16' or 'float32'"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("suffix", "value", "match"),
    [("cofi_delta", float("nan"), "holds NaN or inf"), ("cofi_mask", -1.0, r"factors outside \[0, 1\]")],
)
def test_non_finite_values_and_bad_masks_are_refused_at_load(tmp_path, tokens, suffix, value, match):
    saved(tmp_path)
    tensors, metadata = read(tmp_path)
    key = f"base_model.model.model.layers.1.mlp.up_proj.{suffix}"
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    rewrite(tmp_path, tensors, metadata)
    assert_refused_untouched(tmp_path, match, tokens)


# 6. a file cannot switch off its own checks


def test_a_saved_config_cannot_skip_the_base_check(tmp_path):
    saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "verify_base": False}))
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="other base weights"):
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path)
    PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path, verify_base=False)  # the caller can


# 7. the command line never destroys its inputs; every failure is one line and exit 2


@pytest.fixture
def folders(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base)
    saved(adapter)
    return base, adapter


def files(folder) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["export-lora", "{adapter}", "{adapter}", "--rank", "4"], "is or contains the input"),
        (["export-lora", "{adapter}", "{tmp}", "--rank", "4"], "is or contains the input"),
        (["merge", "{base}", "{adapter}", "{base}"], "is or contains the input"),
        (["merge", "{base}", "{adapter}", "{file}"], "is an existing file"),
        (["export-lora", "{adapter}", "{file}", "--rank", "4"], "is an existing file"),
        (["merge", "{base}", "{adapter}", "{full}"], "is not empty; pass --overwrite"),
        (["merge", "{tmp}/nonexistent", "{adapter}", "{tmp}/out"], "nonexistent"),
        (["export-lora", "{adapter}", "{tmp}/out"], "give --rank"),
        (["inspect", "{tmp}/missing"], "does not exist"),
    ],
)
def test_cli_refuses_to_destroy_inputs_and_fails_in_one_line(folders, tmp_path, capsys, argv, match):
    base, adapter = folders
    (tmp_path / "existing_file").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("keep me too")
    values = {"base": base, "adapter": adapter, "tmp": tmp_path, "file": tmp_path / "existing_file"}
    values["full"] = tmp_path / "full"
    before = files(tmp_path)
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert files(tmp_path) == before


def test_cli_overwrite_and_merge_reports_what_it_wrote(folders, tmp_path, capsys):
    base, adapter = folders
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["merge", str(base), str(adapter), str(out), "--overwrite"]) == 0
    assert f"wrote the merged model to {out}" in capsys.readouterr().out
    tiny_dir = tmp_path / "other"
    assert main(["merge", str(tiny_dir), str(adapter), str(tmp_path / "m2")]) == 2
    tiny_llama(seed=1).save_pretrained(tiny_dir)
    assert main(["merge", str(tiny_dir), str(adapter), str(tmp_path / "m3")]) == 2
    assert "--no-verify-base" in capsys.readouterr().err
    assert main(["merge", str(tiny_dir), str(adapter), str(tmp_path / "m3"), "--no-verify-base"]) == 0


def test_inspect_names_what_a_non_cofi_folder_is(tmp_path, capsys):
    from peft import LoraConfig

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
    assert "holds a LORA adapter, not a CoFi adapter" in capsys.readouterr().err


# 8. the search cache survives interruptions and bad lines


def test_search_cache_appends_after_a_partial_line_and_skips_bad_records(tmp_path):
    from peft_cofi.search_trials import Trial

    cache = TrialCache(tmp_path / "trials.jsonl")
    cache.append(Trial("a", "ffn", "bottom2", ["up_proj"], [1], "ok", 1.0, 1.0))
    with (tmp_path / "trials.jsonl").open("a") as handle:
        handle.write('{"format": "peft-cofi-search-trial/1", "key": "partial')  # an interrupted write
    cache.append(Trial("b", "ffn", "top", ["up_proj"], [3], "ok", 2.0, 1.0))
    good = json.loads((tmp_path / "trials.jsonl").read_text().splitlines()[0])
    with (tmp_path / "trials.jsonl").open("a") as handle:
        handle.write(json.dumps({**good, "key": "c", "layers": "1"}) + "\n")  # wrongly typed
        handle.write(json.dumps({k: v for k, v in good.items() if k != "modules"} | {"key": "d"}) + "\n")  # missing
    with pytest.warns(UserWarning, match="skipped a bad search-cache line"):
        trials = cache.load()
    assert sorted(trials) == ["a", "b"] and trials["b"].speciality == 2.0


# 10. a pathological regex in a saved config is refused, not run


def test_a_catastrophic_regex_in_a_saved_config_is_refused_quickly(tmp_path, tokens):
    saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "(.*.*)*x"}))
    start = time.perf_counter()
    assert_refused_untouched(tmp_path, "target_modules='\\(.\\*.\\*\\)\\*x' nests an unbounded quantifier", tokens)
    assert time.perf_counter() - start < 30
    with pytest.raises(ValueError, match="exclude_modules='\\[' is not a valid regular expression"):
        CoFiConfig(exclude_modules="[")


# 11. smaller ones


def test_a_refused_save_leaves_the_folder_and_its_card_alone(tmp_path):
    model = saved(tmp_path)
    (tmp_path / "README.md").write_text("my own notes")
    before = files(tmp_path)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.save_pretrained(tmp_path)
    assert files(tmp_path) == before


def test_saved_files_get_the_mode_a_normal_write_gives(tmp_path):
    old = os.umask(0o022)
    try:
        saved(tmp_path)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}
