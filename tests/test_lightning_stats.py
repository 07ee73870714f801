"""FeatureAckCallback logs data wait, samples/s and ledger lag through self.log (a real Trainer + CSVLogger)."""

from __future__ import annotations

import csv

import pytest
import torch

from torch_dataflow import FeatureLoader, FeatureStoreDataset, FeatureWriter

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from torch_dataflow.lightning import FeatureAckCallback  # noqa: E402


class _Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.fc(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, log_stats: bool) -> list[dict[str, str]]:
    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(store, ledger, name="p0") as w:
        for i in range(32):
            w.put(f"s{i}", {"x": torch.randn(4), "y": torch.randn(1)})
    ds = FeatureStoreDataset(store, ledger, batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=CSVLogger(tmp_path / "logs", name="run"), log_every_n_steps=1,
                        callbacks=[FeatureAckCallback(ds, log_stats=log_stats)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Model(), FeatureLoader(ds, batch_size=8))
    assert ds.ledger.counts().trained + ds.ledger.counts().durable == 32
    rows: list[dict[str, str]] = []
    for path in (tmp_path / "logs").rglob("metrics.csv"):  # none when nothing was logged
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def test_callback_logs_wait_rate_and_lag(tmp_path):
    rows = _fit(tmp_path, log_stats=True)
    stats = [r for r in rows if r.get("dataflow/data_wait_s")]
    assert len(stats) == 4  # one per batch
    assert all(float(r["dataflow/data_wait_s"]) >= 0 for r in stats)
    assert all(0 <= float(r["dataflow/data_wait_fraction"]) <= 1 for r in stats)
    assert float(stats[-1]["dataflow/samples_per_s"]) > 0
    # After the first batch's ack: 24 of 32 are pending or leased (the next batch is prefetched).
    assert float(stats[0]["dataflow/ledger_lag"]) == 24


def test_flag_turns_it_off(tmp_path):
    rows = _fit(tmp_path, log_stats=False)
    assert not any(k.startswith("dataflow/") for r in rows for k in r if r[k])


@pytest.mark.parametrize("log_stats", [True, False])
def test_fabric_callback_logs_per_optimizer_step(tmp_path, log_stats):
    from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
    from torch.utils.data import DataLoader

    from torch_dataflow.fabric import FabricFeatureAck

    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(store, ledger, name="p0") as w:
        for i in range(24):
            w.put(f"s{i}", {"x": torch.randn(4), "y": torch.randn(1)})
    ds = FeatureStoreDataset(store, ledger, batch_size=4)
    ack = FabricFeatureAck(ds, log_stats=log_stats)
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[ack],
                      loggers=FabricCSVLogger(tmp_path / "logs", name="fabric"))
    net = torch.nn.Linear(4, 1)
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    ack.load(fabric, tmp_path / "none.ckpt", {"ack": ack})  # a fresh start: begin() gets the Fabric
    for i, batch in enumerate(DataLoader(ds, batch_size=4)):
        ack.add(batch)
        fabric.backward(torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]))
        if i % 2 == 1:  # two batches per optimizer step
            opt.step()
            opt.zero_grad()
    fabric.logger.finalize("success")
    assert ack.step == 3 and ds.ledger.counts().trained == 24
    rows = []
    for path in (tmp_path / "logs").rglob("metrics.csv"):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    if not log_stats:
        assert not any(k.startswith("dataflow/") for r in rows for k in r if r[k])
        return
    stats = [r for r in rows if r.get("dataflow/data_wait_s")]
    assert [int(r["step"]) for r in stats] == [1, 2, 3]  # one row per optimizer step
    assert all(0 <= float(r["dataflow/data_wait_fraction"]) <= 1 for r in stats)
    assert float(stats[-1]["dataflow/samples_per_s"]) > 0
    assert float(stats[0]["dataflow/ledger_lag"]) == 16  # after step 1's ack: 16 of 24 not trained yet
