"""Post-hoc calibration of a trained diff: scale_diff, the scale math, calibrate (search, DARE/TIES, cache, refusals),
the CLI, and full fine-tuning results turned into diffs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from peft_cofi import CheckpointError, CoFiConfig, calibrate, read_diff_file, scale_diff
from peft_cofi.calibration_search import EvaluationCache
from peft_cofi.checkpoint import adapter_layers
from peft_cofi.cli import main
from peft_cofi.diff_format import WEIGHTS_NAME
from peft_cofi.diff_scaling import SCALING_KEY, SOURCE_CHECKSUM_KEY, file_checksum
from peft_cofi.evaluation import loss_evaluator, retention_evaluator
from peft_cofi.full_diff import diff_from_models
from peft_cofi.mask import masked_diff
from peft_cofi.scales import expand_scales, scale_groups, sparsify_delta
from peft_cofi.search_trials import fingerprint_model
from tiny_models import VOCAB, random_importance, tiny_gpt2, tiny_llama

MODULES = [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("down_proj", "up_proj")]


def task_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Arithmetic progressions (step 5 mod VOCAB): a task a tiny model learns in a few dozen steps."""
    generator = torch.Generator().manual_seed(seed)
    starts = [torch.randint(0, VOCAB, (4, 1), generator=generator) for _ in range(n)]
    return [{"input_ids": (start + 5 * torch.arange(12)) % VOCAB} for start in starts]


def general_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=generator)} for _ in range(n)]


