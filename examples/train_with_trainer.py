"""Train a CoFiTune adapter with the Hugging Face ``Trainer``: checkpoints hold the weight diff, resuming is exact.

Run from the repository root::

    python -m examples.train_with_trainer --tiny            # random tiny Llama, synthetic data: seconds
    python -m examples.train_with_trainer                   # SmolLM2-135M-Instruct, FreeDict (see the README)
    python -m examples.train_with_trainer --tiny --out OUT --resume-from OUT/trainer/checkpoint-20
    python -m examples.train_with_trainer --tiny --anchor 2   # + a retention anchor (logged, checkpointed)

Every checkpoint (``OUT/trainer/checkpoint-N``) holds ``adapter_model.safetensors`` and ``adapter_config.json`` (the
diff of the trained modules, not a full model) plus the optimizer, scheduler and RNG state, so ``--resume-from``
continues the run exactly where it stopped. The final adapter is saved to ``OUT/adapter`` and reloaded onto a fresh
base model; the script exits non-zero when the reloaded adapter does not reproduce the trained model's logits.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import Trainer, TrainingArguments

from examples.common import (
    attach_anchor,
    check_reload,
    cofi_model,
    data_collator,
    held_out_loss,
    parser,
    prepare,
    report_anchor,
)


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: steps/2)")
    arguments.add_argument("--resume-from", type=Path, default=None, help="a checkpoint-N directory to continue from")
    arguments.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    args = arguments.parse_args(argv)
    start = time.perf_counter()
    task = prepare(args, "trainer")
    model = cofi_model(task, args)
    before = held_out_loss(model, task, args)

    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing; the old name warns even when False.
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=args.save_steps or max(args.steps // 2, 1),
        logging_steps=max(args.steps // 10, 1),
        report_to="none",
        seed=args.seed,
        **{checkpointing: args.gradient_checkpointing},
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=task.train, data_collator=data_collator(task, args)
    )
    anchor = attach_anchor(trainer, task, args)  # the Trainer logs it and keeps its data position in checkpoints
    trainer.train(resume_from_checkpoint=str(args.resume_from) if args.resume_from else None)
    report_anchor(anchor)
    after = held_out_loss(model, task, args)

    adapter_dir = args.out / "adapter"
    trainer.save_model(str(adapter_dir))  # PeftModel.save_pretrained: the diff adapter
    print(f"held-out loss: {before:.4f} -> {after:.4f}")
    ok = check_reload(model, adapter_dir, task, args)
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
