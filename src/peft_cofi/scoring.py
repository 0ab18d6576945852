"""``compute_importance``: raw unit importance of any causal LM, from gradients of gates on module outputs.

For every target module (see :mod:`peft_cofi.targets`) a gate vector of ones multiplies the module's output
(:mod:`peft_cofi.gates`). Per batch the loss is backpropagated to the gates only (every parameter is frozen), the
absolute gate gradient is accumulated, and the sum is divided by the number of tokens at the end:
``score_i = sum_batches |dL_b / dg_i| / tokens``.

Methods:

- ``"kl-dropout"`` (CoFiTune, after DAS): the batch runs twice with independent dropout (default p=0.003) on the
  gated outputs; ``L = sum_tokens KL(softmax(logits_1) || softmax(logits_2))`` over non-padding positions. The
  model runs in eval mode, so its own dropout layers are off: the only noise is the injected one, as for the
  paper's Llama, which has no dropout. Masks come from a private generator seeded from ``seed`` and the batch's
  token ids, so the result depends on the data and the seed only (not on batch order or on how the data are
  sharded across ranks), and the global RNG is untouched.
- ``"loss"``: one pass, ``L`` = summed next-token cross-entropy on ``labels`` (default: the input ids with
  padding ignored); use a general (versatility) corpus.

Deviation from the authors' code: padding positions are excluded from the KL and from the token count (theirs
include them, so padding-heavy batches count more there).

Pooled attention heads: the per-head gradient is the sum of the signed per-row gate gradients of the head's rows,
taken per batch before the absolute value, so it equals what a single gate per head would get.

Under ``torch.distributed`` (when initialised) scores and token counts are summed across ranks; every rank returns
the same result. The model is left exactly as it was found (modes, ``requires_grad``, ``.grad``, no hooks), also
when an exception interrupts the pass.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, vocab_size=100))
    >>> batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    >>> importance = compute_importance(model, [batch], progress=False)
    >>> importance["model.layers.0.mlp.up_proj"].shape, importance.tokens
    (torch.Size([64]), 16)
"""

from __future__ import annotations

import itertools
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from .config import CoFiConfig
from .gates import OutputGates, frozen_model_state
from .importance import UnitImportance
from .losses import logits_kl
from .targets import ImportanceTarget, base_model_of, resolve_targets

