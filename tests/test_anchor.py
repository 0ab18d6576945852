"""The retention anchor: its effect, exactness at weight 0, the value it adds, detach, the Trainer (logging, resume,
gradient accumulation, gradient checkpointing), self-answers and their cache, every bad input, and the masked KL's
math. TRL, the monitor, DDP, the examples and the benchmarks: tests/test_anchor_runs.py."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from peft_cofi import attach_retention_anchor
from peft_cofi.anchor import LOG_KEY, STATE_KEY, anchor_of, masked_mean_kl
from peft_cofi.evaluation import kl_to_base, mean_loss
from tiny_models import VOCAB, tiny_llama
from training_helpers import StopAt, batches_of, cofi_model, deltas, token_examples, trainer_for, training_args

GENERAL = batches_of(token_examples(12, length=10, seed=3), size=4)  # 3 anchor batches of general "prompts"
TASK = batches_of(token_examples(32, seed=0), size=4)


def lora_model(init: bool = True) -> torch.nn.Module:
    config = LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=8, init_lora_weights=init)
    return get_peft_model(tiny_llama(), config)


def full_model() -> torch.nn.Module:
    model = tiny_llama()
    model.requires_grad_(True)
    return model


MODELS = {  # (builder, learning rate, needs a frozen reference copy)
    "cofi": (lambda: cofi_model(mask=False, layers_to_transform=None), 1e-2, False),
    "lora": (lora_model, 1e-2, False),
    "full": (full_model, 1e-3, True),
}


def train_plain(name: str, steps: int = 12, **anchor: object) -> tuple[torch.nn.Module, object]:
    """AdamW on the task in a plain loop, anchored when ``anchor`` settings are given; same seed either way."""
    build, lr, needs_reference = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    handle = None
    if anchor:
        reference = tiny_llama() if needs_reference else None
        handle = attach_retention_anchor(model, GENERAL, reference=reference, progress=False, **anchor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**TASK[step % len(TASK)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, handle


def kl_on_anchor_prompts(model: torch.nn.Module, name: str) -> float:
    return kl_to_base(model, GENERAL, reference=tiny_llama() if MODELS[name][2] else None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_kl_anchor_keeps_the_model_closer_to_its_base(name):
    free, _ = train_plain(name)
    anchored, handle = train_plain(name, weight=5.0)
    drifted, kept = kl_on_anchor_prompts(free, name), kl_on_anchor_prompts(anchored, name)
    assert drifted > 1e-4  # the task moved the model away from its base on the general prompts
    assert kept < 0.8 * drifted, (kept, drifted)
    assert handle.state_dict() == {"calls": 12, "drawn": 12} and handle.mean_since()[0] > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_self_answers_anchor_keeps_the_base_models_answers_likely(name):
    free, _ = train_plain(name)
    anchored, handle = train_plain(name, weight=5.0, kind="self-answers", max_new_tokens=4)
    answers = handle._batches  # the prompts with the base model's greedy answers, labelled on the answers
    if MODELS[name][2]:
        base = mean_loss(tiny_llama(), answers)
    else:
        with anchored.disable_adapter():
            base = mean_loss(anchored, answers)
    assert mean_loss(free, answers) > base  # training on the task made the base's own answers less likely
    assert mean_loss(anchored, answers) < mean_loss(free, answers) - 0.05


def test_weight_zero_reproduces_unanchored_training_exactly():
    free, _ = train_plain("cofi", steps=6)
    measured, handle = train_plain("cofi", steps=6, weight=0.0)
    for key, value in deltas(free).items():
        assert torch.equal(value, deltas(measured)[key])
    assert handle.mean_since()[0] > 0  # the anchor was computed on every call, just not applied


def kl_by_hand(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """KL(base || tuned) per non-padding position, written out: base from disable_adapter() in eval mode."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        tuned = model(**inputs).logits.log_softmax(-1)
        model.eval()
        with model.disable_adapter():
            base = model(**inputs).logits.log_softmax(-1)
        model.train()
    per_position = (base.exp() * (base - tuned)).sum(-1)
    return float(per_position[batch["attention_mask"].bool()].mean())


