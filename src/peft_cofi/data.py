"""Data loading: JSONL records -> tokenised examples -> padded batches for importance and training.

Record formats (one JSON object per line; a file may mix them):

- ``{"instruction": ..., "input": ..., "output": ...}``: the authors' (Alpaca) format; ``input`` is optional;
- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``: chat;
- ``{"text": ...}``: plain text.

Tokenisation uses the tokenizer's chat template where it has one (instruction records become a user turn with the
instruction and input, and an assistant turn with the output); without one, instruction records use the Alpaca
prompt (:data:`ALPACA_PROMPT`) and chat records are an error. ``labels`` equal ``input_ids`` with the prompt
(everything but assistant turns / the output) set to ``-100``; plain text is labelled everywhere. Batches are
right-padded: ``input_ids`` with the pad token, ``labels`` with ``-100``, ``attention_mask`` 0 on padding.

Example:
    >>> collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])["labels"]
    tensor([[-100,    6,    7],
            [   8, -100, -100]])
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

IGNORE_INDEX = -100
Example = dict[str, list[int]]
FORMATS = ("instruction", "messages", "text")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
# ``model_max_length`` above this means "unset" in transformers (it defaults to a huge number).
_UNSET_LENGTH = 10**8


def read_jsonl(path: str | os.PathLike[str], max_records: int | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not a JSON object (the line number is named), or the file holds no record.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "data.jsonl"
        >>> _ = path.write_text('{"text": "hello"}\\n\\n{"text": "world"}\\n')
        >>> read_jsonl(path)
        [{'text': 'hello'}, {'text': 'world'}]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} is a JSON {type(record).__name__}, not an object.")
            records.append(record)
            if max_records is not None and len(records) >= max_records:
                break
    if not records:
        raise ValueError(f"data file {str(path)!r} holds no record.")
    return records


def record_format(record: Mapping[str, Any]) -> str:
    """``"messages"``, ``"instruction"`` or ``"text"``: which format a record has (checked in that order).

    Example:
        >>> record_format({"instruction": "Add 2 and 3.", "output": "5"})
        'instruction'
    """
    for name, key in (("messages", "messages"), ("instruction", "instruction"), ("text", "text")):
        if key in record:
            return name
    raise ValueError(
        f"a record with keys {sorted(record)} has no known format; expected 'instruction' (+ 'input', 'output'), "
        "'messages' (a list of {'role', 'content'}) or 'text'."
    )


def tokenize_record(tokenizer: Any, record: Mapping[str, Any], use_chat_template: bool | None = None) -> Example:
    """One example ``{"input_ids", "labels"}`` from a record (see the module docstring for the formats).

    Args:
        tokenizer: a transformers tokenizer.
        record: one record.
        use_chat_template: render instruction records with the chat template; default: when the tokenizer has one.

    Example:
        example = tokenize_record(tokenizer, {"text": "The cat sat."})
        example["labels"] == example["input_ids"]
        True
    """
    kind = record_format(record)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if kind == "text":
        ids = tokenizer(_string(record, "text"), add_special_tokens=True)["input_ids"]
        return {"input_ids": list(ids), "labels": list(ids)}
    if kind == "instruction":
        instruction, extra = _string(record, "instruction"), _string(record, "input", "")
        output = _string(record, "output")
        if not use_chat_template:
            template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
            prompt = tokenizer(template.format(instruction=instruction, input=extra), add_special_tokens=True)
            answer = tokenizer(output, add_special_tokens=False)["input_ids"]
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids = list(prompt["input_ids"])
            return {"input_ids": ids + answer + eos, "labels": [IGNORE_INDEX] * len(ids) + answer + eos}
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        messages = _messages(record)
    if not has_template:
        raise ValueError(
            "chat records need a tokenizer with a chat_template; this tokenizer has none. Use instruction or text "
            "records, or set tokenizer.chat_template."
        )
    return _chat_example(tokenizer, messages)


def tokenize_records(
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]],
    max_length: int | None = None,
    use_chat_template: bool | None = None,
) -> list[Example]:
    """Tokenise records (:func:`tokenize_record`) and truncate each to ``max_length`` tokens.

    ``max_length`` defaults to the tokenizer's ``model_max_length`` when that is set. Empty examples are dropped.

    Example:
        examples = tokenize_records(tokenizer, read_jsonl("data.jsonl"), max_length=256)
    """
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        max_length = limit if isinstance(limit, int) and limit < _UNSET_LENGTH else None
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length} must be at least 1 token.")
    examples = []
    for record in records:
        example = tokenize_record(tokenizer, record, use_chat_template)
        if max_length is not None:
            example = {key: value[:max_length] for key, value in example.items()}
        if example["input_ids"]:
            examples.append(example)
    if not examples:
        raise ValueError("no record gave any token.")
    return examples


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Example:
        >>> class T: pad_token_id = None; eos_token_id = 2
        >>> pad_token_id(T())
        2
    """
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch: ``input_ids`` (pad ``pad_id``), ``labels`` (pad -100), ``attention_mask``.

    Examples without ``labels`` are labelled on every token.

    Example:
        >>> collate([{"input_ids": [5, 6]}, {"input_ids": [7]}], pad_id=0)["input_ids"].tolist()
        [[5, 6], [7, 0]]
    """
    if not examples:
        raise ValueError("cannot collate an empty batch.")
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = list(example["input_ids"])
        labs = list(example.get("labels", ids))
        if len(labs) != len(ids):
            raise ValueError(f"example {row} has {len(ids)} input_ids but {len(labs)} labels.")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_dataloader(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 8,
    shuffle: bool = False,
    seed: int = 0,
    **loader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` of padded batches (:func:`collate`) over tokenised examples; extra arguments (e.g.
    ``sampler=DistributedSampler(...)``) go to the DataLoader.

    Example:
        >>> loader = make_dataloader([{"input_ids": [1, 2], "labels": [1, 2]}], tokenizer=None, batch_size=4)
        >>> next(iter(loader))["attention_mask"].tolist()
        [[1, 1]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    pad_id = pad_token_id(tokenizer)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=functools.partial(collate, pad_id=pad_id),
        **loader_kwargs,
    )


def load_jsonl_dataloader(
    path: str | os.PathLike[str],
    tokenizer: Any,
    batch_size: int = 8,
    max_length: int | None = None,
    max_records: int | None = None,
    use_chat_template: bool | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """JSONL file -> tokenised examples -> DataLoader of padded batches, in one call.

    Example:
        loader = load_jsonl_dataloader("general.jsonl", tokenizer, batch_size=8)
        compute_importance(model, loader)
    """
    records = read_jsonl(path, max_records)
    examples = tokenize_records(tokenizer, records, max_length, use_chat_template)
    return make_dataloader(examples, tokenizer, batch_size, **loader_kwargs)


def _string(record: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = record.get(key, default)
    if value is None:
        raise ValueError(f"a record with keys {sorted(record)} lacks {key!r}.")
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string; got {type(value).__name__}.")
    return value


def _messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = record["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        or not all(isinstance(m.get("content"), str) for m in messages)
    ):
        raise ValueError("'messages' must be a non-empty list of {'role': str, 'content': str} objects.")
    return messages


class _TemplateMismatch(Exception):
    pass


def _chat_example(tokenizer: Any, messages: list[dict[str, str]]) -> Example:
    """Tokenise a conversation segment by segment; only assistant turns (end-of-turn included) are labelled."""
    try:
        segments = _chat_segments(tokenizer, messages)
    except _TemplateMismatch:
        warnings.warn(
            "the chat template does not render conversations incrementally (a prefix changes once later turns "
            "follow), so assistant turns cannot be located; labelling the whole conversation.",
            stacklevel=4,
        )
        segments = [(tokenizer.apply_chat_template(messages, tokenize=False), True)]
    input_ids: list[int] = []
    labels: list[int] = []
    for text, learned in segments:
        if not text:
            continue
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def _chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        if not turns:
            return ""
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], True)
        full = render(messages[: index + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise _TemplateMismatch
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    final = render(messages, False)
    if not final.startswith(done):
        raise _TemplateMismatch
    segments.append((final[len(done) :], False))
    return segments
