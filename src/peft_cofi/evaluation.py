"""Speciality and versatility measures of a causal LM over batches: held-out loss, exact match, forgetting.

Every function takes ``(model, batches)``: ``batches`` is an iterable of dicts with ``input_ids`` and optionally
``attention_mask`` and ``labels`` (``-100`` labels are ignored; without ``labels`` every non-padding token is a
label), as :func:`peft_cofi.data.collate` builds them. Functions run without gradients in eval mode and restore the
model's train/eval mode afterwards. Losses are token-weighted means (a batch with more label tokens counts more).

Versatility is measured against the base model: its outputs come from ``model.disable_adapter()`` (exact for CoFi)
or from an explicit ``reference`` model. Two measures:

- *cross-entropy increase* ``ΔCE = CE_tuned - CE_base`` on a general corpus (peft's forgetting convention);
- *KL to the base model* ``KL(p_base || p_tuned)`` per non-padding position, averaged over positions.

Both are mapped to a *retention* in (0, 1] (1 = nothing forgotten): ``exp(-ΔCE)`` is the ratio of the tuned to
the base model's per-token likelihood (perplexity ratio), ``exp(-KL)`` the analogue for KL. The evaluator
factories (:func:`loss_evaluator`, :func:`exact_match_evaluator`, :func:`retention_evaluator`) bind batches to
these functions for :func:`peft_cofi.search.search_modules`: each returns a dict with ``"score"`` (higher is
better) and the raw metrics, and carries a ``fingerprint`` of its batches so that search results are cached per
evaluation set.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                      num_attention_heads=2, vocab_size=50))
    >>> batch = {"input_ids": torch.randint(0, 50, (2, 6))}
    >>> round(kl_to_base(model, [batch], reference=model), 6)
    0.0
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
Batch = Mapping[str, torch.Tensor]
# An evaluator maps a (CoFi-wrapped) model to a score, higher is better, or to a dict with "score" and more metrics.
Evaluator = Callable[[nn.Module], float | Mapping[str, float]]


def model_inputs(batch: Batch, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of a batch on ``device``, with the defaults filled in.

    Missing ``attention_mask``: all ones. Missing ``labels``: the input ids, ``-100`` where the mask is 0.

    Example:
        >>> model_inputs({"input_ids": torch.tensor([[4, 5]])})["labels"].tolist()
        [[4, 5]]
    """
    if "input_ids" not in batch:
        raise ValueError(f"a batch needs 'input_ids'; got keys {sorted(batch)}.")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, sequence); got shape {tuple(input_ids.shape)}.")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask)
    labels = batch.get("labels")
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else torch.as_tensor(labels)
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {key: value.to(device) for key, value in out.items()} if device is not None else out


def mean_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Token-weighted mean next-token cross-entropy on the label tokens (e.g. a held-out speciality set).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=50))
        >>> mean_loss(model, [{"input_ids": torch.randint(0, 50, (2, 6))}]) > 0
        True
    """
    return loss_and_exact_match(model, batches)[0]


def exact_match(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of examples whose every label token is the model's top prediction (teacher forcing).

    This equals greedy-decoding exact match of the labelled answer: greedy decoding reproduces the answer token by
    token exactly when every teacher-forced argmax is right (an answer ending in an end-of-turn token also checks
    that decoding stops there). Examples without label tokens are not counted.

    Example:
        exact_match(model, eval_batches)
        0.42
    """
    return loss_and_exact_match(model, batches)[1]


def loss_and_exact_match(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, float]:
    """:func:`mean_loss` and :func:`exact_match` from one forward pass per batch.

    Raises:
        ValueError: if the batches hold no label token.

    Example:
        loss, accuracy = loss_and_exact_match(model, eval_batches)
    """
    total, tokens, correct, examples = 0.0, 0, 0, 0
    with _evaluating(model):
        for batch in batches:
            inputs = model_inputs(batch, _device(model))
            logits, labels = _shifted(model, inputs)
            valid = labels != IGNORE_INDEX
            if not valid.any():
                continue
            losses = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            total += float(losses[valid].sum())
            tokens += int(valid.sum())
            hits = (logits.argmax(-1) == labels) | ~valid
            has_labels = valid.any(-1)
            correct += int((hits.all(-1) & has_labels).sum())
            examples += int(has_labels.sum())
    if tokens == 0:
        raise ValueError("the batches hold no label token (every label is -100), so no loss can be measured.")
    return total / tokens, correct / examples


