"""A finished run frees what it kept for a replay: the steps after its newest checkpoint.

Without a final action those samples keep their bytes forever (a resume from the
newest checkpoint would train them again). Freed by: one more checkpoint after
``fit``, ``StepAcker.finish(saved=True)``, or ``torch-dataflow finish``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from torch_dataflow import FeatureLoader, FeatureStoreDataset, FeatureWriter
from torch_dataflow.acking import StepAcker
from torch_dataflow.cli import main
from torch_dataflow.errors import CheckpointTooOld, ConfigError, SessionConflict
from torch_dataflow.finish import MODE_KEY, finish_training
from torch_dataflow.ledger import open_ledger
from torch_dataflow.lightning import FeatureAckCallback

N = 40
BATCH = 8


def _produce(store: str, ledger: str, n: int = N) -> None:
    with FeatureWriter(store, ledger, name="p") as w:
        for i in range(n):
            w.put(f"s{i}", {"x": torch.full((4,), float(i)), "y": torch.ones(1)})


def _sample_files(root: Path) -> list[str]:
    return sorted(f for _, _, fs in os.walk(root) for f in fs if f.endswith(".tdf"))


class Counter(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)
        self.register_buffer("seen", torch.zeros(N, dtype=torch.long))

    def training_step(self, batch, batch_idx):
        for sid in batch["__sample_id__"]:
            self.seen[int(sid[1:])] += 1
        return torch.nn.functional.mse_loss(self.fc(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(store: str, ledger: str, ckpt: Path, *, resume: str | None = None) -> tuple[L.Trainer, Counter, Any]:
    ds = FeatureStoreDataset(store, ledger, batch_size=BATCH)
    model = Counter()
    trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[FeatureAckCallback(ds), ModelCheckpoint(dirpath=ckpt, every_n_train_steps=2,
                                                                           save_last=True)])
    trainer.fit(model, FeatureLoader(ds, batch_size=BATCH), ckpt_path=resume)
    return trainer, model, ds


def test_lightning_tail_is_reported_then_freed_by_the_cli(tmp_path: Path, caplog, capsys) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    _produce(store, ledger)
    with caplog.at_level(logging.INFO, logger="torch_dataflow.acking"):
        _, model, ds = _fit(store, ledger, tmp_path / "ckpt")
    assert model.seen.tolist() == [1] * N
    # 5 batches, 2 per step: steps 1, 2, 3; checkpoints at step 2: the 8 samples of step 3 stay.
    c = ds.ledger.counts()
    assert (c.trained, c.durable, c.freed) == (8, 32, 32)
    assert len(_sample_files(tmp_path / "s")) == 8
    said = [r for r in caplog.records if "after the newest checkpoint" in r.getMessage()]
    # at the end of fit: INFO (a checkpoint after fit may still free them); the warning waits for the exit
    assert [r.levelno for r in said] == [logging.INFO] and "8 samples" in said[0].getMessage()

    assert main(["finish", store, ledger, "--dry-run"]) == 0
    assert "would make 8 trained samples durable at step 3" in capsys.readouterr().out
    assert len(_sample_files(tmp_path / "s")) == 8  # the dry run changed nothing
    assert main(["finish", store, ledger]) == 0
    assert "8 trained samples made durable at step 3; freed 8" in capsys.readouterr().out
    assert _sample_files(tmp_path / "s") == []
    c = ds.ledger.counts()
    assert (c.trained, c.durable, c.freed) == (0, 40, 40)
    assert main(["finish", store, ledger]) == 0
    assert "already durable" in capsys.readouterr().out

    # The newest checkpoint (step 2) is no resume point any more: refused, never a silent skip.
    with pytest.raises(CheckpointTooOld):
        _fit(store, ledger, tmp_path / "ckpt", resume=str(tmp_path / "ckpt" / "last.ckpt"))


_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_finish import _fit, _produce
tmp = Path({tmp!r})
store, ledger = f"file://{{tmp}}/s", f"sqlite://{{tmp}}/l.db"
_produce(store, ledger)
trainer, _, _ = _fit(store, ledger, tmp / "ckpt")
if {save}:
    trainer.save_checkpoint(tmp / "final.ckpt")
if {clean}:  # the run cleans up after itself: nothing to warn of, and no ledger made again at exit
    import shutil
    (tmp / "l.db").unlink()
    shutil.rmtree(tmp / "s")
print("fit done", flush=True)
"""


@pytest.mark.parametrize("save_after_fit", [False, True])
def test_kept_tail_warning_at_exit_only_if_no_checkpoint_after_fit(tmp_path: Path, save_after_fit: bool) -> None:
    """A user's script: fit, then (or not) trainer.save_checkpoint. The warning that bytes are kept comes at
    exit, and only when they still are: a script that saves after fit is not told to do what it did."""
    import subprocess
    import sys

    script = _SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), save=save_after_fit, clean=False)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fit done" in out.stdout
    warned = "8 samples trained after the newest checkpoint keep their bytes" in out.stderr
    assert warned is not save_after_fit, out.stderr
    files = _sample_files(tmp_path / "s")
    assert len(files) == (0 if save_after_fit else 8)
    if not save_after_fit:
        assert "torch-dataflow finish" in out.stderr