def test_output_carries_the_kl_of_the_next_anchor_batch_on_schedule():
    torch.manual_seed(0)
    model = lora_model(init=False).train()  # a random adapter: the tuned model differs from its base from the start
    anchor = attach_retention_anchor(model, GENERAL[:2], weight=0.7, every=2)
    tokens = TASK[0]["input_ids"]
    for call, index in enumerate([0, None, 1, None, 0]):  # every 2nd call takes the next batch, cycling
        out = model(input_ids=tokens, labels=tokens)
        if index is None:
            assert LOG_KEY not in out, call
            continue
        expected = kl_by_hand(model, GENERAL[index])
        assert expected > 0 and float(out.anchor_loss) == pytest.approx(expected, rel=1e-5), call
    assert anchor.state_dict() == {"calls": 5, "drawn": 3}


def test_the_loss_gains_weight_times_anchor_weighted_by_the_calls_share_of_label_tokens():
    torch.manual_seed(0)
    model = lora_model(init=False).train()
    tokens = TASK[0]["input_ids"]
    task = model(input_ids=tokens, labels=tokens).loss.detach()
    anchor = attach_retention_anchor(model, GENERAL[:2], weight=0.7)
    out = model(input_ids=tokens, labels=tokens)
    assert float(out.loss.detach()) == pytest.approx(float(task + 0.7 * out.anchor_loss), rel=1e-6)
    # a Trainer accumulating 4 micro-batches passes num_items_in_batch = the label tokens of all 4
    items = torch.tensor(4 * int((tokens[:, 1:] != -100).sum()))
    shared = model(input_ids=tokens, labels=tokens, num_items_in_batch=items)
    task_part = model.base_model.model(input_ids=tokens, labels=tokens, num_items_in_batch=items).loss.detach()
    assert float(shared.loss.detach()) == pytest.approx(float(task_part + 0.7 * shared.anchor_loss / 4), rel=1e-5)
    model.eval()  # no anchor in eval mode (evaluation, the monitor) or without labels
    assert LOG_KEY not in model(input_ids=tokens, labels=tokens)
    model.train()
    assert LOG_KEY not in model(input_ids=tokens)
    assert anchor.state_dict() == {"calls": 2, "drawn": 2}


def test_a_restored_position_draws_the_same_batches_as_an_uninterrupted_run():
    torch.manual_seed(0)
    model = lora_model(init=False).train()
    tokens = TASK[0]["input_ids"]
    straight = attach_retention_anchor(model, GENERAL, weight=1.0, every=2)
    values = [model(input_ids=tokens, labels=tokens).get(LOG_KEY) for _ in range(6)]  # batches 0, -, 1, -, 2, -
    straight.detach()
    assert len({float(v) for v in values[::2]}) == 3 and values[1::2] == [None] * 3
    resumed = attach_retention_anchor(model, GENERAL, weight=1.0, every=2)  # a new process after 3 calls
    resumed.load_state_dict({"calls": 3, "drawn": 2})
    later = [model(input_ids=tokens, labels=tokens).get(LOG_KEY) for _ in range(3)]
    assert later[0] is None and later[2] is None and float(later[1]) == float(values[4])
    with pytest.raises(ValueError, match="needs whole numbers 'calls' and 'drawn' >= 0"):
        resumed.load_state_dict({"calls": -1, "drawn": 0})


