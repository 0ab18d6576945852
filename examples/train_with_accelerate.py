"""Train a CoFiTune adapter in a plain PyTorch loop with accelerate's ``Accelerator``, watching forgetting as it goes.

Run from the repository root::

    python -m examples.train_with_accelerate --tiny         # random tiny Llama, synthetic data: seconds
    python -m examples.train_with_accelerate                # SmolLM2-135M-Instruct, FreeDict (see the README)
    accelerate launch -m examples.train_with_accelerate     # the same loop on several processes / GPUs
    python -m examples.train_with_accelerate --tiny --anchor 2   # + a retention anchor on general prompts

The loop is accelerate's usual one: ``accelerator.prepare`` the model, optimizer and data loader, then
``accelerator.backward(loss)``. A :class:`peft_cofi.ForgettingMonitor` (its plain-loop API: ``monitor.step`` after
every optimizer step, ``monitor.finish`` at the end) measures the loss increase and the KL to the base model on
general text, and the held-out loss, every ``--monitor-every`` steps, and writes ``OUT/forgetting_monitor.json`` and
``.png``. The adapter is saved with ``accelerator.unwrap_model(model).save_pretrained(OUT/adapter)``, reloaded onto a
fresh base model and checked: the script exits non-zero when the logits differ. With ``--anchor`` the retention
anchor is attached to the model before ``accelerator.prepare`` (the loop itself does not change; each process draws
its own shard of the anchor prompts) and the monitor records its mean (``anchor_loss``).
"""

from __future__ import annotations

import sys
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from examples.common import (
    attach_anchor,
    batches,
    check_reload,
    cofi_model,
    data_collator,
    general_examples,
    held_out_loss,
    parser,
    prepare,
    report_anchor,
)
from peft_cofi import ForgettingMonitor


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--monitor-every", type=int, default=10, help="measure forgetting every N steps; 0: off")
    args = arguments.parse_args(argv)
    start = time.perf_counter()
    task = prepare(args, "accelerate")
    accelerator = Accelerator()
    model = cofi_model(task, args)
    before = held_out_loss(model, task, args)
    anchor = attach_anchor(model, task, args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    loader = DataLoader(
        task.train,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=data_collator(task, args),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    monitor = None
    if args.monitor_every > 0:
        general = batches(general_examples(task, 16, args.seed), task, args)
        held_out = batches(task.held_out, task, args)
        monitor = ForgettingMonitor(general, held_out, every_n_steps=args.monitor_every, output_dir=args.out)
        monitor.step(unwrapped, 0)

    step = 0
    model.train()
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = monitor.step(unwrapped, step) if monitor is not None else None
            if record is not None and accelerator.is_main_process:
                print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
            if step == args.steps:
                break

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    after = held_out_loss(unwrapped, task, args)
    print(f"held-out loss: {before:.4f} -> {after:.4f}")
    report_anchor(anchor)
    if monitor is not None:
        written = monitor.finish(unwrapped, step)
        print(f"monitor: {written['png']} and {written['json']}")
    adapter_dir = args.out / "adapter"
    unwrapped.save_pretrained(adapter_dir)
    ok = check_reload(unwrapped, adapter_dir, task, args)
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