def test_in_a_notebook_or_repl_the_kept_tail_warns_when_fit_ends(tmp_path: Path, caplog, monkeypatch) -> None:
    import sys

    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # a REPL: its exit is not watched
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    _produce(store, ledger)
    with caplog.at_level(logging.INFO, logger="torch_dataflow.acking"):
        _fit(store, ledger, tmp_path / "ckpt")
    said = [r for r in caplog.records if "after the newest checkpoint" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING] and "torch-dataflow finish" in said[0].getMessage()


def test_a_run_that_deleted_its_ledger_is_not_warned_and_gets_no_new_ledger_at_exit(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = _SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), save=False, clean=True)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fit done" in out.stdout, out.stderr
    assert "keep their bytes" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "l.db").exists()


def test_lightning_save_after_fit_frees_the_tail_without_a_warning_later(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    _produce(store, ledger)
    trainer, _, ds = _fit(store, ledger, tmp_path / "ckpt")
    assert ds.ledger.counts().trained == 8
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    c = ds.ledger.counts()
    assert (c.trained, c.durable, c.freed) == (0, 40, 40)
    assert _sample_files(tmp_path / "s") == []


def _loop(ds: FeatureStoreDataset, *, checkpoint_at: int | None) -> StepAcker:
    acker = StepAcker(ds)
    acker.resume(None)
    for batch in DataLoader(ds, batch_size=BATCH):
        acker.add(batch)
        acker.after_step()
        if acker.step == checkpoint_at:
            acker.checkpoint_written()
    return acker


def test_finish_saved_frees_everything_sqlite(tmp_path: Path) -> None:
    _finish_saved(tmp_path, f"sqlite://{tmp_path}/l.db")


def test_finish_saved_frees_everything_redis(tmp_path: Path, redis_uri: str) -> None:
    _finish_saved(tmp_path, redis_uri)
    _wipe(redis_uri)


def _finish_saved(tmp_path: Path, ledger: str) -> None:
    store = f"file://{tmp_path}/s"
    _produce(store, ledger)
    ds = FeatureStoreDataset(store, ledger, batch_size=BATCH)
    acker = _loop(ds, checkpoint_at=2)
    assert acker.kept() == 24  # steps 3..5
    acker.finish(saved=True)
    assert acker.kept() == 0
    c = ds.ledger.counts()
    assert (c.trained, c.durable, c.freed) == (0, N, N)
    assert _sample_files(tmp_path / "s") == []
    ds.ledger.close()


def _wipe(uri: str) -> None:
    import redis

    redis.Redis.from_url(uri).flushdb()


def test_finish_is_refused_while_a_trainer_session_is_live(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    _produce(store, ledger)
    ds = FeatureStoreDataset(store, ledger, batch_size=BATCH)
    acker = StepAcker(ds)
    acker.resume(None)  # opens the session, held by this (live) process
    batch = next(iter(DataLoader(ds, batch_size=BATCH)))
    acker.add(batch)
    acker.after_step()
    with pytest.raises(SessionConflict, match="live trainer"):
        finish_training(store, ledger)
    assert ds.ledger.counts().trained == BATCH  # nothing changed
    acker.release()
    acker.finish(warn=False)
    assert finish_training(store, ledger).made_durable == BATCH


def test_offline_finish_keeps_the_bytes(tmp_path: Path, capsys) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    _produce(store, ledger)
    ds = FeatureStoreDataset(store, ledger, batch_size=BATCH, mode="offline")
    acker = _loop(ds, checkpoint_at=None)
    acker.finish()
    assert main(["finish", store, ledger, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["mode"], rep["made_durable"], rep["freed"]) == ("offline", N, 0)
    assert len(_sample_files(tmp_path / "s")) == N  # read again next epoch


def test_mixed_modes_need_an_explicit_mode(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    _produce(store, ledger, n=16)
    _loop(FeatureStoreDataset(store, ledger, batch_size=BATCH), checkpoint_at=None).finish(warn=False)
    led = open_ledger(ledger)
    offline = StepAcker(FeatureStoreDataset(store, ledger, mode="offline"))
    offline.resume(None)  # now also an offline consumer
    offline.finish(warn=False)
    assert led.get_meta(MODE_KEY) == "mixed"
    with pytest.raises(ConfigError, match="online or offline"):
        finish_training(store, led)
    led.close()


def test_mistyped_paths_change_nothing(tmp_path: Path, capsys) -> None:
    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    _produce(store, ledger, n=8)
    _loop(FeatureStoreDataset(store, ledger, batch_size=BATCH), checkpoint_at=None).finish(warn=False)
    assert main(["finish", f"file://{tmp_path}/typo", ledger]) == 2
    err = capsys.readouterr().err
    assert "cannot serve ledger" in err and "Nothing was changed" in err
    assert not (tmp_path / "typo").exists()  # no store directory was created
    assert main(["finish", store, f"sqlite://{tmp_path}/typo.db"]) == 2
    assert "no ledger at" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()
    assert open_ledger(ledger).counts().trained == 8
