"""A retention anchor for any training loop: pull the model toward its base model on general prompts while it learns.

``attach_retention_anchor(model, data, weight=w)`` hooks the model's forward pass. From then on, every call made in
training mode with ``labels`` (the task's forward pass: Hugging Face ``Trainer``, TRL's ``SFTTrainer``, an accelerate
loop or a plain loop, unchanged) also takes the next batch of ``data`` (general prompts, cycled) and adds
``w * anchor`` to the returned loss, where the anchor is

- ``kind="kl"``: ``KL(p_base || p_tuned)`` of the next-token distributions, averaged over the batch's non-padding
  positions; ``p_base`` comes from the same model under ``disable_adapter()``, without gradients, in eval mode;
- ``kind="self-answers"``: the cross-entropy of the base model's own greedy answers to the prompts (generated once
  when attaching, optionally cached to a file), which needs no base forward pass per step.

Nothing here is CoFi-specific: any peft model whose adapter can be disabled works (CoFi, LoRA, ...). That is where
an adapter pays off: its base model comes for free from ``disable_adapter()``, exactly and without a second copy in
memory. Full fine-tuning has no adapter to disable, so it needs ``reference=`` a frozen copy of the base model (twice
the weights in memory).

The anchor's value is returned on the output (``outputs.anchor_loss``, unweighted, detached). Pass a ``Trainer``
instead of the model to also log it (``anchor_loss`` in ``trainer.state.log_history`` and every ``report_to``
integration) and to store the anchor data position in the checkpoints' ``trainer_state.json``, so that
``resume_from_checkpoint`` continues exactly. Plain loops save the position with ``anchor.state_dict()`` (accelerate:
``accelerator.register_for_checkpointing(anchor)``). A :class:`peft_cofi.ForgettingMonitor` records the anchor's mean
since its last measurement. ``anchor.detach()`` removes everything and leaves the model as it was.

Scaling: the term is added per forward call. When the caller normalises the task loss over a whole accumulated batch
(the Trainer passes ``num_items_in_batch``), the term is weighted by this call's share of the label tokens, so that
gradient accumulation and token averaging across DDP ranks see ``w`` times a token-weighted mean of the anchors; a
caller that divides the loss itself (``loss / accumulation_steps``) divides the term too. TRL's ``SFTTrainer``
computes its loss from the per-token ``log_probs`` of its fused LM head instead of ``outputs.loss``: there the term
is also folded into ``log_probs`` (each label token's log-probability is lowered by ``w * anchor``), so TRL's
token-mean (``nll``) loss is the task loss plus ``w * anchor`` as well. ``every=k`` applies the anchor on one call
in ``k`` at the same weight. Under ``torch.distributed`` each rank draws its own shard of ``data`` (batches
``rank::world_size``).

Cost: an anchored ``kind="kl"`` step adds a training forward and backward pass on the anchor batch and a base forward
pass without gradients. ``benchmarks/bench_cost`` on SmolLM2-135M (CoFi bottom2 FFN, batch and anchor batch 8 x 64
tokens, two CPU threads): 2.40 x a CoFi step and 1.55 x its peak memory; ``every=4`` spreads that to 1.38 x.
``kind="self-answers"`` needs no base pass.

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                     num_attention_heads=2, vocab_size=50))
    >>> model = get_peft_model(base, LoraConfig(target_modules=["up_proj"], init_lora_weights=False)).train()
    >>> anchor = attach_retention_anchor(model, [{"input_ids": torch.randint(0, 50, (2, 6))}], weight=0.5)
    >>> tokens = torch.randint(0, 50, (2, 6))
    >>> outputs = model(input_ids=tokens, labels=tokens)
    >>> bool(outputs.anchor_loss > 0)
    True
    >>> anchor.detach()
    >>> "anchor_loss" in model(input_ids=tokens, labels=tokens)
    False
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .anchor_data import (
    KINDS,
    answer_batches,
    base_fingerprint,
    check_anchor_data,
    check_answer_room,
    check_reference,
    check_settings,
    context_length,
    distributed_shard,
    pad_id,
    unwrap,
    vocabulary_size,
)
from .evaluation import IGNORE_INDEX, Batch
from .losses import logits_kl

if TYPE_CHECKING:  # importing transformers.Trainer costs about a second (it pulls in datasets and pandas)
    from transformers import Trainer

__all__ = ["KINDS", "RetentionAnchor", "anchor_of", "attach_retention_anchor", "log_through", "masked_mean_kl"]
LOG_KEY = "anchor_loss"
# Where a Trainer checkpoint keeps the anchor position: a key of trainer_state.json's stateful_callbacks that no
# callback class is named (a dotted name), so the Trainer's own callback restoring never tries to rebuild it.
STATE_KEY = "peft_cofi.RetentionAnchor"
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, RetentionAnchor] = weakref.WeakKeyDictionary()


def _is_trainer(obj: Any) -> bool:
    """A transformers / TRL Trainer, recognised without importing ``transformers.Trainer``."""
    return callable(getattr(obj, "add_callback", None)) and isinstance(getattr(obj, "model", None), nn.Module)


def attach_retention_anchor(
    model: nn.Module | Trainer,
    data: Iterable[Batch],
    *,
    weight: float,
    kind: Literal["kl", "self-answers"] = "kl",
    every: int = 1,
    max_cached: int | None = None,
    reference: nn.Module | None = None,
    answers_file: str | os.PathLike[str] | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> RetentionAnchor:
    """Anchor ``model`` to its base model on the general prompts ``data`` during training (see the module docstring).

    Every argument is checked before anything is changed: on a bad input the model is left untouched.

    Args:
        model: the model being trained: a peft model (its adapter is disabled to get the base model), any model with
            ``reference=``, or a ``transformers`` / TRL ``Trainer`` (its model; then the anchor is also logged and
            its data position is saved in and restored from the Trainer's checkpoints).
        data: batches of general prompts (dicts with ``input_ids`` and optionally ``attention_mask``, as
            :func:`peft_cofi.data.collate` builds them); cycled in order. Disjoint from your evaluation sets.
        weight: the anchor term's weight ``w >= 0``; ``0`` measures the anchor (``outputs.anchor_loss``) without
            changing training (exactly so for models without dropout: the anchor's training pass draws its own
            dropout masks).
        kind: ``"kl"`` (KL from the base model's next-token distributions) or ``"self-answers"`` (cross-entropy of
            the base model's greedy answers to the prompts).
        every: apply the anchor on every ``every``-th training call (1 = each call) to cut its cost.
        max_cached: take at most this many batches from ``data`` and cycle through them (so ``data`` may be a long
            or endless loader); ``None`` takes all of ``data``, which must then be finite.
        reference: a frozen copy of the base model, for models without an adapter to disable (full fine-tuning).
        answers_file: ``kind="self-answers"`` only: a JSON file caching the generated answers; a later (resumed)
            run with the same prompts, settings and base weights reuses them instead of generating again.
        max_new_tokens: ``kind="self-answers"`` only: the longest answer generated per prompt.
        progress: show a progress bar while generating the base model's answers.

    Returns:
        The :class:`RetentionAnchor` handle (``detach()``, ``state_dict()``, the running mean of the anchor).

    Raises:
        ValueError / TypeError: a bad argument or anchor set, named with the fix, before anything is changed.

    Example:
        anchor = attach_retention_anchor(trainer, general_prompt_batches, weight=0.5)   # Trainer / SFTTrainer
        trainer.train()                                         # logs anchor_loss; resume_from_checkpoint is exact
        anchor = attach_retention_anchor(full_ft_model, batches, weight=0.5, reference=frozen_base_copy)
    """
    trainer = model if _is_trainer(model) else None
    if trainer is not None:
        if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
            raise ValueError(
                "this Trainer computes the loss outside the model (compute_loss_func or label smoothing), so the "
                "model is called without labels and the anchor would never be applied; drop that option (the anchor "
                "acts on forward calls made with labels)."
            )
        model = trainer.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch model or a transformers Trainer; got {type(model).__name__}.")
    module = unwrap(model)
    if module in _ATTACHED:
        raise ValueError("this model already has a retention anchor attached; call its detach() first.")
    check_settings(weight, kind, every, max_cached, max_new_tokens, answers_file)
    check_reference(module, reference)
    limit = context_length(module)
    batches = check_anchor_data(data, max_cached, vocabulary_size(module), limit)
    if kind == "self-answers":
        check_answer_room(batches, max_new_tokens, limit)
    batches = distributed_shard(batches)
    if kind == "self-answers":
        fingerprint = base_fingerprint(module, reference)
        with _base_model(module, reference) as base, _eval_mode(base):
            batches = answer_batches(base, batches, max_new_tokens, answers_file, progress, pad_id(module), fingerprint)
    anchor = RetentionAnchor(module, batches, float(weight), kind, every, reference)
    _ATTACHED[module] = anchor
    if trainer is not None:
        anchor._trainer = trainer
        trainer.add_callback(anchor)
    return anchor


def anchor_of(model: nn.Module) -> RetentionAnchor | None:
    """The retention anchor attached to ``model`` (or to the model a DDP / accelerate wrapper holds), else ``None``.

    Example:
        >>> anchor_of(nn.Linear(2, 2)) is None
        True
    """
    return _ATTACHED.get(unwrap(model))


def masked_mean_kl(base_logits: torch.Tensor, tuned_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is non-zero of ``KL(softmax(base) || softmax(tuned))``, in float32.

    Gradients flow to ``tuned_logits`` only where ``mask`` is set; padding positions are ignored entirely.

    Raises:
        ValueError: the mask selects no position.

    Example:
        >>> logits = torch.randn(2, 3, 5)
        >>> float(masked_mean_kl(logits, logits, torch.ones(2, 3)))
        0.0
    """
    keep = mask.bool()
    positions = int(keep.sum())
    if positions == 0:
        raise ValueError("the mask selects no position: an all-padding batch has no distribution to anchor.")
    return logits_kl(base_logits.to(tuned_logits.device), tuned_logits, keep.to(tuned_logits.device)) / positions


class RetentionAnchor(TrainerCallback):
    """The handle :func:`attach_retention_anchor` returns: the hook's state, its running mean, and ``detach()``.

    Attributes:
        weight, kind, every: the settings it was attached with.
        calls: training calls with labels seen so far; ``drawn``: anchor batches drawn (the data position).
        last_value: the latest anchor value (unweighted), or ``None`` before the first.

    Example:
        anchor = attach_retention_anchor(model, batches, weight=0.5)
        ...  # train
        anchor.mean_since()[0]          # mean anchor value since attaching
        torch.save(anchor.state_dict(), "anchor.pt"); anchor.detach()
    """

    def __init__(
        self,
        module: nn.Module,
        batches: list[dict[str, torch.Tensor]],
        weight: float,
        kind: str,
        every: int,
        reference: nn.Module | None,
    ) -> None:
        self.weight, self.kind, self.every = weight, kind, every
        self.calls = self.drawn = 0
        self.last_value: float | None = None
        self._module: nn.Module | None = module
        self._batches = batches
        self._reference = reference
        self._total, self._count = 0.0, 0
        self._log_mark = (0.0, 0)
        self._calls_at_begin: int | None = None
        self._pending: float | None = None
        self._trainer: Any = None
        self._running = False
        self._hook = module.register_forward_hook(self._after_forward, with_kwargs=True)

    # --------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, int]:
        """The data position: ``{"calls": ..., "drawn": ...}`` (save it with your checkpoint)."""
        return {"calls": self.calls, "drawn": self.drawn}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict` (a resumed run then draws the same batches)."""
        calls, drawn = state.get("calls"), state.get("drawn")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (calls, drawn)):
            raise ValueError(f"an anchor state needs whole numbers 'calls' and 'drawn' >= 0; got {dict(state)}.")
        self.calls, self.drawn = calls, drawn

    def mean_since(self, mark: tuple[float, int] = (0.0, 0)) -> tuple[float | None, tuple[float, int]]:
        """The mean anchor value since ``mark`` (``None`` if none was computed since) and the mark for next time.

        Example:
            mean, mark = anchor.mean_since()       # since attaching
            mean, mark = anchor.mean_since(mark)   # since the previous call
        """
        total, count = self._total - mark[0], self._count - mark[1]
        return (total / count if count else None), (self._total, self._count)

    def detach(self) -> None:
        """Remove the hook (and the Trainer callback): the model is exactly as before attaching. Idempotent."""
        if self._module is None:
            return
        self._hook.remove()
        _ATTACHED.pop(self._module, None)
        if self._trainer is not None:
            self._trainer.remove_callback(self)
            self._trainer = None
        self._module = None

    # --------------------------------------------------------------------------------------------- the hook

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        labels = kwargs.get("labels")
        if self._running or not module.training or labels is None:
            return None
        loss = output.get("loss") if isinstance(output, Mapping) else output[0]
        if loss is None:
            return None
        self.calls += 1
        if (self.calls - 1) % self.every:
            return None
        batch = self._batches[self.drawn % len(self._batches)]
        self.drawn += 1
        self._running = True
        try:
            value = self._anchor_value(module, {k: v.to(labels.device) for k, v in batch.items()})
        finally:
            self._running = False
        self.last_value = float(value.detach())
        self._total += self.last_value
        self._count += 1
        shifted = kwargs.get("shift_labels")
        shifted = labels[..., 1:] if shifted is None else shifted
        items = kwargs.get("num_items_in_batch")
        # The caller normalises the task loss over all label tokens of the accumulated (and gathered) batch: weight
        # this call's anchor by its share of them, so the step sees weight x a token-weighted mean of the anchors.
        share = 1.0 if items is None else (shifted != IGNORE_INDEX).sum() / items
        term = self.weight * value
        if not isinstance(output, Mapping):
            return (loss + term * share, *output[1:])
        output["loss"] = loss + term * share
        output[LOG_KEY] = value.detach()
        log_probs = output.get("log_probs")
        if isinstance(log_probs, torch.Tensor):  # TRL's fused LM head: its trainer sums these, not outputs.loss
            valid = output.get("label_mask")
            valid = (shifted != IGNORE_INDEX) if valid is None else valid
            output["log_probs"] = log_probs - term * valid.to(log_probs.dtype)
        return output

    def _anchor_value(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.kind == "self-answers":
            logits = _logits(module(**inputs, **_no_cache(module)))[:, :-1]
            targets = batch["labels"][:, 1:]
            valid = targets != IGNORE_INDEX
            return F.cross_entropy(logits[valid].float(), targets[valid])
        with torch.no_grad(), _base_model(module, self._reference) as base, _eval_mode(base):
            device = next(base.parameters()).device
            base_logits = _logits(base(**{k: v.to(device) for k, v in inputs.items()}, **_no_cache(base)))
        return masked_mean_kl(base_logits, _logits(module(**inputs, **_no_cache(module))), batch["attention_mask"])

    # --------------------------------------------------------------------------------------------- Trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._trainer is None:
            raise RuntimeError(
                "a RetentionAnchor was added to a Trainer by hand; pass the Trainer to attach_retention_anchor("
                "trainer, ...) instead, so that it is logged and its position is checkpointed."
            )
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is not None:  # resuming from a checkpoint: continue from its data position
            self.load_state_dict(saved)
        self._calls_at_begin = self.calls
        self._store(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._calls_at_begin is not None and self.calls == self._calls_at_begin:
            raise RuntimeError(
                "the retention anchor saw no training call with labels during a whole optimizer step, so it was not "
                "applied: this Trainer computes its loss without passing labels to the model."
            )
        self._calls_at_begin = None
        self._store(state)  # the checkpoint saved after this step records the position
        if control.should_log:  # the Trainer logs its loss after this; the anchor's entry follows at the next event
            self._pending, self._log_mark = self.mean_since(self._log_mark)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush()

    def _flush(self) -> None:
        # Logged after the Trainer's own entry rather than before it, so that trainers which merge their metrics
        # into the next log call (TRL) keep them with the loss.
        if self._pending is not None:
            log_through(self._trainer, {LOG_KEY: self._pending})
            self._pending = None

    def _store(self, state: TrainerState) -> None:
        if state.stateful_callbacks is None:
            state.stateful_callbacks = {}
        state.stateful_callbacks[STATE_KEY] = self.state_dict()


# ------------------------------------------------------------------------------------------------- helpers


def log_through(trainer: Any, logs: dict[str, float]) -> None:
    """``trainer.log(logs)`` from inside a callback, keeping the Trainer's own pending log: ``Trainer.log`` clears
    ``control.should_log``, which would drop the loss the Trainer logs after ``on_step_end`` at this step.

    Example:
        log_through(trainer, {"anchor_loss": 0.012})   # in a callback's on_step_end / on_step_begin
    """
    pending = trainer.control.should_log
    trainer.log(logs)
    trainer.control.should_log = pending


def _no_cache(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for transformers models: the anchor's passes need no key/value cache."""
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


def _logits(output: Any) -> torch.Tensor:
    return output["logits"] if isinstance(output, Mapping) else output[0]


@contextlib.contextmanager
def _base_model(module: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    if reference is not None:
        yield reference
        return
    with module.disable_adapter():
        yield module


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), then every submodule's own train/eval flag back as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
