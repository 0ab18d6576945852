"""Training under DDP, FSDP2 and DeepSpeed ZeRO-3 on CPU processes (gloo), for tests/test_distributed.py.

Launch: ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT --engines ddp,fsdp2[,zero3]``
(``DS_ACCELERATOR=cpu`` for ZeRO-3). Every scenario trains a tiny Llama wrapped with CoFi (a soft mask with
rows of factor 0, partial factors and factor 1) for a few SGD steps, rank ``r`` on rows ``r::world`` of each global
batch, and saves the adapter to ``OUT/<scenario>/ckpt`` with ``save_pretrained``. Rank 0 writes
``OUT/<scenario>/report.json``; FSDP2 scenarios also write each rank's shard of the effective diff. The test process
compares everything against single-process training on the global batches (:func:`train` with :func:`build_model`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from safetensors.torch import save_file

from peft_cofi import CoFiConfig, CoFiLayer
from tiny_models import VOCAB, random_importance, tiny_llama

STEPS, GLOBAL_BATCH, SEQ_LEN, LR = 3, 4, 10, 0.5
NAMES = [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("up_proj", "down_proj")]
# "positive" normalisation with a sharp tanh: about 9 % of rows get factor exactly 0, 27 % partial, 64 % factor 1.
MASK = dict(mask_normalization="positive", mask_sharpness=0.2)
MODES = ("update", "grad")
SCENARIOS = {
    **{f"ddp-{mode}": dict(engine="ddp", mask_mode=mode) for mode in MODES},
    **{f"ddp-{mode}-checkpointing": dict(engine="ddp", mask_mode=mode, checkpointing=True) for mode in MODES},
    **{f"ddp-{mode}-bf16": dict(engine="ddp", mask_mode=mode, bf16=True) for mode in MODES},
    **{f"fsdp2-{mode}": dict(engine="fsdp2", mask_mode=mode) for mode in MODES},
    **{f"zero3-{mode}": dict(engine="zero3", mask_mode=mode) for mode in MODES},
    # DeepSpeed's bf16 mode: parameters (base weights, diff) in bf16, float32 master copies; the mask stays float32
    **{f"zero3-{mode}-bf16": dict(engine="zero3", mask_mode=mode, bf16=True) for mode in MODES},
    # HF Trainer's ZeRO-3 path: the base model is built partitioned (zero.Init) before get_peft_model sees it
    "zero3-update-zero-init": dict(engine="zero3", mask_mode="update", zero_init=True),
}


def build_model(mask_mode: str, base: torch.nn.Module | None = None):
    """The CoFi-wrapped tiny Llama (or ``base``) every scenario and its single-process reference start from."""
    config = CoFiConfig(importance=random_importance(tiny_llama(), NAMES), mask_mode=mask_mode, **MASK)
    return get_peft_model(tiny_llama() if base is None else base, config)


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator) for _ in range(STEPS)]


def train(model, batches, step, bf16: bool = False) -> None:
    """Plain SGD steps; ``step`` applies the update (``optimizer.step`` + ``zero_grad``, or a DeepSpeed engine's)."""
    model.train()
    for tokens in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(input_ids=tokens, labels=tokens).loss
        step(loss)


def sgd_step(parameters):
    optimizer = torch.optim.SGD(parameters, lr=LR)

    def step(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def cofi_layers(model) -> dict[str, CoFiLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, CoFiLayer)}


def run_scenario(spec: dict, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(spec["mask_mode"], _zero_init_base(out) if spec.get("zero_init") else None)
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    local = [batch[rank::world] for batch in global_batches()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    report: dict = {"world_size": world, "checkpointing": checkpointing}
    if spec["engine"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        train(ddp, local, sgd_step(trainable), spec.get("bf16", False))
        if rank == 0:  # DDP replicas are identical: rank 0 saves alone
            model.save_pretrained(out / "ckpt")
    elif spec["engine"] == "fsdp2":
        report.update(_run_fsdp2(model, local, out))
    else:
        report.update(_run_zero3(model, trainable, local, out, spec.get("bf16", False)))
    dist.barrier()
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))


def _run_fsdp2(model, local, out: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    train(model, local, sgd_step([p for p in model.parameters() if p.requires_grad]))
    layers = cofi_layers(model)
    first = layers[NAMES[0]].cofi_delta["default"]
    # Each rank's shard of s * D, computed on the sharded DTensor outside the forward pass.
    shards = {}
    for name, layer in layers.items():
        with torch.no_grad():
            effective = layer.effective_delta("default")
        shards[name] = effective.to_local().detach().cpu().contiguous()
        shards[name + ".offset"] = torch.tensor(_shard_offset(effective))
    save_file(shards, str(out / f"shard-rank{rank}.safetensors"))
    # Both ways to save a sharded model: save_pretrained on every rank (gathers itself), or a full state dict.
    model.save_pretrained(str(out / "ckpt"), is_main_process=rank == 0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(out / "ckpt-state-dict"), state_dict=full)
    layer = layers[NAMES[0]]
    whole = layer.cofi_mask["default"]
    layer.cofi_mask["default"] = whole[: first.to_local().shape[0]].clone()  # a mask sized for the local shard
    try:
        layer.get_delta_weight("default")
        wrong_mask_error = None
    except ValueError as error:
        wrong_mask_error = str(error)
    finally:
        layer.cofi_mask["default"] = whole
    return {
        "delta_type": type(first).__name__,
        "placements": str(first.placements),
        "mask_type": type(layer.cofi_mask["default"]).__name__,
        "wrong_mask_error": wrong_mask_error,
    }


def _shard_offset(tensor) -> int:
    """First global row of this rank's shard of a DTensor sharded on dim 0 over a 1-D mesh (torch.chunk sizes)."""
    from torch.distributed.tensor import Shard

    assert tensor.device_mesh.ndim == 1 and tensor.placements == (Shard(0),), tensor.placements
    return dist.get_rank() * -(-tensor.shape[0] // dist.get_world_size())


def _zero3_config(bf16: bool = False) -> dict:
    return {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
        # threshold 0: partition even tiny parameters (the default keeps those under 1e5 elements whole)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }


def _zero_init_base(out: Path) -> torch.nn.Module:
    """A tiny Llama built partitioned under ``deepspeed.zero.Init``; its gathered initial weights go to a file, so
    the test can train the single-process reference from the same start."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=_zero3_config()):
        base = tiny_llama()
    with deepspeed.zero.GatheredParameters(list(base.parameters())):
        initial = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    if dist.get_rank() == 0:
        save_file(initial, str(out / "initial.safetensors"))
    return base


def _run_zero3(model, trainable, local, out: Path, bf16: bool) -> dict:
    import deepspeed

    optimizer = torch.optim.SGD(trainable, lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_zero3_config(bf16))

    def step(loss):
        engine.backward(loss)
        engine.step()

    train(engine, local, step)
    layer = cofi_layers(model)[NAMES[0]]
    placeholder = tuple(layer.cofi_delta["default"].shape)
    try:  # outside the forward pass a partitioned delta is an empty placeholder: a clear error, not garbage
        layer.get_delta_weight("default")
        outside_forward_error = None
    except ValueError as error:
        outside_forward_error = str(error)
    model.save_pretrained(str(out / "ckpt"), is_main_process=dist.get_rank() == 0)
    dtypes = {"delta": str(layer.cofi_delta["default"].dtype), "mask": str(layer.cofi_mask["default"].dtype)}
    return {"placeholder_shape": placeholder, "outside_forward_error": outside_forward_error, "dtypes": dtypes}


def start_worker(description: str) -> tuple[Path, list[str]]:
    """Parse ``OUT [--engines ...]``, use one thread, and join the gloo group (through DeepSpeed for ZeRO-3)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", type=Path)
    parser.add_argument("--engines", default="ddp,fsdp2", help="comma-separated: ddp, fsdp2, zero3")
    args = parser.parse_args()
    engines = args.engines.split(",")
    torch.set_num_threads(1)
    if "zero3" in engines:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    return args.out, engines


def main() -> None:
    out, engines = start_worker(__doc__.splitlines()[0])
    try:
        for name, spec in SCENARIOS.items():
            if spec["engine"] in engines:
                run_scenario(spec, out / name)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
