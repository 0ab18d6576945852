"""Fronts benchmark: does CoFi keep versatility better than full fine-tuning and LoRA at equal speciality?

Every method of ``benchmarks.fronts_methods`` is trained on the same data, steps, schedule and seeds, at each
learning rate of its grid; each run is scored on

- speciality: held-out cross-entropy and exact match (teacher-forced argmax of every answer token, which equals
  greedy-decoding exact match) on dictionary pairs whose headwords never occur in training;
- versatility, each its own front: retention (the cross-entropy increase on the base model's own greedy answers to
  fixed general instructions), general text as assistant answers (quotes, Python code, witty definitions) and plain
  English (WordNet example sentences).

The data, regimes and versatility sets are :mod:`benchmarks.fronts_setup`'s. Methods that carry a retention anchor
(``fronts_methods.ANCHORED_METHODS``) train with ``peft_cofi.attach_retention_anchor`` on the general prompts of
``anchor_prompts.txt``, checked to be disjoint from every evaluation set; the input-subspace methods
(``fronts_methods.SUBSPACE_METHODS``) train CoFi with ``CoFiConfig(input_subspace=...)``. Both run only when named with
``--methods``.

Then the settings on each method's front (not dominated within its own sweep) are rerun with more seeds, and the
report (``RESULTS.md``-style markdown, JSON, a fronts PNG) compares the fronts of every cached run, whichever
``--methods`` ran this time (so processes sharing a cache never leave a partial report; ``python -m
benchmarks.sync_docs`` then copies its tables into the docs). Runs are cached in
``<name>_runs.jsonl`` and the mask importance in ``<name>_importance.safetensors`` (delete it, or pass another
``--name``, when the general data change), so an interrupted benchmark resumes where it stopped::

    python -m benchmarks.bench_fronts                  # SmolLM2-135M-Instruct, FreeDict eng-fra, WordNet (~1.5 h)
    python -m benchmarks.bench_fronts --regime heavy   # two epochs over 1,536 pairs (about 16x the light regime)
    python -m benchmarks.bench_fronts --regime heavy --seeds 1 --methods full@1e-5 full+anchor-kl-3@1e-5  # chosen runs
    python -m benchmarks.bench_fronts --regime heavy --seeds 3 --only-seeds 2 --methods full@1e-5  # seed 2 only
    python -m benchmarks.bench_fronts --quick          # tiny random Llama, synthetic task (CI, ~1 min)
    python -m benchmarks.bench_fronts --dictionary /usr/share/dictd/freedict-eng-deu.dict.dz --name fronts_deu
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import RESULTS_DIR
from benchmarks.anchor_prompts import ANCHOR_PROMPTS
from benchmarks.fronts_methods import ALL_METHODS, METHODS, Method
from benchmarks.fronts_report import front_settings, write_report
from benchmarks.fronts_setup import REGIMES, Setup, against_base, evaluate, quick_setup, real_setup
from benchmarks.resources import FREEDICT_ENG_FRA, WORDNET_DIR
from benchmarks.tasks import train
from peft_cofi import attach_retention_anchor

INSTRUCTIONS = Path(__file__).resolve().parent / "general_instructions.txt"
SEARCH_RESULTS = RESULTS_DIR / "search.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama and a synthetic task (CI)")
    parser.add_argument(
        "--regime", choices=sorted(REGIMES), default="light", help="light (24 steps) or heavy (2 epochs of 1,536 pairs)"
    )
    parser.add_argument(
        "--remeasure", action="store_true", help="rerun cached runs that lack a versatility measure added since"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[m.name for m in METHODS],
        help="method names to run, in this order (default: every method of fronts_methods.METHODS; the anchored "
        "ones by name); NAME@LR runs that method at that learning rate only",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds for the settings on fronts (default 3; 2 quick)")
    parser.add_argument(
        "--only-seeds",
        type=int,
        nargs="+",
        default=None,
        help="of the extra seeds (1 to --seeds - 1), run only these: to split them between processes sharing the cache",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the regime's)")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the cached runs only, running nothing"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="only these learning rates (runs and extra seeds)"
    )
    parser.add_argument("--lr-scale", type=float, default=None, help="multiply every grid (default 1; 10 quick)")
    parser.add_argument("--dictionary", default=FREEDICT_ENG_FRA, help="a FreeDict dictd file (the speciality)")
    parser.add_argument("--wordnet", default=WORDNET_DIR, help="WordNet data directory (general English)")
    parser.add_argument("--instructions", type=Path, default=INSTRUCTIONS, help="general instructions, one per line")
    parser.add_argument(
        "--anchor-prompts", type=Path, default=ANCHOR_PROMPTS, help="general prompts for anchored methods, one per line"
    )
    parser.add_argument("--search-results", type=Path, default=SEARCH_RESULTS, help="search.json of bench_search")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--keep-models", type=Path, default=None, help="also keep each trained adapter / model here (for calibration)"
    )
    parser.add_argument("--name", default=None, help="results stem (default fronts, or fronts_quick)")
    args = parser.parse_args(argv)
    # calibrated runs (benchmarks.fronts_calibration) are named "{method}@{lr}+wise" / "+calib"
    unknown = sorted(m for m in args.methods if m.split("@")[0] not in {m.name for m in ALL_METHODS})
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {[m.name for m in ALL_METHODS]}")
    argv_methods = list(args.methods)
    args.only_lrs = {}  # NAME@LR entries; a calibrated run's name ("{method}@{lr}+wise") is not one
    for i, entry in enumerate(args.methods):
        name, _, lr = entry.partition("@")
        try:
            rate = float(lr)
        except ValueError:
            continue
        args.only_lrs.setdefault(name, []).append(rate)
        args.methods[i] = name
    both = sorted({m for m in argv_methods if "@" not in m} & set(args.only_lrs))
    if both:
        parser.error(f"{both} named both bare (every rate) and as NAME@LR (those rates only); name each one way")
    args.methods = list(dict.fromkeys(args.methods))
    args.steps = args.steps or (4 if args.quick else REGIMES[args.regime].steps_for(args.batch_size))
    args.seeds = args.seeds or (2 if args.quick else 3)
    if args.only_seeds and not set(args.only_seeds) <= set(range(1, args.seeds)):
        parser.error(f"--only-seeds {args.only_seeds}: the extra seeds are 1 to {args.seeds - 1} (raise --seeds)")
    args.lr_scale = args.lr_scale or (10.0 if args.quick else 1.0)
    args.name = args.name or ("fronts_quick" if args.quick else "fronts" if args.regime == "light" else "fronts_heavy")
    return args


# ----------------------------------------------------------------------------------------------------- runs


def kept_run_folder(args: argparse.Namespace, method: str, lr: float, seed: int) -> Path:
    """Where ``--keep-models`` keeps one run's saved model (read back by ``fronts_calibration``)."""
    return args.keep_models / f"{args.name}-{method}-{lr:g}-{seed}"


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
        if args.keep_models is not None:  # for post-hoc calibration: the adapter, or a full fine-tune's whole model
            shutil.copytree(tmp, kept_run_folder(args, method.name, lr, seed), dirs_exist_ok=True)
    base = setup.base
    return {
        "method": method.name,
        "lr": lr,
        "seed": seed,
        **against_base(scores, base),
        "trainable_params": trainable,
        "checkpoint_bytes": checkpoint_bytes,
        "train_seconds": round(train_seconds, 2),
        **anchor_record,
    }