def test_detach_leaves_the_model_exactly_as_before(tmp_path):
    model = cofi_model()
    model.train()
    model.base_model.model.model.layers[0].eval()  # a submodule deliberately in eval mode stays so
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks = [(m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in model.modules()]
    trainer = trainer_for(model, training_args(tmp_path, steps=1))
    callbacks = list(trainer.callback_handler.callbacks)
    anchor = attach_retention_anchor(trainer, GENERAL, weight=1.0)
    with pytest.raises(ValueError, match="already has a retention anchor attached"):
        attach_retention_anchor(model, GENERAL, weight=1.0)
    assert anchor_of(model) is anchor and anchor in trainer.callback_handler.callbacks
    assert LOG_KEY in model(**TASK[0])
    anchor.detach()
    anchor.detach()  # idempotent
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()] == hooks
    assert trainer.callback_handler.callbacks == callbacks and anchor_of(model) is None
    assert LOG_KEY not in model(**TASK[0])
    attach_retention_anchor(model, GENERAL, weight=1.0).detach()  # can be attached again


# ------------------------------------------------------------------------------------------------- Trainer


def anchored_trainer(output_dir, weight: float = 3.0, data=GENERAL, callbacks=None, **overrides):
    model = cofi_model()
    trainer = trainer_for(model, training_args(output_dir, **overrides), callbacks=callbacks)
    anchor = attach_retention_anchor(trainer, data, weight=weight)
    return trainer, anchor


