"""``peft-cofi inspect | merge | export-lora``: look into, apply and convert diff checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..diff_format import CONFIG_NAME, FINGERPRINT, CheckpointError, in_model_order, read_diff_file
from ..export import ADAPTER_FILE, export_lora, merge_into_base


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the checkpoint commands to the ``peft-cofi`` parser."""
    inspect = subparsers.add_parser(
        "inspect",
        help="show what a CoFi diff checkpoint holds",
        description="Show modules, shapes, storage, density, bytes, base fingerprints and "
        "mask (importance) summary of a CoFi diff checkpoint.",
    )
    inspect.add_argument("path", help="adapter folder or adapter_model.safetensors file")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    inspect.set_defaults(handler=run_inspect)

    merge = subparsers.add_parser(
        "merge",
        help="apply a diff to its base and write a full model",
        description="Validate a CoFi diff against its base model, merge it, and write a "
        "full transformers model (sharded safetensors).",
    )
    merge.add_argument("base", help="local folder of the base transformers model")
    merge.add_argument("adapter", help="CoFi adapter folder")
    merge.add_argument("out", help="output folder for the merged model")
    merge.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default: 2GB)")
    merge.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    merge.add_argument(
        "--no-verify-base", action="store_true", help="apply the diff even if BASE is not the model it was trained on"
    )
    merge.set_defaults(handler=run_merge)

    export = subparsers.add_parser(
        "export-lora",
        help="convert a diff to a plain peft LoRA adapter",
        description="Approximate each module's diff by a truncated SVD and write a "
        "standard peft LoRA adapter that loads without peft-cofi.",
    )
    export.add_argument("adapter", help="CoFi adapter folder")
    export.add_argument("out", help="output folder for the LoRA adapter")
    export.add_argument("--rank", type=int, help="LoRA rank per module (cap when --energy is given)")
    export.add_argument("--energy", type=float, help="keep this fraction of each diff's squared norm, e.g. 0.9")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    export.set_defaults(handler=run_export)


def _weights_path(path: str) -> Path:
    candidate = Path(path)
    return candidate / ADAPTER_FILE if candidate.is_dir() else candidate


def check_output(out: str | Path, inputs: list[str | Path], overwrite: bool) -> Path:
    """Refuse an output that is, or contains, one of the inputs (writing it would destroy them), an existing file,
    and a non-empty folder unless ``overwrite``. Returns the output folder."""
    out = Path(out).resolve()
    for source in (Path(p).resolve() for p in inputs):
        if out == source or source.is_relative_to(out):
            raise ValueError(f"the output {str(out)!r} is or contains the input {str(source)!r}; choose another place.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {str(out)!r} is an existing file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"the output folder {str(out)!r} is not empty; pass --overwrite to write into it.")
    return out


def _check_cofi_folder(weights: Path) -> None:
    """Say what a folder is when it is not a CoFi adapter (a LoRA adapter, say), instead of blaming its file."""
    config = weights.parent / CONFIG_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{str(weights)!r} does not exist.")
    if config.is_file():
        peft_type = json.loads(config.read_text()).get("peft_type")
        if peft_type != "COFI":
            raise ValueError(
                f"{str(weights.parent)!r} holds a {peft_type} adapter, not a CoFi adapter; this command reads CoFi "
                "diff checkpoints only."
            )


def summarize(path: str) -> dict:
    """The ``inspect`` report as a dict (see ``peft-cofi inspect --help``)."""
    weights = _weights_path(path)
    _check_cofi_folder(weights)
    diff_file = read_diff_file(weights)
    modules = {}
    for name in in_model_order(diff_file.records):
        record, stored, mask = diff_file.records[name], diff_file.tensors[name], diff_file.mask(name)
        modules[name] = {
            "shape": record["shape"],
            "storage": record["storage"],
            "value_dtype": record["value_dtype"],
            "kept": round(record["kept"], 6),
            "bytes": sum(t.numel() * t.element_size() for t in stored.values()),
            "rel_error": record["rel_error"],
            "base_fingerprint": bytes(stored[FINGERPRINT].tolist()).hex(),
            "mask_mean": round(float(mask.mean()), 4),
            "mask_below_0.1": round(float((mask < 0.1).float().mean()), 4),
        }
    others = {key: list(tensor.shape) for key, tensor in diff_file.others.items()}
    return {
        "file": str(weights),
        "file_bytes": weights.stat().st_size,
        "header": diff_file.header.fields,
        "modules": modules,
        "other_tensors": others,
    }


def run_inspect(args: argparse.Namespace) -> int:
    report = summarize(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    header = report["header"]
    print(
        f"{report['file']}: {report['file_bytes']:,} bytes, format {header.get('cofi_format')} "
        f"v{header.get('cofi_format_version')} (peft-cofi {header.get('peft_cofi_version')})"
    )
    print(
        f"base model: {header.get('base_model', 'unknown')}  mask mode: {header.get('mask_mode')}  "
        f"storage: {header.get('storage')} density: {header.get('density', '-')} dtype: {header.get('value_dtype')}"
    )
    print(
        f"{'module':<48} {'shape':>12} {'storage':>7} {'kept':>7} {'bytes':>11} {'rel.err':>8} "
        f"{'mask mean':>9} {'<0.1':>6}  base fingerprint"
    )
    for name, m in report["modules"].items():
        shape = "x".join(map(str, m["shape"]))
        print(
            f"{name:<48} {shape:>12} {m['storage']:>7} {m['kept']:>7.3f} {m['bytes']:>11,} {m['rel_error']:>8.1e} "
            f"{m['mask_mean']:>9.3f} {m['mask_below_0.1']:>6.1%}  {m['base_fingerprint'][:16]}"
        )
    for key, shape in report["other_tensors"].items():
        print(f"also stored (modules_to_save / embeddings): {key} {'x'.join(map(str, shape))}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    out = check_output(args.out, [args.base, args.adapter], args.overwrite)
    _check_cofi_folder(_weights_path(args.adapter))
    try:
        merge_into_base(args.base, args.adapter, out, args.max_shard_size, verify_base=not args.no_verify_base)
    except CheckpointError as error:
        if "other base weights" not in str(error):
            raise
        advice = f"{str(error).split('. Load the matching')[0]}. Pass --no-verify-base to merge anyway."
        raise CheckpointError(advice) from error
    print(f"wrote the merged model to {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.rank is None and args.energy is None:
        raise ValueError("give --rank (e.g. 16) or --energy (e.g. 0.9) for the LoRA export.")
    out = check_output(args.out, [args.adapter], args.overwrite)
    _check_cofi_folder(_weights_path(args.adapter))
    report = export_lora(args.adapter, out, rank=args.rank, energy=args.energy)
    for name in sorted(report.ranks):
        print(f"{name:<48} rank {report.ranks[name]:>5}  rel. error {report.rel_errors[name]:.3e}")
    print(f"wrote a peft LoRA adapter to {args.out}; max relative error {report.max_rel_error:.3e}")
    return 0
