"""A plain training loop under accelerate's Accelerator: train, unwrap, save_pretrained, reload."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch.utils.data import DataLoader

from peft_cofi.data import collate
from tiny_models import tiny_llama
from training_helpers import cofi_model, deltas, effective_diffs, load_example, logits, token_examples


def test_accelerate_loop_trains_saves_and_reloads(tmp_path, tokens):
    accelerator = Accelerator()
    model = cofi_model()
    before = deltas(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = DataLoader(token_examples(), batch_size=4, shuffle=True, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for step, batch in enumerate(loader):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if step == 3:
            break
    unwrapped = accelerator.unwrap_model(model)
    assert isinstance(unwrapped, PeftModel)
    trained = deltas(unwrapped)
    assert all(not torch.equal(trained[name], before[name]) for name in before)

    unwrapped.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    for name, diff in effective_diffs(reloaded).items():
        assert torch.equal(diff, effective_diffs(unwrapped)[name])
    assert torch.equal(logits(reloaded, tokens), logits(unwrapped, tokens))


def test_accelerate_example_tiny_with_the_plain_loop_monitor(tmp_path, capsys):
    example = load_example("train_with_accelerate")
    assert example.main(["--tiny", "--steps", "4", "--monitor-every", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reload check: PASSED" in out and "step 2: general_loss" in out
    history = json.loads((tmp_path / "forgetting_monitor.json").read_text())["history"]
    assert [record["step"] for record in history] == [0, 2, 4]
    assert history[0]["ce_increase"] == 0.0 and history[0]["kl"] == 0.0
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert (tmp_path / "forgetting_monitor.png").stat().st_size > 5_000
