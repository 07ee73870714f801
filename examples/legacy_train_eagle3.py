"""A legacy-style EAGLE3 draft training loop, as SpecForge-era trainers write it.

``DistributedSampler`` + ``DataLoader`` over a SpecForge offline feature
directory, ``sampler.set_epoch(epoch)`` every epoch and ``len(loader)`` for
the step plan. Runs on CPU with world size 1 in a few seconds (it writes a
small random SpecForge directory first). ``migrated_train_eagle3.py`` is the
same script after the migration shown in ``docs/sampler.md``.

Example:
    $ python examples/legacy_train_eagle3.py --workdir /tmp/eagle3-legacy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from torch_dataflow.eagle3 import Eagle3Collator, Eagle3Draft, SpecForgeDirectory, write_specforge_directory

HIDDEN, VOCAB = 32, 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("eagle3-example"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()

    data = args.workdir / "hidden_states"
    if not data.exists():
        write_specforge_directory(data, n=24, seq_lens=[12, 16, 20], hidden=HIDDEN, vocab=VOCAB)
    torch.manual_seed(0)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)

    dataset = SpecForgeDirectory(data)
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=Eagle3Collator(max_len=64),
        drop_last=True,
    )

    draft = Eagle3Draft(hidden_size=HIDDEN, vocab_size=VOCAB, lm_head_weight=torch.randn(VOCAB, HIDDEN) * 0.2)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    total_steps = args.epochs * len(loader)
    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = draft(batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            print(f"epoch {epoch} step {step}/{total_steps} loss {loss.item():.4f}")
    print(f"done: {step} steps")


if __name__ == "__main__":
    main()
