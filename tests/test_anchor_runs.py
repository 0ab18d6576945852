"""The retention anchor in whole runs: DDP on two CPU processes (gloo), TRL's SFTTrainer with bf16 and gradient
checkpointing, the forgetting monitor, the examples' ``--anchor --tiny`` modes, and the fronts benchmark's anchored
methods with their disjoint prompt file (the cost benchmark's anchored rows: tests/test_bench_fronts.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks import bench_fronts
from benchmarks.anchor_prompts import INSTRUCTIONS, check_disjoint, read_prompts
from benchmarks.fronts_methods import ALL_METHODS, ANCHORED_METHODS, METHODS
from safetensors.torch import load_file
from transformers import TrainerCallback

from anchor_worker import SCENARIOS, WEIGHT, anchor_batches
from distributed_worker import LR, build_model, global_batches
from peft_cofi import ForgettingMonitor, attach_retention_anchor
from peft_cofi.anchor import LOG_KEY, masked_mean_kl
from test_anchor import GENERAL, anchored_trainer
from test_distributed import TOLERANCE
from training_helpers import load_example

WORKER = Path(__file__).with_name("anchor_worker.py")


def single_process_reference(bf16: bool) -> dict[str, torch.Tensor]:
    """What DDP must compute: per step, the mean over the two ranks of (task loss on the rank's rows + WEIGHT x KL on
    the rank's next anchor batch), where rank r's shard is batches r::2 (step t draws its batch t % 2)."""
    model = build_model("update")
    data = anchor_batches()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=LR)
    for step, tokens in enumerate(global_batches()):
        total = 0.0
        for rank in range(2):
            batch = data[rank + 2 * (step % 2)]
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                task = model(input_ids=tokens[rank::2], labels=tokens[rank::2]).loss
                model.eval()
                with torch.no_grad(), model.disable_adapter():
                    base = model(**inputs).logits
                model.train()
                tuned = model(**inputs).logits
            total = total + task + WEIGHT * masked_mean_kl(base, tuned, batch["attention_mask"])
        (total / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_shards_and_train_like_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*command, str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    for name, spec in SCENARIOS.items():
        reports = [json.loads((tmp_path / name / f"rank{rank}.json").read_text()) for rank in range(2)]
        assert [report["shard"] for report in reports] == [[0, 2], [1, 3]], name  # disjoint, rank::world
        assert all(report["state"] == {"calls": 3, "drawn": 3} and report["mean"] > 0 for report in reports), name
        trained = load_file(tmp_path / name / "deltas.safetensors")
        expected = single_process_reference(spec.get("bf16", False))
        assert sorted(trained) == sorted(expected)
        for key, value in expected.items():
            torch.testing.assert_close(trained[key], value, **TOLERANCE[spec.get("bf16", False)])
    # the anchor mattered: the same run without it ends elsewhere
    free = build_model("update")
    optimizer = torch.optim.SGD([p for p in free.parameters() if p.requires_grad], lr=LR)
    for tokens in global_batches():
        free(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {name: p.detach() for name, p in free.named_parameters() if p.requires_grad}
    trained = load_file(tmp_path / "ddp" / "deltas.safetensors")
    assert any(not torch.allclose(trained[k], moved[k], **TOLERANCE[False]) for k in moved)


# ------------------------------------------------------------------------------------------------- trainers


def test_trl_sft_trainer_with_bf16_and_checkpointing_folds_the_anchor_into_its_loss(tmp_path):
    from test_trl import sft_trainer  # TRL's defaults there: gradient checkpointing and bf16 autocast on CPU

    loss, anchor = {}, {}
    for weight in (0.0, 1000.0):
        trainer = sft_trainer(tmp_path / str(weight))
        trainer.args.max_steps = 2
        attach_retention_anchor(trainer, GENERAL, weight=weight)
        trainer.train()
        history = trainer.state.log_history
        loss[weight] = [(e["step"], e["loss"]) for e in history if "loss" in e]
        anchor[weight] = [(e["step"], e[LOG_KEY]) for e in history if LOG_KEY in e]
        assert all("entropy" in e for e in history if "loss" in e)  # TRL's metrics stay with its loss entries
    assert [step for step, _ in loss[0.0]] == [step for step, _ in anchor[0.0]] == [1, 2]
    assert anchor[0.0] == anchor[1000.0]  # step 1 changed nothing: the zero diff is the base model, no pull
    (_, first), (_, second) = anchor[1000.0]
    assert first < 1e-7 < second
    # step 2: TRL's token-mean loss (from the fused head's log-probs, not outputs.loss) rose by weight x anchor
    assert loss[1000.0][1][1] - loss[0.0][1][1] == pytest.approx(1000.0 * second, rel=0.02)
    assert loss[1000.0][0] == loss[0.0][0]


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_the_forgetting_monitor_and_logging_integrations_see_the_anchor(tmp_path):
    recorder = Recorder()
    trainer, _ = anchored_trainer(tmp_path, steps=4, save_strategy="no", logging_steps=2, callbacks=[recorder])
    monitor = ForgettingMonitor(GENERAL, every_n_steps=2).attach(trainer)
    trainer.train()
    assert [log[LOG_KEY] > 0 for log in recorder.logs if LOG_KEY in log] == [True, True]  # steps 2 and 4
    assert "anchor_loss" not in monitor.history[0]  # step 0: nothing was anchored yet
    assert all(record["anchor_loss"] > 0 for record in monitor.history[1:])
    assert any("monitor/anchor_loss" in entry for entry in trainer.state.log_history)
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [2, 4]


# ------------------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("example", ["train_with_trainer", "train_with_trl", "train_with_accelerate", "quickstart"])
def test_examples_run_with_the_anchor(tmp_path, capsys, example):
    arguments = ["--tiny", "--steps", "4", "--out", str(tmp_path), "--anchor", "2.0", "--anchor-every", "2"]
    assert load_example(example).main(arguments) == 0
    out = capsys.readouterr().out
    assert "retention anchor: KL to the base model, weight 2, on one call in 2; 2 batches of general prompts" in out
    assert "retention anchor: mean anchor_loss " in out and "over 2 anchored calls" in out
    assert "reload check: PASSED" in out


def test_monitor_example_records_the_anchor(tmp_path, capsys):
    arguments = ["--tiny", "--steps", "4", "--every", "2", "--out", str(tmp_path), "--anchor", "2.0"]
    assert load_example("monitor_forgetting").main(arguments) == 0
    assert "over 4 anchored calls" in capsys.readouterr().out
    history = json.loads((tmp_path / "monitor_tiny.json").read_text())["history"]
    assert [record["step"] for record in history] == [0, 2, 4] and "anchor_loss" not in history[0]
    assert all(record["anchor_loss"] >= 0 for record in history[1:])


def test_examples_without_the_anchor_say_nothing_about_it(tmp_path, capsys):
    assert load_example("train_with_accelerate").main(["--tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert "retention anchor" not in capsys.readouterr().out


@pytest.mark.slow
def test_trainer_example_resumes_with_the_anchor(tmp_path, capsys):
    example = load_example("train_with_trainer")
    first = ["--tiny", "--steps", "4", "--save-steps", "2", "--out", str(tmp_path / "a"), "--anchor"]
    assert example.main(first) == 0
    state = json.loads((tmp_path / "a" / "trainer" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["peft_cofi.RetentionAnchor"] == {"calls": 2, "drawn": 2}
    again = ["--tiny", "--steps", "4", "--out", str(tmp_path / "b"), "--anchor"]
    assert example.main([*again, "--resume-from", str(tmp_path / "a" / "trainer" / "checkpoint-2")]) == 0
    assert "reload check: PASSED" in capsys.readouterr().out
    final = json.loads((tmp_path / "b" / "trainer" / "checkpoint-4" / "trainer_state.json").read_text())
    assert final["stateful_callbacks"]["peft_cofi.RetentionAnchor"] == {"calls": 4, "drawn": 4}


# ------------------------------------------------------------------------------------------------- benchmarks


def test_the_anchor_prompt_file_is_disjoint_from_the_evaluation_instructions():
    prompts = read_prompts()
    assert len(prompts) == len(set(prompts)) >= 32
    instructions = {"retention instructions": read_prompts(INSTRUCTIONS)}
    check_disjoint(prompts, instructions)  # the check the fronts benchmark and the examples run
    with pytest.raises(
        ValueError, match=r"1 anchor prompt\(s\) also occur in the retention instructions .*capital of FRANCE"
    ):
        check_disjoint([*prompts, "  what is the capital of FRANCE "], instructions)
    with pytest.raises(ValueError, match=r"in the general evaluation set, e.g. \[1, 2\]"):
        check_disjoint([[1, 2], [3]], {"general": [(1, 2)]})


def test_fronts_methods_carry_the_anchor_and_leave_the_existing_methods_alone(tmp_path):
    assert all(method.anchor is None for method in METHODS)  # cached runs keep their names and settings
    names = {"full+anchor-kl-1", "lora-ffn+anchor-kl-1", "cofi-update-1+anchor-kl-1"}
    assert {method.name for method in ANCHORED_METHODS} == {
        name.replace("kl-1", f"kl-{weight}") for name in names for weight in (1, 3, 10, 30)
    }
    args = bench_fronts.parse_args(["--quick", "--out-dir", str(tmp_path), "--steps", "3", "--methods", *names])
    setup = bench_fronts.quick_setup(args)
    by_name = {method.name: method for method in ALL_METHODS}
    for name in ("full", "lora-ffn", "cofi-update-1"):
        lr = by_name[name].lrs[-1] * args.lr_scale
        plain = bench_fronts.run_one(by_name[name], lr, 0, setup, args)
        anchored = bench_fronts.run_one(by_name[f"{name}+anchor-kl-1"], lr, 0, setup, args)
        assert "anchor" not in plain and anchored["method"] == f"{name}+anchor-kl-1"
        assert anchored["anchor"]["weight"] == 1.0 and anchored["anchor"]["mean"] > 0, name
        assert anchored["retention_ce_increase"] != plain["retention_ce_increase"], name
