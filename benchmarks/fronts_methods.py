"""The fine-tuning methods the fronts benchmark compares, each a function that makes a fresh base model trainable.

Every method trains with the same loop, data, steps and seeds (``benchmarks.tasks.train``); only which weights move,
and how, differs. Learning-rate grids are per method (a LoRA adapter needs a larger rate than a full fine-tune):
each method is run at every rate of its grid, so that fronts, not points, are compared.

A method can carry a retention anchor (:class:`Anchor`, :func:`anchored`): the benchmark then attaches
``peft_cofi.attach_retention_anchor`` on its general anchor prompts before training. An adapter method gets its base
model from ``disable_adapter()``; full fine-tuning gets a frozen copy of the base model as ``reference``. The anchored
variants in :data:`ANCHORED_METHODS` run only when named with ``--methods``; :data:`METHODS` is unchanged.

Example:
    >>> [m.name for m in METHODS][:3]
    ['full', 'lora-all', 'lora-ffn']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from peft import LoraConfig, OSFConfig, get_peft_model
from peft.helpers import KappaTuneSelector
from torch import nn

from benchmarks.fronts_subspace import VARIANTS, fraction_subspace
from peft_cofi import CoFiConfig, InputSubspace, UnitImportance

FFN = ["gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16
KAPPA_TOP_P = 0.2  # KappaTune: LoRA on the 20% of linear modules with the lowest condition number


@dataclass
class Context:
    """What the builders share: the importance of every FFN unit and the searched coarse configuration."""

    importance: UnitImportance
    searched_modules: list[str]
    searched_layers: list[int]
    kappa_targets: list[str] = field(default_factory=list)  # filled on first use (an SVD of every linear module)
    # (general batches, task batches) for the input-subspace methods, and the subspaces computed from them
    subspace_data: tuple[list, list] | None = None
    subspaces: dict[tuple[str, float], InputSubspace] = field(default_factory=dict)


@dataclass(frozen=True)
class Anchor:
    """A retention anchor a method trains with (see ``peft_cofi.attach_retention_anchor``)."""

    weight: float
    kind: str = "kl"  # "kl" or "self-answers"
    every: int = 1  # applied on one training step in `every`


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    lrs: tuple[float, ...]
    build: Callable[[nn.Module, Context], nn.Module]
    family: str  # plot colour group: "baseline", "lora", "cofi"
    anchor: Anchor | None = None  # train with a retention anchor on the benchmark's anchor prompts


def full_fine_tuning(model: nn.Module, ctx: Context) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_config(target_modules: Any) -> LoraConfig:
    """The benchmark's LoRA: rank 16, alpha 32, no dropout (also the quickstart's ``--adapter lora``)."""
    return LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=target_modules)


def lora(target_modules: Any) -> Callable[[nn.Module, Context], nn.Module]:
    def build(model: nn.Module, ctx: Context) -> nn.Module:
        return get_peft_model(model, lora_config(target_modules))

    return build


def kappatune_lora(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.kappa_targets:
        selector = KappaTuneSelector(model, show_progress=False)
        ctx.kappa_targets = [name for name in selector.get_best_targets(top_p=KAPPA_TOP_P) if "lm_head" not in name]
    return lora(list(ctx.kappa_targets))(model, ctx)


def osf(model: nn.Module, ctx: Context) -> nn.Module:
    # OSF freezes the top half of each weight's singular directions and trains the rest (peft's default rank).
    return get_peft_model(model, OSFConfig(target_modules=FFN))


def cofi_settings(ctx: Context, mask_mode: str | None, sharpness: float, searched: bool) -> dict[str, Any]:
    """``CoFiConfig`` arguments: the paper's coarse pick (FFN up/down in ``bottom2``) or the searched one, and
    the unit mask if any."""
    settings: dict[str, Any] = {"layers_to_transform": "bottom2"}
    if searched:
        settings = {"target_modules": ctx.searched_modules, "layers_to_transform": ctx.searched_layers}
    if mask_mode is not None:
        settings |= {"importance": ctx.importance, "mask_mode": mask_mode, "mask_sharpness": sharpness}
    return settings


def cofi(mask_mode: str | None = None, sharpness: float = 1.0, searched: bool = False):
    """CoFi on the paper's coarse pick or the searched one, with or without a mask."""

    def build(model: nn.Module, ctx: Context) -> nn.Module:
        return get_peft_model(model, CoFiConfig(**cofi_settings(ctx, mask_mode, sharpness, searched)))

    return build


