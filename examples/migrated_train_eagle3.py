"""``legacy_train_eagle3.py`` after the migration to torch_dataflow.

The data now comes from a feature store + ledger (here: the SpecForge
directory imported once into a shared-directory store and a SQLite ledger),
the sampler is :class:`~torch_dataflow.sampler.ReshardingSampler`, and each
optimizer step acks the samples it trained on. Everything else — the
DataLoader arguments, ``set_epoch``, ``len(loader)``, the collator, the
model — is unchanged. See ``docs/sampler.md`` for the diff and the guarantees.

Example:
    $ python examples/migrated_train_eagle3.py --workdir /tmp/eagle3-migrated
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from torch_dataflow.eagle3 import Eagle3Collator, Eagle3Draft, import_directory, write_specforge_directory
from torch_dataflow.pool import FeaturePool
from torch_dataflow.sampler import ReshardingSampler

HIDDEN, VOCAB = 32, 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("eagle3-example"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--resume-step", type=int, default=None, help="step of the checkpoint being resumed")
    args = parser.parse_args()

    data = args.workdir / "hidden_states"
    store, ledger = f"file://{args.workdir.resolve()}/features", f"sqlite://{args.workdir.resolve()}/ledger.db"
    if not data.exists():
        write_specforge_directory(data, n=24, seq_lens=[12, 16, 20], hidden=HIDDEN, vocab=VOCAB)
        import_directory(data, store, ledger, progress=False)
    torch.manual_seed(0)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)

    dataset = FeaturePool.from_specforge(data, store, ledger)
    if args.resume_step is not None and rank == 0:
        dataset.reconcile(args.resume_step)  # once, before any rank starts: see docs/sampler.md
    if dist.is_initialized():
        dist.barrier()
    sampler = ReshardingSampler(dataset, num_replicas=world, rank=rank, shuffle=True, drop_last=True)
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
    step = args.resume_step or 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = draft(batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            dataset.ack(batch, step)  # these samples are in the model now
            print(f"epoch {epoch} step {step}/{total_steps} loss {loss.item():.4f}")
    trained = {e: len(dataset.ledger.trained_steps(e)) for e in range(args.epochs)}
    print(f"done: {step} steps; samples trained per epoch: {trained}")


if __name__ == "__main__":
    main()
