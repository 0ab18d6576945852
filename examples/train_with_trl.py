"""Train a CoFiTune adapter with TRL's ``SFTTrainer`` (``peft_config=CoFiConfig(...)``), save it and reload it.

Run from the repository root::

    python -m examples.train_with_trl --tiny                # random tiny Llama, synthetic data: seconds
    python -m examples.train_with_trl                       # SmolLM2-135M-Instruct, FreeDict (see the README)
    python -m examples.train_with_trl --tiny --anchor 2     # + a retention anchor on general prompts

``SFTTrainer`` wraps the base model itself (``get_peft_model`` with the CoFi config; ``import peft_cofi`` registers
the method). The data are already tokenised chat examples with the prompt masked out of ``labels``, which
``SFTTrainer`` uses as they are. TRL's gradient checkpointing stays on; bf16 autocast (TRL's default) is used where a
GPU supports it (on CPU transformers refuses it unless ``use_cpu=True``). Checkpoints
(``OUT/sft/checkpoint-N``) and the final ``OUT/adapter`` hold the diff adapter; the script exits non-zero when the
reloaded adapter does not reproduce the trained model's logits.
"""

from __future__ import annotations

import sys
import time

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from examples.common import (
    attach_anchor,
    check_reload,
    cofi_importance,
    held_out_loss,
    parser,
    prepare,
    report_anchor,
    tokenizer_for,
)
from peft_cofi import CoFiConfig


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    start = time.perf_counter()
    task = prepare(args, "trl")
    config = CoFiConfig(layers_to_transform="bottom2", importance=cofi_importance(task, args))
    before = held_out_loss(task.base, task, args)

    sft_args = SFTConfig(
        output_dir=str(args.out / "sft"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_length=args.max_len,
        save_strategy="steps",
        save_steps=max(args.steps // 2, 1),
        logging_steps=max(args.steps // 10, 1),
        report_to="none",
        seed=args.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    trainer = SFTTrainer(
        model=task.base,
        args=sft_args,
        train_dataset=Dataset.from_list(task.train),
        processing_class=tokenizer_for(task, args.tiny),
        peft_config=config,
    )
    trainer.model.print_trainable_parameters()
    anchor = attach_anchor(trainer, task, args)  # after SFTTrainer wrapped the model with the CoFi adapter
    trainer.train()
    report_anchor(anchor)
    after = held_out_loss(trainer.model, task, args)

    adapter_dir = args.out / "adapter"
    trainer.save_model(str(adapter_dir))
    print(f"held-out loss: {before:.4f} -> {after:.4f}")
    ok = check_reload(trainer.model, adapter_dir, task, args)
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
