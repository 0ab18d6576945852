"""Fronts benchmark: does CoFi keep versatility better than full fine-tuning and LoRA at equal speciality?

Every method of ``benchmarks.fronts_methods`` is trained on the same data, steps, schedule and seeds, at each
learning rate of its grid; each run is scored on

- speciality: held-out cross-entropy and exact match (teacher-forced argmax of every answer token, which equals
  greedy-decoding exact match) on dictionary pairs whose headwords never occur in training;
- versatility: (a) the cross-entropy increase on general English (WordNet example sentences), (b) retention: the
  cross-entropy increase on the base model's own greedy answers to fixed general instructions.

Methods that carry a retention anchor (``fronts_methods.ANCHORED_METHODS``, run only when named with ``--methods``)
train with ``peft_cofi.attach_retention_anchor`` on the general prompts of ``anchor_prompts.txt``, which are checked
to be disjoint from every evaluation set.

Then the settings on each method's front (not dominated within its own sweep) are rerun with more seeds, and the
report (``RESULTS.md``-style markdown, JSON, a fronts PNG) compares fronts. Runs are cached in
``<name>_runs.jsonl`` and the mask importance in ``<name>_importance.safetensors`` (delete it, or pass another
``--name``, when the general data change), so an interrupted benchmark resumes where it stopped::

    python -m benchmarks.bench_fronts                  # SmolLM2-135M-Instruct, FreeDict eng-fra, WordNet (~1.5 h)
    python -m benchmarks.bench_fronts --quick          # tiny random Llama, synthetic task (CI, ~1 min)
    python -m benchmarks.bench_fronts --dictionary /usr/share/dictd/freedict-eng-deu.dict.dz --name fronts_deu
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.anchor_prompts import ANCHOR_PROMPTS, chat_prompts, check_disjoint, prompt_batches, read_prompts
from benchmarks.fronts_methods import ALL_METHODS, FFN, METHODS, Context, Method
from benchmarks.fronts_report import front_settings, write_report
from benchmarks.resources import (
    FREEDICT_ENG_FRA,
    IGNORE_INDEX,
    WORDNET_DIR,
    collate,
    freedict_pairs,
    load_smollm2,
    short_translation_examples,
    split_pairs,
    text_examples,
    wordnet_sentences,
)
from benchmarks.tasks import RESULTS_DIR, Example, Task, tiny_task, train
from peft_cofi import CoFiConfig, UnitImportance, attach_retention_anchor, compute_importance
from peft_cofi.evaluation import loss_and_exact_match, mean_loss

INSTRUCTIONS = Path(__file__).resolve().parent / "general_instructions.txt"
SEARCH_RESULTS = RESULTS_DIR / "search.json"


@dataclass
class Setup:
    """A task plus the general and retention sets and the base model's scores on everything."""

    task: Task
    retention: list[Example]
    context: Context
    base: dict[str, float]
    description: dict[str, Any]
    anchor: list[dict[str, torch.Tensor]]  # general prompt batches for methods that carry a retention anchor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama and a synthetic task (CI)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[m.name for m in METHODS],
        help="method names to run (default: every method of fronts_methods.METHODS; the anchored ones by name)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds for the settings on fronts (default 3; 2 quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 24; 4 quick)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached runs only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr-scale", type=float, default=None, help="multiply every grid (default 1; 10 quick)")
    parser.add_argument("--dictionary", default=FREEDICT_ENG_FRA, help="a FreeDict dictd file (the speciality)")
    parser.add_argument("--wordnet", default=WORDNET_DIR, help="WordNet data directory (general English)")
    parser.add_argument("--instructions", type=Path, default=INSTRUCTIONS, help="general instructions, one per line")
    parser.add_argument(
        "--anchor-prompts", type=Path, default=ANCHOR_PROMPTS, help="general prompts for anchored methods, one per line"
    )
    parser.add_argument("--search-results", type=Path, default=SEARCH_RESULTS, help="search.json of bench_search")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="results stem (default fronts, or fronts_quick)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - {m.name for m in ALL_METHODS})
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {[m.name for m in ALL_METHODS]}")
    args.steps = args.steps or (4 if args.quick else 24)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.lr_scale = args.lr_scale or (10.0 if args.quick else 1.0)
    args.name = args.name or ("fronts_quick" if args.quick else "fronts")
    return args


# ----------------------------------------------------------------------------------------------------- setups


def searched_coarse(path: Path, fallback_layers: list[int]) -> tuple[list[str], list[int], str]:
    """Modules and layers of the tree search's best node (``bench_search`` results), else FFN in ``fallback_layers``."""
    if path.is_file():
        best = json.loads(path.read_text())["tree"]["best"]
        return list(best["modules"]), list(best["layers"]), f"{best['label']} (from {path.name})"
    return list(FFN), fallback_layers, "FFN middle-plus (no search results found)"


