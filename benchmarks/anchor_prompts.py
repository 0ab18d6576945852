"""General prompts for the retention anchor (``anchor_prompts.txt``), kept apart from every evaluation set.

An anchor trains on its prompts, so none of them may be a prompt or text that an evaluation scores: not the retention
instructions (``general_instructions.txt``, whose base-model answers measure forgetting), not the general-English
sentences, not the held-out task inputs. :func:`check_disjoint` enforces that, comparing text after normalising case,
spacing and end punctuation (and token sequences as sequences); the fronts benchmark and the examples call it before
attaching an anchor.

Example:
    >>> check_disjoint(["Name a colour."], {"retention": ["Name a colour!", "What is 2 + 2?"]})
    Traceback (most recent call last):
    ...
    ValueError: 1 anchor prompt(s) also occur in the retention evaluation set, e.g. 'Name a colour.'; the anchor would \
train on what is measured. Remove them from the anchor prompts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.resources import collate

ANCHOR_PROMPTS = Path(__file__).resolve().parent / "anchor_prompts.txt"
INSTRUCTIONS = Path(__file__).resolve().parent / "general_instructions.txt"


def read_prompts(path: Path = ANCHOR_PROMPTS) -> list[str]:
    """The non-empty lines of a prompt file, stripped.

    Example:
        >>> len(read_prompts()) >= 32
        True
    """
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"the prompt file {str(path)!r} holds no prompt.")
    return prompts


def normalise(item: str | Sequence[int]) -> Hashable:
    """A comparison key: text case-folded, whitespace collapsed, end punctuation dropped; token ids as a tuple.

    Example:
        >>> normalise("  What is  2+2? "), normalise([5, 6])
        ('what is 2+2', (5, 6))
    """
    if isinstance(item, str):
        return " ".join(item.casefold().split()).rstrip(".?!;:")
    return tuple(int(token) for token in item)


def check_disjoint(anchor: Iterable[str | Sequence[int]], evaluation_sets: Mapping[str, Iterable[Any]]) -> None:
    """Raise ``ValueError`` when an anchor prompt also occurs in an evaluation set (see :func:`normalise`).

    Example:
        >>> check_disjoint(["Name a colour."], {"retention instructions": ["What is 2 + 2?"]})
    """
    keys = {normalise(item): item for item in anchor}
    for name, items in evaluation_sets.items():
        shared = [keys[key] for key in dict.fromkeys(normalise(item) for item in items) if key in keys]
        if shared:
            raise ValueError(
                f"{len(shared)} anchor prompt(s) also occur in the {name} evaluation set, e.g. {shared[0]!r}; the "
                "anchor would train on what is measured. Remove them from the anchor prompts."
            )


def chat_prompts(tokenizer: Any, prompts: Iterable[str]) -> list[list[int]]:
    """Each prompt as a user turn with the chat template's generation prompt: the tokens a chat model answers.

    Example:
        ids = chat_prompts(tokenizer, read_prompts())
    """
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        )
        for text in prompts
    ]


def prompt_batches(prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of token prompts (``input_ids`` and ``attention_mask``) for ``attach_retention_anchor``.

    Example:
        >>> prompt_batches([[5, 6, 7], [8]], pad_id=0)[0]["attention_mask"].tolist()
        [[1, 1, 1], [1, 0, 0]]
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = collate(
            [{"input_ids": list(p), "labels": list(p)} for p in prompts[start : start + batch_size]], pad_id
        )
        out.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return out
