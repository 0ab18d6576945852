"""A forgetting monitor: versatility and speciality measured every N training steps, with a plot and a JSON log.

Every ``every_n_steps`` optimizer steps (and at step 0) :class:`ForgettingMonitor` measures on fixed batches:

- *versatility* on general-text batches (:func:`peft_cofi.evaluation.versatility_metrics`): the model's loss
  ``general_loss``, the base model's ``base_loss`` (from ``disable_adapter()``, exact for CoFi), their difference
  ``ce_increase`` (ΔCE, peft's forgetting convention) and ``kl`` = KL(base || tuned) per position;
- *speciality* on held-out task batches: ``eval_loss`` (:func:`peft_cofi.evaluation.mean_loss`);
- when a retention anchor is attached to the model (:func:`peft_cofi.attach_retention_anchor`): ``anchor_loss``, the
  mean of the anchor's values since the previous measurement (when it was applied since).

Use it from a plain loop (``monitor.step(model, step)`` after each optimizer step, ``monitor.finish(model, step)``
at the end) or with a ``transformers.Trainer`` / TRL trainer (``monitor.attach(trainer)``): there every measurement
goes through ``trainer.log``, so it lands in ``trainer.state.log_history`` (and the checkpoints'
``trainer_state.json``) and in every logging integration (TensorBoard, W&B, ...) as ``monitor/<metric>``. A
resumed Trainer run takes the measurements made before the checkpoint back from the log history. Measuring runs
without gradients in eval mode and draws no random numbers, so it does not change the training run.

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft_cofi import CoFiConfig
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                     num_attention_heads=2, vocab_size=50))
    >>> model = get_peft_model(base, CoFiConfig())
    >>> monitor = ForgettingMonitor([{"input_ids": torch.randint(0, 50, (2, 8))}], every_n_steps=5)
    >>> record = monitor.step(model, 0)
    >>> record["ce_increase"], record["kl"]
    (0.0, 0.0)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .anchor import anchor_of, log_through
from .evaluation import Batch, mean_loss, versatility_metrics
from .plots import plot_training_history

LOG_PREFIX = "monitor/"
# versatility_metrics key -> history key
_VERSATILITY = {"loss": "general_loss", "base_loss": "base_loss", "ce_increase": "ce_increase", "kl": "kl"}
METRICS = (*_VERSATILITY.values(), "eval_loss")


class ForgettingMonitor(TrainerCallback):
    """Measure forgetting (versatility) and task loss (speciality) every ``every_n_steps`` steps.

    Args:
        general_batches: general-text batches (dicts with ``input_ids``, optionally ``attention_mask`` and
            ``labels``); at least one. Forgetting is measured on these.
        eval_batches: held-out task batches for ``eval_loss``; ``None`` measures versatility only.
        every_n_steps: measure at every multiple of this many optimizer steps (step 0 included).
        output_dir: where :meth:`finish` writes ``<name>.json`` (the history) and ``<name>.png`` (the plot);
            ``None`` writes nothing.
        name: file stem of the outputs.
        reference: a separate base model to compare with, for models without ``disable_adapter()``.

    Example:
        monitor = ForgettingMonitor(general_batches, eval_batches, every_n_steps=10, output_dir="out")
        monitor.attach(trainer)           # Trainer / SFTTrainer: measured and logged during trainer.train()
        trainer.train()
        monitor.history[-1]["kl"]
        0.0123
    """

    def __init__(
        self,
        general_batches: Iterable[Batch],
        eval_batches: Iterable[Batch] | None = None,
        every_n_steps: int = 10,
        output_dir: str | os.PathLike[str] | None = None,
        name: str = "forgetting_monitor",
        reference: nn.Module | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive whole number of optimizer steps.")
        if not name or os.sep in name:
            raise ValueError(f"name={name!r} must be a non-empty file stem without a path separator.")
        self.general = _checked_batches(general_batches, "general_batches")
        self.eval = None if eval_batches is None else _checked_batches(eval_batches, "eval_batches")
        self.every_n_steps = every_n_steps
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.name = name
        self.reference = reference
        self._records: dict[int, dict[str, float]] = {}
        self._trainer: Any = None
        self._anchor_mark: tuple[Any, tuple[float, int]] = (None, (0.0, 0))

    @property
    def history(self) -> list[dict[str, float]]:
        """The measurements so far, one dict per measured step (``step`` and :data:`METRICS`), by step."""
        return [self._records[step] for step in sorted(self._records)]

    # ----------------------------------------------------------------------------------------- plain loops

    def measure(self, model: nn.Module, step: int) -> dict[str, float]:
        """Measure now, whatever the step, and record the result under ``step`` (replacing an earlier one)."""
        _check_step(step)
        versatility = versatility_metrics(model, self.general, self.reference)
        record: dict[str, Any] = {"step": step}
        record.update({key: versatility[source] for source, key in _VERSATILITY.items()})
        if self.eval is not None:
            record["eval_loss"] = mean_loss(model, self.eval)
        anchor = anchor_of(model)
        if anchor is not None:
            last, mark = self._anchor_mark
            mean, mark = anchor.mean_since(mark if last is anchor else (0.0, 0))
            self._anchor_mark = (anchor, mark)
            if mean is not None:
                record["anchor_loss"] = mean
        self._records[step] = record
        return record

    def step(self, model: nn.Module, step: int) -> dict[str, float] | None:
        """Call after optimizer step ``step`` (and with ``step=0`` before training): measures when ``step`` is a
        multiple of ``every_n_steps`` not measured yet, and returns the record (else ``None``)."""
        _check_step(step)
        if step % self.every_n_steps or step in self._records:
            return None
        return self.measure(model, step)

    def finish(self, model: nn.Module | None = None, step: int | None = None) -> dict[str, Path]:
        """End of training: measure the final ``step`` of ``model`` if it was not measured, then write the JSON
        history and the PNG plot to ``output_dir`` (if set). Returns the written paths by kind (``json``, ``png``).
        """
        if (model is None) != (step is None):
            raise ValueError("pass both the model and its final step to finish(), or neither.")
        if model is not None and step not in self._records:
            self.measure(model, step)
        if not self._records:
            raise ValueError("nothing was measured: call monitor.step(model, 0) before training (or measure()).")
        if self.output_dir is None:
            return {}
        return self.save(self.output_dir)

    def save(self, output_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``<name>.json`` (settings and history) and ``<name>.png`` (the plot) into ``output_dir``."""
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise NotADirectoryError(f"output_dir {str(output_dir)!r} is a file; pass a directory for the outputs.")
        output_dir.mkdir(parents=True, exist_ok=True)
        json_path = output_dir / f"{self.name}.json"
        document = {"every_n_steps": self.every_n_steps, "metrics": list(METRICS), "history": self.history}
        json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        png_path = plot_training_history(self.history, output_dir / f"{self.name}.png")
        return {"json": json_path, "png": png_path}

    # ----------------------------------------------------------------------------------------- Trainer

    def attach(self, trainer: Any) -> ForgettingMonitor:
        """Register with a ``transformers.Trainer`` (or a TRL trainer): measurements are logged through
        ``trainer.log``. Returns the monitor.

        Example:
            monitor = ForgettingMonitor(general_batches, every_n_steps=10).attach(trainer)
        """
        if not (hasattr(trainer, "log") and hasattr(trainer, "add_callback")):
            raise TypeError(f"attach() needs a transformers Trainer; got {type(trainer).__name__}.")
        self._trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._trainer is None:
            raise RuntimeError(
                "ForgettingMonitor was added to a Trainer without attach(): its measurements could not reach the "
                "Trainer's loggers. Use monitor.attach(trainer) instead of callbacks=[monitor]."
            )
        for entry in state.log_history:  # a resumed run: take back what was measured before the checkpoint
            if LOG_PREFIX + "kl" in entry:
                values = {key: entry[LOG_PREFIX + key] for key in METRICS if LOG_PREFIX + key in entry}
                self._records.setdefault(int(entry["step"]), {"step": int(entry["step"]), **values})
        self._log_if_due(kwargs["model"], state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._log_if_due(kwargs["model"], state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step not in self._records:
            self._log(self.measure(kwargs["model"], state.global_step))
        if state.is_world_process_zero and self.output_dir is not None:
            self.save(self.output_dir)

    def _log_if_due(self, model: nn.Module, step: int) -> None:
        record = self.step(model, step)
        if record is not None:
            self._log(record)

    def _log(self, record: Mapping[str, float]) -> None:
        log_through(self._trainer, {LOG_PREFIX + key: value for key, value in record.items() if key != "step"})


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be the number of optimizer steps taken, a whole number >= 0.")


def _checked_batches(batches: Iterable[Batch], what: str) -> list[Batch]:
    if batches is None or isinstance(batches, (Mapping, str)):
        raise TypeError(f"{what} must be a list (or other iterable) of batch dicts; got {type(batches).__name__}.")
    out = list(batches)
    if not out:
        raise ValueError(f"{what} is empty; pass at least one batch (a dict with 'input_ids').")
    for index, batch in enumerate(out):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"{what}[{index}] must be a dict with 'input_ids' (as peft_cofi.data.collate builds); got {keys}."
            )
    return out
