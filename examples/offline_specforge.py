"""Offline EAGLE3 — train from an existing SpecForge feature directory.

SpecForge's ``scripts/prepare_hidden_states.py`` leaves a directory of
``rows_*/data_*.ckpt`` files. This example first makes a small one (random
features in exactly that layout), then trains an EAGLE3 draft head from it in
the two ways torch_dataflow offers:

1. **in place** — :class:`~torch_dataflow.eagle3.SpecForgeDirectory` reads the
   files where they are (memory-mapped, ``weights_only=True``) as a map-style
   dataset; :class:`~torch_dataflow.eagle3.Eagle3Collator` builds SpecForge's
   batch. A drop-in for SpecForge's ``OfflineEagle3Dataset`` + padding collator.
2. **imported** — ``torch-dataflow import`` (here :func:`import_directory`)
   copies the files into a feature store + ledger once; a
   :class:`~torch_dataflow.FeatureStoreDataset` in offline mode then serves
   them epoch after epoch, and the ledger records which samples each epoch
   trained (so a crash resumes mid-epoch without repeating or skipping any).

    python examples/offline_specforge.py --workdir /tmp/td-offline
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from torch_dataflow import FeatureLoader, FeatureStoreDataset
from torch_dataflow.acking import StepAcker
from torch_dataflow.eagle3 import (
    Eagle3Collator,
    Eagle3Draft,
    SpecForgeDirectory,
    import_directory,
    write_specforge_directory,
)

H, V = 64, 512


def new_draft(head: torch.Tensor) -> tuple[Eagle3Draft, torch.optim.Optimizer]:
    torch.manual_seed(0)
    draft = Eagle3Draft(hidden_size=H, vocab_size=V, lm_head_weight=head)
    return draft, torch.optim.AdamW(draft.parameters(), lr=3e-3)


def train_in_place(src: Path, head: torch.Tensor, epochs: int, batch_size: int, max_len: int) -> float:
    """Way 1: read the SpecForge directory where it is."""
    draft, opt = new_draft(head)
    loader = DataLoader(
        SpecForgeDirectory(src),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=Eagle3Collator(max_len=max_len),
    )
    for _ in range(epochs):
        for batch in loader:
            loss = draft(batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return loss.item()


def train_imported(src: Path, workdir: Path, head: torch.Tensor, epochs: int, batch_size: int, max_len: int) -> float:
    """Way 2: import once into a store + ledger, then train with acks per epoch."""
    store, ledger = f"file://{workdir / 'store'}", f"sqlite://{workdir / 'ledger.db'}"
    n = import_directory(src, store, ledger, progress=False)  # = `torch-dataflow import SRC --store .. --ledger ..`
    print(f"imported {n} samples into {store}")
    draft, opt = new_draft(head)
    ds = FeatureStoreDataset(store, ledger, mode="offline", batch_size=batch_size, seed=0)
    loader = FeatureLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=Eagle3Collator(max_len=max_len))
    acker = StepAcker(ds)
    acker.resume(None)  # a fresh run; pass the checkpoint's acker state when resuming
    for epoch in range(epochs):
        ds.set_epoch(epoch)  # as DistributedSampler.set_epoch: a new seeded order
        for batch in loader:
            acker.add(batch)
            loss = draft(batch).loss
            opt.zero_grad()
            loss.backward()
            with acker.stepping():
                opt.step()
        print(f"epoch {epoch}: {len(ds.ledger.trained_steps(epoch=epoch))} samples trained, loss {loss.item():.3f}")
    acker.checkpoint_written()  # after saving a checkpoint (offline: marks durable, keeps the bytes)
    acker.finish()  # end the ledger session: the next run needs no takeover
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("td-offline"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()  # a relative --workdir is fine: URIs get the absolute path
    if (args.workdir / "ledger.db").exists():
        raise SystemExit(f"{args.workdir} holds an earlier run: remove it or pick another --workdir")
    torch.set_num_threads(1)
    src = args.workdir / "specforge"
    # Stands in for `python scripts/prepare_hidden_states.py --output-path <src>` (SpecForge).
    write_specforge_directory(src, n=args.samples, seq_lens=[24, 40, 64, 80], hidden=H, vocab=V, seed=0)
    head = torch.randn(V, H, generator=torch.Generator().manual_seed(1))  # the target's lm_head in real use
    print(f"in place: final loss {train_in_place(src, head, args.epochs, args.batch_size, args.max_len):.3f}")
    print(
        f"imported: final loss {train_imported(src, args.workdir, head, args.epochs, args.batch_size, args.max_len):.3f}"
    )


if __name__ == "__main__":
    main()