def save_random_adapter(path, storage="dense", mask_mode="update", dtype="float32", layers=None):
    """A CoFi adapter with a random diff and a soft mask (mask factors not all 1) on tiny_llama()."""
    base = tiny_llama()
    importance = random_importance(base, MODULES)
    config = CoFiConfig(init_weights=False, importance=importance, mask_mode=mask_mode, storage=storage,
                        storage_density=0.5 if storage != "dense" else None, storage_dtype=dtype,
                        layers_to_transform=layers)  # fmt: skip
    get_peft_model(base, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def harmful_layer_adapter(tmp_path_factory):
    """Layer 1 learned the task; layer 2 was trained *against* the general text and helps the task in no way."""
    path = tmp_path_factory.mktemp("harmful") / "adapter"
    model = get_peft_model(tiny_llama(), CoFiConfig(layers_to_transform=[1, 2]))
    layers = adapter_layers(model, "default")
    for layer_index, batches, steps, sign in ((1, task_batches(4, 0), 60, 1.0), (2, general_batches(2, 2), 20, -1.0)):
        params = [layer.cofi_delta["default"] for name, layer in layers.items() if f".{layer_index}." in name]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        for step in range(steps):
            batch = batches[step % len(batches)]
            (sign * model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(path)
    return path


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# --------------------------------------------------------------------------------------------- scale_diff


@pytest.mark.parametrize(
    ("storage", "mask_mode", "dtype"),
    [("dense", "update", "float32"), ("rows", "grad", "float32"), ("topk", "update", "float32"),
     ("dense", "grad", "bfloat16")],
)  # fmt: skip
def test_scale_diff_is_linear_per_layer_module_and_row(tmp_path, storage, mask_mode, dtype):
    source = save_random_adapter(tmp_path / "source", storage, mask_mode, dtype)
    rows = torch.linspace(0.0, 2.0, 32)
    spec = {"*": 0.5, 1: 2.0, "mlp.up_proj": 0.25, "model.layers.3.mlp.down_proj": rows}
    scale_diff(source, tmp_path / "scaled", spec)
    before, after = read_diff_file(source / WEIGHTS_NAME), read_diff_file(tmp_path / "scaled" / WEIGHTS_NAME)
    expected = {name: 0.5 for name in MODULES} | {"model.layers.1.mlp.down_proj": 2.0}
    expected |= {name: 0.25 for name in MODULES if name.endswith("up_proj")}
    for name in MODULES:
        factor = rows.unsqueeze(1) if name == "model.layers.3.mlp.down_proj" else expected[name]
        tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == "bfloat16" else {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(after.diff(name), factor * before.diff(name), **tolerance)
        for suffix, tensor in before.tensors[name].items():  # indices, mask and fingerprint are the source's
            if suffix != "cofi_delta":
                assert torch.equal(after.tensors[name][suffix], tensor), (name, suffix)
        assert after.tensors[name]["cofi_delta"].dtype == before.tensors[name]["cofi_delta"].dtype
    assert after.header.mask_mode == mask_mode and after.records[MODULES[0]]["storage"] == storage


def test_scale_one_is_byte_identical_and_zero_is_the_base(tmp_path, tokens):
    source = save_random_adapter(tmp_path / "source", "topk", dtype="bfloat16")
    scale_diff(source, tmp_path / "one", 1.0)
    with safe_open(source / WEIGHTS_NAME, "pt") as a, safe_open(tmp_path / "one" / WEIGHTS_NAME, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():  # noqa: SIM118
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
    scale_diff(save_random_adapter(tmp_path / "dense"), tmp_path / "zero", 0)
    zero = PeftModel.from_pretrained(tiny_llama(), tmp_path / "zero")
    assert torch.equal(logits(zero, tokens), logits(tiny_llama(), tokens))


def test_header_records_the_scaling_and_the_source_checksum(tmp_path):
    source = save_random_adapter(tmp_path / "source")
    scale_diff(source, tmp_path / "half", {"*.up_proj": 0.5})
    header = read_diff_file(tmp_path / "half" / WEIGHTS_NAME).header.fields
    record = json.loads(header[SCALING_KEY])
    assert record["method"] == "scale" and record["scales"] == {"*.up_proj": 0.5}
    assert record["modules"]["model.layers.0.mlp.up_proj"] == 0.5 and record["modules"][MODULES[0]] == 1.0
    assert header[SOURCE_CHECKSUM_KEY] == file_checksum(source / WEIGHTS_NAME)
    assert header["cofi_format_version"] == "2" and header["mask_mode"] == "update"
    assert "Rescaled after training" in (tmp_path / "half" / "README.md").read_text()
    scale_diff(tmp_path / "half", tmp_path / "quarter", 0.5)  # a rescaled diff rescaled again keeps its history
    again = json.loads(read_diff_file(tmp_path / "quarter" / WEIGHTS_NAME).header.fields[SCALING_KEY])
    assert again["previous"]["scales"] == {"*.up_proj": 0.5}
    assert (tmp_path / "quarter" / "adapter_config.json").read_text() == (source / "adapter_config.json").read_text()


def test_scale_diff_refuses_bad_specs_and_foreign_folders(tmp_path):
    source = save_random_adapter(tmp_path / "source")
    for spec, match in [({"gate_proj": 0.5}, "selects no module"), ({3: [1.0, 2.0]}, "does not fit"),
                        (float("nan"), "not a finite"), ({"*": "x"}, "number or a row vector")]:  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=match):
            scale_diff(source, tmp_path / "out", spec)
    with pytest.raises(ValueError, match="source adapter folder"):
        scale_diff(source, source, 0.5)
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["up_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"LORA adapter.*diff_from_models"):
        scale_diff(tmp_path / "lora", tmp_path / "out", 0.5)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- pure math


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-2, 2)), max_size=6), st.floats(0, 2))
def test_later_scale_entries_override_earlier_ones(entries, default):
    rows = {name: 3 for name in MODULES}
    spec = {"*": default}
    for layer, value in entries:
        spec.pop(layer, None)
        spec[layer] = value
    factors = expand_scales(spec, rows)
    for name in MODULES:
        layer = int(name.split(".")[2])
        assert torch.all(factors[name] == torch.tensor(float(spec.get(layer, default)))), name


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.sampled_from(["update", "grad"]), st.integers(0, 2**16))
def test_scaling_the_state_scales_the_diff_in_both_mask_modes(rows, cols, mode, seed):
    generator = torch.Generator().manual_seed(seed)
    delta, mask = torch.randn(rows, cols, generator=generator), torch.rand(rows, generator=generator)
    factors = torch.rand(rows, generator=generator) * 2
    scaled = masked_diff(delta * factors.unsqueeze(1), mask, mode)
    torch.testing.assert_close(scaled, factors.unsqueeze(1) * masked_diff(delta, mask, mode))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=20), st.integers(1, 6))
