"""The retention anchor's checks and data (:mod:`peft_cofi.anchor`): the settings, the model and its reference, the
general-prompt batches (each checked before anything changes), their shard per distributed rank, and the base model's
own answers for ``kind="self-answers"`` (generated once, cached to a file).

Example:
    >>> batch = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    >>> batches = check_anchor_data([batch], max_cached=None, vocabulary=10, context=8)
    >>> batches[0]["attention_mask"].tolist()
    [[1, 1, 0]]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import collate
from .evaluation import IGNORE_INDEX, Batch

KINDS = ("kl", "self-answers")
ANSWERS_FORMAT = "peft-cofi anchor answers"
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model: nn.Module) -> int | None:
    """The longest input the model's config allows (``max_position_embeddings`` or its GPT-2 style equivalents).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> context_length(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=24)))
        24
    """
    config = getattr(model, "config", None)
    for field in _CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_settings(
    weight: float, kind: str, every: int, max_cached: int | None, max_new_tokens: int, answers_file: object
) -> None:
    """Raise ``ValueError`` naming the first bad setting of :func:`peft_cofi.attach_retention_anchor`.

    Example:
        >>> check_settings(-1.0, "kl", 1, None, 32, None)
        Traceback (most recent call last):
        ...
        ValueError: weight=-1.0 must be a finite number >= 0 (0 measures the anchor without applying it).
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight={weight!r} must be a finite number >= 0 (0 measures the anchor without applying it).")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {list(KINDS)}.")
    for name, value in (("every", every), ("max_new_tokens", max_new_tokens), ("max_cached", max_cached)):
        if not (name == "max_cached" and value is None) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}={value!r} must be a whole number >= 1.")
    if answers_file is not None and kind != "self-answers":
        raise ValueError(f"answers_file is for kind='self-answers' (the cached base answers); kind={kind!r} has none.")


def check_reference(module: nn.Module, reference: nn.Module | None) -> None:
    """The base model must be reachable: an adapter to disable, or a separate frozen ``reference`` of the same
    vocabulary (sharing no weight with ``module``, or it would move with it).

    Example:
        >>> check_reference(nn.Linear(2, 2), None)
        Traceback (most recent call last):
        ...
        TypeError: Linear has no adapter to disable, so the anchor has no base model to compare with: wrap it with \
peft (get_peft_model), or pass reference=<a frozen copy of the base model> (for full fine-tuning: \
copy.deepcopy(model) before training).
    """
    if reference is None:
        if not hasattr(module, "disable_adapter"):
            raise TypeError(
                f"{type(module).__name__} has no adapter to disable, so the anchor has no base model to compare "
                "with: wrap it with peft (get_peft_model), or pass reference=<a frozen copy of the base model> "
                "(for full fine-tuning: copy.deepcopy(model) before training)."
            )
        return
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be a torch model (a frozen copy of the base); got {type(reference).__name__}.")
    if {p.data_ptr() for p in module.parameters()} & {p.data_ptr() for p in reference.parameters()}:
        raise ValueError(
            "reference shares weights with the model being trained, so it would move with it; pass a separate "
            "frozen copy (copy.deepcopy(model) before training, or load the base model again)."
        )
    ours, theirs = vocabulary_size(module), vocabulary_size(reference)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"reference has a vocabulary of {theirs} tokens, the model {ours}; pass the model's own base.")


def check_answer_room(batches: list[dict[str, torch.Tensor]], max_new_tokens: int, context: int | None) -> None:
    """``kind="self-answers"``: the longest prompt plus ``max_new_tokens`` must fit the model's context.

    Example:
        >>> check_answer_room([{"attention_mask": torch.ones(1, 6)}], max_new_tokens=4, context=10)
    """
    widest = max(int(batch["attention_mask"].sum(1).max()) for batch in batches)
    if context is not None and widest + max_new_tokens > context:
        raise ValueError(
            f"the longest anchor prompt ({widest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {context} tokens; lower max_new_tokens or shorten the prompts."
        )


