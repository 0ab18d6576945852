"""Input-subspace protection, as a measurement inside the fronts benchmark (issue 15: measure before building).

General text's inputs to a module live mostly in a few directions. If the update is zero on those directions, the
module's output on general inputs barely changes, whatever the optimizer does. Per trained module:

- the inputs' second moment ``C = sum_t x_t x_t^T / n`` over non-padding tokens, in float64, on general text (the
  importance text, disjoint from every evaluation set) and, for the contrastive variant, on the training data;
- ``U``: the top eigenvectors of ``C_general`` covering a ``fraction`` of the input dimensions (``"plain"``), or the
  top generalized eigenvectors of ``(C_general, C_task + eps I)`` — directions general text uses *more than the
  task does*, so the task's own directions stay trainable (``"contrastive"``), orthonormalised;
- CoFi's trained update becomes ``(s * D)(I - U U^T)``: the projection is part of the parametrisation (``torch``'s
  ``parametrize`` on ``D``), so it holds exactly under Adam (a projected gradient would not).

Example:
    >>> c = torch.diag(torch.tensor([4.0, 1.0, 0.1], dtype=torch.float64))
    >>> protected_basis(c, fraction=1 / 3).abs().flatten().tolist()
    [1.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from peft_cofi import CoFiLayer

VARIANTS = ("plain", "contrastive")


@torch.no_grad()
def input_second_moments(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], names: list[str]
) -> dict[str, torch.Tensor]:
    """``C`` of the inputs of each named module (names as in the bare model), padding excluded, float64."""
    modules = dict(model.named_modules())
    sums = {name: torch.zeros(0, dtype=torch.float64) for name in names}
    count = 0
    mask: torch.Tensor | None = None

    def hook(name: str) -> Callable:
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            x = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
            sums[name] = sums[name] + x.T @ x if sums[name].numel() else x.T @ x

        return accumulate

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        for batch in batches:
            mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            count += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(count, 1) for name, total in sums.items()}


def protected_basis(
    c_general: torch.Tensor, c_task: torch.Tensor | None = None, fraction: float = 0.25, eps: float = 1e-3
) -> torch.Tensor:
    """``U`` (``in_features x k`` orthonormal columns, float32), ``k = round(fraction * in_features)``: the top
    eigenvectors of ``c_general``, or with ``c_task`` the top generalized eigenvectors of
    ``(c_general, c_task + eps * mean(diag(c_task)) * I)``."""
    n = c_general.shape[0]
    k = max(1, min(n - 1, round(fraction * n)))
    if c_task is None:
        _, vectors = torch.linalg.eigh(c_general)
        return vectors[:, -k:].flip(1).contiguous().float()
    ridge = eps * c_task.diagonal().mean().clamp(min=1e-12)
    factor = torch.linalg.cholesky(c_task + ridge * torch.eye(n, dtype=c_task.dtype))
    inverse = torch.linalg.inv(factor)
    _, vectors = torch.linalg.eigh(inverse @ c_general @ inverse.T)  # whitened by the task's covariance
    top = inverse.T @ vectors[:, -k:]  # back to input space: general-heavy relative to the task
    return torch.linalg.qr(top)[0].float().contiguous()


class Projected(nn.Module):
    """``D -> D (I - U U^T)``: the trained update never acts on ``span(U)``."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        basis = self.basis.to(delta.dtype)
        return delta - (delta @ basis) @ basis.T


def protect(model: nn.Module, bases: dict[str, torch.Tensor]) -> nn.Module:
    """Parametrise every CoFi layer's ``D`` (adapter ``default``) as projected away from its module's basis."""
    for name, module in model.named_modules():
        if isinstance(module, CoFiLayer):
            basis = bases[name.removeprefix("base_model.model.")]
            parametrize.register_parametrization(module.cofi_delta, "default", Projected(basis))
    return model


def bake(model: nn.Module) -> nn.Module:
    """Replace the parametrised ``D`` by its projected value (a plain CoFi adapter again, saveable as usual)."""
    for module in model.modules():
        if isinstance(module, CoFiLayer) and parametrize.is_parametrized(module.cofi_delta, "default"):
            parametrize.remove_parametrizations(module.cofi_delta, "default", leave_parametrized=True)
    return model


def kept_energy(c_general: torch.Tensor, basis: torch.Tensor) -> float:
    """Fraction of the general inputs' energy ``trace(C)`` inside ``span(U)``."""
    projected = basis.double().T @ c_general @ basis.double()
    return float(projected.trace() / c_general.trace()) if c_general.trace() > 0 else math.nan
