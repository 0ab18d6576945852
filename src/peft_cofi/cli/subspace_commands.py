"""``peft-cofi subspace`` and ``peft-cofi subspace-plot``: compute an input subspace from JSONL files, plot it.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="peft-cofi")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["subspace", "model_dir", "general.jsonl", "--out", "sub.safetensors", "--rank", "8"])
    >>> args.energy, args.rank, args.contrast, args.handler.__name__
    (None, 8, None, 'run_subspace')
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ..config import CoFiConfig
from ..data import load_jsonl_dataloader
from ..plots import plot_subspace_spectrum
from ..subspace import InputSubspace
from ..subspace_compute import compute_input_subspace
from ..subspace_math import check_energy
from . import local_model_dir
from .arguments import add_model_data_arguments, load_model, positive_int

DEFAULT_ENERGY = 0.9


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``subspace`` and ``subspace-plot`` commands (each with a ``handler``) to ``subparsers``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> register(parser.add_subparsers())
        >>> parser.parse_args(["subspace-plot", "sub.safetensors", "--out", "sub.png"]).out
        'sub.png'
    """
    compute = subparsers.add_parser(
        "subspace",
        help="compute the input directions general text uses most, per module, for CoFiConfig(input_subspace=...)",
        description=(
            "Stream general text through a local causal LM and keep, per module a CoFi adapter would train, the input "
            "directions that hold most of the inputs' energy (with --contrast: those general text uses more than the "
            "task does). A CoFi adapter trained with the file never changes those directions' outputs. DATA and "
            "TASK_DATA are JSONL with 'instruction'/'input'/'output', 'messages' or 'text' records."
        ),
    )
    compute.add_argument("model", metavar="MODEL", help="local model directory (AutoModelForCausalLM/AutoTokenizer)")
    compute.add_argument("data", metavar="DATA", help="JSONL file of general text")
    compute.add_argument("--out", required=True, metavar="FILE", help="subspace file to write (.safetensors)")
    compute.add_argument(
        "--contrast",
        metavar="TASK_DATA",
        default=None,
        help="JSONL task data: protect only what general text uses more",
    )
    size = compute.add_mutually_exclusive_group()
    size.add_argument(
        "--energy",
        type=float,
        default=None,
        metavar="E",
        help=f"fraction of energy to protect (default {DEFAULT_ENERGY})",
    )
    size.add_argument("--rank", type=positive_int, default=None, metavar="K", help="protect exactly K directions")
    add_model_data_arguments(compute, "module names or suffixes")
    compute.set_defaults(handler=run_subspace)

    plot = subparsers.add_parser(
        "subspace-plot",
        help="plot a subspace file's energy curves and spectra as a PNG",
        description="Per module kind: the general energy the first directions hold, and the spectrum, per layer.",
    )
    plot.add_argument("file", metavar="FILE", help="subspace file written by 'peft-cofi subspace'")
    plot.add_argument("--out", required=True, metavar="PNG", help="PNG to write")
    plot.set_defaults(handler=run_subspace_plot)


def run_subspace(args: argparse.Namespace) -> int:
    """Handler of ``peft-cofi subspace``: load model, tokenizer and data, compute, save, print a summary.

    Example:
        >>> from peft_cofi.cli import main
        >>> main(["subspace", "model_dir", "general.jsonl", "--out", "sub.safetensors"])  # doctest: +SKIP
        0
    """
    energy = check_energy(DEFAULT_ENERGY if args.energy is None else args.energy)  # before the model loads
    local_model_dir(args.model)  # a missing model is named before a missing data file
    for path in filter(None, (args.data, args.contrast)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file {path!r} does not exist.")
    out = Path(args.out)
    if out.resolve() in {Path(p).resolve() for p in filter(None, (args.data, args.contrast))}:
        raise ValueError(f"--out {str(out)!r} is one of the input files; write the subspace elsewhere.")
    model, tokenizer, max_length = load_model(args)

    def loader(path: str):
        return load_jsonl_dataloader(path, tokenizer, batch_size=args.batch_size, max_length=max_length)

    subspace = compute_input_subspace(
        model,
        loader(args.data),
        config=CoFiConfig(target_modules=args.target_modules, layers_to_transform=args.layers),
        energy=energy,
        rank=args.rank,
        contrast=None if args.contrast is None else loader(args.contrast),
        max_batches=args.max_batches,
        progress=not args.no_progress,
    )
    subspace.metadata.update(model=str(args.model), data=str(args.data), max_length=str(max_length))
    if args.contrast:
        subspace.metadata["task_data"] = str(args.contrast)
    out.parent.mkdir(parents=True, exist_ok=True)
    subspace.save(out)
    ranks = list(subspace.rank.values())
    print(
        f"wrote a {subspace.metadata['kind']} input subspace of {len(subspace)} modules (rank {min(ranks)}-"
        f"{max(ranks)}, median energy {statistics.median(subspace.energy.values()):.3f}, {subspace.tokens} "
        f"general tokens) to {out}"
    )
    return 0


def run_subspace_plot(args: argparse.Namespace) -> int:
    """Handler of ``peft-cofi subspace-plot``: write the spectrum PNG.

    Example:
        >>> from peft_cofi.cli import main
        >>> main(["subspace-plot", "sub.safetensors", "--out", "sub.png"])  # doctest: +SKIP
        0
    """
    print(f"wrote {plot_subspace_spectrum(InputSubspace.load(args.file), args.out)}")
    return 0
