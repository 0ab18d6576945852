"""Pure soft-mask math: raw unit importance -> per-row mask factors in [0, 1].

No peft, no I/O: every function maps tensors to tensors, so the whole pipeline is property-tested.

The pipeline for one module (CoFiTune, after DAS):

1. optionally pool raw per-row scores into per-head scores (attention projections), grouped-query aware;
2. normalise each importance set: z-score over units, ``importance = tanh(|z| / sharpness)`` in [0, 1);
3. combine several normalised sets by element-wise max;
4. mask factor ``1 - importance``, expanded back to one factor per output row;
5. the weight diff a trained state ``D`` makes under the factors (:func:`masked_diff`).

Example:
    >>> import torch
    >>> factors = mask_factors([torch.tensor([1.0, 1.0, 9.0, 1.0])])
    >>> bool(factors[2] < factors[0])
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NORMALIZATIONS = ("abs", "positive")
# "update": W = W0 + s * D (each row's step scaled by s under any optimizer); "grad": W = W0 + D with gradient rows
# scaled by s (the paper's; under Adam nearly a no-op).
MASK_MODES = ("update", "grad")


def normalize_importance(scores: torch.Tensor, sharpness: float = 1.0, normalization: str = "abs") -> torch.Tensor:
    """Map raw scores of one module's units to importances in [0, 1].

    ``normalization="abs"`` is the paper's ``tanh(|z| / sharpness)``: units far from the mean on either side count
    as important. ``"positive"`` uses ``tanh(max(z, 0) / sharpness)``: only above-average units are protected, and
    importance is monotone in the raw score. A module whose units all score the same (std 0, or a single unit) has
    z = 0 everywhere, hence importance 0: no unit stands out, so none is protected (the authors' code gives NaN).

    Raises:
        ValueError: if a score is NaN or infinite, or an argument is out of range.

    Example:
        >>> normalize_importance(torch.tensor([2.0, 2.0, 2.0])).tolist()
        [0.0, 0.0, 0.0]
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not supported; use one of {NORMALIZATIONS}.")
    if not (sharpness > 0 and sharpness != float("inf")):
        raise ValueError(f"sharpness={sharpness!r} must be a finite number > 0 (1.0 is the paper's).")
    scores = scores.detach().to(torch.float64).flatten()
    if scores.numel() == 0:
        raise ValueError("cannot normalise an empty score vector: a module has at least one output unit.")
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"importance scores contain NaN or inf (first bad units: {bad}); recompute the importance.")
    std = scores.std(unbiased=False) if scores.numel() > 1 else scores.new_zeros(())
    # Relative threshold: float noise on a constant vector must not turn into huge z-scores.
    if std <= 1e-12 * max(scores.abs().max().item(), 1e-30):
        return torch.zeros_like(scores, dtype=torch.float32)
    z = (scores - scores.mean()) / std
    z = z.abs() if normalization == "abs" else z.clamp(min=0)
    return torch.tanh(z / sharpness).to(torch.float32)


