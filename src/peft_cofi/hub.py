"""The Hugging Face Hub: a model card that says what a CoFi adapter is, and a push that keeps it.

``transformers``' ``push_to_hub`` replaces the card that ``save_pretrained`` wrote with a generic one
(``library_name: transformers``), so for CoFi adapters ``PeftModel.push_to_hub`` is routed to :func:`push_to_hub`
here (see :mod:`peft_cofi.patches`): ``create_repo``, ``save_pretrained`` into a temporary folder (card included), one
``create_commit``. Loading needs nothing special: ``PeftModel.from_pretrained(base, "owner/name")``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

from .diff_format import MODULES_KEY

TAGS = ("peft-cofi", "cofitune")
_BEGIN, _END = "<!-- peft-cofi:begin -->", "<!-- peft-cofi:end -->"


def write_model_card(directory: str | os.PathLike, header: dict[str, str]) -> None:
    """Add (or refresh) the CoFi section and tags of ``README.md`` in ``directory`` from a diff header.

    Example:
        >>> write_model_card(tempfile.mkdtemp(), {MODULES_KEY: "{}", "storage": "dense"})
    """
    path = Path(directory) / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    card.data.tags = sorted(set(card.data.tags or []) | set(TAGS))
    if header.get("base_model") and not card.data.base_model:
        card.data.base_model = header["base_model"]
    text = card.text
    if _BEGIN in text and _END in text:
        text = text[: text.index(_BEGIN)] + text[text.index(_END) + len(_END) :]
    card.text = text.rstrip() + "\n\n" + _section(header, directory) + "\n"
    card.save(path)


def _section(header: dict[str, str], directory: str | os.PathLike) -> str:
    modules = json.loads(header.get(MODULES_KEY, "{}"))
    layers = sorted({int(p) for name in modules for p in name.split(".") if p.isdigit()})
    kinds = sorted({name.rsplit(".", 1)[-1] for name in modules})
    weights = Path(directory) / "adapter_model.safetensors"
    size = weights.stat().st_size if weights.exists() else None
    errors = [m.get("rel_error", 0.0) for m in modules.values()]
    lines = [
        _BEGIN,
        "## CoFi adapter (CoFiTune, peft-cofi)",
        "",
        "A sparse weight diff trained with [peft-cofi](https://pypi.org/project/peft-cofi/): only the modules below",
        "changed, and a soft mask kept the units that matter most to the base model's general abilities nearly fixed.",
        "",
        f"- Base model: `{header.get('base_model', 'unknown')}`",
        f"- Trained modules: {', '.join(f'`{k}`' for k in kinds)} in layers {layers} ({len(modules)} modules)",
        f"- Mask mode: `{header.get('mask_mode', 'unknown')}`",
        f"- Storage: `{header.get('storage', 'dense')}`"
        + (f", density {header['density']}" if header.get("density") else "")
        + f", values `{header.get('value_dtype', 'float32')}`"
        + (f", max relative reconstruction error {max(errors):.2e}" if errors else ""),
        f"- Size: {size:,} bytes" if size is not None else "- Size: unknown",
        *_scaling_lines(header),
        "",
        "```python",
        "import peft_cofi  # registers the CoFi method with peft",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({header.get('base_model', 'BASE_MODEL')!r})",
        'model = PeftModel.from_pretrained(base, "THIS_REPO")',
        "```",
        _END,
    ]
    return "\n".join(lines)


def _scaling_lines(header: dict[str, str]) -> list[str]:
    """One card line for a diff rescaled after training (``peft_cofi.scale_diff`` / ``calibrate``), if it was."""
    if "cofi_scaling" not in header:
        return []
    record = json.loads(header["cofi_scaling"])
    what = record.get("method", "scale")
    detail = f", granularity {record['granularity']}" if record.get("granularity") else ""
    detail += f", density {record['density']}" if record.get("density") is not None else ""
    return [
        f"- Rescaled after training ({what}{detail}) from the diff with checksum "
        f"`{header.get('cofi_source_checksum', 'unknown')}`; the header's `cofi_scaling` record has the factors."
    ]


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
    **_: Any,
) -> Any:
    """Upload a CoFi adapter (config, diff, model card) to the Hub; returns the commit info.

    Example:
        push_to_hub(model, "me/smollm2-cofi-fr")
    """
    api = api or HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload CoFi adapter",
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
