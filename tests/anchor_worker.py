"""Retention-anchored DDP training on two CPU processes (gloo), for tests/test_anchor_runs.py.

Launch: ``torchrun --nproc_per_node 2 tests/anchor_worker.py OUT``. Every scenario trains tests/distributed_worker.py's
CoFi model for a few SGD steps under DDP, rank ``r`` on rows ``r::world`` of each global batch, with a KL retention
anchor attached before wrapping. Each rank writes ``OUT/<scenario>/rank<r>.json`` (which anchor batches its shard
holds, its anchor position and mean); rank 0 saves the trained diffs to ``OUT/<scenario>/deltas.safetensors``. The
test compares them with single-process training on the same global batches and the same anchor batches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from distributed_worker import build_model, global_batches, sgd_step, train
from peft_cofi import attach_retention_anchor
from tiny_models import VOCAB

WEIGHT = 2.0
SCENARIOS = {"ddp": {}, "ddp-checkpointing": {"checkpointing": True}, "ddp-bf16": {"bf16": True}}


def anchor_batches() -> list[dict[str, torch.Tensor]]:
    """Four batches of two general "prompts"; the last row of each is right-padded by two tokens."""
    generator = torch.Generator().manual_seed(11)
    out = []
    for _ in range(4):
        ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def run_scenario(spec: dict, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("update")
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = anchor_batches()
    anchor = attach_retention_anchor(model, data, weight=WEIGHT)  # each rank keeps its own shard of the batches
    trainable = [p for p in model.parameters() if p.requires_grad]
    local = [batch[rank::world] for batch in global_batches()]
    train(DistributedDataParallel(model), local, sgd_step(trainable), spec.get("bf16", False))
    shard = [
        next(i for i, b in enumerate(data) if torch.equal(b["input_ids"], mine["input_ids"]))
        for mine in anchor._batches
    ]
    report = {"shard": shard, "state": anchor.state_dict(), "mean": anchor.mean_since()[0]}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        trained = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(out / "deltas.safetensors"))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for name, spec in SCENARIOS.items():
            run_scenario(spec, args.out / name)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
