"""The CoFi tuner layer: a masked weight diff on one ``nn.Linear`` or GPT-2 ``Conv1D``.

Per adapter the layer holds a trainable ``D`` (``cofi_delta``, shape ``(out_features, in_features)`` for both layer
types, in the base weight's float dtype until peft upcasts it), per-row mask factors ``s`` (``cofi_mask``, a float32
buffer) and the fingerprint of the base weight the diff applies to (``cofi_base_fingerprint``, a uint8 buffer, all
zeros until taken). The weight diff is :func:`peft_cofi.mask.masked_diff`: ``s * D`` in ``"update"`` mode (Adam's
step on ``D`` is scale-free, so each row's change is scaled by ``s``) and ``D`` with gradient rows multiplied by ``s``
in ``"grad"`` mode (the paper's). The base weight is never modified unless merged.

An adapter trained with an input subspace ``U`` (``CoFiConfig(input_subspace=...)``) also has a
:class:`~peft_cofi.subspace_math.Projection` in ``cofi_subspace`` and uses ``D (I - U U^T)`` in place of ``D``: the
projection is part of the parametrisation, so it holds under any optimizer. It is no buffer, so it is neither
saved (a file stores the projected ``D`` and loads without it) nor broadcast by DDP every step; every rank keeps it
whole, and it follows the delta's device on first use.

These names are exactly what a checkpoint stores (docs/FORMAT.md), so every loader that maps file keys onto a
layer's parameters and buffers (peft's ``set_peft_model_state_dict``, transformers' adapter loader) sees one thing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import CoFiConfig
from .diff_format import FINGERPRINT_BYTES, fingerprint
from .distributed import is_dtensor, is_zero3_partitioned, replicated_like, row_factors, weight_shape
from .subspace_math import Projection, check_basis

SUPPORTED_LAYERS = (nn.Linear, Conv1D)
# Base weight dtypes a float diff can be added to (quantised int8/uint8-packed and float8 weights cannot take one).
TRAINABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def untrainable_reason(module: nn.Module, model_is_loaded: bool = True) -> str | None:
    """Why a Linear/Conv1D ``module`` cannot carry a CoFi diff, or ``None`` if it can.

    ``model_is_loaded``: whether the model has real (non-meta) parameters; a meta weight is fine when the whole
    model is on the meta device (creation under ``init_empty_weights``), not when only the trained modules are.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"its weight is {type(weight).__name__}, not a tensor"
    if weight.dtype not in TRAINABLE_DTYPES:
        return (
            f"its weight has dtype {weight.dtype} (quantised?); a diff needs a floating-point base weight, one of "
            f"{[str(d).removeprefix('torch.') for d in TRAINABLE_DTYPES]}"
        )
    if weight.is_meta and (model_is_loaded or _is_offloaded(module)):
        return (
            "its weight is on the meta device: not loaded, or offloaded by accelerate (device_map / cpu_offload) and "
            "brought in only for the forward pass, so the diff would stay an empty meta tensor"
        )
    return None