def test_row_groups_partition_rows_largest_change_first(norms, groups):
    norms = torch.tensor(norms)
    parts = [rows for members in scale_groups({"m": norms}, "row", groups).values() for _, rows in members]
    assert sorted(torch.cat(parts).tolist()) == list(range(norms.numel()))
    for upper, lower in itertools.pairwise(parts):
        assert norms[upper].min() >= norms[lower].max()


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.floats(0.1, 0.9), st.floats(0.5, 2.0), st.integers(0, 100))
def test_dare_and_ties_keep_the_density_and_rescale(rows, cols, density, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    delta, mask = torch.randn(rows, cols, generator=generator) + 0.01, torch.ones(rows)
    ties = sparsify_delta(delta, mask, "update", "ties", density, alpha)
    kept = ties != 0
    assert int(kept.sum()) == int(density * delta.numel())
    torch.testing.assert_close(ties[kept], alpha * delta[kept])
    if kept.any() and (~kept).any():
        assert delta[kept].abs().min() >= delta[~kept].abs().max()
    state = torch.get_rng_state()
    dare = sparsify_delta(delta, mask, "grad", "dare", density, alpha, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(dare, sparsify_delta(delta, mask, "grad", "dare", density, alpha, seed=seed))
    torch.testing.assert_close(dare[dare != 0], alpha * delta[dare != 0] / density)


# --------------------------------------------------------------------------------------------- calibrate


def evaluators():
    return loss_evaluator(task_batches(2, 5)), retention_evaluator(general_batches(2, 2))


def test_calibrate_finds_the_layer_that_only_hurts(harmful_layer_adapter, tmp_path):
    speciality, versatility = evaluators()
    base = tiny_llama()
    before = fingerprint_model(base)
    result = calibrate(base, harmful_layer_adapter, speciality=speciality, versatility=versatility, budget=0.98,
                       granularity="layer", out_dir=tmp_path, progress=False)  # fmt: skip
    assert fingerprint_model(base) == before and not any("cofi" in n for n, _ in base.named_modules())
    chosen = result.chosen
    assert result.met_budget and chosen.scales["layer 2"] <= 0.25 and chosen.scales["layer 1"] >= 0.75
    assert not result.trained.versatility >= 0.98  # the trained adapter as is breaks the budget
    best_global = max(
        e.speciality for e in result.evaluations if e.phase in ("line", "refine") and e.versatility >= 0.98
    )
    assert chosen.speciality > best_global + 0.05  # per-layer factors beat any one global factor (WiSE-FT)
    assert result.ran == len(result.evaluations) and result.cached == 0
    for name in ("report.md", "result.json", "front.png", "evaluations.jsonl", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert "meets the budget" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "result.json").read_text())["chosen"]["scales"] == chosen.scales
    # the written adapter is exactly the candidate that was scored
    written = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert speciality(written)["score"] == pytest.approx(chosen.speciality, abs=1e-6)
    record = json.loads(read_diff_file(tmp_path / "adapter" / WEIGHTS_NAME).header.fields[SCALING_KEY])
    assert record["calibration"]["groups"] == chosen.scales and record["granularity"] == "layer"


class Counting:
    """An evaluator wrapper that counts calls (same cache identity), optionally interrupting at one of them."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.fingerprint, self.batches = inner.fingerprint, inner.batches

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.inner(model)


def test_interrupted_calibration_resumes_and_a_repeat_evaluates_nothing(harmful_layer_adapter, tmp_path):
    speciality, versatility = evaluators()
    base = tiny_llama()
    kwargs = {"versatility": versatility, "budget": 0.98, "granularity": "layer", "progress": False}
    full = calibrate(base, harmful_layer_adapter, speciality=speciality, cache=tmp_path / "a.jsonl", **kwargs)
    before = fingerprint_model(base)
    with pytest.raises(KeyboardInterrupt):
        calibrate(base, harmful_layer_adapter, speciality=Counting(speciality, 7), cache=tmp_path / "b.jsonl", **kwargs)
    assert fingerprint_model(base) == before  # the interrupted run put the model back
    assert len(EvaluationCache(tmp_path / "b.jsonl").load()) == 6
    counting = Counting(speciality)
    resumed = calibrate(base, harmful_layer_adapter, speciality=counting, cache=tmp_path / "b.jsonl", **kwargs)
    assert counting.calls == resumed.ran == len(full.evaluations) - 6 and resumed.cached == 6
    assert [e.key for e in resumed.evaluations] == [e.key for e in full.evaluations]
    counting = Counting(speciality)
    again = calibrate(base, harmful_layer_adapter, speciality=counting, cache=tmp_path / "b.jsonl", **kwargs)
    assert counting.calls == again.ran == 0 and again.cached == len(full.evaluations)
    assert again.chosen.key == full.chosen.key and again.chosen.scales == full.chosen.scales
    limited = calibrate(base, harmful_layer_adapter, speciality=speciality, max_evaluations=4, **kwargs)
    assert len(limited.evaluations) == 4 and limited.stop_reason.startswith("evaluation budget spent")


@pytest.mark.parametrize(("method", "densities", "expected"), [("ties", [0.3], 0.3), ("dare", [0.3, 0.5], 0.5)])
def test_sparsified_candidate_is_written_as_evaluated(harmful_layer_adapter, tmp_path, method, densities, expected):
    speciality, versatility = evaluators()
    result = calibrate(tiny_llama(), harmful_layer_adapter, speciality=speciality, versatility=versatility,
                       budget=0.95, method=method, densities=densities, levels=[0.5, 1.0], out_dir=tmp_path,
                       progress=False)  # fmt: skip
    labels = [f"{method} d={d:g} α={a:g}" for d in densities for a in (0.5, 1)]
    assert [e.label for e in result.evaluations] == ["base model", "trained adapter", *labels]
    chosen = result.chosen  # the trained adapter breaks the budget; the base has less speciality
    assert chosen.method == method and chosen.density == expected and result.met_budget
    written = read_diff_file(tmp_path / "adapter" / WEIGHTS_NAME)
    for name in written.records:
        assert float((written.diff(name) != 0).float().mean()) == pytest.approx(expected, abs=0.05)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert speciality(loaded)["score"] == pytest.approx(chosen.speciality, abs=1e-6)
    record = json.loads(written.header.fields[SCALING_KEY])
    assert record["method"] == method and record["density"] == expected and record["alpha"] == chosen.scales["all"]


def test_row_granularity_candidate_is_written_as_evaluated(harmful_layer_adapter, tmp_path):
    speciality, versatility = evaluators()
    result = calibrate(tiny_llama(), harmful_layer_adapter, speciality=speciality, versatility=versatility,
                       budget=0.98, granularity="row", row_groups=2, levels=[0.0, 0.5, 1.0], rounds=1, sweeps=1,
                       out_dir=tmp_path, progress=False)  # fmt: skip
    assert len(result.groups) == 8 and result.groups[0] == "model.layers.1.mlp.down_proj#q0"
    assert result.met_budget and len(set(result.chosen.scales.values())) > 1  # rows got different factors
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert speciality(loaded)["score"] == pytest.approx(result.chosen.speciality, abs=1e-6)
    assert versatility(loaded)["score"] == pytest.approx(result.chosen.versatility, abs=1e-6)


def test_calibrate_on_a_peft_model_leaves_its_adapters_alone(harmful_layer_adapter, tokens):
    speciality, versatility = evaluators()
    model = get_peft_model(tiny_llama(), CoFiConfig(init_weights=False, layers_to_transform=[0]))
    expected = logits(model, tokens)
    result = calibrate(model, harmful_layer_adapter, speciality=speciality, versatility=versatility,
                       granularity="global", progress=False)  # fmt: skip
    assert result.chosen is not None and list(model.peft_config) == ["default"]
    assert model.active_adapter == "default" and torch.equal(logits(model, tokens), expected)


def test_calibrate_refuses_bad_inputs(harmful_layer_adapter, tmp_path):
    speciality, versatility = evaluators()
    kwargs = {"speciality": speciality, "versatility": versatility, "progress": False}
    with pytest.raises(ValueError, match="also appear in the training data"):
        calibrate(tiny_llama(), harmful_layer_adapter, train_batches=task_batches(2, 5), **kwargs)
    with pytest.raises(ValueError, match="also appear in the versatility data"):
        calibrate(tiny_llama(), harmful_layer_adapter, speciality=speciality,
                  versatility=retention_evaluator(task_batches(2, 5)), progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="other base weights"):
        calibrate(tiny_llama(seed=1), harmful_layer_adapter, **kwargs)
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["up_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"LORA adapter.*merge_and_unload.*diff_from_models"):
        calibrate(tiny_llama(), tmp_path / "lora", **kwargs)
    lora_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["up_proj"]))
    with pytest.raises(ValueError, match="PeftModel with \\['LoraConfig'\\] adapters"):
        calibrate(lora_model, harmful_layer_adapter, **kwargs)
    for bad, match in [({"granularity": "block"}, "granularity"), ({"method": "anneal"}, "method"),
                       ({"budget": "high"}, "budget"), ({"levels": [-1.0]}, "levels"),
                       ({"method": "dare", "densities": [1.0]}, "density"), ({"max_evaluations": 0}, "max_evaluations"),
                       ({"out_dir": harmful_layer_adapter.parent}, "would overwrite the adapter")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            calibrate(tiny_llama(), harmful_layer_adapter, **kwargs, **bad)
    with pytest.warns(UserWarning, match="no candidate meets the versatility budget 1.01"):
        result = calibrate(tiny_llama(), harmful_layer_adapter, budget=1.01, granularity="global",
                           out_dir=tmp_path / "unmet", **kwargs)  # fmt: skip
    assert not result.met_budget and result.chosen.versatility == max(e.versatility for e in result.evaluations)
    assert (tmp_path / "unmet" / "adapter" / WEIGHTS_NAME).is_file()
    assert "does not meet the budget" in (tmp_path / "unmet" / "report.md").read_text()


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_setup(tmp_path):
    from tiny_tokenizer import tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config = CoFiConfig(init_weights=False, layers_to_transform=[1, 2])
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(tmp_path / "adapter")
    words = ["cat", "dog", "sun", "moon", "red", "blue", "tree", "book"]
    for name, chosen in (("train", words[:4]), ("eval", words[4:])):
        records = [json.dumps({"instruction": f"translate {w}", "output": w}) for w in chosen]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(records))
    (tmp_path / "general.txt").write_text("the cat sat on the mat\nthe dog ran in the house\n")
    return tmp_path


def test_cli_calibrate_end_to_end(cli_setup, capsys):
    root = cli_setup
    args = [str(root / "model"), str(root / "adapter"), "--eval", str(root / "eval.jsonl"), "--general",
            str(root / "general.txt"), "--train", str(root / "train.jsonl"), "--out", str(root / "out"),
            "--granularity", "module", "--levels", "0,0.5,1", "--max-forgetting", "0.05", "--no-progress"]  # fmt: skip
    assert main(["calibrate", *args]) == 0
    assert "chosen:" in capsys.readouterr().out
    for name in ("report.md", "result.json", "front.png", "evaluations.jsonl", "adapter/adapter_config.json"):
        assert (root / "out" / name).is_file(), name
    assert json.loads((root / "out" / "result.json").read_text())["budget"] == pytest.approx(0.951229, abs=1e-6)
    assert main(["calibrate", *args]) == 0  # a repeat reads every evaluation from the cache
    assert "evaluations (0 run," in capsys.readouterr().out


def test_cli_calibrate_bad_inputs_are_one_line_errors(cli_setup, capsys):
    root = cli_setup
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["up_proj"])).save_pretrained(root / "lora")
    common = ["--eval", str(root / "eval.jsonl"), "--general", str(root / "general.txt"), "--out", str(root / "o")]
    cases = [
        ([str(root / "model"), str(root / "lora"), *common], "holds a LORA adapter"),
        ([str(root / "model"), str(root / "adapter"), *common, "--train", str(root / "eval.jsonl")], "also appear"),
        ([str(root / "model"), str(root / "adapter"), *common, "--train", str(root / "nope.jsonl")], "does not exist"),
        ([str(root / "nope"), str(root / "adapter"), *common], "not a local model directory"),
    ]
    for argv, message in cases:
        assert main(["calibrate", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("peft-cofi calibrate: error:") and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        main(["calibrate", str(root / "model"), str(root / "adapter"), *common, "--budget", "0.9", "--max-forgetting",
              "0.1"])  # fmt: skip


# --------------------------------------------------------------------------------------------- full fine-tuning


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_diff_from_models_reproduces_the_tuned_modules(factory, tmp_path):
    base, tuned = factory(), factory()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "ln_f" in name or name == "model.norm.weight" or ("weight" in name and parameter.dim() == 2):
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    before, flags = fingerprint_model(base), {n: p.requires_grad for n, p in base.named_parameters()}
    report = diff_from_models(base, tuned, tmp_path / "diff")
    assert fingerprint_model(base) == before and flags == {n: p.requires_grad for n, p in base.named_parameters()}
    assert "lm_head" not in report.modules and len(report.modules) == len(set(report.modules)) > 4
    assert any("norm" in key or "ln_f" in key for key in report.left_out)  # changed but not a linear module
    loaded = PeftModel.from_pretrained(factory(), tmp_path / "diff")
    for name in report.modules:
        layer = loaded.base_model.model.get_submodule(name)
        x = torch.randn(3, layer.in_features, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), tuned.get_submodule(name)(x), atol=1e-5, rtol=1e-5)
    read = read_diff_file(tmp_path / "diff" / WEIGHTS_NAME)
    assert read.header.mask_mode == "update" and all(bool((read.mask(n) == 1).all()) for n in read.records)


def test_diff_from_models_with_only_linear_changes_gives_the_tuned_logits(tmp_path, tokens):
    base, tuned = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.mul_(1.05)
    report = diff_from_models(base, tuned, tmp_path / "diff", modules=["*.mlp.*_proj", "self_attn.q_proj"])
    assert all(n.endswith(("gate_proj", "up_proj", "down_proj", "q_proj")) for n in report.modules)
    assert "model.layers.0.self_attn.k_proj.weight" in report.left_out
    everything = diff_from_models(tiny_llama(), tuned, tmp_path / "all")
    assert everything.left_out == {}
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "all")
    torch.testing.assert_close(logits(loaded, tokens), logits(tuned, tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"matches no nn\.Linear"):
        diff_from_models(tiny_llama(), tuned, tmp_path / "x", modules=["mlp.nope"])