def cross_entropy_increase(model: nn.Module, batches: Iterable[Batch], reference: nn.Module | None = None) -> float:
    """``CE_tuned - CE_base`` on a general corpus: how much worse the model predicts general text than its base.

    Example:
        cross_entropy_increase(peft_model, general_batches)
        0.013
    """
    return versatility_metrics(model, batches, reference)["ce_increase"]


def kl_to_base(model: nn.Module, batches: Iterable[Batch], reference: nn.Module | None = None) -> float:
    """Mean over non-padding positions of ``KL(p_base || p_tuned)`` of the next-token distributions.

    Example:
        kl_to_base(peft_model, prompt_batches)
        0.004
    """
    return versatility_metrics(model, batches, reference)["kl"]


def versatility_metrics(
    model: nn.Module, batches: Iterable[Batch], reference: nn.Module | None = None
) -> dict[str, float]:
    """Forgetting on general batches from one tuned and one base forward pass per batch.

    Returns ``loss`` and ``base_loss`` (token-weighted CE on the labels), ``ce_increase``, ``kl`` (see
    :func:`kl_to_base`), ``retention_ce = exp(-ce_increase)`` and ``retention_kl = exp(-kl)``.

    Args:
        model: the tuned model; without ``reference`` it must offer ``disable_adapter()`` (a peft model).
        batches: general-text batches.
        reference: a separate base model to compare with instead of the disabled adapter.

    Example:
        metrics = versatility_metrics(peft_model, general_batches)
        sorted(metrics)
        ['base_loss', 'ce_increase', 'kl', 'loss', 'retention_ce', 'retention_kl']
    """
    if reference is None and not hasattr(model, "disable_adapter"):
        raise TypeError(
            f"{type(model).__name__} has no disable_adapter(); pass reference=<the base model> to compare with."
        )
    loss = base_loss = kl = 0.0
    tokens = positions = 0
    with _evaluating(model), _evaluating(reference) if reference is not None else contextlib.nullcontext():
        for batch in batches:
            inputs = model_inputs(batch, _device(model))
            logits, labels = _shifted(model, inputs)
            with _base_view(model, reference) as base:
                base_logits, _ = _shifted(base, inputs)
            valid = labels != IGNORE_INDEX
            loss += _ce_sum(logits, labels, valid)
            base_loss += _ce_sum(base_logits, labels, valid)
            tokens += int(valid.sum())
            present = inputs["attention_mask"][:, :-1].bool()
            log_p = F.log_softmax(logits, -1)
            log_base = F.log_softmax(base_logits, -1)
            per_position = F.kl_div(log_p, log_base, log_target=True, reduction="none").sum(-1)
            kl += float(per_position[present].sum())
            positions += int(present.sum())
    if tokens == 0 or positions == 0:
        raise ValueError("the general batches hold no label token, so forgetting cannot be measured.")
    out = {"loss": loss / tokens, "base_loss": base_loss / tokens, "kl": max(kl / positions, 0.0)}
    out["ce_increase"] = out["loss"] - out["base_loss"]
    out["retention_ce"] = math.exp(-out["ce_increase"])
    out["retention_kl"] = math.exp(-out["kl"])
    return out


