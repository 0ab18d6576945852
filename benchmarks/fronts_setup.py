"""What the fronts benchmark trains on and measures, per regime: the task, the versatility sets, the base scores.

Regimes (``--regime``):

- ``light``: 192 FreeDict English->French pairs seen once (24 AdamW steps of 8): the original setting, the
  regression baseline;
- ``heavy``: 1,536 pairs, two epochs (384 steps of 8, 16x the light regime's), closer to the paper's epochs over
  thousands of examples, where a low learning rate can no longer reach the task without moving far from the base.

Both hold out the same 128 test pairs (headwords never seen in training) and 64 validation pairs (for post-hoc
calibration, disjoint from the test). Versatility is measured several ways, each its own front: ``retention`` (the
base model's own greedy answers to general instructions), ``general`` (WordNet example sentences: plain English,
which a chat fine-tune *lowers* here) and the chat corpora of :mod:`benchmarks.corpora` (general text as assistant
answers). Every set is checked to be disjoint from the anchor prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.anchor_prompts import chat_prompts, check_disjoint, prompt_batches, read_prompts
from benchmarks.corpora import CORPORA, definition_questions
from benchmarks.fronts_methods import FFN, Context
from benchmarks.resources import (
    IGNORE_INDEX,
    chat_example,
    collate,
    freedict_pairs,
    short_translation_examples,
    split_pairs,
    text_examples,
    wordnet_sentences,
)
from benchmarks.tasks import Example, Task, tiny_task
from peft_cofi import CoFiConfig, UnitImportance, compute_importance
from peft_cofi.evaluation import loss_and_exact_match, mean_loss
from peft_cofi.example_model import load_smollm2


@dataclass(frozen=True)
class Regime:
    """How much a run trains: ``pairs`` training pairs (``None``: steps x batch, each seen once) for ``epochs``."""

    pairs: int | None
    epochs: int
    steps: int | None = None  # default: epochs * pairs / batch size

    def steps_for(self, batch_size: int) -> int:
        return self.steps or self.epochs * self.pairs // batch_size


REGIMES = {"light": Regime(None, 1, steps=24), "heavy": Regime(1536, 2)}
CORPUS_SIZE = 48  # examples per chat corpus


@dataclass
class Setup:
    """A task plus the versatility sets and the base model's scores on everything."""

    task: Task
    retention: list[Example]
    context: Context
    base: dict[str, float]
    description: dict[str, Any]
    anchor: list[dict[str, torch.Tensor]]  # general prompt batches for methods that carry a retention anchor
    corpora: dict[str, list[Example]] = field(default_factory=dict)
    validation: list[Example] = field(default_factory=list)  # for calibration; disjoint from the held-out test


def real_setup(args: Any) -> Setup:
    model, tokenizer = load_smollm2()
    pad = tokenizer.pad_token_id
    train_pairs, held_pairs = split_pairs(freedict_pairs(args.dictionary), 0.2, seed=0)
    rng = random.Random(0)
    # The light regime's draws come first and unchanged, so its cached runs stay valid.
    light = rng.sample(train_pairs, args.steps * args.batch_size if args.regime == "light" else 192)
    held = rng.sample(held_pairs, 128)
    sentences = wordnet_sentences(args.wordnet, kind="examples")
    glosses = wordnet_sentences(args.wordnet, kind="glosses")
    general = text_examples(tokenizer, rng.sample(sentences, 96))
    known = text_examples(tokenizer, rng.sample(glosses, 64))  # importance data: disjoint from the general set
    extra = random.Random(1)  # everything new draws from its own generator
    regime = REGIMES[args.regime]
    train = light if args.regime == "light" else extra.sample(train_pairs, regime.pairs)
    validation = extra.sample([p for p in held_pairs if p not in held], 64)
    corpora_pairs = {name: make(random.Random(2), CORPUS_SIZE) for name, make in CORPORA.items()}
    instructions = [line.strip() for line in args.instructions.read_text().splitlines() if line.strip()]
    retention = [greedy_answer(model, _chat_ids(tokenizer, text), 48) for text in instructions]
    defined = {q.split("'")[1] for q, _ in corpora_pairs["chat_definitions"]}
    questions = definition_questions(random.Random(3), 24, avoid=defined)
    retention_definitions = [greedy_answer(model, _chat_ids(tokenizer, q), 48) for q in questions]
    task = Task(
        base=model,
        fresh_base=lambda: load_smollm2()[0],
        train=short_translation_examples(tokenizer, train),
        held_out=short_translation_examples(tokenizer, held),
        pad_id=pad,
        general=general,
    )
    anchor_texts = read_prompts(args.anchor_prompts)
    check_disjoint(
        anchor_texts,
        {
            "retention instructions": instructions,
            "definition questions": questions,
            "general-English sentences": sentences,
            "held-out dictionary words": [english for english, _ in held],
            **{f"{name} prompts and answers": [t for qa in pairs for t in qa] for name, pairs in corpora_pairs.items()},
        },
    )
    anchor = prompt_batches(chat_prompts(tokenizer, anchor_texts), pad, batch_size=8)
    corpora = {
        "retention_definitions": retention_definitions,
        **{
            name: [chat_example(tokenizer, [{"role": "user", "content": q}], a) for q, a in pairs]
            for name, pairs in corpora_pairs.items()
        },
    }
    searched = searched_coarse(args.search_results, list(range(8, 23)))
    description = {
        "model": "SmolLM2-135M-Instruct (30 layers, float32, CPU)",
        "regime": f"{args.regime}: {len(train)} training pairs, {args.steps} steps of {args.batch_size}",
        "speciality": f"{Path(args.dictionary).name}: {len(train)} train / {len(held)} held-out pairs",
        "general": f"{len(general)} WordNet example sentences; importance on {len(known)} WordNet glosses",
        "retention": f"base model's greedy answers (48 tokens max) to {len(instructions)} general instructions, and "
        f"to {len(questions)} word-definition questions (retention_definitions)",
        "chat corpora": f"{CORPUS_SIZE} assistant answers each: {', '.join(CORPORA)} (benchmarks/corpora.py)",
    }
    setup = _finish_setup(args, task, retention, known, searched, description, anchor)
    setup.corpora = corpora
    setup.validation = short_translation_examples(tokenizer, validation)
    setup.base = evaluate(task.base, setup)
    return setup


