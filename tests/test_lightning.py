"""FeatureAckCallback with a real lightning.Trainer on CPU; the Fabric callback.

Single-process runs happen in this process; the 2-rank DDP run (gloo) is two
forked processes started the way torchrun starts them (LOCAL_RANK etc.).
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any

import _train_procs as tp
import pytest
import torch

from torch_dataflow import FeatureStoreDataset, open_ledger

pytest.importorskip("lightning")


def _setup(work: Path, n: int, **cfg: Any) -> dict[str, Any]:
    store, ledger = f"file://{work}/store", f"sqlite://{work}/ledger.db"
    tp.fill(store, ledger, n)
    return {"store": store, "ledger": ledger, "dir": str(work), "n": n, "bs": 2, **cfg}


def _result(work: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((work / f"result.{rank}.json").read_text())


@pytest.mark.parametrize("nw", [0, 2])
def test_acks_land_exactly_on_optimizer_steps(tmp_path: Path, nw: int) -> None:
    cfg = _setup(tmp_path, 20, accumulate=3, nw=nw, final=False)
    tp.lightning_job(cfg)
    r = _result(tmp_path)
    steps = open_ledger(cfg["ledger"]).trained_steps()
    # 10 batches, a step after batches 2, 5, 8 and the epoch's last (9).
    assert r["global_step"] == 4 and len(r["batch_steps"]) == 10
    for b, (ids, _) in enumerate(r["batch_steps"]):
        assert {steps[sid] for sid in ids} == {min(b // 3 + 1, 4)}, (b, ids)
    # Per step: nothing is acked until the optimizer step, then the whole window is.
    acked_after = [row[2] for row in r["spy"]]
    assert acked_after == [0, 0, 6, 6, 6, 12, 12, 12, 18, 20]
    assert [row[1] for row in r["spy"]] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 4]
    assert r["acked"] == 20 and r["lost"] == 0


def test_manual_optimisation_with_two_optimizers_acks_only_real_steps(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, 10, manual=True, step_every=2)
    tp.lightning_job(cfg)
    r = _result(tmp_path)
    led = open_ledger(cfg["ledger"])
    steps = led.trained_steps()
    # Two optimizers step after batches 1 and 3 (global_step counts both: 2, 4); batch 4 never steps.
    assert [s for _, s in r["batch_steps"]] == [0, 2, 2, 4, 4]
    for b, (ids, _) in enumerate(r["batch_steps"][:4]):
        assert {steps[sid] for sid in ids} == {2 * (b // 2 + 1)}
    last = r["batch_steps"][4][0]
    assert not set(last) & set(steps)  # given back at the end of training, never acked
    c = led.counts()
    assert (c.durable, c.pending, c.leased) == (8, 2, 0)  # final checkpoint at step 4 made the rest durable


@pytest.mark.parametrize("free", ["checkpoint", "step"])
def test_free_modes(tmp_path: Path, free: str) -> None:
    cfg = _setup(tmp_path, 12, accumulate=2, ckpt_every=2, free=free)
    tp.lightning_job(cfg)
    r = _result(tmp_path)
    durable_after = [row[3] for row in r["spy"]]
    if free == "step":
        # Durable (bytes freed) right at each optimizer step.
        assert durable_after == [0, 4, 4, 8, 8, 12]
    else:
        # Durable only once the checkpoint of steps 2 is complete; the spy runs before
        # the checkpoint of its own batch, so the mark shows one batch later.
        assert durable_after == [0, 0, 0, 0, 8, 8]
        assert r["written"][:1] == [2]
    c = open_ledger(cfg["ledger"]).counts()
    assert c.durable == 12 and c.freed == 12
    assert FeatureStoreDataset(cfg["store"], cfg["ledger"]).store.keys() == []


def test_resume_reconciles_once_and_replays_what_the_checkpoint_lacks(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, 16, accumulate=1, ckpt_every=2)
    tp.lightning_job({**cfg, "max_steps": 3, "final": False})  # checkpoint at step 2, step 3 lost
    first = _result(tmp_path)
    led = open_ledger(cfg["ledger"])
    c = led.counts()
    # Steps 1-2 durable (checkpoint complete), step 3 trained only; Lightning's prefetched batch stays leased.
    assert first["attempt"] == 1 and (c.durable, c.trained, c.leased) == (4, 2, 2)
    tp.lightning_job(cfg)  # resumes from step=2.ckpt: reconcile(2) replays step 3's samples
    second = _result(tmp_path)
    assert second["attempt"] == 2  # exactly one reconcile per run
    assert second["seen"] == [1.0] * 16  # the final model trained every sample once
    assert led.counts().durable == 16 and second["global_step"] == 8


def test_batches_without_leases_are_a_clear_error(tmp_path: Path) -> None:
    from torch_dataflow.errors import ConfigError
    from torch_dataflow.lightning import FeatureAckCallback

    cb = FeatureAckCallback(FeatureStoreDataset(f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"))
    with pytest.raises(ConfigError, match="__lease__"):
        cb.acker.add({"x": torch.ones(2)})
    with pytest.raises(ConfigError, match="free"):
        FeatureAckCallback(cb.acker.datasets[0], free="sometimes")


def test_fabric_callback_acks_on_after_optimizer_step(tmp_path: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from torch_dataflow.fabric import FabricFeatureAck

    cfg = _setup(tmp_path, 12)
    ds = FeatureStoreDataset(cfg["store"], cfg["ledger"], batch_size=2)
    ack = FabricFeatureAck(ds)
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[ack])
    model, opt = fabric.setup(torch.nn.Linear(8, 1), torch.optim.SGD(torch.nn.Linear(8, 1).parameters(), lr=0.1))
    state = {"model": model, "opt": opt, "ack": ack}
    ack.load(fabric, tmp_path / "none.ckpt", state)  # fresh start
    steps = open_ledger(cfg["ledger"])
    for i, batch in enumerate(DataLoader(ds, batch_size=2)):
        ack.add(batch)
        fabric.backward(model(batch["x"]).pow(2).mean())
        if i % 2 == 1:
            opt.step()
            opt.zero_grad()
            c = steps.counts()
            assert c.trained + c.durable == 4 * ack.step
        if i == 3:
            assert ack.save(fabric, tmp_path / "f.ckpt", state) == 0  # steps 1-2 durable, bytes kept (retention)
            assert steps.counts().durable == 8
    assert ack.step == 3 and steps.counts().trained == 4
    ack2 = FabricFeatureAck(FeatureStoreDataset(cfg["store"], cfg["ledger"], batch_size=2))
    ack2.load(fabric, tmp_path / "f.ckpt", {"ack": ack2})
    assert ack2.step == 2 and steps.counts().pending == 4  # step 3 is not in the checkpoint: replayed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory):
    z = tp.Zygote(str(tmp_path_factory.mktemp("zygote") / "stderr.log"))
    yield z
    z.close()


@pytest.mark.slow
def test_ddp_two_ranks_ack_their_own_samples_then_resume_on_one(zygote: tp.Zygote, tmp_path: Path) -> None:
    n = 24
    # A checkpoint at step 3, written by rank 0 from inside the epoch (as a crash would leave it).
    cfg = _setup(tmp_path, n, ckpt_every=3, max_steps=3, final=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    rcs = zygote.run(*({"fn": "lightning_job", "cfg": cfg, "env": {**env, "LOCAL_RANK": str(r)}} for r in (0, 1)))
    assert rcs == [0, 0]
    led = open_ledger(cfg["ledger"])
    steps = led.trained_steps()
    ranks = [_result(tmp_path, r) for r in (0, 1)]
    ids = [[sid for batch, _ in r["batch_steps"] for sid in batch] for r in ranks]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == 6
    for r in ranks:  # each rank acked its own samples, at the steps it took them
        assert r["acked"] == 6 and r["global_step"] == 3
        for batch, step in r["batch_steps"]:
            assert {steps[sid] for sid in batch} == {step}
    assert ranks[0]["seen"] == ranks[1]["seen"] and sum(ranks[0]["seen"]) == 12
    assert led.counts().durable == 12  # rank 0 wrote the checkpoint of step 3

    # Invariant 9: resume the 2-rank checkpoint on one rank; nothing lost, nothing twice.
    rcs = zygote.run({"fn": "lightning_job", "cfg": {**cfg, "max_steps": -1, "ckpt_every": 0, "final": True}})
    assert rcs == [0]
    end = _result(tmp_path)
    assert end["seen"] == [1.0] * n and led.counts().durable == n
    assert end["global_step"] == 3 + math.ceil((n - 12) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_lightning.py", "train_plain.py"])
def test_examples_run_and_train_everything(tmp_path: Path, script: str) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, str(root / "examples" / script), "--workdir", str(tmp_path), "--samples", "48"],
                         env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "durable=48 pending=0 leased=0" in out.stdout
