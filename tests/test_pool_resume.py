"""Issue 15 item 8a: Lightning + FeaturePool/ReshardingSampler resumed mid-epoch trains the
whole rest of the epoch (Lightning restores its in-epoch batch count; the epoch must not end
early because ``len()`` of the resumed sampler counts only what is left)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from torch_dataflow import FeaturePool, FeatureWriter, ReshardingSampler
from torch_dataflow.lightning import FeatureAckCallback

N, BATCH = 48, 4


class Killed(BaseException):
    pass


class Counter(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("seen", torch.zeros(N, dtype=torch.long))

    def training_step(self, batch, batch_idx):
        for sid in batch["__sample_id__"]:
            if sid:
                self.seen[int(sid[1:])] += 1
        if self.trainer.global_step == getattr(self, "die_at", -1):
            raise Killed  # killed mid-epoch (no end-of-fit hook runs)
        return (self.w * batch["x"].float().sum()).sum() + self.w.pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp: Path, pool: FeaturePool, model: Counter, ckpt: str | None) -> None:
    ck = ModelCheckpoint(dirpath=tmp / "ck", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(max_epochs=1, callbacks=[FeatureAckCallback(pool), ck], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        use_distributed_sampler=False)
    loader = DataLoader(pool, batch_size=BATCH, sampler=ReshardingSampler(pool, shuffle=False, drop_last=False))
    trainer.fit(model, loader, ckpt_path=ckpt)


def test_lightning_resumed_mid_epoch_trains_the_rest_of_the_epoch(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(store, ledger, name="p") as w:
        for i in range(N):
            w.put(f"s{i}", {"x": torch.full((2,), i)})
    m1 = Counter()
    m1.die_at = 4
    with pytest.raises(Killed):
        _fit(tmp_path, FeaturePool(store, ledger), m1, None)
    m2 = Counter()
    _fit(tmp_path, FeaturePool(store, ledger), m2, str(tmp_path / "ck" / "last.ckpt"))
    assert m2.seen.tolist() == [1] * N  # restored counts (steps 1-4) + the rest of the epoch, each once
    c = FeaturePool(store, ledger).ledger.counts(epoch=0)
    assert c.pending == 0 and c.leased == 0
