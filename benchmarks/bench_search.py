"""Benchmark: the coarse-to-fine module search (``peft_cofi.search.search_modules``).

Full run: SmolLM2-135M-Instruct (30 layers), speciality = English->French word translation (FreeDict, chat format,
held-out loss on unseen headwords), versatility = cross-entropy retention on WordNet example sentences; a tree
search within a trial and time budget, then the paper's pick (FFN up/down in ``bottom2``) scored with the same
trial settings for comparison (read from the cache if the tree already scored it).

``--quick`` (seconds, for CI): a tiny random Llama (8 layers) on synthetic data, tree search against exhaustive
search over the same small space (named groups x the paper's seven windows) with real training, both through one
trial cache, plus the same comparison on random synthetic landscapes (no training, many instances).

Run from the repository root::

    python -m benchmarks.bench_search            # SmolLM2-135M-Instruct, real data (~10-15 min on 2 shared cores)
    python -m benchmarks.bench_search --quick    # tiny model + synthetic landscapes, for CI

Results: ``benchmarks/results/search.json``, ``search.md`` and ``search.png`` (``search_quick.*`` with ``--quick``);
the full run keeps its trial cache in ``benchmarks/results/search_trials.jsonl``, so rerunning it is free.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks import RESULTS_DIR
from benchmarks.search_landscapes import grid_markdown, landscape_grid
from peft_cofi.evaluation import loss_evaluator, retention_evaluator
from peft_cofi.example_model import load_smollm2
from peft_cofi.search import search_modules
from peft_cofi.search_report import plot_search, search_markdown
from peft_cofi.search_space import FULL_DEPTH, Candidate, SearchSpace, Window
from peft_cofi.search_trials import Trial

PAPER_PICK = ("ffn_up_down", Window(0.25, 0.5))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model + synthetic landscapes (CI)")
    parser.add_argument("--budget-trials", type=int, default=None, help="default 14 (quick 20)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="default 16 (quick none)")
    parser.add_argument("--steps", type=int, default=None, help="AdamW steps per trial (default 12; quick 8)")
    parser.add_argument("--lr", type=float, default=None, help="default 5e-4 (quick 3e-3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (quick 8)")
    parser.add_argument("--min-retention", type=float, default=0.98)
    parser.add_argument("--landscapes", type=int, default=200, help="synthetic landscapes for the comparison")
    parser.add_argument(
        "--noise-seeds", type=int, default=0, help="re-score the top 3 and the paper's pick with N more seeds"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="results file stem (default: search, or search_quick)")
    args = parser.parse_args(argv)
    args.budget_trials = args.budget_trials or (20 if args.quick else 14)
    args.budget_minutes = args.budget_minutes if args.budget_minutes is not None else (None if args.quick else 16.0)
    args.steps = args.steps or (8 if args.quick else 12)
    args.lr = args.lr or (3e-3 if args.quick else 5e-4)
    args.batch_size = args.batch_size or (8 if args.quick else 4)
    return args


# ------------------------------------------------------------------------------------ quick: tiny model


def tiny_setup(batch_size: int) -> tuple[torch.nn.Module, list, list, list]:
    """A tiny random Llama, a synthetic speciality task (map each token through a fixed permutation after a
    separator) and general text sampled from the base model itself (which it therefore predicts well)."""
    from benchmarks.tasks import tiny_llama

    model = tiny_llama(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_key_value_heads=4, max_position_embeddings=64
    )
    generator = torch.Generator().manual_seed(1)
    permutation = torch.randperm(60, generator=generator) + 4

    def task_batch(n: int) -> dict[str, torch.Tensor]:
        source = torch.randint(4, 64, (n, 5), generator=generator)
        target = permutation[source - 4]
        ids = torch.cat([source, torch.full((n, 1), 1), target], dim=1)
        labels = ids.clone()
        labels[:, :6] = -100
        return {"input_ids": ids, "labels": labels}

    train = [task_batch(batch_size) for _ in range(8)]
    held_out = [task_batch(16) for _ in range(2)]
    with torch.no_grad():
        ids = torch.randint(4, 64, (16, 1), generator=generator)
        for _ in range(15):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    general = [{"input_ids": ids[:8]}, {"input_ids": ids[8:]}]
    return model, train, held_out, general


def run_quick(args: argparse.Namespace) -> dict[str, Any]:
    model, train, held_out, general = tiny_setup(args.batch_size)
    speciality, versatility = loss_evaluator(held_out), retention_evaluator(general)
    settings = {"steps": args.steps, "lr": args.lr, "min_retention": args.min_retention, "progress": False}
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        space = SearchSpace.from_model(model, leave_one_out=False, max_window_depth=2)
        exhaustive = search_modules(
            model,
            train,
            speciality,
            versatility,
            strategy="exhaustive",
            space=space,
            cache=work / "t.jsonl",
            **settings,
        )
        tree = search_modules(
            model,
            train,
            speciality,
            versatility,
            budget_trials=args.budget_trials,
            space=space,
            cache=work / "t.jsonl",
            out_dir=work / "tree",
            **settings,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ranked = exhaustive.objective.ranked(exhaustive.trials)
    keys = [t.key for t in ranked]
    plot_search(tree, args.out_dir / f"{args.name or 'search_quick'}.png")
    return {
        "mode": "quick",
        "model": "tiny random Llama (8 layers, hidden 48)",
        "tree": _summary(tree),
        "exhaustive": _summary(exhaustive),
        "tree_pick_rank_in_exhaustive": keys.index(tree.best.key) + 1 if tree.best else None,
        "tree_trials_needing_training": tree.ran,
        "landscapes": landscape_grid(args.landscapes),
        "report": search_markdown(tree),
        "metrics_table": metrics_markdown([tree.reference, *tree.trials]),
    }


# ------------------------------------------------------------------------------------ full: SmolLM2


def run_full(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.resources import (
        collate,
        freedict_pairs,
        short_translation_examples,
        split_pairs,
        text_examples,
        wordnet_sentences,
    )

    model, tokenizer = load_smollm2()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_pairs, held_pairs = split_pairs(freedict_pairs(), 0.2, seed=0)
    random.Random(0).shuffle(train_pairs)
    train_examples = short_translation_examples(tokenizer, train_pairs[: args.batch_size * args.steps])
    train = [
        collate(train_examples[i : i + args.batch_size], pad) for i in range(0, len(train_examples), args.batch_size)
    ]
    held = short_translation_examples(tokenizer, held_pairs[:32])
    held_out = [collate(held[i : i + 16], pad) for i in range(0, len(held), 16)]
    sentences = random.Random(1).sample(wordnet_sentences(kind="examples"), 24)
    general_examples = text_examples(tokenizer, sentences)
    general = [collate(general_examples[i : i + 12], pad) for i in range(0, len(general_examples), 12)]
    speciality, versatility = loss_evaluator(held_out), retention_evaluator(general)
    settings = {"steps": args.steps, "lr": args.lr, "min_retention": args.min_retention}
    cache = args.out_dir / "search_trials.jsonl"
    tree = search_modules(
        model,
        train,
        speciality,
        versatility,
        budget_trials=args.budget_trials,
        budget_minutes=args.budget_minutes,
        cache=cache,
        **settings,
    )
    space = SearchSpace.from_model(model)
    paper_node = space.candidate(*PAPER_PICK)
    paper = search_modules(
        model, train, speciality, versatility, strategy=[paper_node], cache=cache, progress=False, **settings
    )
    paper_trial = paper.trials[0]
    scored_by_tree = any(t.key == paper_trial.key for t in tree.trials)
    everything = tree.objective.ranked([*tree.trials, *([] if scored_by_tree else [paper_trial])])
    plot_search(tree, args.out_dir / f"{args.name or 'search'}.png")
    noise = seed_noise(args, model, train, speciality, versatility, cache, [*everything[:3], paper_trial])
    return {
        "mode": "full",
        "model": "SmolLM2-135M-Instruct (30 layers)",
        "data": {
            "train_examples": len(train_examples),
            "held_out_examples": len(held),
            "general_sentences": len(sentences),
            "train_tokens_per_batch": int(train[0]["attention_mask"].sum()),
        },
        "tree": _summary(tree),
        "paper_pick": {
            **_trial_summary(paper_trial),
            "scored_by_tree": scored_by_tree,
            "rank_among_scored": [t.key for t in everything].index(paper_trial.key) + 1,
            "feasible": tree.objective.feasible(paper_trial),
            "extra_seconds": round(paper.seconds, 1),
        },
        "seed_noise": noise,
        "report": search_markdown(tree),
        "metrics_table": metrics_markdown([tree.reference, *tree.trials, *([] if scored_by_tree else [paper_trial])]),
    }


def seed_noise(args, model, train, speciality, versatility, cache, trials: list[Trial]) -> list[dict[str, Any]]:
    """Scores of ``trials``' nodes under seeds 0..``--noise-seeds`` (the seed changes the batch order): how much of
    the differences between nodes is training noise."""
    if not args.noise_seeds:
        return []
    unique = {t.key: (Candidate(tuple(t.modules), tuple(t.layers), t.group, FULL_DEPTH), t.label) for t in trials}
    nodes = [node for node, _ in unique.values()]
    labels = {node: label for node, label in unique.values()}
    rows = {node: [] for node in nodes}
    for seed in range(args.noise_seeds + 1):
        result = search_modules(
            model,
            train,
            speciality,
            versatility,
            strategy=nodes,
            cache=cache,
            progress=False,
            seed=seed,
            steps=args.steps,
            lr=args.lr,
            min_retention=args.min_retention,
        )
        for node, trial in zip(nodes, result.trials, strict=True):
            rows[node].append((trial.speciality, trial.versatility))
    out = []
    for node, scores in rows.items():
        special = [s for s, _ in scores]
        versatile = [v for _, v in scores]
        out.append(
            {
                "label": labels[node],
                "speciality": special,
                "versatility": versatile,
                "speciality_mean": sum(special) / len(special),
                "speciality_range": max(special) - min(special),
                "versatility_mean": sum(versatile) / len(versatile),
                "versatility_range": max(versatile) - min(versatile),
            }
        )
    return out


# ------------------------------------------------------------------------------------ output


def metrics_markdown(trials: list[Trial]) -> str:
    """Per-trial raw metrics: held-out loss and exact match, cross-entropy increase and KL on general text."""
    lines = [
        "| node | layers | held-out loss | exact match | ΔCE general | KL to base | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for trial in trials:
        m = trial.metrics

        def get(name: str, m=m) -> str:
            return f"{m[name]:.4f}" if name in m else "-"

        span = "-" if trial.group == "base model" else f"{trial.layers[0]}-{trial.layers[-1]}"
        lines.append(
            f"| `{trial.label}` | {span} | {get('speciality/loss')} | "
            f"{get('speciality/exact_match')} | {get('versatility/ce_increase')} | {get('versatility/kl')} | "
            f"{trial.seconds:.0f} |"
        )
    return "\n".join(lines)


def _trial_summary(trial: Trial | None) -> dict[str, Any]:
    if trial is None:
        return {}
    return {
        "label": trial.label,
        "modules": trial.modules,
        "layers": trial.layers,
        "status": trial.status,
        "speciality": trial.speciality,
        "versatility": trial.versatility,
        "metrics": trial.metrics,
        "seconds": round(trial.seconds, 2),
    }


def _summary(result) -> dict[str, Any]:
    return {
        "trials": len(result.trials),
        "ran": result.ran,
        "cached": result.cached,
        "failed": len(result.failed),
        "wall_seconds": round(result.seconds, 1),
        "trial_seconds": round(sum(t.seconds for t in result.trials), 1),
        "stop_reason": result.stop_reason,
        "log": result.log,
        "best": _trial_summary(result.best),
        "front": [t.label for t in result.front],
        "reference": _trial_summary(result.reference),
    }


def write_results(results: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = results.pop("report")
    metrics = results.pop("metrics_table", None)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    lines = [f"# Module search benchmark ({results['mode']})", "", f"Model: {results['model']}.", ""]
    lines += [f"Environment: {results['environment']}.", ""]
    tree = results["tree"]
    best = tree["best"]
    lines += [
        f"Tree search: {tree['trials']} trials ({tree['ran']} trained, {tree['cached']} cached, {tree['failed']} "
        f"failed), {tree['wall_seconds']} s wall ({tree['trial_seconds']} s of trial time, cached trials "
        f"included); stopped: {tree['stop_reason']}.",
        f"Found: `{best.get('label')}` (modules {best.get('modules')}, layers {best.get('layers')}), speciality "
        f"{best.get('speciality')}, versatility {best.get('versatility')}.",
        "",
    ]
    if "paper_pick" in results:
        paper = results["paper_pick"]
        lines += [
            f"Paper's pick `{paper['label']}` (layers {paper['layers']}): speciality {paper['speciality']}, "
            f"versatility {paper['versatility']}, feasible: {paper['feasible']}, rank {paper['rank_among_scored']} "
            f"among the scored nodes (scored by the tree: {paper['scored_by_tree']}).",
            "",
        ]
    if "exhaustive" in results:
        exhaustive, grid = results["exhaustive"], results["landscapes"]
        lines += [
            f"Exhaustive search over the same space: {exhaustive['trials']} trials, best "
            f"`{exhaustive['best'].get('label')}`; the tree's pick ranks {results['tree_pick_rank_in_exhaustive']} "
            f"of {exhaustive['trials']}.",
            "",
            f"Random landscapes ({grid[0]['landscapes']} per row, {grid[0]['space']}):",
            "",
            grid_markdown(results["landscapes"]),
            "",
        ]
    if results.get("seed_noise"):
        lines += [
            f"Seed noise (seeds 0-{len(results['seed_noise'][0]['speciality']) - 1}; the seed sets the batch order):",
            "",
            "| node | speciality mean | speciality range | versatility mean | versatility range |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{row['label']}` | {row['speciality_mean']:.4f} | {row['speciality_range']:.4f} | "
            f"{row['versatility_mean']:.4f} | {row['versatility_range']:.4f} |"
            for row in results["seed_noise"]
        ]
        lines.append("")
    if metrics:
        lines += ["Raw metrics of every scored node (first row: the base model):", "", metrics, ""]
    lines += ["## Tree search report", "", report.replace("# Module search", "### Module search", 1)]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_quick(args) if args.quick else run_full(args)
    results["environment"] = (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    stem = args.name or ("search_quick" if args.quick else "search")
    write_results(results, args.out_dir, stem)
    summary = (args.out_dir / f"{stem}.md").read_text(encoding="utf-8").split("\n## ")[0]
    print(summary.split("\nRandom landscapes")[0].split("\nRaw metrics")[0].strip())
    print(f"\nwrote {args.out_dir / stem}.json, .md, .png in {results['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
