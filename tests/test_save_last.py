"""Lightning ``save_last``: a crash between ``epoch=..-step=N.ckpt`` and ``last.ckpt``
must not make step N durable, so resuming from ``last.ckpt`` replays it (issue 15.1)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.lightning import FeatureAckCallback

N = 24
BATCH = 2


class Counter(L.LightningModule):
    """Counts every sample it trains on in its own (checkpointed) state."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("seen", torch.zeros(N, dtype=torch.long))

    def training_step(self, batch, batch_idx):
        for sid in batch["__sample_id__"]:
            self.seen[int(sid[1:])] += 1
        return (self.w * batch["x"].float().sum()).sum() + self.w.pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Killed(BaseException):
    pass


def _trainer(ckdir: Path, cb: FeatureAckCallback, die_at: int | None) -> L.Trainer:
    class DieBeforeLast(L.Callback):
        # Runs inside the checkpoint write path: raise when last.ckpt of step die_at is due.
        pass

    ck = ModelCheckpoint(dirpath=ckdir, every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb, ck], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    if die_at is not None:
        orig = ck._save_last_checkpoint

        def save_last(trainer_, monitor_candidates):
            if trainer_.global_step == die_at:
                raise Killed("killed between the step file and last.ckpt")
            return orig(trainer_, monitor_candidates)

        ck._save_last_checkpoint = save_last  # type: ignore[method-assign]
    return trainer


@pytest.mark.parametrize("die_at", [3, 7])
def test_kill_between_step_file_and_last_ckpt_replays_from_last(tmp_path: Path, die_at: int) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(store, ledger, name="p") as w:
        for i in range(N):
            w.put(f"s{i}", {"x": torch.full((2,), i)})
    ckdir = tmp_path / "ck"

    ds = FeatureStoreDataset(store, ledger, batch_size=BATCH, mode="online")
    model = Counter()
    with pytest.raises(Killed):
        _trainer(ckdir, FeatureAckCallback(ds), die_at).fit(model, DataLoader(ds, batch_size=BATCH))
    assert (ckdir / f"epoch=0-step={die_at}.ckpt").exists()
    last = torch.load(ckdir / "last.ckpt", weights_only=False)
    assert last["global_step"] == die_at - 1
    # Nothing beyond what last.ckpt covers was freed: resuming from it can replay the rest. With a
    # checkpoint every step, retention keeps one more: only what the checkpoint before it covers is freed.
    steps = ds.ledger.trained_steps()
    assert ds.ledger.counts().freed == sum(1 for s in steps.values() if s <= die_at - 2)

    ds2 = FeatureStoreDataset(store, ledger, batch_size=BATCH, mode="online")
    model2 = Counter()
    _trainer(ckdir, FeatureAckCallback(ds2), None).fit(model2, DataLoader(ds2, batch_size=BATCH),
                                                       ckpt_path=str(ckdir / "last.ckpt"))
    # The model's own per-sample counter (restored from last.ckpt, then trained on) says exactly once.
    assert model2.seen.tolist() == [1] * N
    c = ds2.ledger.counts()
    assert c.pending == 0 and c.leased == 0 and c.quarantined == 0


class DieAt(Counter):
    def __init__(self, die_at: int | None) -> None:
        super().__init__()
        self.die_at = die_at

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.die_at:
            raise Killed(f"killed at step {self.die_at}")
        return super().training_step(batch, batch_idx)


def test_resume_from_a_step_file_then_literal_last_ckpt_names_last_v1(tmp_path: Path) -> None:
    # Resumed from a step file, Lightning writes its last checkpoint as last-v1.ckpt and leaves
    # last.ckpt behind: a restart from the literal last.ckpt is refused (safely) and the error names
    # the newer file; ckpt_path="last" (Lightning's newest last*.ckpt) finishes exactly once.
    from torch_dataflow.errors import CheckpointTooOld

    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(store, ledger, name="p") as w:
        for i in range(N):
            w.put(f"s{i}", {"x": torch.full((2,), i)})
    ckdir = tmp_path / "ck"

    def run(die_at: int | None, ckpt_path: str | None) -> tuple[Counter, FeatureStoreDataset]:
        ds = FeatureStoreDataset(store, ledger, batch_size=BATCH, mode="online")
        model = DieAt(die_at)
        ck = ModelCheckpoint(dirpath=ckdir, every_n_train_steps=2, save_last=True)  # save_top_k=1, the default
        trainer = L.Trainer(max_epochs=1, callbacks=[FeatureAckCallback(ds), ck], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(model, DataLoader(ds, batch_size=BATCH), ckpt_path=ckpt_path)
        return model, ds

    with pytest.raises(Killed):
        run(3, None)  # files: epoch=0-step=2.ckpt (its state: no last file yet) and last.ckpt
    with pytest.raises(Killed):
        run(9, str(ckdir / "epoch=0-step=2.ckpt"))  # "the newest file": Lightning now writes last-v1.ckpt
    lasts = sorted(p.name for p in ckdir.glob("last*.ckpt"))
    if lasts == ["last.ckpt"]:
        pytest.fail(f"Lightning wrote no versioned last file here ({lasts}): the case this test guards is gone")
    before = open_counts = None
    from torch_dataflow.ledger import open_ledger
    open_counts = open_ledger(ledger).counts
    before = open_counts()
    with pytest.raises(CheckpointTooOld, match=r"last-v1\.ckpt"):
        run(None, str(ckdir / "last.ckpt"))
    assert open_counts() == before  # the refusal changed nothing
    model, ds = run(None, "last")
    assert model.seen.tolist() == [1] * N
    c = ds.ledger.counts()
    assert c.pending == 0 and c.leased == 0 and c.quarantined == 0
