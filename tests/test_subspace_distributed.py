"""Input-subspace protection with two CPU processes (gloo, torchrun): compute_input_subspace sums across ranks, and
DDP, FSDP2 (sharded DTensor D, whole basis) and DeepSpeed ZeRO-3 train what one process trains, with the saved diff
exactly zero on the protected directions. The processes run tests/distributed_subspace_worker.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from distributed_subspace_worker import SUBSPACE, build_model, compute
from distributed_worker import NAMES, cofi_layers, global_batches, sgd_step, train
from peft_cofi import InputSubspace, read_diff_file
from peft_cofi.subspace_math import projector
from tiny_models import tiny_llama

WORKER = Path(__file__).with_name("distributed_subspace_worker.py")
ENGINES = ("ddp", "fsdp2", "zero3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail("DeepSpeed is not installed: scripts/setup.sh installs it (CPU build, no compiled ops up front).")
    out = tmp_path_factory.mktemp("distributed-subspace")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    command += [str(out), "--engines", ",".join(ENGINES)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "contrast"])
def test_two_ranks_compute_the_single_process_subspace(runs, kind):
    ranks = InputSubspace.load(runs / f"compute-{kind}.safetensors")
    single = compute(kind == "contrast", shard=False)
    assert ranks.tokens == single.tokens and ranks.metadata["batches"] == "3" and ranks.rank == single.rank
    for name, basis in single.items():
        torch.testing.assert_close(ranks.curves[name], single.curves[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(projector(ranks[name]), projector(basis), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engines_train_like_one_process_and_save_a_protected_diff(runs, engine):
    reference = build_model()
    train(reference, global_batches(), sgd_step([p for p in reference.parameters() if p.requires_grad]))
    reference.eval()
    saved = read_diff_file(runs / engine / "ckpt" / "adapter_model.safetensors")
    assert sorted(saved.records) == sorted(NAMES) and "cofi_input_subspace" in saved.header.fields
    for name, layer in cofi_layers(reference).items():
        diff = saved.diff(name)
        torch.testing.assert_close(diff, layer.get_delta_weight("default"), rtol=1e-4, atol=1e-7)
        assert diff.matmul(SUBSPACE[name]).abs().max() < 1e-5  # nothing moved on the protected directions
        assert diff.abs().max() > 1e-3
    loaded = PeftModel.from_pretrained(tiny_llama(), runs / engine / "ckpt").eval()  # no subspace given
    tokens = global_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference(tokens).logits, rtol=1e-4, atol=1e-5)
    if engine == "fsdp2":  # each rank's shard of the effective diff, computed on the DTensor, is its rows
        for name in NAMES:
            covered = []
            for rank in range(2):
                shards = load_file(runs / engine / f"shard-rank{rank}.safetensors")
                local, offset = shards[name], int(shards[name + ".offset"])
                torch.testing.assert_close(local, saved.diff(name)[offset : offset + local.shape[0]], rtol=0, atol=1e-7)
                covered += range(offset, offset + local.shape[0])
            assert covered == list(range(saved.diff(name).shape[0]))
