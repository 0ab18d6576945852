"""Speciality and versatility measures: exact values against direct computations on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_cofi import CoFiConfig
from peft_cofi.evaluation import (
    BatchEvaluator,
    cross_entropy_increase,
    exact_match,
    exact_match_evaluator,
    kl_to_base,
    loss_and_exact_match,
    loss_evaluator,
    mean_loss,
    model_inputs,
    retention_evaluator,
    versatility_metrics,
)
from tiny_models import VOCAB, tiny_gpt2, tiny_llama


def batch(seed: int = 0, rows: int = 3, length: int = 7, pad_last: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_mean_loss_equals_the_models_own_loss():
    model = tiny_llama()
    data = batch()
    with torch.no_grad():
        expected = float(model(**data, labels=data["input_ids"]).loss)
    assert mean_loss(model, [data]) == pytest.approx(expected, rel=1e-5)


def test_mean_loss_is_token_weighted_across_batches_and_ignores_padding():
    model = tiny_llama()
    short, long = batch(1, rows=1, length=3), batch(2, rows=2, length=9, pad_last=4)
    per_batch = []
    for data in (short, long):
        inputs = model_inputs(data)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        labels = inputs["labels"][:, 1:]
        valid = labels != -100
        per_batch.append((F.cross_entropy(logits[valid], labels[valid], reduction="sum").item(), int(valid.sum())))
    expected = sum(s for s, _ in per_batch) / sum(n for _, n in per_batch)
    assert mean_loss(model, [short, long]) == pytest.approx(expected, rel=1e-5)


def test_exact_match_counts_examples_whose_every_label_is_the_argmax():
    model = tiny_llama()
    data = batch(3, rows=4, length=6)
    with torch.no_grad():
        predicted = model(**data).logits.argmax(-1)
    labels = torch.full_like(data["input_ids"], -100)
    labels[:, 3:] = predicted[:, 2:-1]  # answers = the model's own greedy continuation
    labels[1, 4] = (labels[1, 4] + 1) % VOCAB  # example 1: one wrong token
    labels[2] = -100  # example 2: no label, not counted
    assert exact_match(model, [{**data, "labels": labels}]) == pytest.approx(2 / 3)
    loss, accuracy = loss_and_exact_match(model, [{**data, "labels": labels}])
    assert accuracy == pytest.approx(2 / 3) and loss > 0


def test_no_label_token_is_an_error():
    data = batch()
    with pytest.raises(ValueError, match="no label token"):
        mean_loss(tiny_llama(), [{**data, "labels": torch.full_like(data["input_ids"], -100)}])


def test_zero_adapter_forgets_nothing_and_a_random_one_does():
    data = [batch(4), batch(5, pad_last=3)]
    zero = get_peft_model(tiny_llama(), CoFiConfig(target_modules=["up_proj", "down_proj"]))
    metrics = versatility_metrics(zero, data)
    assert metrics["ce_increase"] == 0.0 and metrics["kl"] == 0.0
    assert metrics["retention_ce"] == metrics["retention_kl"] == 1.0
    random = get_peft_model(tiny_llama(), CoFiConfig(target_modules=["up_proj", "down_proj"], init_weights=False))
    metrics = versatility_metrics(random, data)
    assert metrics["kl"] > 0 and metrics["ce_increase"] != 0
    assert metrics["retention_kl"] == pytest.approx(math.exp(-metrics["kl"]))
    assert metrics["loss"] - metrics["base_loss"] == pytest.approx(metrics["ce_increase"])
    assert cross_entropy_increase(random, data) == pytest.approx(metrics["ce_increase"])


def test_kl_is_base_to_tuned_over_non_padding_positions_and_a_reference_model_agrees():
    data = batch(6, pad_last=2)
    tuned = get_peft_model(tiny_gpt2(), CoFiConfig(init_weights=False))
    with torch.no_grad():
        log_q = F.log_softmax(tuned(**data).logits[:, :-1], -1)
        with tuned.disable_adapter():
            log_p = F.log_softmax(tuned(**data).logits[:, :-1], -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    present = data["attention_mask"][:, :-1].bool()
    expected = float(per_position[present].mean())
    assert kl_to_base(tuned, [data]) == pytest.approx(expected, rel=1e-4)
    assert kl_to_base(tuned, [data], reference=tiny_gpt2()) == pytest.approx(expected, rel=1e-4)


def test_plain_model_needs_a_reference():
    with pytest.raises(TypeError, match="reference"):
        kl_to_base(tiny_llama(), [batch()])


def test_modes_are_restored():
    model = get_peft_model(tiny_llama(), CoFiConfig(target_modules=["up_proj"]))
    model.train()
    versatility_metrics(model, [batch()])
    mean_loss(model, [batch()])
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    mean_loss(model, [batch()])
    assert not model.training


def test_evaluators_report_scores_and_fingerprint_their_data():
    model = get_peft_model(tiny_llama(), CoFiConfig(target_modules=["up_proj"], init_weights=False))
    data = [batch(7)]
    loss = loss_evaluator(data)(model)
    assert loss["score"] == -loss["loss"] and 0 <= loss["exact_match"] <= 1
    accuracy = exact_match_evaluator(data)(model)
    assert accuracy["score"] == accuracy["exact_match"] and accuracy["loss"] == pytest.approx(loss["loss"])
    ce, kl = retention_evaluator(data)(model), retention_evaluator(data, measure="kl")(model)
    assert ce["score"] == pytest.approx(math.exp(-ce["ce_increase"]))
    assert kl["score"] == pytest.approx(math.exp(-kl["kl"]))
    assert loss_evaluator(data).fingerprint == loss_evaluator([batch(7)]).fingerprint
    assert loss_evaluator(data).fingerprint != loss_evaluator([batch(8)]).fingerprint
    assert loss_evaluator(data).fingerprint != exact_match_evaluator(data).fingerprint
    assert isinstance(loss_evaluator(data), BatchEvaluator)
    with pytest.raises(ValueError, match="measure"):
        retention_evaluator(data, measure="bleu")