def vocabulary_size(model: nn.Module) -> int | None:
    """The number of token ids the model embeds (its input embeddings, else ``config.vocab_size``).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> vocabulary_size(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40)))
        40
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def pad_id(model: nn.Module) -> int:
    """The id to pad generated answers with: the config's pad token, else its end-of-sequence token, else 0.

    Example:
        >>> pad_id(nn.Linear(2, 2))
        0
    """
    config = getattr(model, "config", None)
    for value in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP / DataParallel / DeepSpeed wrapper or a ``torch.compile`` module holds (and calls).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(layer)) is layer
        True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ == "DeepSpeedEngine"
        ):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def base_fingerprint(module: nn.Module, reference: nn.Module | None) -> str:
    """:func:`weights_fingerprint` of the base model: the reference's weights, or the model's without its adapter.

    Example:
        fingerprint = base_fingerprint(peft_model, None)   # unchanged by training the adapter
    """
    if reference is not None:
        return weights_fingerprint(reference)
    prefix = getattr(getattr(module, "base_model", None), "prefix", None)
    return weights_fingerprint(module, skip=(prefix, "modules_to_save") if prefix else ())


def check_anchor_data(
    data: Iterable[Batch], max_cached: int | None, vocabulary: int | None, context: int | None
) -> list[dict[str, torch.Tensor]]:
    """The anchor batches as CPU ``input_ids`` / ``attention_mask`` tensors, each checked: a 2-D integer batch with
    at least one non-padding token, ids inside the vocabulary, no wider than the model's context.

    Raises:
        TypeError / ValueError: what is wrong with which batch, and how to fix it.

    Example:
        check_anchor_data(loader, max_cached=64, vocabulary=49152, context=8192)
    """
    if data is None or isinstance(data, (Mapping, str, torch.Tensor)):
        raise TypeError(
            f"the anchor data must be a list (or loader) of batch dicts with 'input_ids'; got {type(data).__name__}. "
            "Wrap a single batch in a list."
        )
    raw = list(data if max_cached is None else itertools.islice(data, max_cached))
    if not raw:
        raise ValueError(
            "the anchor data is empty; pass at least one batch of general prompts (a dict with 'input_ids')."
        )
    out = []
    for index, batch in enumerate(raw):
        where = f"anchor batch {index}"
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(
                f"{where} must be a dict with 'input_ids' (as peft_cofi.data.collate builds); got {batch!r:.80}"
            )
        ids = torch.as_tensor(batch["input_ids"])
        if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.numel() == 0:
            raise ValueError(
                f"{where}: input_ids must be a non-empty 2-D integer tensor (batch, sequence); got "
                f"{ids.dtype} of shape {tuple(ids.shape)}."
            )
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"{where}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}.")
        if not mask.any():
            raise ValueError(
                f"{where} is all padding (attention_mask is 0 everywhere), so it has no prompt to anchor on; drop it "
                "or check how the prompts were tokenised."
            )
        if vocabulary is not None and (ids.min() < 0 or ids.max() >= vocabulary):
            bad = int(ids.max()) if ids.max() >= vocabulary else int(ids.min())
            raise ValueError(
                f"{where} holds token id {bad}, outside the model's vocabulary of {vocabulary}; "
                "tokenise the prompts with the model's own tokenizer (and pad with a valid id)."
            )
        if context is not None and ids.shape[1] > context:
            raise ValueError(
                f"{where} is {ids.shape[1]} tokens wide, longer than the model's context of {context} tokens; "
                f"truncate the prompts (e.g. collate(..., max_length={context})) or drop the long ones."
            )
        out.append({"input_ids": ids.long().cpu(), "attention_mask": mask.long().cpu()})
    return out


def distributed_shard(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """This rank's batches ``rank::world_size`` under ``torch.distributed`` (all of them otherwise).

    Example:
        >>> len(distributed_shard([{}, {}, {}]))
        3
    """
    rank, world = _rank_and_world()
    if world == 1:
        return batches
    if len(batches) < world:
        raise ValueError(
            f"the anchor data has {len(batches)} batch(es) for {world} processes; each process draws its own shard "
            f"(batches rank::{world}), so pass at least {world} batches."
        )
    return batches[rank::world]


def answer_batches(
    base: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    max_new_tokens: int,
    answers_file: str | os.PathLike[str] | None,
    progress: bool,
    pad_id: int,
    fingerprint: str,
) -> list[dict[str, torch.Tensor]]:
    """The prompts followed by ``base``'s greedy answers, labelled on the answers only, batched as the prompts were.

    ``base`` must already be the base view (adapter disabled, or the reference model) in eval mode. With
    ``answers_file`` the answers are read from it when it was written for the same prompts, ``max_new_tokens`` and
    base weights (``fingerprint``), else generated (one prompt at a time, with a progress bar) and written to it.
    Under ``torch.distributed`` each rank caches its own shard in ``<stem>.rank<r>-of-<world><suffix>``.

    Example:
        batches = answer_batches(base, prompt_batches, 32, "out/anchor_answers.json", True, pad_id=0, fingerprint=f)
    """
    prompts = [
        row[mask.bool()].tolist()
        for batch in batches
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    key = hashlib.blake2b(json.dumps([prompts, max_new_tokens, fingerprint]).encode(), digest_size=16).hexdigest()
    path = _rank_path(Path(answers_file)) if answers_file is not None else None
    answers = _read_answers(path, key) if path is not None else None
    if answers is None:
        device = next(base.parameters()).device
        answers = []
        for prompt in tqdm(prompts, desc="anchor: base model's answers", disable=not progress):
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():
                out = base.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            answers.append(out[0, len(prompt) :].tolist())
        if path is not None:
            _write_answers(path, key, answers)
    examples = iter(
        {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
        for prompt, answer in zip(prompts, answers, strict=True)
    )
    out = []
    for batch in batches:
        rows = [next(examples) for _ in range(batch["input_ids"].shape[0])]
        out.append(collate(rows, pad_id))
    return out


def weights_fingerprint(model: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """A cheap hash of ``model``'s weights (names, shapes and up to 256 evenly spaced values of each), leaving out
    parameters whose names contain any of ``skip`` (an adapter's own parameters).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> weights_fingerprint(layer) == weights_fingerprint(layer) != weights_fingerprint(layer, skip=("bias",))
        True
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, parameter in model.named_parameters():
        if any(part in name for part in skip):
            continue
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        digest.update(f"{name}:{tuple(parameter.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _rank_path(path: Path) -> Path:
    if path.is_dir():
        raise ValueError(
            f"answers_file {str(path)!r} is a directory; pass a file path such as {str(path / 'answers.json')!r}."
        )
    rank, world = _rank_and_world()
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def _read_answers(path: Path, key: str) -> list[list[int]] | None:
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") == ANSWERS_FORMAT and document.get("key") == key:
            return [list(map(int, answer)) for answer in document["answers"]]
        reason = "was made for other prompts, max_new_tokens or base weights"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = f"could not be read ({error})"
    warnings.warn(f"anchor answers file {str(path)!r} {reason}; generating the answers again.", stacklevel=4)
    return None


def _write_answers(path: Path, key: str, answers: list[list[int]]) -> None:
    """Atomic write: a temporary file in the same folder, then a rename (a crash leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"format": ANSWERS_FORMAT, "key": key, "answers": answers}), encoding="utf-8")
    os.replace(temporary, path)
