"""Pure input-subspace math: second moments -> protected bases -> the projection of a trained update.

No peft, no I/O: every function maps tensors to tensors, so the whole pipeline is property-tested.

General text's inputs to a module ``x`` mostly live in a few directions. With ``C = sum_t x_t x_t^T / n`` (float64)
and ``U`` an orthonormal basis of those directions (``in_features x k``), a trained update ``D (I - U U^T)`` is
zero on ``span(U)``: the module's output on general inputs inside that span cannot change.

- :func:`top_directions` (plain): the top eigenvectors of ``C_general``.
- :func:`contrastive_directions`: directions general text uses *more than the task does*: the top generalized
  eigenvectors of ``(C_general, C_task + ridge)``, both normalised to unit trace, orthonormalised in that order.
- :class:`Projection`: ``D -> D (I - U U^T)`` as two thin matmuls; when ``k > in_features / 2`` it keeps the
  complement ``V`` instead (``D V V^T``, the same map, thinner).

Choosing ``k`` (``energy``): the energy curve ``curve[j - 1]`` is the fraction of ``trace(C_general)`` inside the
span of the first ``j`` directions; ``k`` is the smallest ``j`` with ``curve[j - 1] >= energy``. The contrastive
variant stops earlier if needed: it never takes a direction whose trace-normalised ratio is <= 1 (one the task uses
at least as much as general text), so the task's own directions stay trainable; it takes at least one. ``rank``
instead fixes ``k``. Protecting every direction (``k = in_features``) leaves nothing to train and is refused.

Example:
    >>> c = torch.diag(torch.tensor([4.0, 1.0, 0.1], dtype=torch.float64))
    >>> chosen = top_directions(c, energy=0.75)
    >>> chosen.k, chosen.basis.abs().flatten().tolist(), round(chosen.energy, 3)
    (1, [1.0, 0.0, 0.0], 0.784)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_RIDGE = 1e-3  # task covariance ridge, relative to its mean eigenvalue: C_task may be singular
# Energy slack: with energy=1.0 the directions of (numerically) zero energy are left trainable.
ENERGY_SLACK = 1e-9
ORTHONORMAL_TOLERANCE = 1e-4  # float32 bases from float64 eigenvectors are orthonormal to ~1e-7


@dataclass(frozen=True)
class Selection:
    """Protected directions of one module.

    Attributes:
        basis: ``(in_features, k)`` float32, orthonormal columns: the protected directions, most important first.
        curve: ``(in_features,)`` float32: general energy fraction in the span of the first ``j`` directions of the
            full ordering (``curve[k - 1]`` is what ``basis`` keeps).
        spectrum: ``(in_features,)`` float32, descending: plain: the eigenvalues of ``C_general / trace``;
            contrastive: the trace-normalised ratios (general over task energy) of the generalized eigenvectors.
    """

    basis: torch.Tensor
    curve: torch.Tensor
    spectrum: torch.Tensor

    @property
    def k(self) -> int:
        """How many directions are protected."""
        return int(self.basis.shape[1])

    @property
    def energy(self) -> float:
        """Fraction of the general inputs' energy inside the protected span."""
        return float(self.curve[self.k - 1])


def check_energy(energy: object) -> float:
    """``energy`` as a float in (0, 1], else a ValueError naming it.

    Example:
        >>> check_energy(1)
        1.0
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0 < energy <= 1):
        raise ValueError(f"energy={energy!r} must be a fraction in (0, 1] of the general inputs' energy.")
    return float(energy)


def check_rank(rank: object, in_features: int | None = None) -> int:
    """``rank`` as an int in [1, in_features), else a ValueError naming it.

    Example:
        >>> check_rank(3, 8)
        3
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive number of protected directions.")
    if in_features is not None and rank >= in_features:
        raise ValueError(
            f"rank={rank} protects {rank} of {in_features} input directions: at least one must stay trainable, so "
            f"rank must be < {in_features}."
        )
    return rank


def rank_for_energy(curve: torch.Tensor, energy: float) -> int:
    """The smallest ``k`` whose first ``k`` directions hold ``energy`` of the total (``curve`` is cumulative).

    Example:
        >>> rank_for_energy(torch.tensor([0.5, 0.9, 1.0]), 0.9)
        2
    """
    slack = max(ENERGY_SLACK, 4 * torch.finfo(curve.dtype).eps)  # a float32 curve carries float32 rounding
    reached = (curve.double() >= check_energy(energy) - slack).nonzero()
    return int(reached[0]) + 1 if reached.numel() else int(curve.numel())