def real_setup(args: argparse.Namespace) -> Setup:
    model, tokenizer = load_smollm2()
    pad = tokenizer.pad_token_id
    train_pairs, held_pairs = split_pairs(freedict_pairs(args.dictionary), 0.2, seed=0)
    rng = random.Random(0)
    train_pairs = rng.sample(train_pairs, args.steps * args.batch_size)  # every example seen once per run
    held_pairs = rng.sample(held_pairs, 128)
    sentences = wordnet_sentences(args.wordnet, kind="examples")
    glosses = wordnet_sentences(args.wordnet, kind="glosses")
    general = text_examples(tokenizer, rng.sample(sentences, 96))
    # the anchor's prompts: read without drawing from rng (the other sets, hence every cached run, stay as they were)
    anchor_texts = read_prompts(args.anchor_prompts)
    known = text_examples(tokenizer, rng.sample(glosses, 64))  # importance data: disjoint from the general set
    instructions = [line.strip() for line in args.instructions.read_text().splitlines() if line.strip()]
    retention = [
        _greedy_answer(
            model,
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False
            ),
            48,
        )
        for text in instructions
    ]
    task = Task(
        base=model,
        fresh_base=lambda: load_smollm2()[0],
        train=short_translation_examples(tokenizer, train_pairs),
        held_out=short_translation_examples(tokenizer, held_pairs),
        pad_id=pad,
        general=general,
    )
    check_disjoint(
        anchor_texts,
        {
            "retention instructions": instructions,
            "general-English sentences": sentences,
            "held-out dictionary words": [english for english, _ in held_pairs],
        },
    )
    anchor = prompt_batches(chat_prompts(tokenizer, anchor_texts), pad, batch_size=8)
    searched = searched_coarse(args.search_results, list(range(8, 23)))
    description = {
        "model": "SmolLM2-135M-Instruct (30 layers, float32, CPU)",
        "speciality": f"{Path(args.dictionary).name}: {len(train_pairs)} train / {len(held_pairs)} held-out pairs",
        "general": f"{len(general)} WordNet example sentences; importance on {len(known)} WordNet glosses",
        "retention": f"base model's greedy answers (48 tokens max) to {len(instructions)} general instructions",
    }
    return _finish_setup(args, task, retention, known, searched, description, anchor)


def quick_setup(args: argparse.Namespace) -> Setup:
    task = tiny_task(0, n_train=96, n_eval=24)
    rng = random.Random(1)
    task.general = [
        {"input_ids": ids, "labels": ids} for ids in ([rng.randrange(10, 250) for _ in range(12)] for _ in range(24))
    ]
    known = [
        {"input_ids": ids, "labels": ids} for ids in ([rng.randrange(10, 250) for _ in range(12)] for _ in range(16))
    ]
    retention = [_greedy_answer(task.base, [1, *(rng.randrange(10, 250) for _ in range(6))], 6) for _ in range(8)]
    anchor_rng = random.Random(2)  # its own generator: the sets above (and cached runs) stay as they were
    prompts = [[1, *(anchor_rng.randrange(10, 250) for _ in range(6))] for _ in range(8)]
    prompts_of = [[t for t, label in zip(r["input_ids"], r["labels"], strict=True) if label == -100] for r in retention]
    check_disjoint(prompts, {"retention prompts": prompts_of, "general": [e["input_ids"] for e in task.general]})
    description = {"model": "tiny random Llama (8 layers)", "speciality": "synthetic word dictionary"}
    searched = (list(FFN), list(range(2, 6)), "FFN 2-5")
    return _finish_setup(args, task, retention, known, searched, description, prompt_batches(prompts, 0, 8))


def _finish_setup(args, task: Task, retention, known, searched, description, anchor) -> Setup:
    cache = args.out_dir / f"{args.name}_importance.safetensors"
    if cache.is_file():
        importance = UnitImportance.load(cache)
    else:
        batches = [collate(known[i : i + 8], task.pad_id) for i in range(0, len(known), 8)]
        importance = compute_importance(task.base, batches, config=CoFiConfig(target_modules=FFN), progress=False)
        importance.save(cache)
    context = Context(importance, searched[0], searched[1])
    description["searched"] = f"{searched[2]}: modules {searched[0]}, layers {searched[1]}"
    setup = Setup(task, retention, context, {}, description, anchor)
    setup.base = evaluate(task.base, setup)
    return setup


@torch.no_grad()
def _greedy_answer(model: nn.Module, prompt_ids: list[int], max_new_tokens: int) -> Example:
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


# ----------------------------------------------------------------------------------------------------- runs


