"""Issue 15, smaller holes (points 7 and 8): each test fails on the code before its fix.

Real DataLoader workers (fork and spawn), real ledgers, a real Lightning Trainer.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp_mp
from _procs import sample
from torch.utils.data import DataLoader

from torch_dataflow import FeatureLoader, FeatureStoreDataset, FeatureWriter
from torch_dataflow.acking import StepAcker
from torch_dataflow.eagle3.collate import Eagle3Collator
from torch_dataflow.errors import CollateError, ConfigError
from torch_dataflow.ledger import open_ledger
from torch_dataflow.ledger.memory import MemoryLedger
from torch_dataflow.pool import FeaturePool
from torch_dataflow.sampler import ReshardingSampler


def _uris(tmp_path: Path, name: str = "") -> tuple[str, str]:
    return f"file://{tmp_path}/store{name}", f"sqlite://{tmp_path}/ledger{name}.db"


def _fill(store: str, ledger: object, n: int, prefix: str = "s", make=sample) -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(n)]
    with FeatureWriter(store, ledger) as w:
        for i, sid in enumerate(ids):
            w.put(sid, make(i))
    return ids


# ---------------------------------------------------------------- a. memory:// in a spawned worker
@pytest.mark.allow_leaks  # the spawn context starts multiprocessing's resource tracker once per process
def test_memory_ledger_refuses_a_spawn_started_worker(tmp_path: Path) -> None:
    name = f"holes-spawn-{os.getpid()}"
    try:
        led = open_ledger(f"memory://{name}")
        _fill(f"file://{tmp_path}/store", led, 4)
        ds = FeatureStoreDataset(f"file://{tmp_path}/store", led, mode="offline")
        loader = DataLoader(ds, num_workers=1, multiprocessing_context="spawn")
        with pytest.raises(ConfigError, match="cannot cross processes"):
            list(loader)
        assert led.counts().leased == 0 and led.counts(epoch=0).pending == 4  # nothing leased anywhere
    finally:
        MemoryLedger.drop(name)


# ---------------------------------------------------------------- b. persistent workers, offline epochs
def test_offline_epochs_reach_persistent_workers(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    ids = _fill(store, ledger, 10)
    ds = FeatureStoreDataset(store, ledger, mode="offline", shuffle=True)
    loader = FeatureLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    acker = StepAcker(ds)
    acker.resume(None)
    seen = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        got = []
        for batch in loader:
            got += batch["__sample_id__"]
            acker.add(batch)
            acker.after_step()
        seen.append(sorted(got))
    assert seen == [ids, ids, ids]
    assert [ds.ledger.counts(epoch=e).trained for e in range(3)] == [10, 10, 10]


# ---------------------------------------------------------------- c. ack validates step
@pytest.mark.parametrize("bad", [-5, "7", 2.9, True, None.__class__])
def test_ack_refuses_a_step_that_is_not_an_int_ge_0(tmp_path: Path, bad: object) -> None:
    store, ledger = _uris(tmp_path)
    _fill(store, ledger, 2)
    ds = FeatureStoreDataset(store, ledger, batch_size=2)
    [batch] = list(DataLoader(ds, batch_size=2, num_workers=1))
    with pytest.raises(ConfigError, match="step must be an int >= 0"):
        ds.ledger.ack(batch["__lease__"], step=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="step must be an int >= 0"):
        ds.ack(batch, step=bad)  # type: ignore[arg-type]
    acker = StepAcker(ds)
    acker.add(batch)
    with pytest.raises(ConfigError, match="step must be an int >= 0"):
        acker.after_step(bad)  # type: ignore[arg-type]
    assert ds.ledger.counts().trained == 0 and ds.ledger.counts().leased == 2
    assert acker.after_step(3) == 2 and ds.ledger.trained_steps() == {"s00000": 3, "s00001": 3}


# ---------------------------------------------------------------- d. another dataset's batch
def test_acking_another_datasets_batch_is_a_config_error(tmp_path: Path) -> None:
    sa, la = _uris(tmp_path, "a")
    sb, lb = _uris(tmp_path, "b")
    _fill(sa, la, 4, prefix="a")
    _fill(sb, lb, 4, prefix="b")
    ds_a = FeatureStoreDataset(sa, la, batch_size=2)
    ds_b = FeatureStoreDataset(sb, lb, batch_size=2)
    acker = StepAcker(ds_a, strict=False)
    batch_b = next(iter(DataLoader(ds_b, batch_size=2, num_workers=2)))
    acker.add(batch_b)
    with pytest.raises(ConfigError, match="do not belong to ledger") as e:
        acker.after_step(1)
    assert "another dataset's ledger" in str(e.value) and acker.lost == 0
    assert ds_a.ledger.counts().trained == 0
    # Through the right dataset the same batch acks cleanly.
    assert StepAcker(ds_b, strict=True).add(batch_b) == 2
    assert ds_b.ack(batch_b, step=1) == [] and ds_b.ledger.counts().trained == 2


# ---------------------------------------------------------------- e. collate failures
def _ragged(i: int) -> dict[str, torch.Tensor]:
    return sample(i, size=16 if i % 2 else 8)


def test_collate_mismatch_names_ids_and_returns_leases(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    ids = _fill(store, ledger, 8, make=_ragged)
    ds = FeatureStoreDataset(store, ledger, mode="offline", shuffle=False)
    loader = FeatureLoader(ds, batch_size=4, num_workers=1)
    with pytest.raises(CollateError, match="sample ids") as e:
        list(loader)
    msg, is_config = str(e.value), isinstance(e.value, ConfigError)
    del e, loader
    gc.collect()  # the traceback holds the iterator: shut its worker down now
    assert is_config
    named = [sid for sid in ids if sid in msg]
    assert "equal size" in msg and len(named) == 4
    # Given back at once (PENDING again), not at the TTL: the worker's next batch leased them again.
    assert "4 of 4 leases were given back" in msg
    ds.reconcile(None)  # what a rerun does with the leases of the batch being prepared at the error
    assert ds.ledger.counts(epoch=0).pending == 8


def _eagle(i: int) -> dict[str, torch.Tensor]:
    h = 2 if i % 2 else 4
    return {"input_ids": torch.arange(3), "loss_mask": torch.ones(3, dtype=torch.long),
            "hidden_state": torch.zeros(3, h), "aux_hidden_state": torch.zeros(3, 3 * h)}


def test_eagle3_collator_names_ids_and_returns_leases(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    ids = _fill(store, ledger, 4, make=_eagle)
    ds = FeatureStoreDataset(store, ledger, batch_size=4)
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=Eagle3Collator(ledger=ds.ledger))
    with pytest.raises(CollateError, match="differs from sample 0") as e:
        list(loader)
    msg = str(e.value)
    del e, loader
    gc.collect()
    assert all(sid in msg for sid in ids) and "4 of 4 leases were given back" in msg
    c = ds.ledger.counts()
    assert (c.leased, c.pending) == (0, 4)


# ---------------------------------------------------------------- f./g. padding under ReshardingSampler
def test_padding_only_batch_acks_cleanly(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    _fill(store, ledger, 1)
    pool = FeaturePool(store, ledger)
    s0 = ReshardingSampler(pool, num_replicas=2, rank=0, shuffle=False, drop_last=False)
    s1 = ReshardingSampler(pool, num_replicas=2, rank=1, shuffle=False, drop_last=False)
    assert len(s0) == len(s1) == 1
    [b1] = list(DataLoader(pool, batch_size=1, sampler=s1, num_workers=1))
    assert b1["__lease__"] == [""]  # rank 1 has nothing of its own: a padded slot
    [b0] = list(DataLoader(pool, batch_size=1, sampler=s0, num_workers=1))
    a0, a1 = StepAcker(pool, strict=True), StepAcker(pool, strict=True)
    assert a1.add(b1) == 0 and a1.after_step(1) == 0
    assert a0.add(b0) == 1 and a0.after_step(1) == 1
    assert pool.ledger.counts().trained == 1


def test_repeat_ack_of_a_durable_lease_is_not_lost(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    _fill(store, ledger, 3)
    pool = FeaturePool(store, ledger)
    s0 = ReshardingSampler(pool, num_replicas=2, rank=0, shuffle=False, drop_last=False)
    s1 = ReshardingSampler(pool, num_replicas=2, rank=1, shuffle=False, drop_last=False)
    assert len(s0) == len(s1) == 2
    b1 = list(DataLoader(pool, batch_size=1, sampler=s1, num_workers=1))
    assert b1[0]["__lease__"] != [""] and b1[1]["__lease__"] == [""]  # the pad (the head) carries no lease
    acker = StepAcker(pool, strict=True)
    acker.add(b1[0])
    assert acker.after_step(1) == 1
    acker.checkpoint_written(1)  # DURABLE between the two acks
    acker.add(b1[0])  # the same lease again (a replayed batch)
    assert acker.after_step(2) == 1 and acker.lost == 0
    assert pool.ledger.trained_steps() == {b1[0]["__sample_id__"][0]: 1}  # recorded once, at its first step


# ---------------------------------------------------------------- h. lazy rank/world; Lightning's wrapping
def _lazy_child(rank: int, world: int, sampler: ReshardingSampler, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        n = len(sampler)
        idx = [int(i) for i in sampler]
        Path(f"{out}.{rank}").write_text(f"{sampler.rank} {sampler.num_replicas} {n} {','.join(map(str, idx))}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.allow_leaks  # spawn's resource tracker lives as long as the test process
def test_sampler_built_before_the_process_group_plans_for_the_real_world(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    _fill(store, ledger, 6)
    pool = FeaturePool(store, ledger)
    sampler = ReshardingSampler(pool, shuffle=False)  # built before any process group, as before trainer.fit
    out = str(tmp_path / "res")
    tmp_mp.spawn(_lazy_child, args=(2, sampler, f"file://{tmp_path}/pg", out), nprocs=2, join=True)
    got = [Path(f"{out}.{r}").read_text().split() for r in range(2)]
    assert [g[:3] for g in got] == [["0", "2", "3"], ["1", "2", "3"]]
    assert sorted(int(i) for g in got for i in g[3].split(",")) == list(range(6))


_LIGHTNING_JOB = """
import sys, torch, lightning as L
from torch.utils.data import DataLoader
from torch_dataflow.errors import ConfigError
from torch_dataflow.lightning import FeatureAckCallback
from torch_dataflow.pool import FeaturePool
from torch_dataflow.sampler import ReshardingSampler