def _symmetric(c: torch.Tensor, what: str) -> torch.Tensor:
    if c.dim() != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"{what} must be a square matrix of at least 2 x 2; got shape {tuple(c.shape)}.")
    c = c.detach().to("cpu", torch.float64)
    if not torch.isfinite(c).all():
        raise ValueError(f"{what} holds NaN or inf: the model overflows on these inputs (try float32 weights).")
    c = (c + c.T) / 2
    trace = float(c.trace())
    if not trace > 0:
        raise ValueError(f"{what} has zero energy: the module's inputs are all zero on this data.")
    return c / trace


def _choose(curve: torch.Tensor, n: int, energy: float, rank: int | None, cap: int | None = None) -> int:
    if rank is not None:
        return check_rank(rank, n)
    k = rank_for_energy(curve, energy)
    if cap is not None:
        k = max(1, min(k, cap))
    if k >= n:
        raise ValueError(
            f"energy={energy:g} needs all {n} input directions (the inputs spread evenly), which leaves nothing to "
            "train; use a lower energy or a rank."
        )
    return k


def top_directions(c_general: torch.Tensor, energy: float = 0.9, rank: int | None = None) -> Selection:
    """The top eigenvectors of the general inputs' second moment ``c_general`` (``rank`` of them, or as many as
    hold ``energy`` of its trace).

    Raises:
        ValueError: a bad ``energy`` or ``rank``, a non-finite or all-zero matrix, or a choice that protects every
            direction.

    Example:
        >>> top_directions(torch.diag(torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)), energy=1.0).k
        2
    """
    c = _symmetric(c_general, "the general inputs' second moment")
    values, vectors = torch.linalg.eigh(c)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    curve = (values.cumsum(0) / values.sum()).clamp(0, 1)
    k = _choose(curve, c.shape[0], energy, rank)
    return Selection(vectors[:, :k].float().contiguous(), curve.float(), values.float())