def evaluate(model: nn.Module, setup: Setup) -> dict[str, float]:
    def batches(examples: list[Example]) -> list[dict[str, torch.Tensor]]:
        return [collate(examples[i : i + 16], setup.task.pad_id) for i in range(0, len(examples), 16)]

    held_ce, accuracy = loss_and_exact_match(model, batches(setup.task.held_out))
    return {
        "held_out_ce": held_ce,
        "exact_match": accuracy,
        "general_ce": mean_loss(model, batches(setup.task.general)),
        "retention_ce": mean_loss(model, batches(setup.retention)),
    }


def run_one(method: Method, lr: float, seed: int, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = method.build(setup.task.fresh_base(), setup.context)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    anchor, anchor_record = None, {}
    if method.anchor is not None:
        # an adapter gives its base through disable_adapter(); full fine-tuning needs a frozen copy of the base
        reference = None if hasattr(model, "disable_adapter") else setup.task.fresh_base()
        settings = {"weight": method.anchor.weight, "kind": method.anchor.kind, "every": method.anchor.every}
        answers = args.out_dir / f"{args.name}_anchor_answers.json" if method.anchor.kind == "self-answers" else None
        anchor = attach_retention_anchor(
            model, setup.anchor, **settings, reference=reference, answers_file=answers, progress=False
        )
    start = time.perf_counter()
    train(model, setup.task, args.steps, args.batch_size, lr, seed=seed)
    train_seconds = time.perf_counter() - start
    if anchor is not None:
        anchor_record = {"anchor": {**settings, "mean": anchor.mean_since()[0]}}
        anchor.detach()
    scores = evaluate(model, setup)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        checkpoint_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
    base = setup.base
    return {
        "method": method.name,
        "lr": lr,
        "seed": seed,
        **scores,
        "speciality_gain": base["held_out_ce"] - scores["held_out_ce"],
        "general_ce_increase": scores["general_ce"] - base["general_ce"],
        "retention_ce_increase": scores["retention_ce"] - base["retention_ce"],
        "trainable_params": trainable,
        "checkpoint_bytes": checkpoint_bytes,
        "train_seconds": round(train_seconds, 2),
        **anchor_record,
    }


def run_all(args: argparse.Namespace, setup: Setup, cache: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    done = {(r["method"], r["lr"], r["seed"]) for r in records}
    methods = [m for m in ALL_METHODS if m.name in args.methods]

    def ensure(method: Method, lr: float, seed: int) -> None:
        if (method.name, lr, seed) in done:
            return
        print(f"[{len(records) + 1}] {method.name} lr={lr:g} seed={seed}", flush=True)
        record = run_one(method, lr, seed, setup, args)
        print(
            f"    gain {record['speciality_gain']:+.3f}  general {record['general_ce_increase']:+.4f}  "
            f"retention {record['retention_ce_increase']:+.4f}  EM {record['exact_match']:.3f}",
            flush=True,
        )
        records.append(record)
        done.add((method.name, lr, seed))
        with cache.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    if args.report_only:
        return [r for r in records if r["method"] in args.methods]
    for method in methods:  # phase 1: every setting once (quick: the grid's ends)
        for lr in (method.lrs[0], method.lrs[-1]) if args.quick else method.lrs:
            ensure(method, lr * args.lr_scale, 0)
    # Phase 2: more seeds where it matters, the settings on each method's own front; the reference and CoFi first.
    methods.sort(key=lambda m: (m.family == "lora", m.name == "osf"))
    for method in methods:
        for lr in front_settings([r for r in records if r["method"] == method.name and r["seed"] == 0]):
            for seed in range(1, args.seeds):
                ensure(method, lr, seed)
    return [r for r in records if r["method"] in args.methods]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    cache = args.out_dir / f"{args.name}_runs.jsonl"
    saved_setup = args.out_dir / f"{args.name}_setup.json"  # the base model's scores: a report needs no model
    if args.report_only and not (saved_setup.is_file() and cache.is_file()):
        raise SystemExit(f"--report-only: no cached runs at {cache} and {saved_setup}; run without it first.")
    if args.report_only:
        base, description = json.loads(saved_setup.read_text()).values()
        records = [r for r in map(json.loads, cache.read_text().splitlines()) if r["method"] in args.methods]
    else:
        setup = quick_setup(args) if args.quick else real_setup(args)
        base, description = setup.base, setup.description
        saved_setup.write_text(json.dumps({"base": base, "description": description}, indent=1))
        print(f"base model: {json.dumps({k: round(v, 4) for k, v in base.items()})}", flush=True)
        records = run_all(args, setup, cache)
    write_report(records, base, ALL_METHODS, description, settings, args.out_dir, args.name)
    print(f"wrote {args.out_dir / args.name}.md/.json/.png in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
