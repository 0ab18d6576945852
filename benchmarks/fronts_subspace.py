"""Input-subspace protection in the fronts benchmark (issue 15), through the package's own API.

Per trained module, ``peft_cofi.compute_input_subspace`` protects a fixed ``fraction`` of its input directions:
those general text (the importance text, disjoint from every evaluation set) uses most (``"plain"``), or uses more
than the training data does (``"contrastive"``, its ``contrast=`` argument). CoFi then trains
``CoFiConfig(input_subspace=...)``: ``W0 + (s * D)(I - U U^T)``. A fixed fraction rather than an energy keeps the
sweep comparable across modules; ``rank`` is one number per call, so modules are grouped by input width.

Example:
    >>> [protected_rank(width, 0.3) for width in (576, 1536, 2)]
    [173, 461, 1]
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from peft_cofi import CoFiConfig, InputSubspace, compute_input_subspace
from peft_cofi.subspace_compute import input_features
from peft_cofi.targets import resolve_targets

VARIANTS = ("plain", "contrastive")


def protected_rank(width: int, fraction: float) -> int:
    """How many of ``width`` input directions a ``fraction`` protects (at least one, never all)."""
    return max(1, min(width - 1, round(fraction * width)))


def fraction_subspace(
    model: nn.Module, config: CoFiConfig, general: list, task: list, variant: str, fraction: float
) -> InputSubspace:
    """The ``variant`` subspace of every module ``config`` trains, ``fraction`` of each module's input directions."""
    by_width: dict[int, list[str]] = defaultdict(list)
    for target in resolve_targets(model, config, head_pooling=False):
        by_width[input_features(target.module)].append(target.name)
    contrast = task if variant == "contrastive" else None
    parts = [
        compute_input_subspace(
            model, general, modules=names, rank=protected_rank(width, fraction), contrast=contrast, progress=False
        )
        for width, names in by_width.items()
    ]
    return InputSubspace(
        {name: basis for part in parts for name, basis in part.bases.items()},
        curves={name: curve for part in parts for name, curve in part.curves.items()},
        spectra={name: spectrum for part in parts for name, spectrum in part.spectra.items()},
        tokens=parts[0].tokens,
        **{**parts[0].metadata, "rank": f"{fraction:g} of each module's inputs"},
    )
