"""Post-hoc calibration in the fronts benchmark: rescale trained diffs and score them exactly like trained runs.

Source runs are those kept by ``bench_fronts --keep-models DIR``: a CoFi adapter, or a full fine-tune, which
``peft_cofi.full_diff.diff_from_models`` turns into a diff of all its linear layers (the same calibration then applies
to both: a fair comparison). For each source:

- ``+wise``: one global factor ``a`` in {0.25, 0.5, 0.75} (WiSE-FT); the record's ``lr`` holds ``a``. A front from
  one training run — which, for a single factor, may just imitate a lower learning rate;
- ``+calib``: ``peft_cofi.calibrate`` at layer granularity: the factors that maximise speciality on the validation
  split (held-out headwords disjoint from the test) within a retention budget on the base model's own answers to the
  anchor prompts (disjoint from every evaluation set); the record's ``lr`` holds the budget's allowed CE increase.

Each calibrated adapter is evaluated on the test and versatility sets as ``bench_fronts`` evaluates a run, and
appended to the regime's runs cache as soon as it is scored, under the method name ``{method}@{lr}+wise`` /
``+calib`` (seed of the source: ``METHOD:LR:SEED`` picks a kept run other than seed 0); a rerun skips the records
already there, and each calibration's candidates are cached too::

    python -m benchmarks.fronts_calibration --keep-models DIR --sources cofi-update-1:0.0003 full:3e-05 \
        [--budgets 0.02] [--max-evaluations 20] [--regime heavy]
    (then python -m benchmarks.bench_fronts --report-only [--regime heavy] to put them in the report)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from benchmarks.anchor_prompts import chat_prompts, read_prompts
from benchmarks.bench_fronts import kept_run_folder, read_runs
from benchmarks.bench_fronts import parse_args as fronts_args
from benchmarks.fronts_setup import against_base, evaluate, greedy_answer, quick_setup, real_setup
from benchmarks.resources import collate
from peft_cofi import calibrate, scale_diff
from peft_cofi.evaluation import loss_evaluator, retention_evaluator
from peft_cofi.example_model import load_smollm2
from peft_cofi.full_diff import diff_from_models

FACTORS = (0.25, 0.5, 0.75)
BUDGETS = (0.01, 0.02, 0.05)  # allowed CE increase (nats) on the base's answers to the anchor prompts
MAX_EVALUATIONS = 40


def source_adapter(folder: Path, base: torch.nn.Module, work: Path) -> tuple[Path, dict[str, float]]:
    """The CoFi adapter of a kept run: the folder itself, or a full fine-tune's linear layers as a diff (with the
    other changed parameters it had to leave out, and their relative change)."""
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("peft_type") == "COFI":
        return folder, {}
    if config:
        raise SystemExit(
            f"{folder} holds a {config.get('peft_type')} adapter; only CoFi and full fine-tunes calibrate."
        )
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    report = diff_from_models(base, tuned, work / "full-diff")
    return report.path, report.left_out


def answer_batches(setup: Any, tokenizer_prompts: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """The base model's greedy answers to the anchor prompts, as labelled batches (retention's kind of data)."""
    answers = [greedy_answer(setup.task.base, prompt, 48) for prompt in tokenizer_prompts]
    return [collate(answers[i : i + 8], setup.task.pad_id) for i in range(0, len(answers), 8)]


def record(setup: Any, model: torch.nn.Module, method: str, lr: float, seed: int, extra: dict) -> dict[str, Any]:
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        **against_base(evaluate(model, setup), setup.base),
        "trainable_params": 0,
        "checkpoint_bytes": 0,
        "train_seconds": 0.0,
        **extra,
    }


def parse_source(source: str) -> tuple[str, float, int]:
    """``METHOD:LR[:SEED]`` as (method, lr, seed), or an error that shows the expected form.

    Example:
        >>> parse_source("cofi-update-1:0.0003:1")
        ('cofi-update-1', 0.0003, 1)
    """
    parts = source.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return parts[0], float(parts[1]), int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise SystemExit(f"--sources {source!r}: expected METHOD:LR or METHOD:LR:SEED, e.g. full:3e-05:1") from None


def calibrate_source(
    setup: Any, args: argparse.Namespace, source: str, versatility: list, budgets: list[float], done: set
) -> Iterator[dict]:
    """The ``+wise`` and ``+calib`` records of one kept run (``METHOD:LR[:SEED]``), each as soon as it is scored
    (those in ``done`` skipped); a record carries its source's seed."""
    method, lr, seed = parse_source(source)
    wise_name, calib_name = f"{method}@{lr:g}+wise", f"{method}@{lr:g}+calib"
    folder = kept_run_folder(args, method, lr, seed)
    if not folder.is_dir():
        raise SystemExit(f"no kept run at {folder}: run bench_fronts with --keep-models {args.keep_models} first.")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = setup.task.fresh_base()
        adapter, left_out = source_adapter(folder, base, work)
        extra = {"source": {"method": method, "lr": lr, "left_out": left_out}}
        for factor in (*FACTORS, 1.0):
            if (wise_name, factor, seed) in done:
                continue
            scale_diff(adapter, work / f"wise-{factor:g}", factor)
            model = PeftModel.from_pretrained(setup.task.fresh_base(), work / f"wise-{factor:g}")
            yield record(setup, model, wise_name, factor, seed, extra)
        validation = [
            collate(setup.validation[i : i + 16], setup.task.pad_id) for i in range(0, len(setup.validation), 16)
        ]
        for budget in budgets:
            if (calib_name, budget, seed) in done:
                continue
            result = calibrate(
                setup.task.fresh_base(),
                adapter,
                speciality=loss_evaluator(validation),
                versatility=retention_evaluator(versatility, "ce"),
                budget=math.exp(-budget),
                granularity="layer",
                max_evaluations=args.max_evaluations,
                out_dir=work / f"calib-{budget:g}",
                cache=args.out_dir / f"{args.name}_calibration_{method}_{lr:g}{f'_seed{seed}' if seed else ''}.jsonl",
                progress=False,
            )
            model = PeftModel.from_pretrained(setup.task.fresh_base(), work / f"calib-{budget:g}" / "adapter")
            scales = {k: round(v, 3) for k, v in list(result.chosen.scales.items())[:40]} if result.chosen else {}
            info = {**extra, "calibration": {"budget_ce": budget, "met": result.met_budget, "factors": scales}}
            yield record(setup, model, calib_name, budget, seed, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sources", nargs="+", required=True, help="METHOD:LR[:SEED] of kept runs (seed 0 unless given)"
    )
    parser.add_argument("--keep-models", type=Path, required=True, help="bench_fronts --keep-models folder")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=list(BUDGETS), help="allowed retention CE increases (nats)"
    )
    parser.add_argument("--max-evaluations", type=int, default=MAX_EVALUATIONS, help="candidates per calibration")
    own, rest = parser.parse_known_args(argv)
    args = fronts_args([*rest, "--keep-models", str(own.keep_models)])
    args.max_evaluations = own.max_evaluations
    setup = quick_setup(args) if args.quick else real_setup(args)
    if args.quick:
        prompts = [ids[mask.bool()].tolist() for b in setup.anchor for ids, mask in zip(*b.values(), strict=True)]
    else:
        prompts = chat_prompts(load_smollm2()[1], read_prompts(args.anchor_prompts))
    versatility = answer_batches(setup, prompts)
    cache = args.out_dir / f"{args.name}_runs.jsonl"
    done = {(r["method"], r["lr"], r["seed"]) for r in read_runs(cache)}
    for source in own.sources:
        for row in calibrate_source(setup, args, source, versatility, own.budgets, done):
            gain, forgetting = row["speciality_gain"], row["retention_ce_increase"]
            print(f"{row['method']} {row['lr']:g}: gain {gain:+.3f} retention {forgetting:+.4f}", flush=True)
            with cache.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