def fingerprint_batches(batches: Iterable[Batch]) -> str:
    """A short hash of the batches' tensors (keys, shapes, values): equal data give equal fingerprints.

    Example:
        >>> a = [{"input_ids": torch.tensor([[1, 2]])}]
        >>> fingerprint_batches(a) == fingerprint_batches([{"input_ids": torch.tensor([[1, 2]])}])
        True
    """
    digest = hashlib.blake2b(digest_size=12)
    for batch in batches:
        for key in sorted(batch):
            value = torch.as_tensor(batch[key]).detach().cpu().contiguous()
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BatchEvaluator:
    """An evaluator bound to fixed batches: ``evaluator(model)`` returns ``{"score": ..., <metrics>}``.

    Args:
        name: what it measures (recorded in search results).
        measure: ``measure(model, batches) -> dict`` holding at least ``"score"``.
        batches: the evaluation batches (materialised once).

    ``fingerprint`` identifies the measure and the data, for caching search trials.

    Example:
        >>> evaluator = BatchEvaluator("size", lambda model, batches: {"score": float(len(batches))}, [{}, {}])
        >>> evaluator(None)
        {'score': 2.0}
    """

    def __init__(
        self, name: str, measure: Callable[[nn.Module, Sequence[Batch]], dict[str, float]], batches: Iterable[Batch]
    ) -> None:
        self.name = name
        self.measure = measure
        self.batches: list[Batch] = list(batches)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """``"<name>:<hash of the batches>"``."""
        if self._fingerprint is None:
            self._fingerprint = f"{self.name}:{fingerprint_batches(self.batches)}"
        return self._fingerprint

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return self.measure(model, self.batches)

    def __repr__(self) -> str:
        return f"BatchEvaluator({self.name!r}, {len(self.batches)} batches)"


def loss_evaluator(batches: Iterable[Batch]) -> BatchEvaluator:
    """Speciality as held-out loss: ``score = -loss`` (also reports ``loss`` and ``exact_match``).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=50))
        >>> result = loss_evaluator([{"input_ids": torch.randint(0, 50, (2, 6))}])(model)
        >>> result["score"] == -result["loss"]
        True
    """

    def measure(model: nn.Module, data: Sequence[Batch]) -> dict[str, float]:
        loss, accuracy = loss_and_exact_match(model, data)
        return {"score": -loss, "loss": loss, "exact_match": accuracy}

    return BatchEvaluator("held-out-loss", measure, batches)


def exact_match_evaluator(batches: Iterable[Batch]) -> BatchEvaluator:
    """Speciality as exact-match accuracy of the labelled answers: ``score = exact_match`` (also reports ``loss``).

    Example:
        evaluator = exact_match_evaluator(eval_batches)
        evaluator(peft_model)["exact_match"]
        0.31
    """

    def measure(model: nn.Module, data: Sequence[Batch]) -> dict[str, float]:
        loss, accuracy = loss_and_exact_match(model, data)
        return {"score": accuracy, "loss": loss, "exact_match": accuracy}

    return BatchEvaluator("exact-match", measure, batches)


def retention_evaluator(batches: Iterable[Batch], measure: Literal["ce", "kl"] = "ce") -> BatchEvaluator:
    """Versatility as retention of the base model's behaviour on general batches (see :func:`versatility_metrics`).

    ``measure="ce"``: ``score = exp(-ΔCE)`` on the general corpus; ``"kl"``: ``score = exp(-KL(base || tuned))``.
    Both metrics are reported either way. The model must be a peft model (the base comes from ``disable_adapter``).

    Example:
        evaluator = retention_evaluator(general_batches, measure="kl")
        evaluator(peft_model)["score"]
        0.996
    """
    if measure not in ("ce", "kl"):
        raise ValueError(f"measure={measure!r} must be 'ce' (cross-entropy increase) or 'kl' (KL to the base).")

    def run(model: nn.Module, data: Sequence[Batch]) -> dict[str, float]:
        metrics = versatility_metrics(model, data)
        return {"score": metrics[f"retention_{measure}"], **metrics}

    return BatchEvaluator(f"retention-{measure}", run, batches)


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _base_view(model: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    if reference is not None:
        yield reference
        return
    with model.disable_adapter():
        yield model


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _shifted(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits of positions 0..n-2 and the labels they predict (positions 1..n-1)."""
    output: Any = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits[:, :-1].float(), inputs["labels"][:, 1:].to(logits.device)


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> float:
    losses = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return float(losses[valid].sum())
