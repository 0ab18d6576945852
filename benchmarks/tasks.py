"""Shared tasks for the examples and benchmarks: a base model, tokenised data, and plain train / eval loops.

``real_task`` is SmolLM2-135M-Instruct learning English->French words (FreeDict), with WordNet glosses as general
English; ``tiny_task`` is a random 8-layer Llama with a synthetic word dictionary, for seconds-long runs.

Example:
    >>> task = tiny_task(n_train=8, n_eval=4)
    >>> len(task.train), len(task.held_out)
    (8, 4)
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.resources import (
    collate,
    freedict_pairs,
    split_pairs,
    text_examples,
    translation_examples,
    translation_messages,
    wordnet_sentences,
)
from peft_cofi.example_model import load_smollm2

Example = dict[str, list[int]]


@dataclass
class Task:
    """A base model, how to load it again from scratch, and tokenised data."""

    base: nn.Module
    fresh_base: Callable[[], nn.Module]
    train: list[Example]
    held_out: list[Example]
    pad_id: int
    general: list[Example] = field(default_factory=list)  # general text: its loss increase measures forgetting
    show: Callable[[nn.Module], list[str]] | None = None


def real_task(seed: int = 0, n_train: int = 256, n_eval: int = 64) -> Task:
    """SmolLM2-135M-Instruct, FreeDict English->French pairs (split by headword) and WordNet glosses."""
    print("loading SmolLM2-135M-Instruct, FreeDict English->French pairs and WordNet glosses", flush=True)
    model, tokenizer = load_smollm2()
    train_pairs, eval_pairs = split_pairs(freedict_pairs(), eval_fraction=0.2, seed=seed)
    rng = random.Random(seed)
    train_pairs, eval_pairs = rng.sample(train_pairs, n_train), rng.sample(eval_pairs, n_eval)
    try:
        general = text_examples(tokenizer, rng.sample(wordnet_sentences(kind="glosses"), n_eval))
    except FileNotFoundError as err:
        print(f"(no forgetting measure: {err})")
        general = []

    @torch.no_grad()
    def show(m: nn.Module) -> list[str]:
        lines = []
        for en, fr in tqdm(eval_pairs[:3], desc="sample translations", file=sys.stdout):
            text = tokenizer.apply_chat_template(translation_messages(en), tokenize=False, add_generation_prompt=True)
            enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            out = m.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            lines.append(f"{en!r} -> {answer!r} (dictionary: {fr!r})")
        return lines

    return Task(
        base=model,
        fresh_base=lambda: load_smollm2()[0],
        train=translation_examples(tokenizer, train_pairs),
        held_out=translation_examples(tokenizer, eval_pairs),
        pad_id=tokenizer.pad_token_id,
        general=general,
        show=show,
    )


def tiny_llama(seed: int = 0, **overrides: object) -> nn.Module:
    """A random Llama for the quick modes (8 layers, hidden 64, vocabulary 256 unless ``overrides`` say otherwise).

    Example:
        >>> tiny_llama(num_hidden_layers=2).config.num_hidden_layers
        2
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, object] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(settings | overrides))).eval()


def tiny_task(seed: int = 0, n_train: int = 96, n_eval: int = 24) -> Task:
    """A random 8-layer Llama and a synthetic word dictionary: [BOS, TASK, en, SEP] -> [fr, EOS]."""
    from transformers import LlamaForCausalLM

    base = tiny_llama(seed, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = base.config
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh_base() -> nn.Module:
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        return model.eval()

    rng = random.Random(seed)
    english = rng.sample(range(10, 130), n_train + n_eval)
    french = dict(zip(english, rng.sample(range(130, 250), len(english)), strict=True))
    examples = [{"input_ids": [1, 3, en, 4, french[en], 2], "labels": [-100] * 4 + [french[en], 2]} for en in english]
    return Task(base, fresh_base, examples[:n_train], examples[n_train:], pad_id=0)


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    batch_size: int = 8,
    max_len: int = 64,
    desc: str | None = None,
) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens; ``desc`` shows a progress bar with that label."""
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, file=sys.stdout, disable=desc is None):
        batch = collate(examples[i : i + batch_size], pad_id, max_len)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    return total / max(count, 1)


def train(
    model: nn.Module, task: Task, steps: int, batch_size: int = 8, lr: float = 2e-4, max_len: int = 64, seed: int = 0
) -> None:
    """A plain AdamW loop over shuffled training examples, with a tqdm bar."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng, order = random.Random(seed), []
    model.train()
    bar = tqdm(range(steps), desc="train", file=sys.stdout)
    for _ in bar:
        if len(order) < batch_size:
            order += rng.sample(range(len(task.train)), len(task.train))
        batch = collate([task.train[i] for i in order[:batch_size]], task.pad_id, max_len)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
