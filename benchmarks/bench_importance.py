"""Benchmark: one importance pass per batch against one CoFi training step on the same batch.

Importance pass: ``compute_importance(model, [batch])`` with the paper's ``kl-dropout`` (two forward passes, one
backward to the gates) on the bare model. Training step: forward + backward + AdamW step of a CoFi adapter (FFN
``up_proj``/``down_proj`` of the ``bottom2`` window, the paper's pick; default update mask mode) on the same batch.
Both score/train the same modules. Target: importance <= 3x a training step.

Time: wall clock of each call, alternating importance and training (one warm-up each first), median of
``--repeats``. Memory: peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh process
that sets up one kind (model, batch; adapter and optimizer for training), minus its RSS after setup
(``/proc/self/statm``), over two calls (so training includes the AdamW state it keeps). The delta is the memory
each kind needs on top of the loaded model; it can only be underestimated if loading peaked higher, which the
results flag (``setup_peak_hides_delta``). The children start before this process loads a model: on Linux a child
inherits its parent's max RSS through fork/exec.

Also writes a heatmap of SmolLM2's importance (``bottom2``, FFN up/down, kl-dropout on ``--heatmap-batches``
batches of general text: WordNet example sentences).

Run from the repository root::

    python -m benchmarks.bench_importance            # SmolLM2-135M-Instruct, real text (a few minutes on 2 cores)
    python -m benchmarks.bench_importance --quick    # tiny random Llama, random tokens: seconds, for CI
    python -m benchmarks.bench_importance --parts memory   # rerun one part, keep the others' results

Results: ``benchmarks/results/importance.json`` and ``importance.md`` (``importance_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import get_peft_model

from benchmarks import RESULTS_DIR, ROOT
from peft_cofi import CoFiConfig
from peft_cofi.example_model import load_smollm2
from peft_cofi.plots import plot_importance_distributions, plot_importance_heatmap
from peft_cofi.scoring import compute_importance
from peft_cofi.targets import resolve_targets

WINDOW = "bottom2"
PARTS = ("time", "memory", "heatmap")
Batch = dict[str, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per kind (default 5; quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (quick 4)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 128; quick 32)")
    parser.add_argument("--heatmap-batches", type=int, default=16, help="batches for the heatmap (0: none)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--parts",
        type=lambda text: text.split(","),
        default=list(PARTS),
        help="comma-separated subset of time,memory,heatmap; a subset updates the existing results file",
    )
    parser.add_argument("--memory-child", choices=["importance", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not set(args.parts) <= set(PARTS):
        parser.error(f"--parts must be a subset of {','.join(PARTS)}; got {','.join(args.parts)}.")
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.max_length = args.max_length or (32 if args.quick else 128)
    return args


# ------------------------------------------------------------------------------------------------ model and data


def load_model(quick: bool) -> tuple[torch.nn.Module, Any, str]:
    if quick:
        from benchmarks.tasks import tiny_llama

        return tiny_llama(), None, "tiny random Llama (8 layers, hidden 64)"
    model, tokenizer = load_smollm2()
    return model, tokenizer, "SmolLM2-135M-Instruct"


def make_batches(tokenizer: Any, count: int, batch_size: int, length: int, vocab: int) -> list[Batch]:
    """Full-length sequences (no padding): general text packed into ``length``-token chunks, or random tokens."""
    needed = count * batch_size * length
    if tokenizer is None:
        ids = torch.randint(0, vocab, (needed,), generator=torch.Generator().manual_seed(0))
    else:
        from benchmarks.resources import wordnet_sentences

        ids_list: list[int] = []
        sentences = wordnet_sentences(kind="examples")
        for start in range(0, len(sentences), 500):
            text = ". ".join(sentences[start : start + 500]) + "."
            ids_list += tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids_list) >= needed:
                break
        if len(ids_list) < needed:
            raise ValueError(f"WordNet gave {len(ids_list)} tokens; {needed} are needed.")
        ids = torch.tensor(ids_list[:needed])
    ids = ids.view(count, batch_size, length)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids]


# ------------------------------------------------------------------------------------------------ the two kinds


def importance_step(model: torch.nn.Module, batch: Batch, config: CoFiConfig) -> None:
    compute_importance(model, [batch], config=config, method="kl-dropout", progress=False)


def make_trainer(model: torch.nn.Module, config: CoFiConfig):
    peft_model = get_peft_model(model, copy.copy(config))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(batch: Batch) -> None:
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_alternating(model: torch.nn.Module, batch: Batch, config: CoFiConfig, repeats: int) -> dict[str, Any]:
    train = make_trainer(copy.deepcopy(model), config)
    importance_step(model, batch, config)  # warm-up
    train(batch)
    samples: dict[str, list[float]] = {"importance": [], "train": []}
    for _ in range(repeats):
        for kind in ("importance", "train"):
            start = time.perf_counter()
            if kind == "importance":
                importance_step(model, batch, config)
            else:
                train(batch)
            samples[kind].append(time.perf_counter() - start)
    medians = {kind: statistics.median(values) for kind, values in samples.items()}
    return {
        "importance_s": medians["importance"],
        "train_step_s": medians["train"],
        "ratio": medians["importance"] / medians["train"],
        "samples_s": samples,
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: set up one kind, run it twice, print peak-RSS figures as JSON."""
    model, tokenizer, _ = load_model(args.quick)
    config = CoFiConfig(layers_to_transform=WINDOW)
    vocab = model.get_input_embeddings().num_embeddings
    (batch,) = make_batches(tokenizer, 1, args.batch_size, args.max_length, vocab)
    train = make_trainer(model, config) if args.memory_child == "train" else None
    setup_rss, setup_peak = _rss_mb(), _maxrss_mb()
    for _ in range(2):
        if train is None:
            importance_step(model, batch, config)
        else:
            train(batch)
    peak = _maxrss_mb()
    result = {
        "setup_rss_mb": setup_rss,
        "setup_peak_mb": setup_peak,
        "peak_mb": peak,
        "peak_delta_mb": peak - setup_rss,
        "setup_peak_hides_delta": setup_peak >= peak,
    }
    print(json.dumps(result))