def _is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate hooks keep this module's weights elsewhere and load them only for the forward pass."""
    hook = getattr(module, "_hf_hook", None)
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook]))


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies gradient rows by the ``(rows, 1)`` column in the backward pass."""

    @staticmethod
    def forward(ctx: Any, delta: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(column)
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (column,) = ctx.saved_tensors
        return grad * column.to(grad.dtype), None


class CoFiLayer(BaseTunerLayer):
    """State and merge logic shared by CoFi layers (see the module docstring)."""

    adapter_layer_names = ("cofi_delta",)
    other_param_names = ("cofi_mask", "cofi_base_fingerprint", "cofi_mask_mode", "cofi_subspace")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.cofi_delta = nn.ParameterDict({})
        self.cofi_mask = BufferDict({}, persistent=True)
        self.cofi_base_fingerprint = BufferDict({}, persistent=True)
        self.cofi_mask_mode: dict[str, str] = {}
        self.cofi_subspace: dict[str, Projection] = {}  # adapters trained away from protected input directions
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.is_conv1d = isinstance(base, Conv1D)
        rows, cols = weight_shape(base.weight)  # the full shape also for a ZeRO-3 partitioned weight
        out_features, in_features = (cols, rows) if self.is_conv1d else (rows, cols)
        self.in_features, self.out_features = in_features, out_features

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as ``(out_features, in_features)``: Conv1D stores it transposed."""
        return weight.T if self.is_conv1d else weight

    def update_layer(
        self,
        adapter_name: str,
        mask_factors: torch.Tensor,
        *,
        config: CoFiConfig,
        subspace: torch.Tensor | None = None,
    ) -> None:
        """Create (or replace) the trainable state, mask factors and fingerprint slot of ``adapter_name``;
        ``subspace``: the protected input basis ``U`` (``in_features x k``) its update is projected away from."""
        if mask_factors.shape != (self.out_features,):
            raise ValueError(
                f"mask factors of shape {tuple(mask_factors.shape)} do not match the layer's "
                f"{self.out_features} output rows."
            )
        projection = None if subspace is None else Projection.of(check_basis(subspace, self.in_features))
        base_weight = self.get_base_layer().weight
        shape = (self.out_features, self.in_features)
        # The base dtype, as peft's contract says (autocast_adapter_dtype upcasts bf16/fp16 to float32 afterwards).
        dtype = base_weight.dtype if base_weight.dtype.is_floating_point else torch.float32
        if config.init_weights or base_weight.device.type == "meta":
            delta = torch.zeros(shape, dtype=dtype, device=base_weight.device)
        else:
            # A random non-identity adapter for tests, scaled like the base weights.
            scale = base_weight.detach().float().std().clamp(min=1e-3)
            delta = (torch.randn(shape, device=base_weight.device) * scale).to(dtype)
        self.cofi_delta[adapter_name] = nn.Parameter(delta)
        self.cofi_mask[adapter_name] = mask_factors.detach().to(torch.float32).clone()
        self.cofi_base_fingerprint[adapter_name] = torch.zeros(FINGERPRINT_BYTES, dtype=torch.uint8)
        self.cofi_mask_mode[adapter_name] = config.mask_mode
        self.cofi_subspace.pop(adapter_name, None)
        if projection is not None:
            self.cofi_subspace[adapter_name] = projection
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # peft's default would also cast the mask to the base dtype; it stays float32 (it is a fixed input, and the
        # format stores it in float32), the fingerprint stays uint8, and D takes the base's float dtype.
        weight = self.get_base_layer().weight
        target = device if device is not None else weight.device
        if target.type == "meta":
            return
        if adapter_name in self.cofi_delta and self.cofi_delta[adapter_name].device.type != "meta":
            delta = self.cofi_delta[adapter_name]
            dtype = weight.dtype if weight.dtype.is_floating_point else delta.dtype
            self.cofi_delta[adapter_name] = delta.to(target, dtype=dtype)
        for buffers in (self.cofi_mask, self.cofi_base_fingerprint):
            if adapter_name in buffers:
                buffers[adapter_name] = buffers[adapter_name].to(target)
        if adapter_name in self.cofi_subspace:
            self.cofi_subspace[adapter_name] = self.cofi_subspace[adapter_name].to(target)

    def has_full_base_weight(self) -> bool:
        """Whether the base weight holds its full values here (not meta, a ZeRO-3 placeholder or an FSDP2 shard)."""
        weight = self.get_base_layer().weight
        return weight.device.type != "meta" and not is_zero3_partitioned(weight) and not is_dtensor(weight)

    def base_fingerprint(self, adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The fingerprint of the base weight ``adapter_name``'s diff applies to. Taken once, when the adapter is
        created (or, for a sharded or not yet loaded base, when first needed, from ``weight``: a full copy), replaced
        when a checkpoint is loaded, and kept: merging and unmerging cannot change it."""
        stored = self.cofi_base_fingerprint[adapter_name]
        if not stored.any():
            if self.merged:
                raise ValueError("cannot fingerprint the base weight while an adapter is merged into it.")
            stored = fingerprint(self.get_base_layer().weight if weight is None else weight)
            self.cofi_base_fingerprint[adapter_name] = stored.to(self.cofi_base_fingerprint[adapter_name].device)
        return stored.cpu()

    def effective_delta(self, adapter_name: str) -> torch.Tensor:
        """The weight change ``W_tuned - W_base`` of one adapter, ``(out_features, in_features)``, with autograd:
        :func:`~peft_cofi.mask.masked_diff`, written out here to keep rows aligned under sharding and to scale the
        gradient (not the value) in ``"grad"`` mode."""
        delta = self.cofi_delta[adapter_name]
        # One factor per row of the full weight, also when FSDP2 shards the delta (a replicated DTensor then).
        column = row_factors(self.cofi_mask[adapter_name], delta, f"adapter {adapter_name!r}")
        if adapter_name in self.cofi_subspace:
            delta = self._projected(adapter_name, delta, follow=True)
        if self.cofi_mask_mode[adapter_name] == "update":
            return delta * column
        return _ScaleGrad.apply(delta, column)

    def projected_delta(self, adapter_name: str, delta: torch.Tensor | None = None) -> torch.Tensor:
        """``D (I - U U^T)`` of an adapter trained with an input subspace (``D`` itself without one), with autograd;
        ``delta``: that adapter's ``D`` as read now (a full copy gathered for saving, say)."""
        own = delta is None
        return self._projected(adapter_name, self.cofi_delta[adapter_name] if own else delta, follow=own)

    def _projected(self, adapter_name: str, delta: torch.Tensor, follow: bool) -> torch.Tensor:
        projection = self.cofi_subspace.get(adapter_name)
        if projection is None:
            return delta
        if projection.basis.device != delta.device:
            projection = projection.to(delta.device)
            if follow:  # the layer moved since the adapter was created: follow it, once
                self.cofi_subspace[adapter_name] = projection
        basis = replicated_like(projection.basis.to(delta.dtype), delta)  # whole on every rank, also under FSDP2
        # In D's own dtype even under autocast: a bf16 projection would leak into the protected directions.
        autocast = torch.is_autocast_enabled(delta.device.type)
        with torch.autocast(delta.device.type, enabled=False) if autocast else contextlib.nullcontext():
            return projection(delta, basis, fused=not is_dtensor(delta))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The detached weight change of one adapter in the base weight's own orientation and dtype."""
        base_weight = self.get_base_layer().weight
        with torch.no_grad():
            return self._oriented(self.effective_delta(adapter_name)).detach().to(base_weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the diffs of ``adapter_names`` (default: the active ones) into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_weight = self.get_base_layer().weight
        if not self.merged:
            for name in self.cofi_delta:  # the base every adapter applies to, before it changes
                self.base_fingerprint(name)
        for name in adapter_names:
            if name not in self.cofi_delta:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge:
                merged = base_weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} gives NaN or inf weights; the adapter is broken.")
                base_weight.data = merged
            else:
                base_weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged diffs again (exact up to floating-point rounding of the add/subtract; the fingerprints
        taken before the first merge still name the original base)."""
        base_weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.cofi_delta:
                base_weight.data -= self.get_delta_weight(name)


class Linear(nn.Module, CoFiLayer):
    """A CoFi-adapted ``nn.Linear`` or ``Conv1D``.

    Example:
        >>> layer = Linear(nn.Linear(4, 3), "default", torch.ones(3), config=CoFiConfig(target_modules=["x"]))
        >>> layer(torch.ones(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        mask_factors: torch.Tensor,
        *,
        config: CoFiConfig,
        subspace: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        CoFiLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, mask_factors, config=config, subspace=subspace)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.cofi_delta]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        base_weight = self._oriented(base.weight)
        delta = self.effective_delta(active[0])
        for name in active[1:]:
            delta = delta + self.effective_delta(name)
        # One matmul with the combined weight: the same cost as training the module in full.
        weight = (base_weight.to(delta.dtype) + delta).to(base_weight.dtype)
        return F.linear(x, weight, base.bias)

    def __repr__(self) -> str:
        return "cofi." + super().__repr__()
