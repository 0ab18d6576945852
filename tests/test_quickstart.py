"""The quickstart example (tiny mode, end to end) and the offline resource helpers it relies on."""

from __future__ import annotations

import doctest
import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import resources
from benchmarks.resources import (
    IGNORE_INDEX,
    chat_example,
    collate,
    freedict_pairs,
    split_pairs,
    translation_examples,
    translation_messages,
    wordnet_sentences,
)
from examples import quickstart

ROOT = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def run_quickstart(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m examples.quickstart --tiny ...`` from the repository root, as the README runs it."""
    return subprocess.run(
        [sys.executable, "-m", "examples.quickstart", "--tiny", *arguments],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_quickstart_tiny_runs_and_reload_matches(tmp_path: Path) -> None:
    # the default: the recommended recipe, LoRA r16 on every FFN projection with the weight-10 anchor
    result = run_quickstart("--steps", "10", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reload check: PASSED" in result.stdout
    assert re.search(r"^held-out loss: \d+\.\d+ -> \d+\.\d+$", result.stdout, re.MULTILINE)
    assert "trainable parameters: 73,728" in result.stdout  # 8 layers * 3 projections * r16 * (64 + 128)
    assert "retention anchor: KL to the base model, weight 10, on every call" in result.stdout
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # every slow step says what it does: the evaluations before and after training, training
    for label in ("held-out loss (base model)", "train", "held-out loss (tuned)"):
        assert f"{label}: 100%" in result.stdout + result.stderr, label
    # --adapter cofi: CoFiTune with the same anchor, saved as a weight diff (the main job)
    cofi = run_quickstart("--steps", "4", "--adapter", "cofi", "--out", str(tmp_path / "cofi"))
    assert cofi.returncode == 0 and "reload check: PASSED" in cofi.stdout, cofi.stdout + cofi.stderr
    assert "trainable parameters: 32,768" in cofi.stdout  # up/down_proj of layers 2-3 of 8: 2 * 2 * 64 * 128
    assert "importance: 100%" in cofi.stdout + cofi.stderr and "soft mask over" in cofi.stdout
    assert "retention anchor: KL to the base model, weight 10" in cofi.stdout
    assert json.loads((tmp_path / "cofi" / "adapter_config.json").read_text())["peft_type"] == "COFI"
    # an explicit weight wins; --no-anchor: the adapter alone
    chosen = run_quickstart("--steps", "2", "--anchor", "5", "--out", str(tmp_path / "chosen"))
    assert "retention anchor: KL to the base model, weight 5, on every call" in chosen.stdout, chosen.stdout
    plain = run_quickstart("--steps", "2", "--no-anchor", "--adapter", "cofi", "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0 and "retention anchor" not in plain.stdout, plain.stdout + plain.stderr


@pytest.mark.parametrize(
    ("argv", "weight"),
    [
        ([], 10.0),  # the default: anchored at the recommended weight, whichever adapter
        (["--adapter", "cofi"], 10.0),
        (["--anchor"], 10.0),  # a bare --anchor means the recommended weight too
        (["--adapter", "cofi", "--anchor", "5"], 5.0),
        (["--no-anchor"], None),
    ],
)
def test_quickstart_anchors_at_the_recommended_weight_unless_told(argv: list[str], weight: float | None) -> None:
    assert quickstart.parse_args(argv).anchor == weight


@pytest.mark.slow
def test_quickstart_without_out_removes_its_temporary_folder(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    result = run_quickstart("--steps", "1", env={"TMPDIR": str(temp)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"output: {temp}" in result.stdout and "temporary, removed at exit" in result.stdout
    assert list(temp.iterdir()) == []


def test_resource_docstring_examples() -> None:
    failures, _ = doctest.testmod(resources, verbose=False)
    assert failures == 0


# --------------------------------------------------------------------------------------------- split_pairs


def _pairs(n: int) -> list[tuple[str, str]]:
    return [(f"word{i}", f"mot{i}") for i in range(n)]


def test_split_pairs_is_deterministic_disjoint_and_complete() -> None:
    pairs = _pairs(500)
    train, held_out = split_pairs(pairs, 0.2, seed=3)
    assert (train, held_out) == split_pairs(pairs, 0.2, seed=3)
    assert not {en for en, _ in train} & {en for en, _ in held_out}
    assert sorted(train + held_out) == sorted(pairs)
    assert 60 < len(held_out) < 140


def test_split_pairs_depends_on_headword_not_order_or_case() -> None:
    pairs = _pairs(300)
    shuffled = random.Random(1).sample(pairs, len(pairs))
    assert set(split_pairs(shuffled, 0.3, seed=0)[1]) == set(split_pairs(pairs, 0.3, seed=0)[1])
    upper = [(en.upper(), fr) for en, fr in pairs]
    assert {en.lower() for en, _ in split_pairs(upper, 0.3, seed=0)[1]} == {
        en for en, _ in split_pairs(pairs, 0.3, seed=0)[1]
    }
    assert split_pairs(pairs, 0.3, seed=0) != split_pairs(pairs, 0.3, seed=1)


def test_split_pairs_edges() -> None:
    pairs = _pairs(20)
    assert split_pairs(pairs, 0.0) == (pairs, [])
    assert split_pairs(pairs, 1.0) == ([], pairs)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_pairs(pairs, 1.5)


# --------------------------------------------------------------------------------------------- chat examples


@pytest.fixture
def chat_tokenizer():
    """A byte-level tokenizer built in memory with a ChatML template: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=CHATML,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )


