"""Hugging Face Trainer with a CoFi adapter: diff checkpoints, exact resume, save/reload, gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from peft_cofi import CoFiLayer
from tiny_models import tiny_llama
from training_helpers import (
    StopAt,
    cofi_model,
    deltas,
    effective_diffs,
    load_example,
    logits,
    trainer_for,
    training_args,
)


def test_checkpoints_hold_the_diff_and_resume_continues_exactly(tmp_path, tokens):
    straight = cofi_model()
    before = deltas(straight)
    trainer_for(straight, training_args(tmp_path / "straight")).train()
    after = deltas(straight)
    assert all(not torch.equal(after[name], before[name]) for name in before)  # it trained

    checkpoint = tmp_path / "straight" / "checkpoint-3"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}  # no full model
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "COFI"
    # the optimizer state covers only the two trained diffs
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert len(state) == 2

    # a preempted run: same arguments, stopped after step 3's checkpoint, then resumed by a fresh process
    trainer_for(cofi_model(), training_args(tmp_path / "preempted"), callbacks=[StopAt(3)]).train()
    assert not (tmp_path / "preempted" / "checkpoint-6").exists()
    resumed = cofi_model()
    trainer = trainer_for(resumed, training_args(tmp_path / "preempted"))
    trainer.train(resume_from_checkpoint=str(tmp_path / "preempted" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    for name, value in deltas(resumed).items():
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-7)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6  # steps 1-3 from the checkpoint's trainer_state.json, 4-6 from the resumed run

    # the final adapter: save_pretrained, reload onto a fresh base, identical logits
    straight.save_pretrained(tmp_path / "final")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    assert torch.equal(logits(reloaded, tokens), logits(straight, tokens))
    assert not torch.equal(logits(reloaded, tokens), logits(tiny_llama(), tokens))


class CountCheckpointing(TrainerCallback):
    """Counts the decoder layers' activation-checkpointing calls during training."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = self._counting(func)

    def _counting(self, func):
        def wrapped(*args, **kwargs):
            self.calls += 1
            return func(*args, **kwargs)

        return wrapped


def sharp_mask_model() -> torch.nn.Module:
    """Two rows per module with outlying importance: their mask factor is ~0 (protected), the others' above 0.4."""
    scores = {}
    for name, rows in (("model.layers.1.mlp.up_proj", 48), ("model.layers.1.mlp.down_proj", 32)):
        raw = torch.ones(rows)
        raw[[3, 7]] = 1000.0
        scores[name] = raw
    return cofi_model(importance=scores, mask_sharpness=0.5)


@pytest.fixture(scope="module")
def plain_deltas(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The diffs after 4 steps without gradient checkpointing."""
    plain = sharp_mask_model()
    trainer_for(plain, training_args(tmp_path_factory.mktemp("plain"), steps=4, save_strategy="no")).train()
    return deltas(plain)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_same_and_the_mask_still_protects(tmp_path, plain_deltas, reentrant):
    checkpointed = sharp_mask_model()
    counter = CountCheckpointing()
    arguments = training_args(
        tmp_path / "gc",
        steps=4,
        save_strategy="no",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    trainer_for(checkpointed, arguments, callbacks=[counter]).train()
    assert counter.calls >= 4 * 4  # every decoder layer, every step
    for name, value in deltas(checkpointed).items():
        torch.testing.assert_close(value, plain_deltas[name], rtol=1e-5, atol=1e-7)

    masks = {n: m.cofi_mask["default"] for n, m in checkpointed.named_modules() if isinstance(m, CoFiLayer)}
    for name, diff in effective_diffs(checkpointed).items():
        protected, free = masks[name] < 1e-5, masks[name] > 0.4
        assert protected.sum() == 2 and free.sum() == masks[name].numel() - 2
        moved = diff.abs().amax(dim=1)
        assert moved[free].min() > 1e-3  # the free rows trained
        assert moved[protected].max() < 1e-3 * moved[free].mean()  # the protected rows did not move


def test_trainer_example_tiny_runs_and_resumes(tmp_path, capsys):
    example = load_example("train_with_trainer")
    assert example.main(["--tiny", "--steps", "4", "--save-steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reload check: PASSED" in out and "trainable params: 32,768" in out
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    again = tmp_path / "again"
    arguments = ["--tiny", "--steps", "4", "--out", str(again), "--resume-from", str(checkpoint)]
    assert example.main(arguments) == 0
    assert "reload check: PASSED" in capsys.readouterr().out