def combine_importance(importances: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine several normalised importance sets of one module by element-wise max.

    Example:
        >>> combine_importance([torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.125])]).tolist()
        [0.5, 0.75]
    """
    if not importances:
        raise ValueError("combine_importance needs at least one importance set.")
    shapes = {tuple(t.shape) for t in importances}
    if len(shapes) != 1:
        raise ValueError(f"importance sets of one module must have the same shape; got {sorted(shapes)}.")
    return torch.stack([t.to(torch.float32) for t in importances]).amax(dim=0)


def pool_heads(
    scores: torch.Tensor, out_features: int, head_dim: int, num_query_heads: int | None = None
) -> torch.Tensor:
    """Reduce raw scores of an attention projection to one score per head of that projection.

    The projection has ``out_features // head_dim`` heads of ``head_dim`` consecutive rows (this also holds for fused
    q/k/v layouts such as GPT-2's ``c_attn``). Accepted inputs:

    - one score per row: averaged within each head;
    - one score per head of this projection: returned as is;
    - one score per *query* head for a grouped-query k/v projection (``num_query_heads`` a multiple of its head
      count): max over the query heads that share each k/v head, so a k/v head is as important as its most important
      query head.

    Where two readings fit the count, the first in this list wins.

    Example:
        >>> pool_heads(torch.tensor([1.0, 3.0, 5.0, 7.0]), out_features=4, head_dim=2).tolist()
        [2.0, 6.0]
        >>> pool_heads(torch.tensor([1.0, 4.0, 2.0, 0.0]), out_features=8, head_dim=4, num_query_heads=4).tolist()
        [4.0, 2.0]
    """
    if head_dim <= 0 or out_features % head_dim:
        raise ValueError(f"out_features={out_features} is not a multiple of head_dim={head_dim}.")
    num_heads = out_features // head_dim
    scores = scores.flatten()
    if scores.numel() == out_features:
        return scores.reshape(num_heads, head_dim).mean(dim=1)
    if scores.numel() == num_heads:
        return scores
    if num_query_heads and scores.numel() == num_query_heads and num_query_heads % num_heads == 0:
        return scores.reshape(num_heads, num_query_heads // num_heads).amax(dim=1)
    accepted = sorted({out_features, num_heads} | ({num_query_heads} if num_query_heads else set()))
    raise ValueError(
        f"got {scores.numel()} scores for a projection with {out_features} rows; expected one of {accepted}."
    )


def mask_factors(
    score_sets: Sequence[torch.Tensor],
    sharpness: float = 1.0,
    normalization: str = "abs",
    head_dim: int | None = None,
    num_query_heads: int | None = None,
    out_features: int | None = None,
    normalized: Sequence[bool] = (),
) -> torch.Tensor:
    """Full pipeline for one module: raw score sets -> one mask factor in [0, 1] per output row.

    Without ``head_dim`` each score is one unit (row); with it, scores are pooled per head first and each head's
    factor is repeated over its ``head_dim`` rows (``out_features`` is then required). ``normalized[i]`` marks a
    set that already holds importances in [0, 1] (e.g. a combination of sets): it is not normalised again.

    Example:
        >>> factors = mask_factors([torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])])
        >>> factors.tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    if not score_sets:
        raise ValueError("mask_factors needs at least one importance set.")
    if head_dim is not None:
        if out_features is None:
            raise ValueError("out_features is required when pooling scores per head.")
        score_sets = [pool_heads(s, out_features, head_dim, num_query_heads) for s in score_sets]
    normalized = list(normalized) + [False] * (len(score_sets) - len(normalized))
    importance = combine_importance(
        [
            s.float().clamp(0.0, 1.0) if done else normalize_importance(s, sharpness, normalization)
            for s, done in zip(score_sets, normalized, strict=True)
        ]
    )
    factors = (1.0 - importance).clamp_(0.0, 1.0)
    if head_dim is not None:
        factors = factors.repeat_interleave(head_dim)
    return factors


def masked_diff(delta: torch.Tensor, factors: torch.Tensor, mask_mode: str) -> torch.Tensor:
    """The weight diff ``W_tuned - W_base`` of a trained state ``D`` (``delta``, ``(rows, cols)``) under per-row mask
    factors: ``s * D`` row-wise in ``"update"`` mode, ``D`` itself in ``"grad"`` mode (there the mask acted on the
    gradients during training). The one home of this formula: layers, checkpoints and readers all use it.

    Example:
        >>> masked_diff(torch.ones(2, 3), torch.tensor([1.0, 0.5]), "update").tolist()
        [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
        >>> masked_diff(torch.ones(2, 1), torch.tensor([1.0, 0.5]), "grad").tolist()
        [[1.0], [1.0]]
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r} is not supported; use one of {MASK_MODES}.")
    if factors.shape != (delta.shape[0],):
        raise ValueError(f"{factors.numel()} mask factors do not fit a diff with {delta.shape[0]} rows.")
    return delta * factors.to(delta.dtype).unsqueeze(1) if mask_mode == "update" else delta


def delta_from_diff(diff: torch.Tensor, factors: torch.Tensor, mask_mode: str) -> torch.Tensor:
    """The trained state ``D`` that makes ``diff`` under the factors: the inverse of :func:`masked_diff`. Rows with
    factor 0 cannot move in ``"update"`` mode; their ``D`` is 0.

    Example:
        >>> delta_from_diff(torch.tensor([[1.0], [0.5], [0.0]]), torch.tensor([1.0, 0.5, 0.0]), "update").tolist()
        [[1.0], [1.0], [0.0]]
    """
    if mask_mode == "grad":
        return diff
    column = factors.to(diff.dtype).unsqueeze(1)
    return torch.where(column > 0, diff / torch.where(column > 0, column, torch.ones_like(column)), 0.0)