METHODS = ("kl-dropout", "loss")
DEFAULT_DROPOUT = 0.003
IGNORE_INDEX = -100
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def compute_importance(
    model: nn.Module,
    data: Iterable[Mapping[str, object]],
    *,
    method: str = "kl-dropout",
    config: CoFiConfig | None = None,
    modules: Sequence[str] | None = None,
    head_pooling: bool | None = None,
    dropout: float | None = None,
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> UnitImportance:
    """Raw per-unit importance of the target modules of ``model`` over ``data`` (see the module docstring).

    Args:
        model: a transformers causal LM, or a ``PeftModel`` wrapping one (CoFi-wrapped: the gate sits on the CoFi
            layer's output). Its device is used for the batches.
        data: a DataLoader or any iterable of batches: mappings with ``input_ids`` (``[batch, seq]``), optional
            ``attention_mask`` (default all ones) and ``labels`` (``"loss"`` only; ``-100`` is ignored).
        method: ``"kl-dropout"`` (the paper's) or ``"loss"``.
        config: score the modules this CoFi config trains. Default: the wrapped model's CoFi config, else
            ``CoFiConfig()`` (the FFN projections of every layer).
        modules: explicit module names instead of a config.
        head_pooling: one score per attention head for attention projections; default ``config.head_pooling``.
        dropout: dropout probability on the gated outputs; default 0.003 for ``"kl-dropout"``, 0 for ``"loss"``.
        max_batches: stop after this many batches (per rank).
        seed: seed of the dropout masks.
        progress: show a tqdm progress bar (rank 0 only).

    Returns:
        A :class:`UnitImportance` of raw scores, keyed by module names relative to the base model, with ``tokens``
        and metadata (``method``, ``dropout``, ``batches``, ``seed``, ``head_pooled``, ``model``).

    Raises:
        ValueError: bad arguments, no data or no tokens, a sequence longer than the model's context, token ids
            outside the vocabulary, a non-finite loss, or scores that are zero everywhere.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
        >>> batch = {"input_ids": torch.randint(0, 50, (2, 6))}
        >>> imp = compute_importance(gpt2, [batch], method="loss", modules=["transformer.h.1.attn.c_attn"],
        ...                          progress=False)
        >>> imp["transformer.h.1.attn.c_attn"].shape  # 3 x 2 heads (q, k, v) of 8 rows each
        torch.Size([6])
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {METHODS}.")
    if dropout is None:
        dropout = DEFAULT_DROPOUT if method == "kl-dropout" else 0.0
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must lie in [0, 1).")
    if method == "kl-dropout" and dropout == 0.0:
        raise ValueError(
            "method='kl-dropout' with dropout=0 scores every unit 0: both passes are identical, so the KL and its "
            "gradient vanish. Use dropout > 0 (the paper's is 0.003) or method='loss'."
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be a positive number of batches or None.")
    base = base_model_of(model)
    targets = resolve_targets(model, config, modules, head_pooling)
    device = next(base.parameters()).device
    limits = _input_limits(base)
    sums = {t.name: torch.zeros(t.num_scores, dtype=torch.float64, device=device) for t in targets}
    tokens = batches = 0
    with frozen_model_state(base), OutputGates(targets, dropout) as gates, torch.enable_grad():
        for index, batch in enumerate(_progress(data, max_batches, progress and _rank() == 0)):
            input_ids, attention_mask, labels = _prepare_batch(batch, index, device, limits)
            batches += 1
            gates.reseed(_batch_seed(seed, input_ids, attention_mask))
            if method == "kl-dropout":
                loss, count = _kl_dropout_loss(base, input_ids, attention_mask)
            else:
                loss, count = _lm_loss(base, input_ids, attention_mask, labels)
            if count == 0:
                continue
            if not torch.isfinite(loss):
                raise ValueError(
                    f"the {method} loss of batch {index} is {loss.item()}; the model overflows on this batch "
                    "(try float32 weights) or its inputs are broken."
                )
            if not loss.requires_grad:
                raise ValueError(
                    "the loss does not depend on any target module's output: the modules are not called in the "
                    f"model's forward pass ({[t.name for t in targets][:3]}...)."
                )
            loss.backward()
            _accumulate(sums, targets, gates.grads())
            gates.zero_grad()
            tokens += count
    tokens, batches = _all_reduce(sums, tokens, batches)
    return _finish(base, targets, sums, tokens, batches, method=method, dropout=dropout, seed=seed)


def _accumulate(sums: dict[str, torch.Tensor], targets: Sequence[ImportanceTarget], grads: dict) -> None:
    for target in targets:
        grad = grads[target.name].to(torch.float64)
        if target.head_dim:
            grad = grad.view(-1, target.head_dim).sum(dim=1)  # signed sum per head, then abs: a per-head gate
        sums[target.name] += grad.abs().to(sums[target.name].device)


def _kl_dropout_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    keep = attention_mask.bool()
    count = int(keep.sum())
    if count == 0:
        return input_ids.new_zeros((), dtype=torch.float32), 0
    first = _logits(model, input_ids, attention_mask)
    second = _logits(model, input_ids, attention_mask)
    return logits_kl(first, second, keep), count


def _lm_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return input_ids.new_zeros((), dtype=torch.float32), 0
    logits = _logits(model, input_ids, attention_mask)[:, :-1][keep].float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), count


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return output.logits if hasattr(output, "logits") else output[0]


def _prepare_batch(
    batch: object, index: int, device: torch.device, limits: tuple[int | None, int | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            f"batch {index} must be a mapping with 'input_ids' (and optionally 'attention_mask', 'labels'); "
            f"got {type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}."
        )
    input_ids = _as_2d(batch["input_ids"], "input_ids", index).to(device)
    mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if mask is None else _as_2d(mask, "attention_mask", index).to(device)
    labels = batch.get("labels")
    labels = None if labels is None else _as_2d(labels, "labels", index).to(device)
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ValueError(
                f"batch {index}: {name} has shape {tuple(tensor.shape)}, input_ids {tuple(input_ids.shape)}."
            )
    context, vocab = limits
    if context is not None and input_ids.shape[1] > context:
        raise ValueError(
            f"batch {index} holds sequences of {input_ids.shape[1]} tokens, longer than the model's context of "
            f"{context}; truncate them (e.g. max_length={context})."
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or (vocab is not None and int(input_ids.max()) >= vocab)):
        raise ValueError(
            f"batch {index} holds token ids outside the model's vocabulary [0, {vocab}): use the model's tokenizer."
        )
    return input_ids, attention_mask, labels


def _as_2d(value: object, name: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.is_floating_point():
        raise ValueError(f"batch {index}: {name} must be an integer tensor [batch, seq]; got {tuple(tensor.shape)}.")
    return tensor.long()


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings``, ``n_positions``...), if stated.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> context_length(GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=32)))
        32
    """
    config = getattr(base_model_of(model), "config", None)
    return next((getattr(config, k) for k in _CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)


def _input_limits(model: nn.Module) -> tuple[int | None, int | None]:
    context = context_length(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    return context, vocab


def _batch_seed(seed: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    # A function of the seed and the batch's real tokens only (not their pad ids): the same batch gets the same
    # dropout masks wherever and whenever it runs.
    tokens = input_ids.masked_fill(attention_mask == 0, -1).detach().cpu()
    return zlib.crc32(tokens.numpy().tobytes(), zlib.crc32(f"{seed}:{tuple(tokens.shape)}".encode()))


def _progress(data: Iterable, max_batches: int | None, enabled: bool, desc: str = "importance") -> Iterable:
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        data = itertools.islice(data, max_batches)
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(data, total=total, desc=desc, unit="batch", disable=not enabled)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce(sums: dict[str, torch.Tensor], tokens: int, batches: int) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tokens, batches
    device = next(iter(sums.values())).device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    counts = torch.tensor([tokens, batches], dtype=torch.float64, device=device)
    flat = torch.cat([*(s.to(device).flatten() for s in sums.values()), counts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for name, tensor in sums.items():
        sums[name] = flat[offset : offset + tensor.numel()].view_as(tensor).to(tensor.device)
        offset += tensor.numel()
    return int(flat[-2].item()), int(flat[-1].item())


def _finish(
    model: nn.Module,
    targets: Sequence[ImportanceTarget],
    sums: dict[str, torch.Tensor],
    tokens: int,
    batches: int,
    **provenance: object,
) -> UnitImportance:
    if batches == 0:
        raise ValueError("the data yielded no batch; pass a non-empty DataLoader or iterable of batches.")
    if tokens == 0:
        raise ValueError(f"the {batches} batch(es) hold no token to score (all padding, or every label is -100).")
    scores = {name: (total / tokens).cpu() for name, total in sums.items()}
    bad = [name for name, s in scores.items() if not torch.isfinite(s).all()]
    if bad:
        raise ValueError(f"importance of {bad[:5]} is not finite; the model overflows (try float32 weights).")
    zero = [name for name, s in scores.items() if not s.any()]
    if len(zero) == len(scores):
        raise ValueError(
            "every importance score is zero: the loss does not depend on the target modules' outputs (their "
            "weights are zero, or the loss is constant). Check the model and the modules."
        )
    if zero:
        warnings.warn(
            f"{len(zero)} module(s) got zero importance for every unit, e.g. {zero[:3]}: no unit of theirs will be "
            "protected. Their outputs are zero or do not reach the loss.",
            stacklevel=3,
        )

    pooled = [t.name for t in targets if t.head_dim]
    return UnitImportance(
        scores,
        tokens=tokens,
        batches=batches,
        head_pooled=",".join(pooled),
        model=getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__,
        peft_cofi_version=__version__,
        **provenance,
    )
