"""Resuming from a checkpoint of another configuration fails clearly and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from peft_cofi import CheckpointError
from tiny_models import tiny_llama
from training_helpers import cofi_model, logits, same_state, snapshot, trainer_for, training_args

FIX = r"PeftModel.from_pretrained\(base, '.*checkpoint-2', is_trainable=True\)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint-2 of a Trainer run on layer 1's up/down projections, update mask mode, with a soft mask."""
    out = tmp_path_factory.mktemp("run")
    trainer_for(cofi_model(), training_args(out, steps=2, save_steps=2)).train()
    return out / "checkpoint-2"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"layers_to_transform": [2]}, r"layers_to_transform: checkpoint \[1\], this adapter \[2\]"),
        ({"target_modules": ["up_proj"]}, r"target_modules: checkpoint \['down_proj', 'up_proj'\], this adapter"),
        ({"mask_mode": "grad"}, "trained with mask_mode='update'"),
    ],
)
def test_trainer_resume_from_another_configuration_is_refused(checkpoint, tmp_path, config, message):
    model = cofi_model(**config)
    state = snapshot(model)
    trainer = trainer_for(model, training_args(tmp_path, steps=4))
    with pytest.raises(CheckpointError, match=f"{message}.*{FIX}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert same_state(model, state)
    assert trainer.state.global_step == 0


def test_load_adapter_into_another_configuration_names_the_difference(checkpoint, tokens):
    model = cofi_model(layers_to_transform=[1, 2])
    state, before = snapshot(model), logits(model, tokens)
    with pytest.raises(
        CheckpointError, match=r"missing 2 .*layers_to_transform: checkpoint \[1\], this adapter \[1, 2"
    ):
        model.load_adapter(str(checkpoint), adapter_name="default", is_trainable=True)
    assert same_state(model, state) and torch.equal(logits(model, tokens), before)


def test_other_mask_mode_loads_for_inference_with_the_same_weights(checkpoint, tokens):
    """Only continuing training is refused across mask modes; the stored diff itself applies in either mode."""
    expected = logits(PeftModel.from_pretrained(tiny_llama(), checkpoint), tokens)
    model = cofi_model(mask_mode="grad")
    model.load_adapter(str(checkpoint), adapter_name="default", is_trainable=False)
    torch.testing.assert_close(logits(model, tokens), expected, rtol=0, atol=1e-6)


def test_the_advised_fix_resumes(checkpoint, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(), checkpoint, is_trainable=True)
    trainer = trainer_for(model, training_args(tmp_path, steps=4))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