def measure_memory(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_importance", "--memory-child", kind]
    command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    command += ["--quick"] if args.quick else []
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ heatmap and report


def heatmap(model, tokenizer, args, name: str, stem: str) -> dict[str, Any]:
    config = CoFiConfig(layers_to_transform=WINDOW)
    vocab = model.get_input_embeddings().num_embeddings
    batches = make_batches(tokenizer, args.heatmap_batches, args.batch_size, args.max_length, vocab)
    start = time.perf_counter()
    result = compute_importance(model, batches, config=config, method="kl-dropout", progress=True)
    seconds = time.perf_counter() - start
    result.save(args.out_dir / f"{stem}.safetensors")
    title = f"{name}: kl-dropout importance, {WINDOW} FFN up/down, {result.tokens} tokens (tanh(|z|), per module)"
    plot_importance_heatmap(result, args.out_dir / f"{stem}.png", title=title)
    plot_importance_distributions(result, args.out_dir / f"{stem}_distributions.png", title=title)
    return {"batches": args.heatmap_batches, "tokens": result.tokens, "seconds": seconds, "png": f"{stem}.png"}


def write_report(results: dict[str, Any], out_dir: Path, stem: str) -> None:
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# Importance pass vs CoFi training step ({results['model']})",
        "",
        f"Batch {results['batch']}, window `{WINDOW}`, modules {results['modules']}, "
        f"{results['torch_threads']} torch threads, {results['machine']}.",
        "",
        "| | importance (kl-dropout) | training step (fwd+bwd+AdamW) | ratio |",
        "|---|---|---|---|",
    ]
    t, m = results.get("time"), results.get("memory")
    if t:
        lines.append(
            f"| time per batch, median of {results['repeats']} (s) | {t['importance_s']:.3f} | "
            f"{t['train_step_s']:.3f} | {t['ratio']:.2f}x |"
        )
    if m:
        lines.append(
            f"| peak RSS above loaded model (MiB) | {m['importance']['peak_delta_mb']:.0f} | "
            f"{m['train']['peak_delta_mb']:.0f} | {m['ratio']:.2f}x |"
        )
    lines.append("")
    if t:
        lines.append(f"Target: importance <= 3x a training step: **{'met' if t['ratio'] <= 3 else 'NOT met'}** (time).")
    if m and any(m[kind]["setup_peak_hides_delta"] for kind in ("importance", "train")):
        lines.append("Memory caveat: setup peaked above the steps, so a delta may be underestimated.")
    lines += [
        "",
        "Time: wall clock, importance and training calls alternating after one warm-up each. Memory: "
        "`resource.getrusage` max RSS of a fresh process per kind (started before this process loads any model, "
        "since Linux children inherit the parent's max RSS) minus its RSS after setup, over two calls (training "
        "keeps its AdamW state).",
    ]
    if "heatmap" in results:
        h = results["heatmap"]
        lines += ["", f"Heatmap: `{h['png']}` ({h['batches']} batches, {h['tokens']} tokens, {h['seconds']:.0f} s)."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "importance_quick" if args.quick else "importance"
    previous = args.out_dir / f"{stem}.json"
    results: dict[str, Any] = {}
    if set(args.parts) != set(PARTS) and previous.is_file():
        results = json.loads(previous.read_text(encoding="utf-8"))  # update the parts run now, keep the others
    if "memory" in args.parts:
        # First, while this process is small: a child inherits the parent's max RSS on Linux.
        memory = {kind: measure_memory(args, kind) for kind in ("importance", "train")}
        memory["ratio"] = memory["importance"]["peak_delta_mb"] / max(memory["train"]["peak_delta_mb"], 1e-9)
        results["memory"] = memory
        results["memory_method"] = "resource.getrusage ru_maxrss of a fresh process per kind minus RSS after setup"
    model, tokenizer, name = load_model(args.quick)
    config = CoFiConfig(layers_to_transform=WINDOW)
    results.update(
        model=name,
        batch=f"{args.batch_size} x {args.max_length} tokens",
        modules=len(resolve_targets(model, config)),
        torch_threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {os.cpu_count()} CPUs",
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    if "time" in args.parts:
        vocab = model.get_input_embeddings().num_embeddings
        (batch,) = make_batches(tokenizer, 1, args.batch_size, args.max_length, vocab)
        results["time"] = time_alternating(model, batch, config, args.repeats)
        results["repeats"] = args.repeats
    if "heatmap" in args.parts and args.heatmap_batches:
        heatmap_stem = "tiny_importance_quick" if args.quick else "smollm2_importance"
        results["heatmap"] = heatmap(model, tokenizer, args, name, heatmap_stem)
    write_report(results, args.out_dir, stem)
    print(json.dumps({k: results.get(k) for k in ("model", "time", "memory")}, indent=2))
    return results


if __name__ == "__main__":
    main()
