"""Shared pieces of the training-integration tests: tiny data, CoFi models, Trainer runs that can stop and resume."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_cofi import CoFiConfig, CoFiLayer
from peft_cofi.data import collate
from tiny_models import VOCAB, random_importance, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
FFN = [f"model.layers.{i}.mlp.{name}" for i in range(4) for name in ("up_proj", "down_proj")]


def token_examples(n: int = 48, length: int = 12, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random token sequences, labelled everywhere."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(4, VOCAB, (n, length), generator=generator).tolist()
    return [{"input_ids": row, "labels": list(row)} for row in rows]


def batches_of(examples: list[dict[str, list[int]]], size: int = 8) -> list[dict[str, torch.Tensor]]:
    return [collate(examples[i : i + size]) for i in range(0, len(examples), size)]


def cofi_model(mask: bool = True, **config: Any) -> torch.nn.Module:
    """A tiny Llama with a CoFi adapter (default: bottom2 = layer 1's FFN projections), with a random soft mask by
    default."""
    config.setdefault("layers_to_transform", "bottom2")
    if mask:
        config.setdefault("importance", random_importance(tiny_llama(), FFN))
    return get_peft_model(tiny_llama(), CoFiConfig(**config))


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The absolute trained parameters (``cofi_delta``) by name, detached copies."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "cofi_delta" in name}


def effective_diffs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``W_tuned - W_base`` of every CoFi layer."""
    return {
        name: m.get_delta_weight("default").float() for name, m in model.named_modules() if isinstance(m, CoFiLayer)
    }


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[key], state[key]) for key in state)


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


class StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` (after that step's checkpoint): a preempted job."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def training_args(output_dir: Path, steps: int = 6, save_steps: int = 3, **overrides: Any) -> TrainingArguments:
    """Deterministic CPU arguments: AdamW with a linear decay over ``steps``, a checkpoint every ``save_steps``."""
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        **overrides,
    }
    return TrainingArguments(**values)


def trainer_for(model: torch.nn.Module, args: TrainingArguments, callbacks: list | None = None) -> Trainer:
    return Trainer(
        model=model,
        args=args,
        train_dataset=token_examples(),
        data_collator=functools.partial(collate, pad_id=0),
        callbacks=callbacks,
    )


def load_example(name: str) -> ModuleType:
    """Import ``examples.<name>`` (the repository root is on pytest's ``pythonpath``); its ``main(argv)`` runs
    in-process."""
    return importlib.import_module(f"examples.{name}")