def contrastive_directions(
    c_general: torch.Tensor,
    c_task: torch.Tensor,
    energy: float = 0.9,
    rank: int | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Selection:
    """Directions general text uses more than the task: generalized eigenvectors of ``(C_g, C_t)`` after scaling
    both to unit trace (``C_t`` plus ``ridge`` times its mean eigenvalue), by descending ratio, orthonormalised in
    that order (QR). ``k`` as in the module docstring: by ``energy`` of the general inputs, never past a ratio <= 1.

    Raises:
        ValueError: as :func:`top_directions`, or shapes that differ.

    Example:
        >>> general = torch.diag(torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64))
        >>> task = torch.diag(torch.tensor([0.1, 4.0, 4.0], dtype=torch.float64))
        >>> contrastive_directions(general, task, energy=0.99).basis.abs().round().flatten().tolist()
        [1.0, 0.0, 0.0]
    """
    if c_general.shape != c_task.shape:
        shapes = f"{tuple(c_general.shape)} vs {tuple(c_task.shape)}"
        raise ValueError(f"the general and task second moments differ in shape: {shapes}.")
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge={ridge!r} must be a finite number > 0.")
    general = _symmetric(c_general, "the general inputs' second moment")
    task = _symmetric(c_task, "the task inputs' second moment")
    n = general.shape[0]
    task = (task + (ridge / n) * torch.eye(n, dtype=task.dtype)) / (1 + ridge)  # unit trace again
    inverse = torch.linalg.inv(torch.linalg.cholesky(task))
    ratios, vectors = torch.linalg.eigh(inverse @ general @ inverse.T)  # whitened by the task's covariance
    ratios, vectors = ratios.flip(0).clamp(min=0), (inverse.T @ vectors).flip(1)
    ordered = torch.linalg.qr(vectors).Q  # nested orthonormal spans, in the order of the ratios
    captured = (ordered * (general @ ordered)).sum(0).clamp(min=0)
    curve = (captured.cumsum(0) / captured.sum()).clamp(0, 1)
    k = _choose(curve, n, energy, rank, cap=int((ratios > 1).sum()))
    return Selection(ordered[:, :k].float().contiguous(), curve.float(), ratios.float())


def kept_energy(c: torch.Tensor, basis: torch.Tensor) -> float:
    """Fraction of ``trace(c)`` inside ``span(basis)`` (orthonormal columns).

    Example:
        >>> kept_energy(torch.diag(torch.tensor([3.0, 1.0])), torch.tensor([[1.0], [0.0]]))
        0.75
    """
    c, basis = c.double(), basis.double()
    return float((basis.T @ c @ basis).trace() / c.trace())


def check_basis(basis: object, in_features: int | None = None) -> torch.Tensor:
    """A protected basis as a float32 ``(in_features, k)`` tensor with orthonormal columns and
    ``1 <= k < in_features``, else a ValueError saying what is wrong.

    Example:
        >>> check_basis(torch.eye(3)[:, :1]).shape
        torch.Size([3, 1])
    """
    if not isinstance(basis, torch.Tensor) or not basis.is_floating_point():
        raise ValueError(f"a basis must be a float tensor (in_features x k); got {type(basis).__name__}.")
    if basis.dim() != 2:
        raise ValueError(f"a basis must be a 2-D tensor (in_features x k); got shape {tuple(basis.shape)}.")
    n, k = basis.shape
    if in_features is not None and n != in_features:
        raise ValueError(f"the basis has {n} rows but the module has {in_features} input features.")
    if k < 1:
        raise ValueError("the basis has rank 0 (no column): it protects nothing; leave the module out instead.")
    if k >= n:
        raise ValueError(f"the basis has rank {k} of {n} input features: at least one direction must stay trainable.")
    basis = basis.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(basis).all():
        raise ValueError("the basis holds NaN or inf values.")
    error = float((basis.double().T @ basis.double() - torch.eye(k, dtype=torch.float64)).abs().max())
    if error > ORTHONORMAL_TOLERANCE:
        raise ValueError(f"the basis columns are not orthonormal (|U^T U - I| up to {error:.3g}).")
    return basis


@dataclass(frozen=True)
class Projection:
    """``D -> D (I - U U^T)`` for a protected basis ``U`` (``n x k``), as two thin matmuls of width
    ``min(k, n - k)``: with ``keep`` the stored ``basis`` is the complement ``V`` and the map is ``D V V^T``.

    Example:
        >>> projection = Projection.of(torch.eye(3)[:, :1])
        >>> projection(torch.ones(2, 3)).tolist(), projection.rank
        ([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], 1)
    """

    basis: torch.Tensor
    keep: bool

    @classmethod
    def of(cls, protected: torch.Tensor) -> Projection:
        """The projection away from ``span(protected)`` (orthonormal columns), stored by its thinner side."""
        n, k = protected.shape
        if 2 * k <= n:
            return cls(protected.contiguous(), False)
        complete = torch.linalg.qr(protected.double(), mode="complete").Q
        return cls(complete[:, k:].to(protected.dtype).contiguous(), True)

    @property
    def rank(self) -> int:
        """How many directions are protected."""
        n, width = self.basis.shape
        return n - width if self.keep else width

    def to(self, device: torch.device) -> Projection:
        """The same projection with its basis on ``device``."""
        return Projection(self.basis.to(device), self.keep)

    def __call__(self, delta: torch.Tensor, basis: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
        """``delta (I - U U^T)`` (differentiable). ``basis``: the stored one as ``delta`` needs it (dtype, device,
        DTensor); ``fused``: one output buffer via ``addmm`` (not for DTensors)."""
        basis = self.basis.to(delta.dtype) if basis is None else basis
        thin = delta @ basis
        if self.keep:
            return thin @ basis.T
        return torch.addmm(delta, thin, basis.T, alpha=-1) if fused else delta - thin @ basis.T


def projector(protected: torch.Tensor) -> torch.Tensor:
    """The dense ``I - U U^T`` (``n x n``), for checks; layers use :class:`Projection`.

    Example:
        >>> projector(torch.eye(2)[:, :1]).tolist()
        [[0.0, 0.0], [0.0, 1.0]]
    """
    return torch.eye(protected.shape[0], dtype=protected.dtype) - protected @ protected.T
