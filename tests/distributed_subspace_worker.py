"""Input-subspace protection under DDP, FSDP2 and DeepSpeed ZeRO-3 on CPU processes (gloo), for
tests/test_subspace_distributed.py.

Launch: ``torchrun --nproc_per_node 2 tests/distributed_subspace_worker.py OUT --engines ddp,fsdp2,zero3``
(``DS_ACCELERATOR=cpu``). ``compute``: each rank streams its shard of the general and task batches through
``compute_input_subspace``; rank 0 saves the result. Training scenarios: the CoFi model of tests/distributed_worker.py
(a soft mask with rows of factor 0) plus a fixed input subspace (:data:`SUBSPACE`), a few SGD steps with rank ``r``
on rows ``r::world`` of each global batch, saved with ``save_pretrained`` on every rank; FSDP2 also writes each
rank's shard of the effective diff computed on the sharded DTensor outside the forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from safetensors.torch import save_file

from distributed_worker import (
    MASK,
    NAMES,
    _shard_offset,
    _zero3_config,
    cofi_layers,
    global_batches,
    sgd_step,
    start_worker,
    train,
)
from peft_cofi import CoFiConfig, InputSubspace, compute_input_subspace
from tiny_models import VOCAB, random_importance, tiny_llama


def fixed_subspace() -> InputSubspace:
    """Seeded orthonormal bases: 20 of up_proj's 32 inputs (stored as the complement), 10 of down_proj's 48."""
    generator = torch.Generator().manual_seed(8)
    bases = {}
    for name in NAMES:
        width, rank = (32, 20) if name.endswith("up_proj") else (48, 10)
        bases[name] = torch.linalg.qr(torch.randn(width, rank, generator=generator, dtype=torch.float64)).Q.float()
    return InputSubspace(bases)


SUBSPACE = fixed_subspace()
COMPUTE_CONFIG = CoFiConfig(layers_to_transform="bottom-plus")


def build_model(base: torch.nn.Module | None = None):
    """The protected CoFi-wrapped tiny Llama every scenario and its single-process reference start from."""
    config = CoFiConfig(importance=random_importance(tiny_llama(), NAMES), input_subspace=SUBSPACE, **MASK)
    return get_peft_model(tiny_llama() if base is None else base, config)


def compute_batches(seed: int, count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(1, VOCAB, (2, 8 + i), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def compute(contrast: bool, shard: bool = True) -> InputSubspace:
    """The subspace of this rank's shard (uneven: rank 0 gets 2 batches of 3), or of all batches."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
    general, task = compute_batches(11)[rank::world], compute_batches(12)[rank::world]
    return compute_input_subspace(
        tiny_llama(), general, config=COMPUTE_CONFIG, energy=0.8, contrast=task if contrast else None, progress=False
    )


def run_training(engine: str, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    model = build_model()
    local = [batch[rank::world] for batch in global_batches()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        train(DistributedDataParallel(model), local, sgd_step(trainable))
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        train(model, local, sgd_step([p for p in model.parameters() if p.requires_grad]))
        shards = {}
        for name, layer in cofi_layers(model).items():
            with torch.no_grad():
                effective = layer.effective_delta("default")  # on the sharded DTensor: the basis is replicated
            shards[name] = effective.to_local().detach().cpu().contiguous()
            shards[name + ".offset"] = torch.tensor(_shard_offset(effective))
        save_file(shards, str(out / f"shard-rank{rank}.safetensors"))
    else:
        import deepspeed

        optimizer = torch.optim.SGD(trainable, lr=0.5)
        engine_, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_zero3_config())

        def step(loss):
            engine_.backward(loss)
            engine_.step()

        train(engine_, local, step)
    model.save_pretrained(str(out / "ckpt"), is_main_process=rank == 0)  # a collective under FSDP2 / ZeRO-3


def main() -> None:
    out, engines = start_worker(__doc__.splitlines()[0])
    try:
        for contrast in (False, True):
            result = compute(contrast)
            if dist.get_rank() == 0:
                result.save(out / f"compute-{'contrast' if contrast else 'plain'}.safetensors")
        for engine in engines:
            run_training(engine, out / engine)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
