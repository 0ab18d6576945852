"""Shared parts of the training-integration examples (``train_with_*.py``, ``monitor_forgetting.py``).

Each example runs on the same task as ``quickstart.py`` (``benchmarks.tasks``): SmolLM2-135M-Instruct learning
English->French words, or with ``--tiny`` a random 8-layer Llama and a synthetic dictionary (seconds, no extras).
The CoFi model is the quickstart's: FFN ``up_proj``/``down_proj`` of the ``bottom2`` layers, with a soft mask from
KL-dropout importance on general text. ``--anchor [WEIGHT]`` adds a retention anchor (:func:`attach_anchor`).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchmarks.anchor_prompts import INSTRUCTIONS, chat_prompts, check_disjoint, prompt_batches, read_prompts
from benchmarks.resources import collate
from benchmarks.tasks import Example, Task, real_task, tiny_task
from peft import PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from peft_cofi import CoFiConfig, UnitImportance, attach_retention_anchor, compute_importance
from peft_cofi.anchor import KINDS, RetentionAnchor
from peft_cofi.evaluation import mean_loss
from peft_cofi.example_model import ensure_smollm2_cache

# Output folders the examples made themselves: removed when the program exits (TemporaryDirectory's finalizer).
_TEMPORARY_OUTPUTS: list[tempfile.TemporaryDirectory] = []


# The anchor weight from the fronts benchmark (benchmarks/RESULTS.md): 10 forgot less than 3 on both retention sets in
# both regimes, on LoRA (three seeds, 97-99 % of full fine-tuning's best gain) and on CoFi (one seed, 1-3 % less gain).
ANCHOR_WEIGHT = 10.0


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every example takes."""
    out = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    out.add_argument("--tiny", action="store_true", help="random tiny Llama + synthetic data (seconds, no extras)")
    out.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-4; 3e-3 with --tiny)")
    out.add_argument("--batch-size", type=int, default=8)
    out.add_argument("--max-len", type=int, default=64, help="truncate examples to this many tokens")
    out.add_argument(
        "--out", type=Path, default=None, help="output dir (default: a temporary dir, removed when the run ends)"
    )
    anchor = out.add_argument_group("retention anchor (peft_cofi.attach_retention_anchor)")
    anchor.add_argument(
        "--anchor",
        type=float,
        nargs="?",
        const=ANCHOR_WEIGHT,
        default=None,
        metavar="WEIGHT",
        help=f"anchor training to the base model on general prompts with this weight (default when given: "
        f"{ANCHOR_WEIGHT:g})",
    )
    anchor.add_argument(
        "--anchor-kind",
        choices=KINDS,
        default="kl",
        help="kl: KL from the base model's next-token distributions; self-answers: the base model's own answers",
    )
    anchor.add_argument("--anchor-every", type=int, default=1, help="apply the anchor on one training call in N")
    anchor.add_argument("--no-anchor", dest="anchor", action="store_const", const=None, help="train without the anchor")
    return out


def prepare(args: argparse.Namespace, prefix: str) -> Task:
    """Fill in the defaults that depend on ``--tiny`` (``lr``, ``out``), seed torch, and load the task.

    Without ``--out`` the outputs go to a new temporary folder that is removed when the program exits, so repeated
    runs (and the tests) leave nothing behind; the printed output line says so.
    """
    args.lr = args.lr or (3e-3 if args.tiny else 2e-4)
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit(f"--steps ({args.steps}) and --batch-size ({args.batch_size}) must be at least 1.")
    where = f"output: {args.out}"
    if args.out is None:
        _TEMPORARY_OUTPUTS.append(tempfile.TemporaryDirectory(prefix=f"peft-cofi-{prefix}-"))
        args.out = Path(_TEMPORARY_OUTPUTS[-1].name)
        where = f"output: {args.out} (temporary, removed at exit; --out DIR keeps it)"
    torch.manual_seed(args.seed)
    task = tiny_task(args.seed, n_train=96, n_eval=24) if args.tiny else real_task(args.seed, n_train=256, n_eval=64)
    print(f"data: {len(task.train)} train / {len(task.held_out)} held-out examples; {where}")
    return task


def general_examples(task: Task, n: int = 32, seed: int = 0) -> list[Example]:
    """General text to measure forgetting on: the task's (WordNet glosses for SmolLM2), else random token sequences
    (the tiny task's base model is random, so any text is as general as any other)."""
    if task.general:
        return task.general[:n]
    generator = torch.Generator().manual_seed(seed)
    vocab = task.base.config.vocab_size
    rows = torch.randint(3, vocab, (n, 12), generator=generator).tolist()
    return [{"input_ids": row, "labels": list(row)} for row in rows]