def test_trainer_logs_the_anchor_and_resumes_at_the_same_data_position(tmp_path):
    two = GENERAL[:2]  # 3 steps into 2 batches: a resume that forgot the position would draw other batches
    straight, anchor = anchored_trainer(tmp_path / "straight", data=two)
    straight.train()
    logged = [entry for entry in straight.state.log_history if LOG_KEY in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6] and logged[-1][LOG_KEY] > 0
    assert anchor.state_dict() == {"calls": 6, "drawn": 6}
    saved = json.loads((tmp_path / "straight" / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"][STATE_KEY] == {"calls": 3, "drawn": 3}
    plain = trainer_for(cofi_model(), training_args(tmp_path / "plain"))
    plain.train()
    moved = deltas(straight.model)
    assert any(not torch.allclose(value, deltas(plain.model)[key], atol=1e-4) for key, value in moved.items())

    anchored_trainer(tmp_path / "preempted", data=two, callbacks=[StopAt(3)])[0].train()
    checkpoint = tmp_path / "preempted" / "checkpoint-3"
    resumed, resumed_anchor = anchored_trainer(tmp_path / "preempted", data=two)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_anchor.state_dict() == {"calls": 6, "drawn": 6}
    for key, value in deltas(resumed.model).items():
        torch.testing.assert_close(value, moved[key], rtol=1e-5, atol=1e-7)

    # control: a checkpoint without the anchor position resumes at the first anchor batch, and ends elsewhere
    lost = tmp_path / "lost" / "checkpoint-3"
    shutil.copytree(checkpoint, lost)
    state = json.loads((lost / "trainer_state.json").read_text())
    del state["stateful_callbacks"][STATE_KEY]
    (lost / "trainer_state.json").write_text(json.dumps(state))
    restarted, _ = anchored_trainer(tmp_path / "lost", data=two)
    restarted.train(resume_from_checkpoint=str(lost))
    assert any(not torch.allclose(v, moved[k], rtol=1e-5, atol=1e-7) for k, v in deltas(restarted.model).items())


def test_gradient_accumulation_weighs_the_anchor_like_one_big_batch(tmp_path):
    # SGD, so that the parameters are linear in the gradients; one anchor batch, so every call anchors on it
    sgd = {"steps": 2, "save_strategy": "no", "optim": "sgd", "learning_rate": 1.0, "weight_decay": 0.0}

    def run(name: str, weight: float, **overrides) -> dict[str, torch.Tensor]:
        trainer, anchor = anchored_trainer(tmp_path / name, weight=weight, data=GENERAL[:1], **sgd, **overrides)
        trainer.train()
        return deltas(trainer.model), anchor

    big, _ = run("big", 100.0)
    accumulated, anchor = run("acc", 100.0, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    doubled, _ = run("doubled", 200.0)  # what adding the full term on each of the 2 micro-batches would give
    assert anchor.state_dict()["calls"] == 4  # two calls per optimizer step
    for key, value in accumulated.items():
        error = (value - big[key]).abs().max()
        assert error < 1e-3 * (doubled[key] - big[key]).abs().max(), key


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_same(tmp_path, reentrant):
    plain, _ = anchored_trainer(tmp_path / "plain", steps=3, save_strategy="no")
    plain.train()
    checkpointed, _ = anchored_trainer(
        tmp_path / "gc",
        steps=3,
        save_strategy="no",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    checkpointed.train()
    for key, value in deltas(checkpointed.model).items():
        torch.testing.assert_close(value, deltas(plain.model)[key], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------- self-answers


def test_self_answers_are_the_base_models_greedy_answers_and_are_cached(tmp_path):
    model = cofi_model()
    cache = tmp_path / "cache" / "answers.json"
    anchor = attach_retention_anchor(
        model, GENERAL, weight=1.0, kind="self-answers", answers_file=cache, max_new_tokens=5
    )
    first = anchor._batches
    prompt = GENERAL[1]["input_ids"][2]
    with model.disable_adapter():
        greedy = model.generate(input_ids=prompt[None], max_new_tokens=5, do_sample=False, pad_token_id=0)[0]
    row = first[1]
    assert torch.equal(row["input_ids"][2][: len(greedy)], greedy)
    assert (row["labels"][2][: len(prompt)] == -100).all() and torch.equal(
        row["labels"][2][len(prompt) :], greedy[len(prompt) :]
    )
    assert json.loads(cache.read_text())["answers"][6] == greedy[len(prompt) :].tolist()
    anchor.detach()

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached answers should have been reused")

    model.generate = no_generation  # a resumed run: the same prompts and base weights read the file
    again = attach_retention_anchor(
        model, GENERAL, weight=1.0, kind="self-answers", answers_file=cache, max_new_tokens=5
    )
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again._batches, strict=True))
    again.detach()
    with pytest.warns(UserWarning, match="made for other prompts"), pytest.raises(AssertionError, match="reused"):
        attach_retention_anchor(
            model, GENERAL[:2], weight=1.0, kind="self-answers", answers_file=cache, max_new_tokens=5
        )


# ------------------------------------------------------------------------------------------------- bad inputs

PADDING = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}
LONG = {"input_ids": torch.randint(4, VOCAB, (1, 65))}  # the tiny models' context is 64


@pytest.mark.parametrize(
    ("model_kind", "data", "kwargs", "error", "message"),
    [
        ("cofi", [], {}, ValueError, "the anchor data is empty; pass at least one batch"),
        ("cofi", iter([]), {}, ValueError, "the anchor data is empty"),
        ("cofi", [PADDING], {}, ValueError, r"anchor batch 0 is all padding \(attention_mask is 0 everywhere\)"),
        ("cofi", [GENERAL[0], PADDING], {}, ValueError, "anchor batch 1 is all padding"),
        ("bare", GENERAL, {}, TypeError, r"LlamaForCausalLM has no adapter to disable.*reference=<a frozen copy"),
        ("cofi", GENERAL, {"weight": -0.1}, ValueError, r"weight=-0.1 must be a finite number >= 0"),
        ("cofi", GENERAL, {"weight": float("nan")}, ValueError, "weight=nan must be a finite number"),
        ("cofi", [LONG], {}, ValueError, "anchor batch 0 is 65 tokens wide, longer than the model's context of 64"),
        (
            "cofi",
            GENERAL,
            {"kind": "self-answers", "max_new_tokens": 60},
            ValueError,
            r"longest anchor prompt \(10 tokens\) plus max_new_tokens=60 exceeds the model's context of 64",
        ),
        ("cofi", GENERAL, {"kind": "mse"}, ValueError, r"kind='mse' must be one of \['kl', 'self-answers'\]"),
        ("cofi", GENERAL, {"every": 0}, ValueError, "every=0 must be a whole number >= 1"),
        ("cofi", GENERAL, {"max_cached": 0}, ValueError, "max_cached=0 must be a whole number >= 1"),
        ("cofi", GENERAL[0], {}, TypeError, "must be a list .* of batch dicts"),
        ("cofi", [{"input_ids": torch.tensor([[3, 200]])}], {}, ValueError, "token id 200, outside the model's vocab"),
        ("cofi", [{"input_ids": torch.rand(2, 3)}], {}, ValueError, "input_ids must be a non-empty 2-D integer"),
        ("cofi", GENERAL, {"reference": "same"}, ValueError, "reference shares weights with the model being trained"),
        ("cofi", GENERAL, {"kind": "self-answers", "answers_file": "dir"}, ValueError, "is a directory"),
        ("cofi", GENERAL, {"answers_file": "dir"}, ValueError, "answers_file is for kind='self-answers'"),
    ],
)
def test_bad_inputs_are_named_before_anything_changes(tmp_path, model_kind, data, kwargs, error, message):
    model = tiny_llama() if model_kind == "bare" else cofi_model()
    model.train()
    if kwargs.get("reference") == "same":
        kwargs = {**kwargs, "reference": model.base_model.model}
    if kwargs.get("answers_file") == "dir":
        kwargs = {**kwargs, "answers_file": tmp_path}
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        attach_retention_anchor(model, data, **{"weight": 1.0, **kwargs})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules()) and anchor_of(model) is None and model.training
    assert not list(tmp_path.iterdir())  # nothing was written


def test_a_trainer_that_computes_its_loss_without_labels_is_refused(tmp_path):
    trainer = trainer_for(cofi_model(), training_args(tmp_path, steps=1, label_smoothing_factor=0.1))
    with pytest.raises(ValueError, match="computes the loss outside the model"):
        attach_retention_anchor(trainer, GENERAL, weight=1.0)
    assert anchor_of(trainer.model) is None


# ------------------------------------------------------------------------------------------------- the math

LOGITS = st.integers(1, 3).flatmap(
    lambda b: st.integers(1, 4).flatmap(
        lambda t: st.tuples(
            st.lists(st.floats(-8, 8), min_size=b * t * 5, max_size=b * t * 5),
            st.lists(st.floats(-8, 8), min_size=b * t * 5, max_size=b * t * 5),
            st.lists(st.booleans(), min_size=b * t, max_size=b * t).filter(any),
            st.just((b, t)),
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(LOGITS)
def test_masked_kl_is_zero_for_equal_logits_non_negative_and_ignores_padding(case):
    first, second, keep, (b, t) = case
    p = torch.tensor(first).view(b, t, 5)
    q = torch.tensor(second).view(b, t, 5).requires_grad_(True)
    mask = torch.tensor(keep).view(b, t)
    assert float(masked_mean_kl(p, p.clone(), mask)) == pytest.approx(0.0, abs=1e-6)
    value = masked_mean_kl(p, q, mask)
    assert float(value.detach()) >= -1e-6
    reference = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none")
    assert float(value.detach()) == pytest.approx(float(reference.detach().sum(-1)[mask].mean()), rel=1e-4, abs=1e-5)
    value.backward()
    assert torch.count_nonzero(q.grad[~mask]) == 0  # padding gets no gradient
    shifted = q.detach().clone()
    shifted[~mask] += 3.0  # whatever the padding positions hold
    shifted[mask] += 1.5  # and a constant shift of logits changes no distribution
    assert float(masked_mean_kl(p, shifted, mask)) == pytest.approx(float(value.detach()), rel=1e-4, abs=1e-5)


def test_masked_kl_refuses_an_empty_mask():
    with pytest.raises(ValueError, match="selects no position"):
        masked_mean_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))
