"""Watch forgetting while a CoFiTune adapter trains: ``ForgettingMonitor`` attached to a Hugging Face ``Trainer``.

Run from the repository root::

    python -m examples.monitor_forgetting --tiny            # random tiny Llama, synthetic data: seconds
    python -m examples.monitor_forgetting                   # SmolLM2-135M-Instruct, FreeDict + WordNet (README)

Every ``--every`` steps (and at step 0) the monitor measures, on fixed batches: the loss on general English text
(WordNet glosses) and its increase over the base model (ΔCE, from ``disable_adapter()``), the KL from the base
model's next-token distributions, and the held-out translation loss. The values go through ``trainer.log`` (so they
appear in ``trainer.state.log_history`` and in any ``report_to`` integration as ``monitor/...``); at the end the
monitor writes the history as JSON and a plot: ``benchmarks/results/monitor_smollm2.{json,png}`` for the real run,
``OUT/monitor_tiny.{json,png}`` with ``--tiny``. ``--anchor [WEIGHT]`` trains with a retention anchor, whose mean
the monitor records as ``anchor_loss``.
"""

from __future__ import annotations

import sys
import time

from benchmarks import RESULTS_DIR
from transformers import Trainer, TrainingArguments

from examples.common import (
    attach_anchor,
    batches,
    cofi_model,
    data_collator,
    general_examples,
    parser,
    prepare,
    report_anchor,
)
from peft_cofi import ForgettingMonitor


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--every", type=int, default=5, help="measure every N optimizer steps (default 5)")
    arguments.add_argument("--general", type=int, default=16, help="general-text examples to measure on (default 16)")
    args = arguments.parse_args(argv)
    start = time.perf_counter()
    out_given = args.out is not None
    task = prepare(args, "monitor")
    results = args.out if args.tiny or out_given else RESULTS_DIR
    model = cofi_model(task, args)
    monitor = ForgettingMonitor(
        general_batches=batches(general_examples(task, args.general, args.seed + 1), task, args),
        eval_batches=batches(task.held_out, task, args),
        every_n_steps=args.every,
        output_dir=results,
        name="monitor_tiny" if args.tiny else "monitor_smollm2",
    )
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=args.every,
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=task.train, data_collator=data_collator(task, args)
    )
    monitor.attach(trainer)
    anchor = attach_anchor(trainer, task, args)  # with --anchor, the monitor also records anchor_loss
    trainer.train()
    report_anchor(anchor)

    history = monitor.history
    first, last = history[0], history[-1]
    print(f"{'step':>5} {'ΔCE':>9} {'KL':>9} {'general':>9} {'held-out':>9}")
    for record in history:
        print(
            f"{record['step']:>5} {record['ce_increase']:>+9.4f} {record['kl']:>9.4f} "
            f"{record['general_loss']:>9.4f} {record['eval_loss']:>9.4f}"
        )
    print(f"held-out loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}", end="; ")
    print(f"ΔCE {first['ce_increase']:+.4f} -> {last['ce_increase']:+.4f}; KL {first['kl']:.4f} -> {last['kl']:.4f}")
    print(f"plot: {results / (monitor.name + '.png')}; history: {results / (monitor.name + '.json')}")
    logged = sum(1 for entry in trainer.state.log_history if "monitor/kl" in entry)
    print(f"log_history entries with monitor values: {logged}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0 if logged == len(history) else 1


if __name__ == "__main__":
    sys.exit(main())
