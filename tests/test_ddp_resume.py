"""Issue 15 point 8: data-parallel training through the sampler face and the
iterable face, killed mid-epoch (SIGKILL of the whole job) and resumed under
Lightning with its defaults: every sample trained exactly once — counted by the
model's own checkpointed state — and nothing left PENDING or LEASED.

Each job runs in its own session forked by a zygote (tests/_ddp_procs.py) that
imported Lightning once; DDP runs use gloo on CPU with two ranks.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import _ddp_procs as dp
import pytest
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset, open_ledger

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

KILLED = -9


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("lightning")
    z = dp.Zygote(str(tmp_path_factory.mktemp("zygote") / "stderr.log"))
    yield z
    z.close()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup(work: Path, n: int, **cfg: Any) -> dict[str, Any]:
    store, ledger = f"file://{work}/store", f"sqlite://{work}/ledger.db"
    dp.fill(store, ledger, n)
    return {"store": store, "ledger": ledger, "dir": str(work), "n": n, "bs": 2, **cfg}


def _run(z: dp.Zygote, cfg: dict[str, Any], **over: Any) -> int:
    return z.run("job", {**cfg, "port": _port(), **over})


def _results(work: Path, world: int) -> list[dict[str, Any]]:
    return [json.loads((work / f"result.{r}.json").read_text()) for r in range(world)]


def _assert_nothing_left(ledger: str, epochs: int) -> None:
    led = open_ledger(ledger)
    for epoch in range(epochs):
        c = led.counts(epoch=epoch)
        assert (c.pending, c.leased) == (0, 0), (epoch, c)


def _killed_then_resumed(z: dp.Zygote, cfg: dict[str, Any], world: int, resume_world: int) -> list[dict[str, Any]]:
    assert _run(z, cfg, world=world) == KILLED, f"the job was not killed: see {z.err_path}"
    assert (Path(cfg["dir"]) / "ck" / "last.ckpt").exists()
    assert _run(z, cfg, world=resume_world, kill=None, resume=True) == 0, f"resume failed: see {z.err_path}"
    return _results(Path(cfg["dir"]), resume_world)


# ---------------------------------------------------------------- (a) one rank, sampler face
@pytest.mark.slow
def test_lightning_pool_killed_mid_epoch_trains_the_whole_rest_of_the_epoch(zygote: dp.Zygote, tmp_path: Path) -> None:
    # 48 samples, batch 2: 24 steps; last.ckpt at step 4, SIGKILL after step 5 was acked.
    cfg = _setup(tmp_path, 48, kind="pool", ckpt_every=2, kill=[0, 5])
    [r] = _killed_then_resumed(zygote, cfg, 1, 1)
    assert r["seen"] == [1.0] * 48, "every sample once, in the model the resume ends with"
    assert r["len"] == 24  # len(loader) is the full epoch, also after the mid-epoch restart
    assert r["global_step"] == 24
    _assert_nothing_left(cfg["ledger"], 1)


# ---------------------------------------------------------------- DDP proof: 2 ranks, Lightning's defaults
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pool", "dataset"])
def test_lightning_ddp_killed_mid_epoch_and_resumed_trains_every_sample_once(
        zygote: dp.Zygote, tmp_path: Path, kind: str) -> None:
    # 2 ranks x batch 2 over 48 samples: 12 steps per epoch. Killed in epoch 1 after step 17
    # (last.ckpt at step 16), with DataLoader workers, so the resume starts inside epoch 1.
    cfg = _setup(tmp_path, 48, kind=kind, epochs=2, nw=2, ckpt_every=2, kill=[1, 17])
    ranks = _killed_then_resumed(zygote, cfg, 2, 2)
    for r in ranks:
        assert r["seen"] == [2.0] * 48, "every sample once per epoch, in the model the resume ends with"
        assert r["global_step"] == 24
    assert ranks[0]["batches"] == ranks[1]["batches"] == {"1": 8}  # the rest of epoch 1, evenly
    _assert_nothing_left(cfg["ledger"], 2)


# ---------------------------------------------------------------- (a) resharded on resume
@pytest.mark.slow
def test_lightning_pool_resumed_on_more_ranks_ends_the_epoch_when_the_ledger_does(
        zygote: dp.Zygote, tmp_path: Path) -> None:
    # One rank trains 5 of 24 steps (last.ckpt at 4) and is killed; two ranks resume. Lightning
    # restores "4 batches done" of an epoch that is now 12 batches long per rank, with 40 samples
    # (10 batches per rank) left: the callback counts the epoch as 2 done, so all 10 are trained.
    cfg = _setup(tmp_path, 48, kind="pool", ckpt_every=2, kill=[0, 5])
    ranks = _killed_then_resumed(zygote, cfg, 1, 2)
    for r in ranks:
        assert r["seen"] == [1.0] * 48
        assert r["len"] == 12 and r["batches"] == {"0": 10}
    _assert_nothing_left(cfg["ledger"], 1)


# ---------------------------------------------------------------- (f) the last, partial global step
def _ranks(store: str, ledger: str, world: int, bs: int, *, step0: int = 0, nw: int = 0,
           stop_after: int | None = None) -> list[list[list[tuple[str, str]]]]:
    """Every rank's batches of one pass, ranks one after another (rank 0 first), each
    batch acked at its global step as DDP would: ``[rank][batch] = [(sample id, lease)]``."""
    out = []
    for rank in range(world):
        ds = FeatureStoreDataset(store, ledger, mode="offline", rank=rank, world_size=world, batch_size=bs,
                                 lease_ttl=60, idle_timeout=30)
        batches = []
        for k, b in enumerate(DataLoader(ds, batch_size=bs, num_workers=nw), 1):
            assert ds.ack(b, step0 + k, strict=True) == []
            batches.append(list(zip(b["__sample_id__"], b["__lease__"], strict=True)))
            if k == stop_after:
                break
        out.append(batches)
    return out


def _check_pass(runs: list[list[list[list[tuple[str, str]]]]], n: int, bs: int, ledger: str) -> None:
    ids = [f"s{i:05d}" for i in range(n)]
    for ranks in runs:
        assert len({len(r) for r in ranks}) == 1, f"batches per rank differ: {[len(r) for r in ranks]}"
        assert all(len(b) == bs for r in ranks for b in r)
    items = [item for ranks in runs for r in ranks for b in r for item in b]
    assert sorted(sid for sid, lid in items if lid) == ids, "every sample trained (acked) exactly once"
    assert {sid for sid, lid in items if not lid} <= set(ids)  # pads repeat real samples
    c = open_ledger(ledger).counts(epoch=0)
    assert (c.pending, c.leased, c.trained + c.durable) == (0, 0, n)


@pytest.mark.parametrize(("world", "n", "nw"), [(2, 23, 0), (3, 23, 2), (3, 13, 0)])
def test_dataset_pads_the_last_partial_step_so_every_sample_trains(tmp_path: Path, world: int, n: int,
                                                                   nw: int) -> None:
    # 23 over 2 x 2: 5 steps + a tail of 3 (each rank 1, rank 0 one more). 23 over 3 x 2 with
    # 2 workers per rank: 3 steps + 5. 13 over 3 x 2: 2 steps + 1: ranks 1 and 2 have no
    # sample of their own in the last step and repeat rank 0's.
    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    dp.fill(store, ledger, n)
    ranks = _ranks(store, ledger, world, 2, nw=nw)
    assert len(ranks[0]) == n // (2 * world) + 1
    _check_pass([ranks], n, 2, ledger)


def test_dataset_resharded_to_a_width_that_does_not_divide_the_rest(tmp_path: Path) -> None:
    # 22 samples: 2 ranks train 2 steps (8) and stop; 3 ranks resume on 14 = 2 steps of 6 + a tail of 2.
    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    dp.fill(store, ledger, 22)
    first = _ranks(store, ledger, 2, 2, stop_after=2)
    FeatureStoreDataset(store, ledger, mode="offline").reconcile(2)
    rest = _ranks(store, ledger, 3, 2, step0=2)
    assert [len(r) for r in rest] == [3, 3, 3]
    _check_pass([first, rest], 22, 2, ledger)


def test_dataset_tail_on_redis(redis_uri: str, tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/store", f"{redis_uri}?namespace=tail{os.getpid()}"
    dp.fill(store, ledger, 13)
    _check_pass([_ranks(store, ledger, 3, 2)], 13, 2, ledger)


# ---------------------------------------------------------------- an epoch shorter than len(loader)
def test_epoch_ending_inside_an_accumulation_window_gives_its_samples_back(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from torch_dataflow.lightning import FeatureAckCallback
    from torch_dataflow.pool import FeaturePool
    from torch_dataflow.sampler import ReshardingSampler

    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    dp.fill(store, ledger, 10)
    pool = FeaturePool(store, ledger)

    class TakeOne(L.Callback):
        """Another consumer leases one sample of epoch 0 after the sampler counted it as left:
        epoch 0 yields 9 batches of len(loader) == 10, the 9th alone in its window of 2."""

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            pool.ledger.lease("someone-else", 1, 600, epoch=0, fence=pool.fence)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, accumulate_grad_batches=2, logger=False,
                        callbacks=[FeatureAckCallback(pool), TakeOne()], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(pool, batch_size=1, sampler=ReshardingSampler(pool, shuffle=False))
    trainer.fit(dp._parts()["Counter"](10), loader)
    led = open_ledger(ledger)
    # Lightning zeroes the lone batch's gradients at epoch 1's first batch: it must not be acked.
    assert len(led.trained_steps(0)) == 8
    c = led.counts(epoch=0)
    assert (c.pending, c.leased) == (1, 1)  # given back, visible; the other consumer's lease is its own
    assert len(led.trained_steps(1)) == 10


# ---------------------------------------------------------------- (g) the plain-loop recipes in docs/training.md
def test_training_md_plain_loop_recipes_are_python_on_the_real_api() -> None:
    import ast
    import re

    from torch_dataflow.acking import StepAcker

    acker = StepAcker(FeatureStoreDataset("memory://training-md", "memory://training-md"))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = doc.split("## Plain PyTorch", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    blocks = [b for b in blocks if "StepAcker" in b]  # the recipes (the others define their tiny parts)
    assert len(blocks) >= 2, "the single-process and the DDP recipe"
    for code in blocks:
        tree = ast.parse(code)  # valid Python
        used = {n.attr for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "acker"}
        assert used and all(hasattr(acker, a) for a in used), used - set(dir(acker))
    ddp = next(b for b in blocks if "dist.barrier()" in b)
    # The barrier every rank passes after its ack, before rank 0 writes; one before finish().
    assert ddp.index("acker.stepping()") < ddp.index("dist.barrier()") < ddp.index("save_atomically")
    assert ddp.rindex("dist.barrier()") < ddp.index("acker.finish()")


# ---------------------------------------------------------------- (h) a checkpoint of another run's ledger
def test_resuming_a_checkpoint_of_another_ledger_is_refused(tmp_path: Path) -> None:
    """A stale relative ckpt_path (a checkpoint of an earlier run on another ledger) used to be
    accepted: the acker took its step and the run skipped or retrained samples silently."""
    from torch_dataflow.acking import StepAcker
    from torch_dataflow.errors import ConfigError

    def ds(name: str) -> FeatureStoreDataset:
        return FeatureStoreDataset(f"memory://{name}-{tmp_path.name}", f"sqlite://{tmp_path}/{name}.db")

    first = StepAcker(ds("a"))
    state = first.state_dict()
    assert len(state["ledgers"]) == 1
    StepAcker(ds("a")).load_state_dict(state)  # the same ledger (another process opens the file): fine
    with pytest.raises(ConfigError, match="another ledger"):
        StepAcker(ds("b")).resume(from_state={**state, "step": 2})
    old = {k: v for k, v in state.items() if k != "ledgers"}  # a checkpoint written before run ids existed
    StepAcker(ds("b")).load_state_dict(old)
