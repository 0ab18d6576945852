"""Worker of the two-process importance test (a module of its own so that spawned processes can import it)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from peft_cofi import CoFiConfig
from peft_cofi.scoring import compute_importance
from tiny_models import VOCAB, tiny_qwen2

CONFIG = dict(target_modules=["k_proj", "up_proj", "down_proj"], layers_to_transform="bottom-plus")


def batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    out = []
    for i in range(count):
        ids = torch.randint(1, VOCAB, (2, 8 + i), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def run(method: str, data: list, out: Path) -> None:
    result = compute_importance(tiny_qwen2(), data, method=method, config=CoFiConfig(**CONFIG), progress=False)
    result.save(out)


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        shard = batches()[rank::world_size]  # uneven on purpose: rank 0 gets 2 batches, rank 1 one
        for method in ("kl-dropout", "loss"):
            run(method, shard, Path(out_dir) / f"{method}-rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()
