"""CoFi under DDP, FSDP2 and DeepSpeed ZeRO-3: two CPU processes (gloo, launched with torchrun) train what one process
trains on the same global batches, the soft mask stays row-aligned (rows with factor 0 do not move), and
``save_pretrained`` writes the full diff, which reloads. The training runs in tests/distributed_worker.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from distributed_worker import NAMES, SCENARIOS, build_model, cofi_layers, global_batches, sgd_step, train
from peft_cofi import read_diff_file
from tiny_models import tiny_llama

WORKER = Path(__file__).with_name("distributed_worker.py")
# float32: only the reduction order differs; bf16 autocast: bf16 rounding of activations differs per batch split.
TOLERANCE = {False: dict(rtol=1e-4, atol=1e-7), True: dict(rtol=0.02, atol=1e-4)}
LOGITS_TOLERANCE = {False: dict(rtol=1e-4, atol=1e-5), True: TOLERANCE[True]}


def launch(out: Path, engines: str, **env: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(WORKER), str(out), "--engines", engines]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One torchrun launch for every DDP and FSDP2 scenario (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("distributed")
    launch(out, "ddp,fsdp2")
    return out


def base_model(initial: Path | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny Llama the workers start from, or one with the initial weights a worker saved."""
    model = tiny_llama()
    if initial is not None:
        model.load_state_dict(load_file(initial))
    return model.to(dtype)


@cache
def reference(mask_mode: str, bf16: bool, initial: Path | None = None):
    """Single-process training on the whole global batches (gradient checkpointing changes no number)."""
    model = build_model(mask_mode, base_model(initial))
    train(model, global_batches(), sgd_step([p for p in model.parameters() if p.requires_grad]), bf16)
    return model.eval()


def check_checkpoint(ckpt: Path, spec: dict, initial: Path | None = None) -> dict[str, torch.Tensor]:
    """The saved diff equals single-process training, protected rows are exactly zero, and the adapter reloads."""
    bf16 = spec.get("bf16", False)
    expected = reference(spec["mask_mode"], bf16, initial)
    saved = read_diff_file(ckpt / "adapter_model.safetensors")
    assert sorted(saved.records) == sorted(NAMES)
    frozen = 0
    for name, layer in cofi_layers(expected).items():
        diff, mask = saved.diff(name), saved.mask(name)
        assert torch.equal(mask, layer.cofi_mask["default"])
        torch.testing.assert_close(diff, layer.get_delta_weight("default"), **TOLERANCE[bf16])
        assert torch.count_nonzero(diff[mask == 0]) == 0, f"{name}: rows with mask factor 0 moved"
        assert torch.count_nonzero(diff[mask > 0].abs().sum(dim=1)) == int((mask > 0).sum()), f"{name}: rows frozen"
        frozen += int((mask == 0).sum())
    assert frozen > 0  # the mask has rows it must hold still
    # DeepSpeed's bf16 mode trains (and fingerprints) bf16 base weights: the diff reloads onto those
    base_dtype = torch.bfloat16 if spec["engine"] == "zero3" and bf16 else torch.float32
    loaded = PeftModel.from_pretrained(base_model(initial, base_dtype), ckpt).eval()
    for name, layer in cofi_layers(loaded).items():
        torch.testing.assert_close(layer.effective_delta("default").detach(), saved.diff(name), rtol=1e-6, atol=1e-9)
    if base_dtype == torch.float32:
        tokens = global_batches()[0]
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, expected(tokens).logits, **LOGITS_TOLERANCE[bf16])
    return {name: saved.diff(name) for name in NAMES}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [name for name, spec in SCENARIOS.items() if spec["engine"] == "ddp"])
def test_ddp_trains_like_one_process_and_rank0_saves(runs, scenario):
    # update/grad mask x plain, gradient checkpointing, bf16 autocast
    report = json.loads((runs / scenario / "report.json").read_text())
    assert (report["world_size"], report["checkpointing"]) == (2, SCENARIOS[scenario].get("checkpointing", False))
    check_checkpoint(runs / scenario / "ckpt", SCENARIOS[scenario])


@pytest.mark.slow
@pytest.mark.parametrize("mask_mode", ["update", "grad"])
def test_fsdp2_shards_rows_keeps_the_mask_whole_and_saves_the_full_diff(runs, mask_mode):
    out = runs / f"fsdp2-{mask_mode}"
    report = json.loads((out / "report.json").read_text())
    # cofi_delta is a DTensor sharded on dim 0 (output rows); the mask is a plain buffer, whole on every rank
    assert (report["delta_type"], report["placements"], report["mask_type"]) == ("DTensor", "(Shard(dim=0),)", "Tensor")
    diffs = check_checkpoint(out / "ckpt", SCENARIOS[f"fsdp2-{mask_mode}"])
    # the other way to save: a full state dict gathered with torch.distributed.checkpoint, passed on rank 0
    gathered = read_diff_file(out / "ckpt-state-dict" / "adapter_model.safetensors")
    assert all(torch.equal(gathered.diff(name), diffs[name]) for name in NAMES)
    # row alignment on the shards: each rank's local s * D (computed on the DTensor) is its rows of the full diff
    for name in NAMES:
        covered = []
        for rank in range(2):
            shards = load_file(out / f"shard-rank{rank}.safetensors")
            local, offset = shards[name], int(shards[name + ".offset"])
            assert torch.equal(local, diffs[name][offset : offset + local.shape[0]]), (name, rank)
            covered += range(offset, offset + local.shape[0])
        assert covered == list(range(diffs[name].shape[0]))
    assert report["wrong_mask_error"].startswith(
        "the cofi_mask of adapter 'default' has 24 rows but the parameter cofi_delta has 48 rows (shape (48, 32) of "
        "the full, unsharded weight; it is sharded as (Shard(dim=0),) and this rank holds 24 of those rows)."
    )


@pytest.mark.slow
def test_deepspeed_zero3_gathers_rows_in_forward_and_on_save(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail("DeepSpeed is not installed: scripts/setup.sh installs it (CPU build, no compiled ops up front).")
    launch(tmp_path, "zero3", DS_ACCELERATOR="cpu")
    scenarios = [name for name, spec in SCENARIOS.items() if spec["engine"] == "zero3"]
    assert len(scenarios) == 5  # update/grad mask x float32/bf16, and a base model built under zero.Init
    for scenario in scenarios:
        # zero.Init draws other initial weights than plain construction: the worker saved them
        initial = tmp_path / scenario / "initial.safetensors" if SCENARIOS[scenario].get("zero_init") else None
        check_checkpoint(tmp_path / scenario / "ckpt", SCENARIOS[scenario], initial)
        report = json.loads((tmp_path / scenario / "report.json").read_text())
        # outside the forward pass a partitioned delta is a placeholder: a clear error instead of a wrong diff
        assert report["placeholder_shape"] == [0]
        assert "DeepSpeed ZeRO-3 partition placeholder" in report["outside_forward_error"]
        # bf16 mode casts parameters (the diff) to bf16 but leaves the float32 mask buffer alone
        delta_dtype = "torch.bfloat16" if SCENARIOS[scenario].get("bf16") else "torch.float32"
        assert report["dtypes"] == {"delta": delta_dtype, "mask": "torch.float32"}