def batches(examples: list[Example], task: Task, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """Padded batches of ``args.batch_size`` examples, truncated to ``args.max_len`` tokens."""
    size = args.batch_size
    return [collate(examples[i : i + size], task.pad_id, args.max_len) for i in range(0, len(examples), size)]


def anchor_batches(task: Task, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """General prompts for the retention anchor: ``benchmarks/anchor_prompts.txt`` in SmolLM2's chat template
    (checked disjoint from the retention instructions), or random token prompts for the tiny task (another seed than
    the monitor's general examples)."""
    if args.tiny:
        prompts = [example["input_ids"] for example in general_examples(task, 16, args.seed + 2)]
        check_disjoint(prompts, {"held-out": [example["input_ids"] for example in task.held_out]})
    else:
        texts = read_prompts()
        check_disjoint(texts, {"retention instructions": read_prompts(INSTRUCTIONS)})
        prompts = [ids[: args.max_len] for ids in chat_prompts(tokenizer_for(task, tiny=False), texts)]
    return prompt_batches(prompts, task.pad_id, args.batch_size)


def attach_anchor(model_or_trainer: Any, task: Task, args: argparse.Namespace) -> RetentionAnchor | None:
    """With ``--anchor``: :func:`peft_cofi.attach_retention_anchor` on the model (plain loops) or the Trainer (logged
    and checkpointed), with the answers of ``--anchor-kind self-answers`` cached in ``OUT/anchor_answers.json``."""
    if args.anchor is None:
        return None
    batches = anchor_batches(task, args)
    answers = args.out / "anchor_answers.json" if args.anchor_kind == "self-answers" else None
    anchor = attach_retention_anchor(
        model_or_trainer,
        batches,
        weight=args.anchor,
        kind=args.anchor_kind,
        every=args.anchor_every,
        answers_file=answers,
        max_new_tokens=8 if args.tiny else 32,  # the tiny task's model has a context of 32 tokens
    )
    kind = "KL to the base model" if args.anchor_kind == "kl" else "the base model's own answers"
    schedule = "every call" if args.anchor_every == 1 else f"one call in {args.anchor_every}"
    print(f"retention anchor: {kind}, weight {args.anchor:g}, on {schedule}; {len(batches)} batches of general prompts")
    return anchor


def report_anchor(anchor: RetentionAnchor | None) -> None:
    """Print the anchor's mean value over the run (nothing without ``--anchor``)."""
    if anchor is not None:
        mean, (_, count) = anchor.mean_since()
        print(f"retention anchor: mean anchor_loss {mean:.4g} over {count} anchored calls")


def data_collator(task: Task, args: argparse.Namespace) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """A collator for ``Trainer``/``DataLoader``: right-pads a list of examples into a batch."""
    return functools.partial(collate, pad_token_id=task.pad_id, max_length=args.max_len)


def cofi_importance(task: Task, args: argparse.Namespace) -> UnitImportance:
    """KL-dropout importance of the bottom2 FFN projections' units on 32 general examples (the fine level)."""
    known = batches(general_examples(task, 32, args.seed), task, args)
    return compute_importance(task.base, known, config=CoFiConfig(layers_to_transform="bottom2"))


def cofi_model(task: Task, args: argparse.Namespace) -> nn.Module:
    """The quickstart's CoFi model. Coarse level: FFN up_proj/down_proj of the layers in the (25%, 50%] depth window
    (bottom2). Fine level: how much each output unit of those modules matters to the base model on general text
    (:func:`cofi_importance`), turned into a soft mask on the updates."""
    config = CoFiConfig(layers_to_transform="bottom2", importance=cofi_importance(task, args))
    model = get_peft_model(task.base, config)
    factors = torch.cat([m.cofi_mask["default"] for m in model.modules() if hasattr(m, "cofi_mask")])
    print(
        f"soft mask over {factors.numel():,} units: mean factor {factors.mean():.3f}, "
        f"{(factors < 0.1).float().mean():.1%} of units below 0.1"
    )
    model.print_trainable_parameters()
    return model


def tokenizer_for(task: Task, tiny: bool) -> Any:
    """A tokenizer for trainers that need one (TRL): SmolLM2's, or for the tiny task a word-level one whose ids are
    the tiny task's (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then ``t3`` ... ``t255``)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not tiny:
        return AutoTokenizer.from_pretrained(ensure_smollm2_cache())
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"t{i}" for i in range(3, task.base.config.vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def held_out_loss(model: nn.Module, task: Task, args: argparse.Namespace) -> float:
    """Token-weighted held-out task loss, with a progress bar."""
    return mean_loss(model, tqdm(batches(task.held_out, task, args), desc="held-out loss", file=sys.stdout))


def check_reload(model: nn.Module, adapter_dir: Path, task: Task, args: argparse.Namespace) -> bool:
    """Reload the saved adapter onto a fresh base model and compare logits with the trained model; print the result."""
    files = sorted(p.name for p in adapter_dir.iterdir())
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    print(f"adapter: {adapter_dir} ({size:,} bytes; files: {', '.join(files)})")
    print("reloading the adapter onto a fresh base model", flush=True)
    device = next(model.parameters()).device
    reloaded = PeftModel.from_pretrained(task.fresh_base(), adapter_dir).to(device).eval()
    model.eval()
    batch = {k: v.to(device) for k, v in collate(task.held_out[: args.batch_size], task.pad_id, args.max_len).items()}
    with torch.no_grad():
        logits, logits_reloaded = model(**batch).logits, reloaded(**batch).logits
    ok = torch.equal(logits, logits_reloaded)
    difference = (logits - logits_reloaded).abs().max().item()
    print(f"reload check: {'PASSED' if ok else 'FAILED'} (max |logit difference| = {difference:.3g})")
    return ok
