"""Diff-checkpoint benchmark: bytes, save time, load+apply time and the quality cost of each storage mode.

After a short CoFi fine-tune of SmolLM2-135M-Instruct (English->French words, FFN up/down of ``bottom2``), every
storage mode is saved, reloaded onto a fresh base and evaluated (held-out translation loss = speciality, loss on
general English = versatility), against saving the full model and against a LoRA adapter of the same modules with
the same file size. Timings alternate between the contenders and report medians.

    python -m benchmarks.bench_checkpoint            # SmolLM2 (needs: bash scripts/setup.sh --data)
    python -m benchmarks.bench_checkpoint --quick    # tiny random model, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from benchmarks import RESULTS_DIR
from benchmarks.tasks import Task, mean_loss, real_task, tiny_task, train
from peft_cofi import CoFiConfig, save_diff

VARIANTS = [
    ("dense", None, "float32"),
    ("dense", None, "bfloat16"),
    ("rows", None, "float32"),
    ("topk", 0.5, "float32"),
    ("topk", 0.2, "float32"),
    ("topk", 0.1, "float32"),
    ("topk", 0.05, "float32"),
    ("topk", 0.1, "bfloat16"),
]


def file_bytes(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def losses(model, task: Task) -> dict[str, float | None]:
    """Held-out speciality loss and general-text loss (None without general text)."""
    general = mean_loss(model, task.general, task.pad_id) if task.general else None
    return {"speciality": mean_loss(model, task.held_out, task.pad_id), "general": general}


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run(task: Task, steps: int, repeats: int, out: Path, label: str) -> dict:
    config = CoFiConfig(layers_to_transform="bottom2")
    model = get_peft_model(task.fresh_base(), config)
    train(model, task, steps=steps)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    results: dict = {"model": label, "steps": steps, "trainable_bytes": trainable_bytes, "variants": {}}
    base_losses = {
        "speciality": mean_loss(model, task.held_out, task.pad_id),
        "general": mean_loss(model, task.general, task.pad_id),
    }
    with model.disable_adapter():
        results["base"] = {
            "speciality": mean_loss(model, task.held_out, task.pad_id),
            "general": mean_loss(model, task.general, task.pad_id),
        }
    results["trained"] = base_losses
    load_model = get_peft_model(task.fresh_base(), CoFiConfig(layers_to_transform="bottom2"))

    for storage, density, dtype in VARIANTS:
        name = f"{storage}" + (f"@{density}" if density else "") + f"/{dtype}"
        folder = work / name.replace("/", "_").replace("@", "_")

        def save(folder=folder, storage=storage, density=density, dtype=dtype):
            save_diff(model, folder, storage=storage, density=density, dtype=dtype)

        def load(folder=folder):
            load_model.load_adapter(folder, adapter_name="probe")
            load_model.delete_adapter("probe")

        save_time = timed(save, repeats)
        load_time = timed(load, repeats)
        reloaded = PeftModel.from_pretrained(task.fresh_base(), folder)
        results["variants"][name] = {
            "bytes": file_bytes(folder),
            "bytes_vs_trainable": file_bytes(folder) / trainable_bytes,
            "save_s": save_time,
            "load_apply_s": load_time,
            **{f"{key}_loss": value for key, value in losses(reloaded, task).items()},
        }
    dense = results["variants"]["dense/float32"]
    for variant in results["variants"].values():
        variant["bytes_vs_dense"] = variant["bytes"] / dense["bytes"]

    # LoRA on the same modules with the same file size as the dense diff, and the full model.
    base_modules = sorted({n.rsplit(".", 1)[-1] for n in model.base_model.targeted_module_names})
    layers = model.peft_config["default"].layers_to_transform
    probe = next(m for m in model.modules() if hasattr(m, "cofi_delta"))
    rank = max(1, round(probe.out_features * probe.in_features / (probe.out_features + probe.in_features)))
    lora = get_peft_model(
        task.fresh_base(),
        LoraConfig(r=rank, target_modules=base_modules, layers_to_transform=layers, init_lora_weights=False),
    )
    lora.save_pretrained(work / "lora")
    lora_load_model = get_peft_model(
        task.fresh_base(), LoraConfig(r=8, target_modules=base_modules, layers_to_transform=layers)
    )

    def load_lora():
        lora_load_model.load_adapter(work / "lora", adapter_name="probe")
        lora_load_model.delete_adapter("probe")

    def load_cofi():
        load_model.load_adapter(work / "dense_float32", adapter_name="probe")
        load_model.delete_adapter("probe")

    lora_times, cofi_times = [], []
    for _ in range(repeats):  # alternate, so drifting machine load hits both alike
        lora_times.append(timed(load_lora, 1))
        cofi_times.append(timed(load_cofi, 1))
    full_folder = work / "full"
    full_save = timed(lambda: model.get_base_model().save_pretrained(full_folder), 1)
    full_bytes = sum(p.stat().st_size for p in full_folder.glob("*.safetensors"))
    results["lora_equal_bytes"] = {
        "rank": rank,
        "bytes": file_bytes(work / "lora"),
        "load_apply_s": statistics.median(lora_times),
    }
    results["dense_load_apply_s_alternating"] = statistics.median(cofi_times)
    results["full_model"] = {"bytes": full_bytes, "save_s": full_save}
    results["targets"] = {
        "dense_bytes_vs_trainable (<= 1.01)": dense["bytes_vs_trainable"],
        "topk0.1_bytes_vs_dense (<= 0.25)": results["variants"]["topk@0.1/float32"]["bytes_vs_dense"],
        "dense_load_vs_lora_equal_bytes (<= 1.2)": results["dense_load_apply_s_alternating"]
        / results["lora_equal_bytes"]["load_apply_s"],
    }
    shutil.rmtree(work, ignore_errors=True)
    write_report(results, out)
    return results


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if results["model"].startswith("SmolLM2") else "_quick"
    (out / f"checkpoint{suffix}.json").write_text(json.dumps(results, indent=2))
    base, trained = results["base"], results["trained"]
    lines = [
        f"# Diff checkpoints on {results['model']} ({results['steps']} training steps)",
        "",
        f"Trained parameters: {results['trainable_bytes']:,} bytes (float32). Base model: speciality loss "
        f"{fmt(base['speciality'])}, general loss {fmt(base['general'])}; trained (in memory): "
        f"{fmt(trained['speciality'])} / {fmt(trained['general'])}.",
        "",
        "| storage | bytes | x trainable | x dense | save s | load+apply s | speciality loss | general loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in results["variants"].items():
        lines.append(
            f"| {name} | {v['bytes']:,} | {v['bytes_vs_trainable']:.3f} | {v['bytes_vs_dense']:.3f} | "
            f"{v['save_s']:.3f} | {v['load_apply_s']:.3f} | {fmt(v['speciality_loss'])} | "
            f"{fmt(v['general_loss'])} |"
        )
    lora, full = results["lora_equal_bytes"], results["full_model"]
    lines += [
        f"| LoRA r={lora['rank']} (equal bytes) | {lora['bytes']:,} | | | | {lora['load_apply_s']:.3f} | | |",
        f"| full model | {full['bytes']:,} | | | {full['save_s']:.3f} | | | |",
        "",
        "Targets (ratios measured in the same run):",
        "",
    ]
    lines += [f"- {key}: {value:.3f}" for key, value in results["targets"].items()]
    (out / f"checkpoint{suffix}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic data (seconds)")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps before saving")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (medians are reported)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for checkpoint.json / .md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        results = run(tiny_task(), steps=5, repeats=2, out=args.out, label="tiny random Llama")
    else:
        results = run(
            real_task(seed=0, n_train=256, n_eval=64), args.steps, args.repeats, args.out, "SmolLM2-135M-Instruct"
        )
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
