"""``compute_input_subspace``: the input directions of each target module that general text uses most.

For every target module (resolved as for unit importance, :mod:`peft_cofi.targets`: the modules a CoFi config
trains, or explicit names) a forward pre-hook accumulates the inputs' second moment ``sum_t x_t x_t^T`` in float64
over the non-padding tokens of each batch; divided by the token count it is ``C``. Per module the protected basis
is then chosen by :mod:`peft_cofi.subspace_math` (plain: top eigenvectors of ``C_general``; with ``contrast``: the
directions general text uses more than the task does).

The model runs in eval mode without gradients (its own dropout is off), as it is: a CoFi-wrapped model's inputs
come through its current adapters. Under ``torch.distributed`` (when initialised) the sums and token counts are
summed across ranks, so every rank returns the same subspace. The model is left exactly as found (modes,
``requires_grad``, ``.grad``, no hooks), also when an exception interrupts the pass.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, vocab_size=100))
    >>> batch = {"input_ids": torch.randint(0, 100, (2, 8))}
    >>> subspace = compute_input_subspace(model, [batch], energy=0.5, progress=False)
    >>> subspace["model.layers.0.mlp.up_proj"].shape[0], subspace.tokens
    (32, 16)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ._version import __version__
from .config import CoFiConfig
from .distributed import weight_shape
from .gates import frozen_model_state
from .layer import CoFiLayer
from .scoring import _all_reduce, _input_limits, _prepare_batch, _progress, _rank
from .subspace import InputSubspace
from .subspace_math import DEFAULT_RIDGE, check_energy, check_rank, contrastive_directions, top_directions
from .targets import ImportanceTarget, base_model_of, resolve_targets


def compute_input_subspace(
    model: nn.Module,
    data: Iterable[Mapping[str, object]],
    *,
    config: CoFiConfig | None = None,
    modules: Sequence[str] | None = None,
    energy: float = 0.9,
    rank: int | None = None,
    contrast: Iterable[Mapping[str, object]] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> InputSubspace:
    """The protected input basis of every target module of ``model`` (see the module docstring).

    Args:
        model: a transformers causal LM, or a ``PeftModel`` wrapping one. Its device is used for the batches.
        data: general text: a DataLoader or any iterable of batches with ``input_ids`` and optional
            ``attention_mask`` (positions where it is 0 are left out).
        config: the modules this CoFi config trains. Default: the wrapped model's CoFi config, else ``CoFiConfig()``
            (the FFN projections of every layer).
        modules: explicit module names instead of a config.
        energy: per module, protect the fewest directions that hold this fraction of the general inputs' energy, in
            (0, 1]; with ``contrast``, never a direction the task uses at least as much (see
            :mod:`peft_cofi.subspace_math`). Ignored with ``rank``.
        rank: protect exactly this many directions per module (``1 <= rank < in_features``).
        contrast: task batches (same form as ``data``): protect the directions general text uses more than these.
        max_batches: stop after this many batches of each data source (per rank).
        progress: show tqdm progress bars (rank 0 only).

    Returns:
        An :class:`~peft_cofi.InputSubspace` keyed by module names relative to the base model, with energy curves,
        spectra, ``tokens`` and provenance (``kind``, ``energy``, ``rank``, ``batches``, ``task_tokens``, ``model``).

    Raises:
        ValueError: bad arguments, no data or no tokens, a sequence longer than the model's context, token ids
            outside the vocabulary, inputs that are not finite or all zero, or a choice that would protect every
            direction of a module (the module is named).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
        >>> general = [{"input_ids": torch.randint(0, 25, (2, 6))}]
        >>> task = [{"input_ids": torch.randint(25, 50, (2, 6))}]
        >>> sub = compute_input_subspace(gpt2, general, modules=["transformer.h.0.mlp.c_fc"], rank=3, contrast=task,
        ...                              progress=False)
        >>> sub["transformer.h.0.mlp.c_fc"].shape, sub.metadata["kind"]
        (torch.Size([16, 3]), 'contrast')
    """
    energy = check_energy(energy)
    if rank is not None:
        check_rank(rank)
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches={max_batches!r} must be a positive number of batches or None.")
    base = base_model_of(model)
    targets = resolve_targets(model, config, modules, head_pooling=False)
    widths = {t.name: input_features(t.module) for t in targets}
    too_narrow = [f"{name} ({width} inputs)" for name, width in widths.items() if rank is not None and rank >= width]
    if too_narrow:
        raise ValueError(f"rank={rank} would protect every input direction of {too_narrow[:5]}; use a smaller rank.")
    general, tokens, batches = _moments(base, targets, widths, data, max_batches, progress, "subspace: general")
    task = None
    if contrast is not None:
        task, task_tokens, task_batches = _moments(
            base, targets, widths, contrast, max_batches, progress, "subspace: task"
        )
    bases, curves, spectra = {}, {}, {}
    for name in widths:
        try:
            if task is None:
                chosen = top_directions(general[name] / tokens, energy, rank)
            else:
                chosen = contrastive_directions(general[name] / tokens, task[name] / task_tokens, energy, rank)
        except ValueError as error:
            raise ValueError(f"input subspace of module {name!r}: {error}") from error
        bases[name], curves[name], spectra[name] = chosen.basis, chosen.curve, chosen.spectrum
    extra = {} if task is None else {"task_tokens": task_tokens, "task_batches": task_batches, "ridge": DEFAULT_RIDGE}
    return InputSubspace(
        bases,
        curves=curves,
        spectra=spectra,
        tokens=tokens,
        kind="plain" if task is None else "contrast",
        energy="" if rank is not None else energy,
        rank="" if rank is None else rank,
        batches=batches,
        model=getattr(getattr(base, "config", None), "name_or_path", "") or type(base).__name__,
        peft_cofi_version=__version__,
        **extra,
    )


def input_features(module: nn.Module) -> int:
    """The input width of a target: an ``nn.Linear``, a transformers ``Conv1D`` or a CoFi layer wrapping one.

    Example:
        >>> input_features(nn.Linear(3, 5))
        3
    """
    if isinstance(module, CoFiLayer):
        return module.in_features
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    shape = weight_shape(base.weight)
    return int(shape[1] if isinstance(base, nn.Linear) else shape[0])  # Conv1D stores (in, out)


def _moments(
    model: nn.Module,
    targets: Sequence[ImportanceTarget],
    widths: dict[str, int],
    data: Iterable[Mapping[str, object]],
    max_batches: int | None,
    progress: bool,
    desc: str,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Per module ``sum_t x_t x_t^T`` (float64, summed across ranks), the token and the batch count."""
    device = next(model.parameters()).device
    # float64 where the model runs, unless that device has none (Apple's MPS): then on the CPU.
    home = device if device.type != "mps" else torch.device("cpu")
    sums = {name: torch.zeros(width, width, dtype=torch.float64, device=home) for name, width in widths.items()}
    limits = _input_limits(model)
    keep: list[torch.Tensor | None] = [None]
    tokens = batches = 0
    handles = []
    try:
        for target in targets:
            handles.append(target.module.register_forward_pre_hook(_accumulate(target.name, sums, keep)))
        with frozen_model_state(model), torch.no_grad():
            for index, batch in enumerate(_progress(data, max_batches, progress and _rank() == 0, desc)):
                input_ids, attention_mask, _ = _prepare_batch(batch, index, device, limits)
                batches += 1
                keep[0] = attention_mask.bool()
                count = int(keep[0].sum())
                if count:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    tokens += count
    finally:
        for handle in handles:
            handle.remove()
    tokens, batches = _all_reduce(sums, tokens, batches)
    if batches == 0:
        raise ValueError(f"the {desc.removeprefix('subspace: ')} data yielded no batch; pass a non-empty iterable.")
    if tokens == 0:
        raise ValueError(f"the {batches} {desc.removeprefix('subspace: ')} batch(es) hold no token (all padding).")
    return {name: total.cpu() for name, total in sums.items()}, tokens, batches


def _accumulate(name: str, sums: dict[str, torch.Tensor], keep: list[torch.Tensor | None]) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        mask = keep[0]
        width = sums[name].shape[0]
        if not isinstance(x, torch.Tensor) or x.shape[-1] != width or mask is None or x.shape[:-1] != mask.shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"cannot read the inputs of module {name!r}: expected a [batch, seq, {width}] tensor, got {shape}."
            )
        rows = x.detach()[mask].to(sums[name].device, torch.float64)  # padding positions left out
        sums[name].addmm_(rows.T, rows)  # float64 is never autocast

    return hook