def test_chat_example_masks_the_prompt(chat_tokenizer) -> None:
    example = chat_example(chat_tokenizer, translation_messages("cat"), "chat")
    prompt = chat_tokenizer.apply_chat_template(translation_messages("cat"), tokenize=False, add_generation_prompt=True)
    n_prompt = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert chat_tokenizer.decode(ids[n_prompt:]) == "chat<|im_end|>\n"
    assert chat_tokenizer.decode(ids) == prompt + "chat<|im_end|>\n"


def test_translation_examples_and_collate(chat_tokenizer) -> None:
    examples = translation_examples(chat_tokenizer, [("cat", "chat"), ("house", "maison")])
    batch = collate(examples, pad_token_id=chat_tokenizer.pad_token_id)
    width = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    short = min(range(2), key=lambda i: len(examples[i]["input_ids"]))
    n = len(examples[short]["input_ids"])
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert collate(examples, max_length=5)["input_ids"].shape == (2, 5)


# --------------------------------------------------------------------------------------------- FreeDict


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    out = ""
    while True:
        out = _B64[n % 64] + out
        n //= 64
        if n == 0:
            return out


def _write_dictd(tmp_path: Path, entries: list[tuple[str, str]]) -> Path:
    """A dictd dictionary (``.dict.dz`` gzip body + tab-separated ``.index`` of base64 offsets/lengths)."""
    body, index = b"", []
    for headword, text in entries:
        data = text.encode("utf-8")
        index.append(f"{headword}\t{_b64(len(body))}\t{_b64(len(data))}")
        body += data
    path = tmp_path / "freedict-eng-fra.dict.dz"
    with gzip.open(path, "wb") as fh:
        fh.write(body)
    (tmp_path / "freedict-eng-fra.index").write_text("\n".join(sorted(index)) + "\n", encoding="utf-8")
    return path


def test_freedict_pairs_parses_dictd(tmp_path: Path) -> None:
    path = _write_dictd(
        tmp_path,
        [
            ("00-database-info", "00-database-info\nEnglish-French FreeDict Dictionary\n"),
            ("cat", "cat /kæt/\nchat\n"),
            ("black forest", "Black Forest /blækfɔrist/\nForêt\u2010Noire\n"),
            ("agile", "agile /ædʒail/\n1. agile\n2. actif, alerte\n"),  # identical translation: skipped
            ("surmise", "surmise /səːmaiz/\n1. conjecturer, se douter de\n2. supposer\n"),
            ("abc", "ABC /eibiːsiː/\n1. abc, alphabet\n"),  # identical (case-insensitive): skipped
            ("route 66", "route 66 /ruːt/\nroute 66\n"),  # digits: skipped
            ("total abstainer", "total abstainer /x/\npersonne qui ne boit jamais d'alcool\n"),  # too long: skipped
            ("hostel", "hostel /hɔstl/\nauberge (de jeunesse)\n"),  # brackets: skipped
        ],
    )
    pairs = freedict_pairs(path)
    assert sorted(pairs) == [("Black Forest", "Forêt-Noire"), ("cat", "chat"), ("surmise", "conjecturer")]
    assert ("agile", "agile") in freedict_pairs(path, skip_identical=False)


def test_freedict_missing_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dict-freedict-eng-fra"):
        freedict_pairs(tmp_path / "absent.dict.dz")


# --------------------------------------------------------------------------------------------- WordNet


def test_wordnet_sentences_parses_data_files(tmp_path: Path) -> None:
    (tmp_path / "data.verb").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by  \n"
        "00002724 29 v 01 choke 0 002 @ 00001740 v 0000 01 + 02 00 | breathe with great difficulty; "
        '"She choked with emotion"; "he choked"  \n'
        "00001930 03 v 01 give_up 0 000 | stop trying  \n",
        encoding="utf-8",
    )
    assert wordnet_sentences(tmp_path, parts=["verb"]) == [
        "Choke: breathe with great difficulty.",
        "She choked with emotion",
        "he choked",
        "Give up: stop trying.",
    ]
    assert wordnet_sentences(tmp_path, parts=["verb"], kind="examples") == ["She choked with emotion", "he choked"]
    assert wordnet_sentences(tmp_path, parts=["verb"], kind="glosses", limit=1) == [
        "Choke: breathe with great difficulty."
    ]
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        wordnet_sentences(tmp_path, parts=["noun"])