def cofi_subspace(variant: str, fraction: float) -> Callable[[nn.Module, Context], nn.Module]:
    """CoFi (update mask, t=1) trained with ``CoFiConfig(input_subspace=...)``: its update kept out of a ``fraction``
    of each module's input directions, those general text uses most (``plain``) or uses more than the task does
    (``contrastive``); see fronts_subspace."""

    def build(model: nn.Module, ctx: Context) -> nn.Module:
        settings = cofi_settings(ctx, "update", 1.0, searched=False)
        if (variant, fraction) not in ctx.subspaces:  # computed once, on the bare base model
            general, task = ctx.subspace_data
            ctx.subspaces[variant, fraction] = fraction_subspace(
                model, CoFiConfig(**settings), general, task, variant, fraction
            )
        return get_peft_model(model, CoFiConfig(**settings, input_subspace=ctx.subspaces[variant, fraction]))

    return build


FULL_LRS = (3e-6, 1e-5, 3e-5, 1e-4)
LORA_LRS = (1e-4, 3e-4, 1e-3)
COFI_LRS = (3e-5, 1e-4, 3e-4)

METHODS: list[Method] = [
    Method("full", "full fine-tuning", FULL_LRS, full_fine_tuning, "baseline"),
    Method("lora-all", f"LoRA r{LORA_RANK}, all linear", LORA_LRS, lora("all-linear"), "lora"),
    Method("lora-ffn", f"LoRA r{LORA_RANK}, FFN only", LORA_LRS, lora(FFN), "lora"),
    Method("kappatune", f"KappaTune LoRA r{LORA_RANK} (top {KAPPA_TOP_P:.0%})", LORA_LRS, kappatune_lora, "lora"),
    Method("osf", "OSF (FFN, half rank)", (1e-5, 3e-5, 1e-4), osf, "baseline"),
    Method("cofi-coarse", "CoFi coarse (bottom2 up/down), no mask", COFI_LRS, cofi(), "cofi"),
    Method("cofi-grad", "CoFi + paper gradient mask", COFI_LRS, cofi("grad"), "cofi"),
    Method("cofi-update-0.5", "CoFi + update mask, t=0.5", COFI_LRS, cofi("update", 0.5), "cofi"),
    Method("cofi-update-1", "CoFi + update mask, t=1", COFI_LRS, cofi("update", 1.0), "cofi"),
    Method("cofi-searched", "CoFi searched coarse + update mask, t=1", COFI_LRS, cofi("update", 1.0, True), "cofi"),
]


def anchored(method: Method, weight: float, kind: str = "kl", every: int = 1) -> Method:
    """``method`` trained with a retention anchor; its name and label say which (cached runs are kept by name).

    Example:
        >>> anchored(METHODS[0], 1.0).name
        'full+anchor-kl-1'
    """
    suffix = f"+anchor-{kind}-{weight:g}" + (f"-every{every}" if every > 1 else "")
    label = f"{method.label} + anchor ({kind}, weight {weight:g}" + (f", 1 step in {every})" if every > 1 else ")")
    return replace(method, name=method.name + suffix, label=label, anchor=Anchor(weight, kind, every))


# Run only when named with --methods: the anchor on full fine-tuning, LoRA and CoFi at weights 1, 3, 10 and 30.
ANCHOR_WEIGHT_GRID = (1.0, 3.0, 10.0, 30.0)  # examples/common.ANCHOR_WEIGHT: the one recommended
ANCHORED_METHODS: list[Method] = [
    anchored(method, weight)
    for weight in ANCHOR_WEIGHT_GRID
    for method in METHODS
    if method.name in ("full", "lora-ffn", "cofi-update-1")
]
# Run only when named: the input-subspace experiment (issue 15), CoFi's update projected away from general inputs.
SUBSPACE_FRACTIONS = (0.1, 0.3, 0.6)
SUBSPACE_METHODS: list[Method] = [
    Method(
        f"cofi-subspace-{variant}-{fraction:g}",
        f"CoFi + update mask + {variant} input subspace ({fraction:.0%} of input directions)",
        COFI_LRS,
        cofi_subspace(variant, fraction),
        "cofi",
    )
    for variant in VARIANTS
    for fraction in SUBSPACE_FRACTIONS
]
ALL_METHODS = METHODS + ANCHORED_METHODS + SUBSPACE_METHODS
