"""TRL's SFTTrainer with ``peft_config=CoFiConfig(...)``: TRL's own tokenisation, checkpoints, resume, reload."""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from peft_cofi import CoFiConfig, CoFiLayer
from tiny_models import tiny_llama
from tiny_tokenizer import WORDS, tiny_tokenizer
from training_helpers import StopAt, deltas, effective_diffs, load_example, logits


def chat_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """Conversational prompt/completion records in the tiny tokenizer's vocabulary."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "translate " + " ".join(rng.sample(WORDS[10:40], 2))
        answer = " ".join(rng.sample(WORDS[40:], 3))
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    return Dataset.from_list(rows)


def sft_trainer(output_dir, callbacks=None) -> SFTTrainer:
    """TRL's defaults otherwise: gradient checkpointing on, bf16 autocast (allowed on CPU with use_cpu=True)."""
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        max_length=32,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    assert args.gradient_checkpointing and args.bf16
    return SFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=chat_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=CoFiConfig(layers_to_transform="bottom2"),
        callbacks=callbacks,
    )


def test_sft_trainer_trains_checkpoints_resumes_and_reloads(tmp_path, tokens):
    trainer = sft_trainer(tmp_path / "straight")
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, CoFiLayer)) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(deltas(model))
    first = trainer.train_dataset[0]
    assert first["labels"][: first["labels"].index(-100) + 1] == [-100]  # prompt masked by TRL
    trainer.train()
    trained = deltas(model)
    assert all(value.abs().max() > 0 for value in trained.values())
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files

    trainer.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    for name, diff in effective_diffs(reloaded).items():
        assert torch.equal(diff, effective_diffs(model)[name])
    # accelerate leaves the trained model's forward wrapped in bf16 autocast (mixed precision): compare alike
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits(reloaded, tokens)
    assert torch.equal(logits(model, tokens), expected.float())

    sft_trainer(tmp_path / "preempted", callbacks=[StopAt(2)]).train()
    resumed = sft_trainer(tmp_path / "preempted")
    resumed.train(resume_from_checkpoint=str(tmp_path / "preempted" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for name, value in deltas(resumed.model).items():
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-7)


def test_trl_example_tiny_runs(tmp_path, capsys):
    assert load_example("train_with_trl").main(["--tiny", "--steps", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reload check: PASSED" in out and "trainable params: 32,768" in out
    assert (tmp_path / "sft" / "checkpoint-2" / "adapter_model.safetensors").is_file()
