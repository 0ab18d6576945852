"""ForgettingMonitor: values, the plain-loop and Trainer APIs, resume, files, and argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from peft_cofi import ForgettingMonitor
from peft_cofi.monitor import LOG_PREFIX, METRICS
from peft_cofi.plots import plot_training_history
from tiny_models import tiny_llama
from training_helpers import (
    StopAt,
    batches_of,
    cofi_model,
    deltas,
    load_example,
    token_examples,
    trainer_for,
    training_args,
)

GENERAL = batches_of(token_examples(16, seed=1))
HELD_OUT = batches_of(token_examples(8, seed=0))  # the first training examples: their loss must fall


def test_plain_loop_measures_on_schedule_and_writes_the_plot_and_json(tmp_path):
    model = cofi_model()
    monitor = ForgettingMonitor(GENERAL, HELD_OUT, every_n_steps=2, output_dir=tmp_path / "out", name="run")
    start = monitor.step(model, 0)
    assert start["ce_increase"] == 0.0 and start["kl"] == 0.0  # the zero diff is the base model
    assert start["general_loss"] == start["base_loss"] > 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 6):
        model(**HELD_OUT[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record = monitor.step(model, step)
        assert (record is None) == (step % 2 == 1)
    assert model.training  # measuring restores train mode
    assert monitor.step(model, 4) is None  # measured already
    written = monitor.finish(model, 5)
    assert [r["step"] for r in monitor.history] == [0, 2, 4, 5]
    last = monitor.history[-1]
    assert last["kl"] > 0 and last["eval_loss"] < start["eval_loss"]
    assert last["base_loss"] == pytest.approx(start["base_loss"], abs=1e-6)  # the base does not move
    assert last["ce_increase"] == pytest.approx(last["general_loss"] - last["base_loss"])
    assert written["png"] == tmp_path / "out" / "run.png" and written["png"].read_bytes()[:4] == b"\x89PNG"
    document = json.loads(written["json"].read_text())
    assert document["every_n_steps"] == 2 and document["history"] == monitor.history


def test_reference_model_and_versatility_only():
    base = tiny_llama()
    monitor = ForgettingMonitor(GENERAL, every_n_steps=1, reference=tiny_llama())
    record = monitor.measure(base, 3)
    assert record["kl"] == 0.0 and "eval_loss" not in record
    assert monitor.finish() == {}  # no output_dir: nothing written
    with pytest.raises(TypeError, match="disable_adapter"):
        ForgettingMonitor(GENERAL).measure(base, 0)


class Recorder(TrainerCallback):
    """Stands in for a logging integration (TensorBoard, W&B): keeps every ``on_log`` payload."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_trainer_logs_through_the_loggers_and_does_not_change_training(tmp_path):
    reference = cofi_model()
    trainer_for(reference, training_args(tmp_path / "plain", steps=5, save_strategy="no")).train()

    model, recorder = cofi_model(), Recorder()
    trainer = trainer_for(model, training_args(tmp_path / "run", steps=5, save_strategy="no"), callbacks=[recorder])
    monitor = ForgettingMonitor(GENERAL, HELD_OUT, every_n_steps=2, output_dir=tmp_path / "out").attach(trainer)
    trainer.train()
    assert [r["step"] for r in monitor.history] == [0, 2, 4, 5]  # step 0, every 2, and the last
    logged = [entry for entry in trainer.state.log_history if LOG_PREFIX + "kl" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4, 5]
    assert {LOG_PREFIX + key for key in METRICS} <= set(logged[-1])
    assert logged[-1][LOG_PREFIX + "kl"] == monitor.history[-1]["kl"] > 0
    assert sum(LOG_PREFIX + "kl" in logs for logs in recorder.logs) == 4  # integrations see every measurement
    assert (tmp_path / "out" / "forgetting_monitor.png").is_file()
    assert (tmp_path / "out" / "forgetting_monitor.json").is_file()
    for name, value in deltas(model).items():
        assert torch.equal(value, deltas(reference)[name])  # measuring draws no random numbers, changes nothing


def test_resumed_trainer_takes_back_earlier_measurements(tmp_path):
    first = trainer_for(cofi_model(), training_args(tmp_path, steps=6, save_steps=3), callbacks=[StopAt(3)])
    ForgettingMonitor(GENERAL, every_n_steps=2).attach(first)
    first.train()
    second = trainer_for(cofi_model(), training_args(tmp_path, steps=6, save_steps=3))
    monitor = ForgettingMonitor(GENERAL, every_n_steps=2).attach(second)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    # 0 and 2 come from the checkpoint's log history (the stopped run measured step 3 after saving it)
    assert [r["step"] for r in monitor.history] == [0, 2, 4, 6]
    assert monitor.history[0]["kl"] == 0.0 and set(monitor.history[0]) == {"step", *METRICS[:4]}


def test_added_without_attach_is_refused(tmp_path):
    trainer = trainer_for(cofi_model(), training_args(tmp_path, steps=1), callbacks=[ForgettingMonitor(GENERAL)])
    with pytest.raises(RuntimeError, match=r"monitor.attach\(trainer\)"):
        trainer.train()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps=0 must be a positive whole number"),
        ({"every_n_steps": -3}, ValueError, "every_n_steps=-3"),
        ({"every_n_steps": 2.5}, ValueError, "every_n_steps=2.5"),
        ({"every_n_steps": True}, ValueError, "every_n_steps=True"),
        ({"general_batches": []}, ValueError, "general_batches is empty"),
        ({"general_batches": iter([])}, ValueError, "general_batches is empty"),
        ({"eval_batches": []}, ValueError, "eval_batches is empty"),
        ({"general_batches": [{"labels": torch.ones(1, 2)}]}, ValueError, r"general_batches\[0\] must be a dict"),
        ({"general_batches": GENERAL[0]}, TypeError, "must be a list"),
        ({"name": "a/b"}, ValueError, "file stem"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    arguments = {"general_batches": GENERAL, **kwargs}
    with pytest.raises(error, match=message):
        ForgettingMonitor(**arguments)


def test_misuse_after_construction(tmp_path):
    monitor = ForgettingMonitor(GENERAL, output_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="nothing was measured"):
        monitor.finish()
    (tmp_path / "file").write_text("")
    monitor.measure(cofi_model(), 0)
    with pytest.raises(NotADirectoryError, match="is a file"):
        monitor.finish()
    with pytest.raises(ValueError, match=r"step=-1 must be the number of optimizer steps"):
        monitor.step(cofi_model(), -1)
    with pytest.raises(ValueError, match="both the model and its final step"):
        monitor.finish(cofi_model())
    with pytest.raises(TypeError, match="needs a transformers Trainer"):
        monitor.attach(object())
    with pytest.raises(ValueError, match="history is empty"):
        plot_training_history([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"some lack \['kl'\]"):
        plot_training_history([{"step": 0, "ce_increase": 0.0}], tmp_path / "bad.png")


def test_monitor_example_tiny(tmp_path, capsys):
    arguments = ["--tiny", "--steps", "4", "--every", "2", "--out", str(tmp_path)]
    assert load_example("monitor_forgetting").main(arguments) == 0
    assert "log_history entries with monitor values: 3" in capsys.readouterr().out
    history = json.loads((tmp_path / "monitor_tiny.json").read_text())["history"]
    assert [record["step"] for record in history] == [0, 2, 4]
    assert (tmp_path / "monitor_tiny.png").is_file()