class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.w = torch.nn.Linear(16, 1)
    def training_step(self, batch, i):
        return self.w(batch["x"]).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

store, ledger, use = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
pool = FeaturePool(store, ledger)
loader = DataLoader(pool, batch_size=2, sampler=ReshardingSampler(pool, shuffle=False), num_workers=1)
kw = {} if use else {"use_distributed_sampler": False}
trainer = L.Trainer(accelerator="cpu", devices=1, strategy="ddp", max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[FeatureAckCallback(pool)], **kw)
try:
    trainer.fit(M(), loader)
except ConfigError as e:
    print("CONFIGERROR", e)
c = pool.ledger.counts()
print("COUNTS", c.pending, c.leased, c.trained)
"""


@pytest.mark.parametrize("use_distributed_sampler", [True, False])
def test_lightning_keeps_the_resharding_sampler_with_or_without_use_distributed_sampler(
        tmp_path: Path, use_distributed_sampler: bool) -> None:
    # ReshardingSampler is a DistributedSampler: Lightning's default does not wrap it.
    store, ledger = _uris(tmp_path)
    _fill(store, ledger, 6)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_LIGHTNING_JOB))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    r = subprocess.run([sys.executable, str(script), store, ledger, "1" if use_distributed_sampler else "0"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = [line for line in r.stdout.splitlines() if line.startswith("COUNTS")]
    assert "CONFIGERROR" not in r.stdout, r.stdout
    assert counts == ["COUNTS 0 0 6"]  # every sample trained, none left leased