def read_runs(cache: Path) -> list[dict[str, Any]]:
    """The cached runs; where a (method, lr, seed) was rerun (``--remeasure``), its last record."""
    if not cache.is_file():
        return []
    records = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    return list({(r["method"], r["lr"], r["seed"]): r for r in records}.values())


def run_all(args: argparse.Namespace, setup: Setup, cache: Path) -> None:
    """Run (and append to ``cache``) every chosen setting not cached yet: each once, then the extra seeds."""
    records = read_runs(cache)
    measures = {f"{name.removesuffix('_ce')}_ce_increase" for name in setup.base if name.endswith("_ce")} - {
        "held_out_ce_increase"
    }
    if args.remeasure:  # a rerun replaces a record that lacks a measure added since (same method, lr, seed)
        records = [r for r in records if measures <= set(r)]
    done = {(r["method"], r["lr"], r["seed"]) for r in records}
    methods = sorted((m for m in ALL_METHODS if m.name in args.methods), key=lambda m: args.methods.index(m.name))

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

    for method in methods:  # phase 1: every setting once (quick: the grid's ends)
        grid = args.lrs or ((method.lrs[0], method.lrs[-1]) if args.quick else method.lrs)
        for lr in args.only_lrs.get(method.name, grid):
            ensure(method, lr * args.lr_scale, 0)
    # Phase 2: more seeds where it matters, the settings on each method's own front; the reference and CoFi first.
    methods.sort(key=lambda m: (m.family == "lora", m.name == "osf"))
    for method in methods:
        for lr in front_settings([r for r in records if r["method"] == method.name and r["seed"] == 0]):
            chosen = args.only_lrs.get(method.name, args.lrs)
            if chosen and not any(math.isclose(lr, c * args.lr_scale) for c in chosen):
                continue  # --lrs or NAME@LR: more seeds for those settings only
            for seed in range(1, args.seeds):
                if args.only_seeds is None or seed in args.only_seeds:
                    ensure(method, lr, seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # what the report depends on; not which runs this invocation chose (the report covers the whole cache)
    chosen = {"methods", "only_lrs", "only_seeds", "lrs", "report_only", "remeasure", "keep_models"}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in chosen}
    cache = args.out_dir / f"{args.name}_runs.jsonl"
    saved_setup = args.out_dir / f"{args.name}_setup.json"  # the base model's scores: a report needs no model
    if not args.report_only:
        setup = quick_setup(args) if args.quick else real_setup(args)
        saved_setup.write_text(json.dumps({"base": setup.base, "description": setup.description}, indent=1))
        print(f"base model: {json.dumps({k: round(v, 4) for k, v in setup.base.items()})}", flush=True)
        run_all(args, setup, cache)
    elif not (saved_setup.is_file() and cache.is_file()):
        raise SystemExit(f"--report-only: no cached runs at {cache} and {saved_setup}; run without it first.")
    base, description = json.loads(saved_setup.read_text()).values()
    records = read_runs(cache)
    write_report(records, base, ALL_METHODS, description, settings, args.out_dir, args.name)
    print(f"wrote {args.out_dir / args.name}.md/.json/.png in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
