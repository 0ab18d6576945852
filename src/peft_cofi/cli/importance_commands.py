"""``peft-cofi importance`` and ``peft-cofi importance-plot``: compute unit importance from a JSONL file, plot it.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="peft-cofi")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["importance", "model_dir", "data.jsonl", "--out", "imp.safetensors"])
    >>> args.method, args.layers, args.handler.__name__
    ('kl-dropout', None, 'run_importance')
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import CoFiConfig
from ..data import load_jsonl_dataloader
from ..importance import UnitImportance
from ..plots import plot_importance_distributions, plot_importance_heatmap
from ..scoring import DEFAULT_DROPOUT, METHODS, compute_importance
from . import local_model_dir
from .arguments import add_model_data_arguments, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``importance`` and ``importance-plot`` commands (each with a ``handler``) to ``subparsers``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> register(parser.add_subparsers())
        >>> parser.parse_args(["importance-plot", "imp.safetensors", "--out", "imp.png"]).out
        'imp.png'
    """
    compute = subparsers.add_parser(
        "importance",
        help="compute unit importance of a local causal LM on a JSONL data file",
        description=(
            "Compute raw unit importance (CoFiTune/DAS) of the modules a CoFi adapter would train and write it as "
            "a safetensors importance file for CoFiConfig(importance=...). DATA is JSONL with 'instruction'/"
            "'input'/'output', 'messages' or 'text' records."
        ),
    )
    compute.add_argument("model", metavar="MODEL", help="local model directory (AutoModelForCausalLM/AutoTokenizer)")
    compute.add_argument("data", metavar="DATA", help="JSONL data file")
    compute.add_argument("--out", required=True, metavar="FILE", help="importance file to write (.safetensors)")
    compute.add_argument(
        "--method", choices=METHODS, default="kl-dropout", help="importance signal (default: %(default)s)"
    )
    add_model_data_arguments(compute, "module names or suffixes to score")
    compute.add_argument(
        "--dropout",
        type=float,
        default=None,
        metavar="P",
        help=f"dropout on the gated outputs (default: {DEFAULT_DROPOUT} for kl-dropout, 0 for loss)",
    )
    compute.add_argument("--seed", type=int, default=0, help="seed of the dropout masks (default: %(default)s)")
    compute.add_argument("--no-head-pooling", action="store_true", help="one score per row of attention projections")
    compute.set_defaults(handler=run_importance)

    plot = subparsers.add_parser(
        "importance-plot",
        help="plot an importance file as a heatmap PNG",
        description="Heatmap of normalised importance (layers x units, one panel per module kind).",
    )
    plot.add_argument("file", metavar="FILE", help="importance file written by 'peft-cofi importance'")
    plot.add_argument("--out", required=True, metavar="PNG", help="heatmap PNG to write")
    plot.add_argument("--distributions", default=None, metavar="PNG", help="also write per-layer distributions")
    plot.add_argument("--sharpness", type=float, default=1.0, help="t in tanh(|z| / t) (default: %(default)s)")
    plot.set_defaults(handler=run_importance_plot)


def run_importance(args: argparse.Namespace) -> int:
    """Handler of ``peft-cofi importance``: load model, tokenizer and data, compute, save, print a summary.

    Example:
        >>> from peft_cofi.cli import main
        >>> main(["importance", "model_dir", "general.jsonl", "--out", "imp.safetensors"])  # doctest: +SKIP
        0
    """
    local_model_dir(args.model)  # a missing model is named before a missing data file
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file {args.data!r} does not exist.")
    out = Path(args.out)
    model, tokenizer, max_length = load_model(args)
    loader = load_jsonl_dataloader(args.data, tokenizer, batch_size=args.batch_size, max_length=max_length)
    config = CoFiConfig(target_modules=args.target_modules, layers_to_transform=args.layers)
    importance = compute_importance(
        model,
        loader,
        method=args.method,
        config=config,
        head_pooling=not args.no_head_pooling,
        dropout=args.dropout,
        max_batches=args.max_batches,
        seed=args.seed,
        progress=not args.no_progress,
    )
    importance.metadata.update(model=str(args.model), data=str(args.data), max_length=str(max_length))
    out.parent.mkdir(parents=True, exist_ok=True)
    importance.save(out)
    print(
        f"wrote importance of {len(importance.scores)} modules ({importance.tokens} tokens, "
        f"{importance.metadata['batches']} batches, method {args.method}) to {out}"
    )
    return 0


def run_importance_plot(args: argparse.Namespace) -> int:
    """Handler of ``peft-cofi importance-plot``: write the heatmap (and optionally the distributions) PNG.

    Example:
        >>> from peft_cofi.cli import main
        >>> main(["importance-plot", "imp.safetensors", "--out", "imp.png"])  # doctest: +SKIP
        0
    """

    importance = UnitImportance.load(args.file)
    written = [plot_importance_heatmap(importance, args.out, sharpness=args.sharpness)]
    if args.distributions:
        written.append(plot_importance_distributions(importance, args.distributions, sharpness=args.sharpness))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
