"""General corpora to measure forgetting on, from Debian packages (nothing downloaded from a hub).

Looked for: general text whose cross-entropy *rises* when SmolLM2-135M-Instruct is fine-tuned on English->French
words. Found none in the light regime: full fine-tuning at 3e-5 (24 steps) lowers the cross-entropy of plain WordNet
sentences, English quotes, Python code, German and Spanish text (-0.02 to -0.06 nats), and of the same texts given
as assistant answers even more (-0.06 to -0.27 nats). A short chat fine-tune makes this instruct model a better
model of text in general; what it changes is the model's *own* behaviour. So the corpora here serve two kinds of
measure:

- general text as assistant answers to fixed user prompts (``chat_quotes``: English sayings and short stories from
  ``fortunes``; ``chat_code``: Python standard-library code; ``chat_definitions``: Ambrose Bierce's Devil's
  Dictionary, ``dict-devil``) — general modelling, reported for both regimes in case the heavy one moves them;
- :func:`definition_questions`: prompts whose *base-model answers* become a second retention set, beside the general
  instructions (the model's own behaviour, on another kind of prompt).

Fresh machine: ``apt-get install -y fortunes dict-devil``.

Example:
    >>> [name for name in CORPORA]
    ['chat_quotes', 'chat_code', 'chat_definitions']
"""

from __future__ import annotations

import gzip
import random
import sysconfig
from collections.abc import Callable
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
FORTUNE_FILES = ("literature", "wisdom", "people", "science", "education", "fortunes", "work", "politics", "law")


def fortunes(
    rng: random.Random, n: int, folder: Path = FORTUNES_DIR, min_chars: int = 60, max_chars: int = 400
) -> list[str]:
    """``n`` English fortunes (one line each, whitespace collapsed) of moderate length."""
    texts = []
    for name in FORTUNE_FILES:
        path = folder / name
        if path.is_file():
            texts += [" ".join(t.split()) for t in path.read_text(encoding="utf-8", errors="ignore").split("\n%\n")]
    texts = sorted({t for t in texts if min_chars <= len(t) <= max_chars})
    if len(texts) < n:
        raise FileNotFoundError(f"found {len(texts)} fortunes in {folder}, need {n}: apt-get install -y fortunes")
    return rng.sample(texts, n)


def python_snippets(rng: random.Random, n: int, lines: int = 12) -> list[str]:
    """``n`` snippets of ``lines`` lines from the Python standard library's own source files."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for path in sorted(folder.glob("*.py")):
        source = path.read_text(encoding="utf-8", errors="ignore").splitlines()
        chunks += ["\n".join(source[i : i + lines]) for i in range(0, len(source) - lines, 60)]
    chunks = [c for c in chunks if 200 <= len(c) <= 600]
    return rng.sample(chunks, n)


def devil_definitions(rng: random.Random, n: int, path: Path = DEVIL_DICT) -> list[tuple[str, str]]:
    """``n`` (headword, definition) pairs from the Devil's Dictionary."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install -y dict-devil")
    with gzip.open(path, "rt", encoding="utf-8", errors="ignore") as handle:
        blocks = handle.read().split("\n\n")
    entries = []
    for block in blocks:
        text = " ".join(block.split())
        head = text.partition(",")[0]
        if head.isupper() and 80 <= len(text) <= 500:
            entries.append((head.strip().lower(), text))
    return rng.sample(sorted(entries), n)


def chat_quotes(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [("Tell me a saying or a short story.", text) for text in fortunes(rng, n)]


def chat_code(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [("Show me a piece of Python code.", text) for text in python_snippets(rng, n)]


def chat_definitions(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [(f"Define the word '{word}' in a witty way.", text) for word, text in devil_definitions(rng, n)]


def definition_questions(rng: random.Random, n: int, avoid: set[str] = frozenset()) -> list[str]:
    """``n`` questions "What does the word 'x' mean? Answer in one sentence." on Devil's Dictionary headwords not in
    ``avoid`` (the base model answers them; its answers are the retention targets)."""
    words = [w for w, _ in devil_definitions(random.Random(7), 300) if w.isalpha() and w not in avoid]
    return [f"What does the word '{word}' mean? Answer in one sentence." for word in rng.sample(words, n)]


# name -> (rng, n) -> [(user prompt, assistant answer)]
CORPORA: dict[str, Callable[[random.Random, int], list[tuple[str, str]]]] = {
    "chat_quotes": chat_quotes,
    "chat_code": chat_code,
    "chat_definitions": chat_definitions,
}
