"""Real data available offline: English text and English->French word pairs (from Debian packages), plus helpers
that turn pairs into chat training examples. The model, SmolLM2-135M-Instruct, comes from
:mod:`peft_cofi.example_model`.

Fresh machine::

    apt-get install -y dict-freedict-eng-fra wordnet-base

Nothing here downloads from a model or data hub.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

FREEDICT_ENG_FRA = "/usr/share/dictd/freedict-eng-fra.dict.dz"
WORDNET_DIR = "/usr/share/wordnet"
IGNORE_INDEX = -100

_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PRONUNCIATION = re.compile(r"\s+/[^/]*/\s*$")
_SENSE_NUMBER = re.compile(r"^\d+\.\s*")
_SIMPLE_ENGLISH = re.compile(r"^[A-Za-z][A-Za-z' -]*$")
_SIMPLE_FRENCH = re.compile(r"^[^\W\d_](?:[^\W\d_]|[' -])*$")  # letters (any script), apostrophe, space, hyphen


# --------------------------------------------------------------------------------------------- FreeDict


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _DICTD_B64.index(char)
    return value


def _read_dictd(path: Path) -> list[tuple[str, str]]:
    """(index headword, entry text) for every entry of a dictd dictionary (``.dict.dz`` or ``.dict`` + ``.index``)."""
    name = path.name
    stem = name[: -len(".dict.dz")] if name.endswith(".dict.dz") else name.removesuffix(".dict")
    index = path.with_name(stem + ".index")
    if not index.is_file():
        raise FileNotFoundError(f"dictd index {index} not found next to {path}.")
    opener = gzip.open if name.endswith(".dz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    entries = []
    for line in index.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        start = _dictd_number(offset)
        entries.append((headword, data[start : start + _dictd_number(length)].decode("utf-8")))
    return entries


def freedict_pairs(
    path: str | os.PathLike[str] = FREEDICT_ENG_FRA,
    max_english_words: int = 2,
    max_french_words: int = 3,
    skip_identical: bool = True,
) -> list[tuple[str, str]]:
    """(english, french) word pairs from a FreeDict dictd dictionary (Debian ``dict-freedict-eng-fra``).

    Each headword gives one pair: its first French translation. Entries are skipped when not simple: headwords or
    translations with digits, brackets or other punctuation, more than ``max_english_words`` /
    ``max_french_words`` words, or (``skip_identical``) a translation equal to the headword. Order: the file's.

    Example:
        pairs = freedict_pairs()
        dict(pairs)["cauliflower"]
        'chou-fleur'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: it comes from the Debian package dict-freedict-eng-fra "
            "(apt-get install -y dict-freedict-eng-fra)."
        )
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for headword, entry in _read_dictd(path):
        if headword.startswith("00database") or headword.startswith("00-database"):
            continue
        lines = [line.strip() for line in entry.replace("\u2010", "-").splitlines() if line.strip()]
        if len(lines) < 2:
            continue
        english = _PRONUNCIATION.sub("", lines[0]).strip()
        french = _SENSE_NUMBER.sub("", lines[1]).split(",")[0].strip()
        if (
            english.lower() in seen
            or not _SIMPLE_ENGLISH.match(english)
            or not _SIMPLE_FRENCH.match(french)
            or len(english.split()) > max_english_words
            or len(french.split()) > max_french_words
            or (skip_identical and english.lower() == french.lower())
        ):
            continue
        seen.add(english.lower())
        pairs.append((english, french))
    return pairs