def quick_setup(args: Any) -> Setup:
    task = tiny_task(0, n_train=96, n_eval=24)
    rng = random.Random(1)
    task.general = [
        {"input_ids": ids, "labels": ids} for ids in ([rng.randrange(10, 250) for _ in range(12)] for _ in range(24))
    ]
    known = [
        {"input_ids": ids, "labels": ids} for ids in ([rng.randrange(10, 250) for _ in range(12)] for _ in range(16))
    ]
    retention = [greedy_answer(task.base, [1, *(rng.randrange(10, 250) for _ in range(6))], 6) for _ in range(8)]
    anchor_rng = random.Random(2)  # its own generator: the sets above (and cached runs) stay as they were
    prompts = [[1, *(anchor_rng.randrange(10, 250) for _ in range(6))] for _ in range(8)]
    prompts_of = [[t for t, label in zip(r["input_ids"], r["labels"], strict=True) if label == -100] for r in retention]
    check_disjoint(prompts, {"retention prompts": prompts_of, "general": [e["input_ids"] for e in task.general]})
    description = {"model": "tiny random Llama (8 layers)", "speciality": "synthetic word dictionary"}
    searched = (list(FFN), list(range(2, 6)), "FFN 2-5")
    setup = _finish_setup(args, task, retention, known, searched, description, prompt_batches(prompts, 0, 8))
    corpus_rng = random.Random(3)
    setup.corpora = {
        "chat_random": [
            {"input_ids": [1, 3, *answer], "labels": [IGNORE_INDEX] * 2 + answer}
            for answer in ([corpus_rng.randrange(10, 250) for _ in range(8)] for _ in range(12))
        ]
    }
    setup.validation = setup.task.held_out[:8]
    setup.base = evaluate(task.base, setup)
    return setup


def searched_coarse(path: Path, fallback_layers: list[int]) -> tuple[list[str], list[int], str]:
    """Modules and layers of the tree search's best node (``bench_search`` results), else FFN in ``fallback_layers``."""
    if path.is_file():
        best = json.loads(path.read_text())["tree"]["best"]
        return list(best["modules"]), list(best["layers"]), f"{best['label']} (from {path.name})"
    return list(FFN), fallback_layers, "FFN middle-plus (no search results found)"


def _finish_setup(args: Any, task: Task, retention, known, searched, description, anchor) -> Setup:
    cache = args.out_dir / f"{args.name}_importance.safetensors"
    if cache.is_file():
        importance = UnitImportance.load(cache)
    else:
        batches = [collate(known[i : i + 8], task.pad_id) for i in range(0, len(known), 8)]
        importance = compute_importance(task.base, batches, config=CoFiConfig(target_modules=FFN), progress=False)
        importance.save(cache)
    known_batches = [collate(known[i : i + 8], task.pad_id) for i in range(0, len(known), 8)]
    task_batches = [collate(task.train[i : i + 8], task.pad_id) for i in range(0, min(len(task.train), 128), 8)]
    context = Context(importance, searched[0], searched[1], subspace_data=(known_batches, task_batches))
    description["searched"] = f"{searched[2]}: modules {searched[0]}, layers {searched[1]}"
    return Setup(task, retention, context, {}, description, anchor)


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


@torch.no_grad()
def greedy_answer(model: nn.Module, prompt_ids: list[int], max_new_tokens: int) -> Example:
    """The model's own greedy continuation of a prompt, as an example labelled on the continuation only."""
    prompt = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
    )
    answer = out[0, prompt.shape[1] :].tolist()
    return {"input_ids": prompt_ids + answer, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer}


def evaluate(model: nn.Module, setup: Setup) -> dict[str, float]:
    """Held-out CE and exact match, and the CE of every versatility set (``{name}_ce``)."""

    def batches(examples: list[Example]) -> list[dict[str, torch.Tensor]]:
        return [collate(examples[i : i + 16], setup.task.pad_id) for i in range(0, len(examples), 16)]

    held_ce, accuracy = loss_and_exact_match(model, batches(setup.task.held_out))
    scores = {
        "held_out_ce": held_ce,
        "exact_match": accuracy,
        "general_ce": mean_loss(model, batches(setup.task.general)),
        "retention_ce": mean_loss(model, batches(setup.retention)),
    }
    scores.update({f"{name}_ce": mean_loss(model, batches(examples)) for name, examples in setup.corpora.items()})
    return scores


def against_base(scores: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """A run's scores with its speciality gain and every set's CE increase against the base model.

    Example:
        >>> against_base({"held_out_ce": 3.0, "retention_ce": 1.5}, {"held_out_ce": 5.0, "retention_ce": 1.0})
        {'held_out_ce': 3.0, 'retention_ce': 1.5, 'speciality_gain': 2.0, 'retention_ce_increase': 0.5}
    """
    increases = {f"{k.removesuffix('_ce')}_ce_increase": v - base[k] for k, v in scores.items() if k.endswith("_ce")}
    increases.pop("held_out_ce_increase", None)
    return {**scores, "speciality_gain": base["held_out_ce"] - scores["held_out_ce"], **increases}
