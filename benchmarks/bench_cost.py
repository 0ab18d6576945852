"""Cost benchmark: training-step time and peak memory of CoFi (each mask mode) against plain fine-tuning of the same
modules without a mask, full fine-tuning, and LoRA; of CoFi with a KL retention anchor (``attach_retention_anchor``,
on prompt batches of the training batch's shape, cut to the model's context) on every step or on one step in four;
and of CoFi with input-subspace protection (``CoFiConfig(input_subspace=...)``, half of each module's inputs).

Each measurement runs in a fresh child process (so peak memory is that variant's alone): it loads the base model,
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), builds the variant, takes warm-up steps, times
``--steps`` AdamW steps, and reports the median step time and the peak resident memory above the loaded base model
(the variant's trainable copies, gradients, optimizer state and activations). The parent runs every variant once per
repeat, in a rotated order, for ``--repeats`` repeats; ratios are taken within a repeat and their medians reported,
so slow drifts of the machine's load cancel. An anchored variant with ``every=k`` is timed in cycles of ``k`` steps
(each holding one anchored step; ``--steps`` cycles for k = 1, at least 2 otherwise), per step. Results go to
``cost.json`` / ``cost.md`` (``cost_quick`` with ``--quick``)::

    python -m benchmarks.bench_cost            # SmolLM2-135M-Instruct, batch 8 x 64 tokens (~20 min)
    python -m benchmarks.bench_cost --quick    # tiny random Llama (CI, ~1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks import RESULTS_DIR, ROOT
from benchmarks.tasks import tiny_task
from peft_cofi import CoFiConfig, UnitImportance, attach_retention_anchor
from peft_cofi.anchor_data import context_length
from peft_cofi.example_model import load_smollm2
from peft_cofi.selection import matched_modules, resolve_selection

VARIANTS = (
    "cofi-update",
    "cofi-grad",
    "same-modules",
    "full",
    "lora",
    "cofi-anchor-1",
    "cofi-anchor-4",
    "cofi-subspace",
)
ANCHOR_EVERY = {"cofi-anchor-1": 1, "cofi-anchor-4": 4}  # CoFi (update mask) + a KL anchor on 1 step in k
# cofi-subspace: CoFi (update mask) protecting this fraction of each module's input directions. The projection's
# thin matmuls are min(k, in - k) wide, so half the inputs is the costliest k (the fronts ran 10-60 %).
SUBSPACE_FRACTION = 0.5
TARGETS = {  # (ratio name, numerator, denominator, target or None)
    "cofi-update / same-modules time": ("cofi-update", "same-modules", "seconds", 1.05),
    "cofi-grad / same-modules time": ("cofi-grad", "same-modules", "seconds", 1.05),
    "cofi-update / full time": ("cofi-update", "full", "seconds", 0.6),
    "cofi-update / full peak memory": ("cofi-update", "full", "peak_mb", 0.5),
    "cofi-grad / full peak memory": ("cofi-grad", "full", "peak_mb", 0.5),
    "cofi-update / same-modules peak memory": ("cofi-update", "same-modules", "peak_mb", None),
    "cofi-update / lora time": ("cofi-update", "lora", "seconds", None),
    "cofi-update / lora peak memory": ("cofi-update", "lora", "peak_mb", None),
    "cofi-anchor-1 / cofi-update time": ("cofi-anchor-1", "cofi-update", "seconds", None),
    "cofi-anchor-4 / cofi-update time": ("cofi-anchor-4", "cofi-update", "seconds", None),
    "cofi-anchor-1 / cofi-update peak memory": ("cofi-anchor-1", "cofi-update", "peak_mb", None),
    "cofi-subspace / cofi-update time": ("cofi-subspace", "cofi-update", "seconds", 1.15),
    "cofi-subspace / cofi-update peak memory": ("cofi-subspace", "cofi-update", "peak_mb", None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every variant (default 5; 1 quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per child (default 6; 3 quick)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 6)
    return args


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def load_base(quick: bool) -> nn.Module:
    if quick:
        return tiny_task(0, n_train=1, n_eval=1).base  # the tiny random Llama the other quick modes use
    return load_smollm2()[0]


def build(variant: str, model: nn.Module) -> nn.Module:
    """The variant's trainable model. CoFi and same-modules train FFN up/down in ``bottom2`` (the paper's pick)."""
    paper = resolve_selection(CoFiConfig(layers_to_transform="bottom2"), model, model.config.to_dict())
    if variant.startswith("cofi"):
        modules = matched_modules(model, paper)
        scores = {name: torch.rand(m.weight.shape[0]) for name, m in modules.items()}  # cost does not depend on it
        importance = UnitImportance(scores, tokens=1)
        subspace = None
        if variant == "cofi-subspace":  # random orthonormal bases: the cost depends on their width only
            widths = {name: m.weight.shape[1] for name, m in modules.items()}
            subspace = {n: torch.linalg.qr(torch.randn(w, round(SUBSPACE_FRACTION * w))).Q for n, w in widths.items()}
        mask_mode = "update" if variant == "cofi-subspace" else variant.removeprefix("cofi-")
        config = CoFiConfig(
            layers_to_transform="bottom2", importance=importance, mask_mode=mask_mode, input_subspace=subspace
        )
        return get_peft_model(model, config)
    for p in model.parameters():
        p.requires_grad_(variant == "full")
    if variant == "same-modules":
        for module in matched_modules(model, paper).values():
            module.weight.requires_grad_(True)
        return model
    if variant == "lora":
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model


def child(args: argparse.Namespace) -> None:
    """Measure one variant in this fresh process and print its figures as JSON."""
    torch.manual_seed(0)
    model = load_base(args.quick)
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(3, vocab, (args.batch_size, args.seq_len))}
    batch["labels"] = batch["input_ids"].clone()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS: the loaded base model
    base_kib = _status_kib("VmRSS")
    every = ANCHOR_EVERY.get(args.child)
    model = build("cofi-update" if every else args.child, model).train()
    anchor = None
    if every:  # general prompts of the training batch's shape (within the model's context); values do not matter
        width = min(args.seq_len, context_length(model) or args.seq_len)
        prompts = [{"input_ids": torch.randint(3, vocab, (args.batch_size, width))} for _ in range(4)]
        anchor = attach_retention_anchor(model, prompts, weight=1.0, every=every)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cycle = every or 1  # time whole cycles of `every` steps: each holds exactly one anchored step
    cycles = args.steps if cycle == 1 else max(2, math.ceil(args.steps / cycle))
    times = []
    for step in range(2 + cycles * cycle):  # two warm-up steps: the optimizer state is created on the first
        if step >= 2 and (step - 2) % cycle == 0:
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2 and (step - 1) % cycle == 0:
            times.append((time.perf_counter() - start) / cycle)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak_mb = (_status_kib("VmHWM") - base_kib) / 1024
    figures = {"seconds": statistics.median(times), "peak_mb": peak_mb, "trainable": trainable}
    if anchor is not None:
        figures["anchored_steps"] = anchor.state_dict()["drawn"]
    print(json.dumps(figures))


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_cost",
        "--child",
        variant,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        *(["--quick"] * args.quick),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    repeats: list[dict[str, dict[str, Any]]] = []
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        repeats.append({variant: measure(args, variant) for variant in order})
        print(
            f"repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{v} {m['seconds']:.3f} s {m['peak_mb']:.0f} MiB" for v, m in repeats[-1].items()),
            flush=True,
        )
    variants = {
        v: {
            "seconds": statistics.median(rep[v]["seconds"] for rep in repeats),
            "peak_mb": statistics.median(rep[v]["peak_mb"] for rep in repeats),
            "trainable": repeats[0][v]["trainable"],
            **({"anchored_steps": repeats[0][v]["anchored_steps"]} if v in ANCHOR_EVERY else {}),
        }
        for v in VARIANTS
    }
    ratios = {}
    for name, (num, den, key, target) in TARGETS.items():
        value = statistics.median(rep[num][key] / rep[den][key] for rep in repeats)
        ratios[name] = {"value": value, "target": target, "met": None if target is None else value <= target}
    return {"variants": variants, "ratios": ratios, "repeats": repeats}


def write_report(results: dict[str, Any], out: Path, stem: str) -> None:
    s = results["settings"]
    lines = [
        f"# Cost: step time and peak memory ({results['model']})",
        "",
        f"batch {s['batch_size']} x {s['seq_len']} tokens, AdamW, float32, CPU ({results['threads']} threads); "
        f"{s['steps']} timed steps per child process, {s['repeats']} repeats alternating the variants; "
        "medians. Peak memory: resident memory above the loaded base model.",
        "",
        "| variant | trainable | step s | peak MiB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {v} | {m['trainable']:,} | {m['seconds']:.3f} | {m['peak_mb']:.0f} |"
        for v, m in results["variants"].items()
    ]
    lines += ["", "| ratio (median over repeats) | value | target | met |", "|---|---|---|---|"]
    for name, r in results["ratios"].items():
        target = "—" if r["target"] is None else f"≤ {r['target']}"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {name} | {r['value']:.3f} | {target} | {met} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = run(args)
    results["model"] = "tiny random Llama" if args.quick else "SmolLM2-135M-Instruct"
    results["threads"] = torch.get_num_threads()
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "child"}
    stem = "cost_quick" if args.quick else "cost"
    write_report(results, args.out_dir, stem)
    print((args.out_dir / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