def split_pairs(
    pairs: Sequence[tuple[str, str]], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic (train, held-out) split by headword: a pair is held out when a seeded hash of its lower-cased
    English side falls below ``eval_fraction``, so the split does not depend on order or on the other pairs.

    Example:
        >>> train, held_out = split_pairs([("cat", "chat"), ("dog", "chien"), ("house", "maison")], 0.5, seed=0)
        >>> sorted(train + held_out) == sorted([("cat", "chat"), ("dog", "chien"), ("house", "maison")])
        True
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must lie in [0, 1].")
    train, held_out = [], []
    for pair in pairs:
        digest = hashlib.sha256(f"{seed}\0{pair[0].lower()}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else train).append(pair)
    return train, held_out


# --------------------------------------------------------------------------------------------- WordNet


def wordnet_sentences(
    wordnet_dir: str | os.PathLike[str] = WORDNET_DIR,
    parts: Iterable[str] = ("noun", "verb", "adj", "adv"),
    kind: str = "both",
    limit: int | None = None,
) -> list[str]:
    """General-English sentences from WordNet (Debian ``wordnet-base``): glosses and quoted example sentences.

    ``kind="examples"`` gives the quoted usage examples (e.g. "I can breathe better when the air is clean"),
    ``"glosses"`` one sentence per synset (``"Breathe: draw air into, and expel out of, the lungs."``), ``"both"``
    both, in file order. ``limit`` caps the count.

    Example:
        sentences = wordnet_sentences(kind="examples", limit=3)
        len(sentences)
        3
    """
    if kind not in ("examples", "glosses", "both"):
        raise ValueError(f"kind={kind!r} must be 'examples', 'glosses' or 'both'.")
    root = Path(wordnet_dir)
    out: list[str] = []
    for part in parts:
        data = root / f"data.{part}"
        if not data.is_file():
            raise FileNotFoundError(
                f"{data} not found: WordNet comes from the Debian package wordnet-base "
                "(apt-get install -y wordnet-base)."
            )
        with data.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(" ") or " | " not in line:  # licence header
                    continue
                fields, gloss = line.split(" | ", 1)
                gloss = gloss.strip()
                if kind in ("glosses", "both"):
                    definition = re.split(r';?\s*"', gloss, maxsplit=1)[0].strip(" ;")
                    lemma = re.sub(r"\(\w+\)$", "", fields.split()[4]).replace("_", " ")
                    if definition:
                        out.append(f"{lemma[:1].upper()}{lemma[1:]}: {definition}.")
                if kind in ("examples", "both"):
                    out.extend(example.strip() for example in re.findall(r'"([^"]+)"', gloss) if example.strip())
                if limit is not None and len(out) >= limit:
                    return out[:limit]
    return out


# --------------------------------------------------------------------------------------------- chat examples


def translation_messages(english: str) -> list[dict[str, str]]:
    """The user turn of a translation example.

    Example:
        >>> translation_messages("cat")
        [{'role': 'user', 'content': 'Translate to French: cat'}]
    """
    return [{"role": "user", "content": f"Translate to French: {english}"}]


def chat_example(tokenizer: Any, prompt: list[dict[str, str]], answer: str) -> dict[str, list[int]]:
    """One training example from chat messages and an assistant answer, tokenised with the tokenizer's chat template.

    ``input_ids`` = prompt tokens (template with generation prompt) + answer tokens (the rest of the rendered
    conversation, end-of-turn included); ``labels`` are ``-100`` on the prompt, so only the answer is learned. The
    prompt tokens are exactly those a model sees at generation time.

    Example:
        example = chat_example(tokenizer, translation_messages("cat"), "chat")
        example["labels"][0]
        -100
    """
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently once an answer follows it.")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def translation_examples(tokenizer: Any, pairs: Iterable[tuple[str, str]]) -> list[dict[str, list[int]]]:
    """Chat training examples "Translate to French: {en}" -> "{fr}" with prompt labels masked.

    Example:
        examples = translation_examples(tokenizer, [("cat", "chat")])
    """
    return [chat_example(tokenizer, translation_messages(en), fr) for en, fr in pairs]


def short_translation_examples(tokenizer: Any, pairs: Iterable[tuple[str, str]]) -> list[dict[str, list[int]]]:
    """Short chat examples (~26 tokens): "Translate to French." as the system turn (it replaces SmolLM2's ~20-token
    default one), the English word as the user turn, its translation as the (only labelled) answer.

    Example:
        examples = short_translation_examples(tokenizer, [("cat", "chat")])
    """
    system = {"role": "system", "content": "Translate to French."}
    return [chat_example(tokenizer, [system, {"role": "user", "content": en}], fr) for en, fr in pairs]


def text_examples(tokenizer: Any, texts: Iterable[str]) -> list[dict[str, list[int]]]:
    """Plain-text language-modelling examples (every token is a label), e.g. to measure forgetting.

    Example:
        examples = text_examples(tokenizer, ["The cat sat on the mat."])
    """
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def collate(
    examples: Sequence[dict[str, list[int]]], pad_token_id: int = 0, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_token_id``, ``labels`` with ``-100``, plus ``attention_mask``.
    ``max_length`` truncates each example first.

    Example:
        >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """
    rows = [(ex["input_ids"][:max_length], ex["labels"][:max_length]) for ex in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
