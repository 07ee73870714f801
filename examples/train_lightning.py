"""Train a small model with Lightning from a feature store, exactly once across crashes.

Run it, kill it (Ctrl-C, SIGKILL) and run it again: it resumes from the last
checkpoint and trains every sample not in that checkpoint exactly once more.

    python examples/train_lightning.py --workdir /tmp/tdf-lightning

A producer fills the store first (in real use another process, e.g. a target
model writing hidden states, does this with FeatureWriter).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from torch_dataflow import FeatureLoader, FeatureStoreDataset, FeatureWriter
from torch_dataflow.lightning import FeatureAckCallback


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(16, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # "__lease__" / "__sample_id__" travel in the batch; the callback reads them.
        return torch.nn.functional.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def produce(store: str, ledger: str, n: int) -> None:
    """Write n samples once (a re-run finds them committed and skips this)."""
    # A stable name and resume=True: a producer restarted after a crash re-registers under the
    # same name and skips ids already committed, so no sample is ever trained twice.
    with FeatureWriter(store, ledger, name="producer-0", resume=True) as w:
        if w.ledger.counts().committed >= n:
            return
        g = torch.Generator().manual_seed(0)
        for i in range(n):
            x = torch.randn(16, generator=g)
            w.put(f"sample-{i:06d}", {"x": x, "y": x.sum()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/tdf-lightning")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store, ledger = f"file://{work}/features", f"sqlite://{work}/ledger.db"
    produce(store, ledger, args.samples)

    ds = FeatureStoreDataset(store, ledger, batch_size=args.batch_size)
    loader = FeatureLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
    ckpt_dir = work / "checkpoints"
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,  # online mode: the epoch ends when the producers closed and everything is delivered
        accumulate_grad_batches=2,
        callbacks=[
            FeatureAckCallback(ds),  # ack per optimizer step, durable per checkpoint, reconcile on resume
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_last=True),
        ],
        logger=False,
        enable_progress_bar=False,
    )
    # "last": the newest last*.ckpt (Lightning may name it last-v1.ckpt after a resume from a step file)
    trainer.fit(Regressor(), loader, ckpt_path="last" if any(ckpt_dir.glob("last*.ckpt")) else None)
    trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))  # the final model: everything it trained becomes durable
    c = ds.ledger.counts()
    print(f"global_step={trainer.global_step} durable={c.durable} pending={c.pending} leased={c.leased}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
