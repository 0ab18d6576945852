"""``peft-cofi search``: find which modules in which layers to train (coarse-to-fine tree search).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="peft-cofi")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["search", "model_dir", "--train", "t.jsonl", "--eval", "e.jsonl",
    ...                           "--general", "g.txt", "--out", "search"])
    >>> args.objective, args.steps, args.handler.__name__
    ('constrained', 20, 'run_search')
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data import collate, pad_token_id, read_jsonl, tokenize_records
from ..evaluation import exact_match_evaluator, loss_evaluator, retention_evaluator
from ..search import STRATEGIES, search_modules
from ..search_objective import DEFAULT_MIN_RETENTION, OBJECTIVES
from . import local_model_dir
from .arguments import positive_float, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``search`` command (with its ``handler``) to ``subparsers``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> register(parser.add_subparsers())
        >>> parser.parse_args(["search", "m", "--train", "t", "--eval", "e", "--general", "g", "--out", "o",
        ...                    "--budget-trials", "12"]).budget_trials
        12
    """
    search = subparsers.add_parser(
        "search",
        help="search module groups x layer windows for the best CoFi configuration",
        description=(
            "Coarse-to-fine tree search (see docs/SEARCH.md): each trial fine-tunes a CoFi adapter on one module "
            "group in one layer window for a few steps and scores speciality (on --eval) and versatility (on "
            "--general). Writes best_config.json, best_adapter/adapter_config.json, report.md, trials.png and the "
            "resumable trial cache trials.jsonl into --out. Data: JSONL with 'instruction'/'input'/'output', "
            "'messages' or 'text' records; --general may also be plain text, one document per line."
        ),
    )
    search.add_argument("model", metavar="MODEL", help="local model directory (AutoModelForCausalLM/AutoTokenizer)")
    search.add_argument("--train", required=True, metavar="JSONL", help="speciality training data")
    search.add_argument("--eval", required=True, metavar="JSONL", help="held-out speciality data")
    search.add_argument("--general", required=True, metavar="FILE", help="general text (.jsonl or plain text)")
    search.add_argument("--out", required=True, metavar="DIR", help="output directory")
    search.add_argument("--budget-trials", type=positive_int, default=None, metavar="N", help="stop after N trials")
    search.add_argument("--budget-minutes", type=positive_float, default=None, metavar="M", help="stop after M min")
    search.add_argument("--steps", type=positive_int, default=20, help="AdamW steps per trial (default: %(default)s)")
    search.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate (default: %(default)s)")
    search.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    search.add_argument("--objective", choices=OBJECTIVES, default="constrained", help="default: %(default)s")
    search.add_argument(
        "--min-retention",
        type=float,
        default=DEFAULT_MIN_RETENTION,
        help="versatility threshold of the constrained/pareto objectives (default: %(default)s)",
    )
    search.add_argument("--weight", type=float, default=1.0, help="versatility weight of 'weighted' (default: 1)")
    search.add_argument(
        "--speciality", choices=("loss", "exact-match"), default="loss", help="speciality measure (default: loss)"
    )
    search.add_argument(
        "--versatility",
        choices=("ce", "kl"),
        default="ce",
        help="versatility: exp(-cross-entropy increase) or exp(-KL to the base model) (default: ce)",
    )
    search.add_argument("--strategy", choices=STRATEGIES, default="tree", help="default: %(default)s")
    search.add_argument("--beam-width", type=positive_int, default=1, help="nodes refined per level (default: 1)")
    search.add_argument("--batch-size", type=positive_int, default=8, help="default: %(default)s")
    search.add_argument("--max-length", type=positive_int, default=256, help="tokens per example (default: 256)")
    search.add_argument("--max-records", type=positive_int, default=None, help="read at most N records per file")
    search.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    search.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    search.set_defaults(handler=run_search)


def run_search(args: argparse.Namespace) -> int:
    """Handler of ``peft-cofi search``: load model, tokenizer and data, search, write the outputs, print a summary."""
    model_dir = local_model_dir(args.model)
    for path in (args.train, args.eval, args.general):
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file {path!r} does not exist.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    train = _batches(tokenizer, _records(args.train, args.max_records), args)
    held_out = _batches(tokenizer, _records(args.eval, args.max_records), args)
    general = _batches(tokenizer, _records(args.general, args.max_records), args)
    speciality = (exact_match_evaluator if args.speciality == "exact-match" else loss_evaluator)(held_out)
    result = search_modules(
        model,
        train,
        speciality,
        retention_evaluator(general, measure=args.versatility),
        budget_trials=args.budget_trials,
        budget_minutes=args.budget_minutes,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        objective=args.objective,
        min_retention=args.min_retention,
        weight=args.weight,
        strategy=args.strategy,
        beam_width=args.beam_width,
        out_dir=args.out,
        progress=not args.no_progress,
    )
    best = result.best
    print(
        f"{len(result.trials)} trials ({result.ran} run, {result.cached} cached, {len(result.failed)} failed) in "
        f"{result.seconds:.1f} s; stopped: {result.stop_reason}"
    )
    if best is None:
        print(f"best: none (every trial failed); report: {Path(args.out) / 'report.md'}")
        return 1
    print(
        f"best: {best.label} (layers {best.layers}), speciality {best.speciality:.4f}, versatility "
        f"{best.versatility:.4f}; config: {Path(args.out) / 'best_config.json'}, report: {Path(args.out) / 'report.md'}"
    )
    return 0


def _records(path: str, max_records: int | None) -> list[dict[str, Any]]:
    """JSONL records, or plain-text lines as ``{"text": line}`` for files not ending in ``.jsonl``/``.json``."""

    if Path(path).suffix in (".jsonl", ".json"):
        return read_jsonl(path, max_records)
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"text file {path!r} holds no line of text.")
    return [{"text": line} for line in lines[:max_records]]


def _batches(tokenizer: Any, records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:

    examples = tokenize_records(tokenizer, records, max_length=args.max_length)
    pad = pad_token_id(tokenizer)
    size = args.batch_size
    return [collate(examples[i : i + size], pad) for i in range(0, len(examples), size)]
