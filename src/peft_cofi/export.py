"""Export a CoFi diff for serving: a plain peft LoRA adapter (truncated SVD), or a merged full model.

Example:
    report = export_lora("out/adapter", "out/lora", rank=16)
    report.max_rel_error
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .diff_format import PEFT_PREFIX, in_model_order, read_diff_file
from .quiet import quiet_deepspeed_probe

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class LoraExportReport:
    """Per-module ranks and relative Frobenius errors of a LoRA export against the dense diff."""

    ranks: dict[str, int] = field(default_factory=dict)
    rel_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_errors.values(), default=0.0)


def _rank_for(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if energy is None:
        return max(1, min(rank, singular_values.numel()))
    cumulative = (singular_values**2).cumsum(0) / (singular_values**2).sum().clamp(min=1e-30)
    needed = int((cumulative < energy).sum()) + 1
    return max(1, min(needed, rank or needed, singular_values.numel()))


def export_lora(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
) -> LoraExportReport:
    """Write a standard peft LoRA adapter approximating a CoFi diff, loadable by plain peft without peft-cofi.

    Each module's diff ``D`` becomes ``B @ A`` from its truncated SVD ``U S Vh``: ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) Vh_r``, ``lora_alpha = r`` (scaling 1). ``rank`` fixes r; ``energy`` (e.g. 0.9) picks per module
    the smallest r keeping that fraction of ``||D||^2`` (capped by ``rank`` when both are given).

    Raises:
        ValueError: neither ``rank`` nor ``energy`` given, or out of range.
    """
    if rank is None and energy is None:
        raise ValueError("give rank (e.g. 16) or energy (e.g. 0.9) for the LoRA export.")
    if rank is not None and rank < 1:
        raise ValueError(f"rank={rank} must be >= 1.")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy={energy} must be in (0, 1].")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    diff_file = read_diff_file(adapter_dir / ADAPTER_FILE)
    cofi_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    is_conv1d = any(record.get("layout") == "conv1d" for record in diff_file.records.values())
    report, tensors = LoraExportReport(), {}
    for name in tqdm(in_model_order(diff_file.records), desc="SVD per module", disable=len(diff_file.records) < 8):
        diff = diff_file.diff(name)
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = _rank_for(s, rank, energy)
        root = s[:r].sqrt()
        lora_b, lora_a = u[:, :r] * root, root.unsqueeze(1) * vh[:r]
        norm = diff.norm().item()
        report.ranks[name] = r
        report.rel_errors[name] = (lora_b @ lora_a - diff).norm().item() / norm if norm > 0 else 0.0
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b.contiguous()
    top_rank = max(report.ranks.values())
    lora_config = LoraConfig(
        r=top_rank,
        lora_alpha=top_rank,
        target_modules=sorted(report.ranks),
        rank_pattern={n: r for n, r in report.ranks.items() if r != top_rank},
        alpha_pattern={n: r for n, r in report.ranks.items() if r != top_rank},
        fan_in_fan_out=is_conv1d,
        task_type=cofi_config.get("task_type") or TaskType.CAUSAL_LM,
        base_model_name_or_path=cofi_config.get("base_model_name_or_path"),
        revision=cofi_config.get("revision"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / ADAPTER_FILE), metadata={"format": "pt"})
    return report


def merge_into_base(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: str = "2GB",
    verify_base: bool = True,
) -> None:
    """Apply a CoFi diff to its base model and write a full transformers model (sharded safetensors).

    The diff is validated against the base (fingerprints) before any weight changes; ``verify_base=False`` applies
    it to other weights anyway.
    """
    model = AutoModelForCausalLM.from_pretrained(str(base))
    adapted = PeftModel.from_pretrained(model, str(adapter_dir), verify_base=verify_base)
    merged = adapted.merge_and_unload(progressbar=True)
    with quiet_deepspeed_probe():  # transformers' save imports DeepSpeed, if installed, to unwrap engines
        merged.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    # A base folder without a tokenizer still gives a complete merged model.
    with contextlib.suppress(OSError, ValueError):
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out_dir))
