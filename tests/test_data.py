"""JSONL loading and tokenisation for importance and training, with an offline tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from peft_cofi.data import (
    ALPACA_PROMPT,
    IGNORE_INDEX,
    collate,
    load_jsonl_dataloader,
    make_dataloader,
    read_jsonl,
    tokenize_record,
    tokenize_records,
)
from peft_cofi.scoring import compute_importance
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer

CHAT = {
    "messages": [
        {"role": "system", "content": "say yes"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "what"},
        {"role": "assistant", "content": "no"},
    ]
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def learned_tokens(tokenizer, example):
    return tokenizer.convert_ids_to_tokens([t for t in example["labels"] if t != IGNORE_INDEX])


def test_chat_records_learn_only_assistant_turns_with_their_end_of_turn():
    tokenizer = tiny_tokenizer()
    example = tokenize_record(tokenizer, CHAT)
    assert learned_tokens(tokenizer, example) == ["yes", "<|im_end|>", "no", "<|im_end|>"]
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_instruction_records_use_the_chat_template_where_present_else_alpaca():
    record = {"instruction": "translate cat", "input": "to french", "output": "the cat"}
    chat = tiny_tokenizer()
    example = tokenize_record(chat, record)
    assert chat.convert_ids_to_tokens(example["input_ids"])[:6] == [
        "<|im_start|>",
        "user",
        "translate",
        "cat",
        "to",
        "french",
    ]
    assert learned_tokens(chat, example) == ["the", "cat", "<|im_end|>"]
    plain = tiny_tokenizer(chat_template=False)
    example = tokenize_record(plain, {"instruction": "translate cat", "output": "the cat"})
    prompt = plain(ALPACA_PROMPT.format(instruction="translate cat"))["input_ids"]
    assert example["input_ids"][: len(prompt)] == prompt and example["input_ids"][0] == plain.bos_token_id
    assert learned_tokens(plain, example) == ["the", "cat", "</s>"]
    assert tokenize_record(chat, record, use_chat_template=False)["input_ids"][0] == chat.bos_token_id


def test_text_records_are_labelled_everywhere_and_truncated():
    tokenizer = tiny_tokenizer()
    (example,) = tokenize_records(tokenizer, [{"text": "the cat sat on the mat"}], max_length=4)
    assert example["input_ids"] == example["labels"] == tokenizer("the cat sat on the mat")["input_ids"][:4]


def test_collate_pads_right_and_masks_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_jsonl_file_to_batches_feeds_importance_and_a_training_step(tmp_path):
    tokenizer = tiny_tokenizer()
    records = [CHAT, {"text": "the red car ran on the road"}, {"instruction": "add two and three", "output": "five"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records * 2)
    loader = load_jsonl_dataloader(path, tokenizer, batch_size=4)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert all(b["input_ids"][b["attention_mask"] == 0].eq(tokenizer.pad_token_id).all() for b in batches)
    model = tiny_llama()
    result = compute_importance(model, loader, method="loss", progress=False)
    assert result.tokens > 0
    loss = model(**batches[0]).loss  # labels usable by a training loop as is
    assert torch.isfinite(loss)


def test_shuffled_loader_is_seeded():
    examples = [{"input_ids": [i + 1], "labels": [i + 1]} for i in range(8)]
    first = [b["input_ids"].flatten().tolist() for b in make_dataloader(examples, None, 4, shuffle=True, seed=1)]
    again = [b["input_ids"].flatten().tolist() for b in make_dataloader(examples, None, 4, shuffle=True, seed=1)]
    assert first == again and sorted(i for batch in first for i in batch) == list(range(1, 9))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no record"),
        ('{"text": "a"}\nnot json\n', r"mixed.jsonl:2 is not valid JSON"),
        ("[1, 2]\n", "is a JSON list, not an object"),
        ('{"prompt": "a"}\n', r"keys \['prompt'\] has no known format"),
        ('{"instruction": "a"}\n', "lacks 'output'"),
        ('{"messages": []}\n', "'messages' must be a non-empty list"),
        ('{"text": 3}\n', "'text' must be a string"),
    ],
)
def test_bad_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "mixed.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        tokenize_records(tiny_tokenizer(), read_jsonl(path))


def test_missing_file_and_chat_without_template_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="need a tokenizer with a chat_template"):
        tokenize_record(tiny_tokenizer(chat_template=False), CHAT)


def test_template_that_rewrites_prefixes_falls_back_to_labelling_everything():
    tokenizer = tiny_tokenizer()
    # Renders the number of messages first: a prefix changes once more turns follow.
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
    with pytest.warns(UserWarning, match="does not render conversations incrementally"):
        example = tokenize_record(tokenizer, CHAT)
    assert example["labels"] == example["input_ids"]
