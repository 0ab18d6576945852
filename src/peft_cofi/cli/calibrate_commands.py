"""``peft-cofi calibrate``: rescale a trained CoFi diff for the best speciality within a versatility budget.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="peft-cofi")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["calibrate", "model_dir", "adapter", "--eval", "e.jsonl", "--general", "g.txt",
    ...                           "--out", "calibration"])
    >>> args.granularity, args.method, args.budget, args.handler.__name__
    ('layer', 'search', None, 'run_calibrate')
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..calibration import calibrate, check_disjoint
from ..calibration_search import DEFAULT_DENSITIES, METHODS
from ..diff_scaling import cofi_weights_path
from ..evaluation import exact_match_evaluator, loss_evaluator, retention_evaluator
from ..scales import GRANULARITIES
from . import local_model_dir
from .arguments import positive_float, positive_int
from .search_commands import _batches, _records

DEFAULT_BUDGET = 0.98


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` command (with its ``handler``) to ``subparsers``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> register(parser.add_subparsers())
        >>> parser.parse_args(["calibrate", "m", "a", "--eval", "e", "--general", "g", "--out", "o",
        ...                    "--levels", "0,0.5,1"]).levels
        [0.0, 0.5, 1.0]
    """
    calibrate = subparsers.add_parser(
        "calibrate",
        help="rescale a trained CoFi diff for the best speciality within a versatility budget",
        description=(
            "Load the adapter once onto MODEL and score rescaled versions of its diff (W0 + f*dW: one factor, or "
            "one per layer, module or row group, found by a line search and coordinate ascent; or DARE/TIES "
            "sparsification) on --eval (speciality) and --general (versatility), forward passes only. Writes the "
            "calibrated adapter (OUT/adapter), report.md, result.json, front.png and the resumable cache "
            "evaluations.jsonl into --out. Exit status: 0 when the pick meets the budget, 1 when no candidate "
            "does (the most versatile one is written), 2 for bad input."
        ),
    )
    calibrate.add_argument("model", metavar="MODEL", help="local base model directory the adapter was trained on")
    calibrate.add_argument("adapter", metavar="ADAPTER", help="trained CoFi adapter folder")
    calibrate.add_argument(
        "--eval", required=True, metavar="JSONL", help="validation split: speciality is measured on it"
    )
    calibrate.add_argument(
        "--general", required=True, metavar="FILE", help="general text (.jsonl or plain text): versatility"
    )
    calibrate.add_argument("--out", required=True, metavar="DIR", help="output directory (resumes from its cache)")
    calibrate.add_argument(
        "--train", metavar="JSONL", help="the training data, only to refuse a validation split that overlaps it"
    )
    limit = calibrate.add_mutually_exclusive_group()
    limit.add_argument(
        "--budget",
        type=positive_float,
        default=None,
        metavar="R",
        help=f"least versatility retention to keep, 1 = the base model's (default: {DEFAULT_BUDGET})",
    )
    limit.add_argument(
        "--max-forgetting",
        type=positive_float,
        default=None,
        metavar="NATS",
        help="the same as a largest CE increase (or KL with --versatility kl) in nats: budget = exp(-NATS)",
    )
    calibrate.add_argument(
        "--granularity", choices=GRANULARITIES, default="layer", help="what gets its own factor (default: layer)"
    )
    calibrate.add_argument(
        "--method", choices=METHODS, default="search", help="factor search, or DARE/TIES sparsification"
    )
    calibrate.add_argument(
        "--levels", type=_floats, default=None, metavar="F,F,...", help="factors a coordinate may take (comma list)"
    )
    calibrate.add_argument(
        "--densities",
        type=_floats,
        default=list(DEFAULT_DENSITIES),
        metavar="D,D,...",
        help="kept fractions tried by --method dare/ties (default: %(default)s)",
    )
    calibrate.add_argument(
        "--row-groups", type=positive_int, default=4, help="row groups per module for --granularity row"
    )
    calibrate.add_argument("--max-evaluations", type=positive_int, default=None, help="stop after N evaluations")
    calibrate.add_argument("--max-minutes", type=positive_float, default=None, help="stop after M minutes")
    calibrate.add_argument(
        "--speciality", choices=("loss", "exact-match"), default="loss", help="speciality measure (default: loss)"
    )
    calibrate.add_argument(
        "--versatility",
        choices=("ce", "kl"),
        default="ce",
        help="versatility: exp(-cross-entropy increase) or exp(-KL to the base model) (default: ce)",
    )
    calibrate.add_argument("--seed", type=int, default=0, help="DARE's random drop (default: %(default)s)")
    calibrate.add_argument("--batch-size", type=positive_int, default=8, help="default: %(default)s")
    calibrate.add_argument("--max-length", type=positive_int, default=256, help="tokens per example (default: 256)")
    calibrate.add_argument("--max-records", type=positive_int, default=None, help="read at most N records per file")
    calibrate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    calibrate.add_argument(
        "--no-verify-base", action="store_true", help="apply the diff even if MODEL is not the model it was trained on"
    )
    calibrate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    calibrate.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    """Handler of ``peft-cofi calibrate``: check the inputs, load model and data, calibrate, print a summary."""
    model_dir = local_model_dir(args.model)
    cofi_weights_path(args.adapter)  # a LoRA or missing folder is refused before the model loads
    for path in filter(None, (args.eval, args.general, args.train)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file {path!r} does not exist.")
    budget = DEFAULT_BUDGET if args.budget is None else args.budget
    if args.max_forgetting is not None:
        budget = math.exp(-args.max_forgetting)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    validation = _batches(tokenizer, _records(args.eval, args.max_records), args)
    general = _batches(tokenizer, _records(args.general, args.max_records), args)
    train = _batches(tokenizer, _records(args.train, args.max_records), args) if args.train else None
    check_disjoint(validation, {"training": train, "versatility": general})  # before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    speciality = (exact_match_evaluator if args.speciality == "exact-match" else loss_evaluator)(validation)
    result = calibrate(
        model,
        args.adapter,
        speciality=speciality,
        versatility=retention_evaluator(general, measure=args.versatility),
        budget=budget,
        granularity=args.granularity,
        method=args.method,
        levels=args.levels,
        densities=args.densities,
        row_groups=args.row_groups,
        max_evaluations=args.max_evaluations,
        max_minutes=args.max_minutes,
        train_batches=train,
        out_dir=args.out,
        seed=args.seed,
        verify_base=not args.no_verify_base,
        progress=not args.no_progress,
    )
    chosen, out = result.chosen, Path(args.out)
    print(
        f"{len(result.evaluations)} evaluations ({result.ran} run, {result.cached} cached, {len(result.failed)} "
        f"failed) in {result.seconds:.1f} s; {result.stop_reason}"
    )
    if chosen is None:
        print(f"every evaluation failed; nothing written; report: {out / 'report.md'}")
        return 1
    scores = f"speciality {chosen.speciality:.4f}, versatility {chosen.versatility:.4f}"
    if not result.met_budget:
        print(
            f"no candidate meets the budget {budget:.4g}; wrote the most versatile one, {chosen.label} ({scores}), "
            f"to {result.adapter_dir}; report: {out / 'report.md'}"
        )
        return 1
    print(f"chosen: {chosen.label} ({scores}); adapter: {result.adapter_dir}; report: {out / 'report.md'}")
    return 0


def _floats(text: str) -> list[float]:
    """A comma-separated list of finite numbers."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers.") from error
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list finite numbers, e.g. 0,0.5,1.")
    return values
