"""A SpecForge-style offline EAGLE3 training script, migrated to torch_dataflow.

``specforge_train_eagle3.py`` with SpecForge's data helpers swapped for
torch_dataflow's (same names and arguments, a ledger added), a ``reconcile``
on resume and an ack after each optimizer step: SpecForge's collator, its
``len(loader)`` arithmetic and its resume skip stay, and every sample is trained
exactly once per epoch across the restart.

Was: ``build_offline_eagle3_dataset`` + ``prepare_dp_dataloaders`` (``DistributedSampler``
and ``DataCollatorWithPadding``) from ``specforge.data``, ``len(loader)`` for the
step plan and SpecForge's resume arithmetic (``skip_steps``). It writes a small
random SpecForge directory first and runs on CPU in a few seconds;
``--stop-after N`` ends the run after ``N`` steps (a crash after a checkpoint),
and running it again resumes. ``specforge_migrated_train_eagle3.py`` is the same
script on torch_dataflow (docs/specforge.md shows the diff). Needs ``specforge``
and its ``datasets`` dependency.

Example:
    $ python examples/specforge_migrated_train_eagle3.py --workdir /tmp/sf-migrated
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from torch_dataflow.eagle3 import Eagle3Draft
from torch_dataflow.specforge import build_offline_eagle3_dataset, prepare_dp_dataloaders, write_specforge_directory

HIDDEN, VOCAB = 32, 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("sf-example"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=None, help="end after this many steps (a crash)")
    args = parser.parse_args()

    data, ckpt = args.workdir / "hidden_states", args.workdir / "checkpoint.pt"
    if not data.exists():
        write_specforge_directory(data, n=16, seq_lens=[12, 16, 20], hidden=HIDDEN, vocab=VOCAB)
    if not dist.is_initialized():  # torchrun sets these up; a single CPU process makes its own group
        dist.init_process_group("gloo", init_method=f"file://{args.workdir.resolve()}/pg", rank=0, world_size=1)
    dataset = build_offline_eagle3_dataset(str(data), max_len=args.max_length, ledger=f"sqlite://{data}.db")
    loader = prepare_dp_dataloaders(
        dataset, args.batch_size, num_workers=args.num_workers, shuffle=True, process_group=dist.group.WORLD
    )
    torch.manual_seed(0)
    draft = Eagle3Draft(hidden_size=HIDDEN, vocab_size=VOCAB, lm_head_weight=torch.randn(VOCAB, HIDDEN) * 0.2)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    global_step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        draft.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        global_step = int(state["global_step"])
        dataset.reconcile(global_step)  # the ledger forgets what this checkpoint does not hold

    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    start_epoch, skip_steps = divmod(global_step, steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if epoch == start_epoch and i < skip_steps:
                continue  # trained before the restart
            loss = draft(batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            global_step += 1
            dataset.ack(batch, global_step)  # these samples are in the model now
            torch.save({"model": draft.state_dict(), "optimizer": optimizer.state_dict(), "global_step": global_step},
                       ckpt)
            print(f"epoch {epoch} step {global_step}/{total_steps} loss {loss.item():.6f}")
            if global_step == args.stop_after:
                return
    print(f"done: {global_step}/{total_steps} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
