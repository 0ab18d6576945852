"""CoFi state under sharding engines: FSDP2 (``fully_shard``, DTensor) and DeepSpeed ZeRO-3 (partitioned parameters).

How the soft mask stays row-aligned:

- FSDP2 shards every ``cofi_delta`` on dim 0 (output rows) and leaves buffers, so each ``cofi_mask`` stays whole. In
  the forward pass FSDP2 all-gathers the full delta, so ``s * D`` (update mode) and the gradient-row scaling (grad
  mode) act on whole rows before the gradient is reduce-scattered. Outside the forward pass (``get_delta_weight``,
  ``merge``) the delta is a sharded DTensor; :func:`row_factors` lifts the mask to a replicated DTensor so that
  DTensor's global semantics keep each row paired with its own factor. An input-subspace basis is lifted the same
  way (:func:`replicated_like`): every rank holds it whole, as it holds the mask.
- DeepSpeed ZeRO-3 replaces each module's ``_parameters`` with a dict that gathers a partitioned parameter when it
  is read inside a forward pass. ``CoFi`` reads ``base_layer.weight`` and ``cofi_delta[name]`` by attribute access,
  so both are gathered whole in the forward pass and the mask again multiplies whole rows (the authors' code tiled
  the mask along a flattened gradient partition instead). Outside the forward pass they are empty placeholders.

Saving: ``save_pretrained`` calls :func:`gather_adapter_state`, which replaces sharded (DTensor) and partitioned
(ZeRO-3) tensors by full CPU copies. Gathering is a collective: under FSDP2 or ZeRO-3 call
``model.save_pretrained(path, is_main_process=rank == 0)`` on **every** rank (peft computes the state dict on every
rank and writes only on the main one), or gather a full state dict yourself (``get_model_state_dict(model,
options=StateDictOptions(full_state_dict=True, cpu_offload=True))`` under FSDP2) and pass it as ``state_dict=`` on
rank 0 only.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated FSDP2 parameter)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (it carries ``ds_id``; its data may be a placeholder)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_status")


def row_factors(scale: torch.Tensor, delta: torch.Tensor, where: str = "") -> torch.Tensor:
    """The per-row mask ``scale`` as a ``(rows, 1)`` column matching ``delta``: same dtype and device, and a
    replicated DTensor on ``delta``'s mesh when ``delta`` is a sharded DTensor, so ``delta * column`` scales every
    row by its own factor whatever the sharding.

    Raises:
        ValueError: the mask does not hold one factor per output row of the full (unsharded) parameter.
    """
    check_mask_rows(scale, delta, where)
    return replicated_like(scale.detach().to(device=delta.device, dtype=delta.dtype).unsqueeze(1), delta)


def replicated_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole on this rank) as a replicated DTensor on ``like``'s mesh when ``like`` is a DTensor, so that
    DTensor arithmetic with it keeps global semantics (FSDP2 outside the forward pass); else ``tensor`` itself.

    Example:
        >>> replicated_like(torch.ones(2), torch.zeros(3)).shape
        torch.Size([2])
    """
    if not is_dtensor(like):
        return tensor
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(tensor, like.device_mesh, [Replicate()] * like.device_mesh.ndim)


def check_mask_rows(mask: torch.Tensor, delta: torch.Tensor, where: str = "") -> None:
    """Raise a clear error when a mask and a (possibly sharded or partitioned) diff parameter disagree in rows."""
    label = f" of {where}" if where else ""
    if delta.dim() != 2:
        hint = (
            " It is a DeepSpeed ZeRO-3 partition placeholder: read it inside the forward pass or within "
            "deepspeed.zero.GatheredParameters."
            if is_zero3_partitioned(delta)
            else ""
        )
        raise ValueError(
            f"cofi_delta{label} has shape {tuple(delta.shape)}, not an (out_features, in_features) matrix.{hint}"
        )
    if mask.dim() != 1 or mask.shape[0] != delta.shape[0]:
        shard = ""
        if is_dtensor(delta):
            local = delta.to_local().shape[0]
            shard = f"; it is sharded as {delta.placements} and this rank holds {local} of those rows"
        raise ValueError(
            f"the cofi_mask{label} has {mask.shape[0] if mask.dim() else 0} rows but the parameter cofi_delta has "
            f"{delta.shape[0]} rows (shape {tuple(delta.shape)} of the full, unsharded weight{shard}). The mask needs "
            "one factor per output row of the whole weight, not of one shard: keep the mask that get_peft_model or "
            "load_adapter built, or compute it from importance of the unsharded model."
        )


def gather_full(tensor: torch.Tensor, parameter: torch.Tensor | None = None) -> torch.Tensor:
    """A full, detached CPU copy of ``tensor``: DTensors are all-gathered (a collective: every rank must call this in
    the same order); a ZeRO-3 placeholder of ``parameter`` is replaced by the parameter gathered with
    ``deepspeed.zero.GatheredParameters`` (also a collective); full tensors are returned as they are."""
    if is_dtensor(tensor):
        return tensor.detach().full_tensor().cpu()
    if parameter is not None and is_zero3_partitioned(parameter) and tensor.shape != weight_shape(parameter):
        with _zero3_gathered([parameter]):
            return parameter.detach().cpu().clone()
    return tensor


def gather_adapter_state(
    model: torch.nn.Module, adapter_name: str, selected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full copies of an adapter's state (``selected``) and of the base weights the diff is fingerprinted against.

    Returns ``(selected, state_dict)`` with every sharded or partitioned entry replaced; unchanged entries are the
    same objects. Runs the gathers in sorted key order, so that all ranks issue the same collectives.
    """
    from .layer import CoFiLayer  # here: layer.py imports this module

    parameters: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, CoFiLayer) and adapter_name in module.cofi_delta:
            parameters[f"{name}.cofi_delta.{adapter_name}"] = module.cofi_delta[adapter_name]
            parameters[f"{name}.base_layer.weight"] = module.get_base_layer().weight
    suffix = f".cofi_delta.{adapter_name}"
    base_keys = [k.removesuffix(suffix) + ".base_layer.weight" for k in selected if k.endswith(suffix)]
    needed = dict(selected) | {k: state_dict[k] for k in base_keys if k in state_dict}
    full = {key: gather_full(needed[key], parameters.get(key)) for key in sorted(needed)}
    for key in selected:
        expected = tuple(weight_shape(parameters[key])) if key in parameters else None
        if key.endswith(suffix) and expected is not None and tuple(full[key].shape) != expected:
            raise ValueError(
                f"the state dict holds a {tuple(full[key].shape)} tensor for {key}, but the diff is {expected}: a "
                "shard or partition that was not gathered. Under FSDP2 or DeepSpeed ZeRO-3 call "
                "save_pretrained(path, is_main_process=rank == 0) on every rank, or pass the gathered full state dict "
                "as state_dict=."
            )
    return {k: full[k] for k in selected}, {**state_dict, **{k: full[k] for k in base_keys if k in full}}


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """The full shape of a weight: a ZeRO-3 partitioned parameter's data is a placeholder, ``ds_shape`` the truth."""
    return weight.ds_shape if is_zero3_partitioned(weight) else weight.shape


def _zero3_gathered(parameters: list[torch.Tensor]):
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is None:
        return nullcontext()
    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
