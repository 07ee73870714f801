"""SpecForge 0.2.0's own runtime classes on torch_dataflow's stores and ledgers (issue 11 item 3).

SpecForge's ``DataFlowController``/``DPAckController``, ``FeatureDataLoader`` and
``TrainerController`` run unmodified against :mod:`torch_dataflow.specforge.runtime`,
with a real ``redis-server`` and a real ``mooncake_master``; the trainer is
SIGKILLed before and after a durable ack and resumed with SpecForge's own
``reconcile_on_restart``. Run as a script, this file is that trainer process.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
N, BATCH, ACCUM, LEN, HID = 16, 2, 2, 8, 4


def _need_specforge() -> None:
    try:
        import specforge.runtime.data_plane.feature_dataloader  # noqa: F401
        import specforge.training.controller  # noqa: F401
    except ImportError as e:
        hint = f"SpecForge's runtime is needed: `make setup` or `pip install --no-deps specforge==0.2.0` ({e})"
        if IN_CI:
            pytest.fail(hint)
        pytest.skip(hint)


# ----------------------------------------------------------------- servers
def _start_redis(stack: ExitStack) -> str:
    from torch_dataflow.ledger.redis_server import INSTALL_HINT, RedisServer

    if shutil.which("redis-server") is None:
        raise LookupError(INSTALL_HINT)
    return stack.enter_context(RedisServer()).uri


def _start_mooncake(stack: ExitStack) -> str:
    try:
        import mooncake.store  # noqa: F401

        from torch_dataflow.stores.mooncake_master import find_master_binary

        find_master_binary()
    except Exception as e:  # noqa: BLE001 - wheel, libibverbs or binary missing
        from torch_dataflow.stores.mooncake_master import INSTALL_HINT

        raise LookupError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    from multiprocessing import resource_tracker

    from torch_dataflow.stores.mooncake import MooncakeStore
    from torch_dataflow.stores.mooncake_master import MooncakeMaster

    resource_tracker.ensure_running()
    m = MooncakeMaster(lease_ttl_ms=300, client_ttl_s=2, segment_size="256MiB")
    m.start()
    stack.callback(m.stop)
    stack.callback(MooncakeStore.close_clients)  # runs first: drains parked removals while the master lives
    return m.uri


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str | LookupError]]:
    """A real redis-server and mooncake_master for the module, started before any test
    (so the leak check of the first test does not see them); a missing one is a reason."""
    with ExitStack() as stack:
        out: dict[str, str | LookupError] = {}
        for name, start in (("redis", _start_redis), ("mooncake", _start_mooncake)):
            try:
                out[name] = start(stack)
            except LookupError as e:
                out[name] = e
        yield out


def _ns() -> str:
    return f"sf{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["file+sqlite", "file+redis", "mooncake+redis"])
def uris(request: pytest.FixtureRequest, servers: dict[str, Any], tmp_path: Any) -> tuple[str, str]:
    """``(store URI, ledger URI)`` reachable from other processes."""
    _need_specforge()
    store_kind, ledger_kind = request.param.split("+")
    for kind in {store_kind, ledger_kind} & {"redis", "mooncake"}:
        if isinstance(servers[kind], LookupError):
            if IN_CI:
                pytest.fail(f"{kind} must run in CI: {servers[kind]}")
            pytest.skip(str(servers[kind]))
    store = (f"file://{tmp_path}/feats" if store_kind == "file"
             else f"{servers['mooncake']}?namespace={_ns()}&segment_size=0")
    ledger = (f"sqlite://{tmp_path}/ledger.db" if ledger_kind == "sqlite"
              else f"{servers['redis']}?namespace={_ns()}")
    return store, ledger


# ----------------------------------------------------------------- helpers
def _sample(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"input_ids": torch.randint(0, 100, (LEN,), generator=g),
            "loss_mask": (torch.arange(LEN) >= i % 3).long(),
            "hidden_state": torch.randn(LEN, HID, generator=g).to(torch.bfloat16)}


def _produce(be: Any, n: int = N) -> list[str]:
    """SpecForge's producer flow: ``FeatureStore.put`` then ``DataFlowController.commit_samples``."""
    from specforge.runtime.control_plane import DataFlowController

    ctl = DataFlowController("run", metadata_store=be.metadata_store)
    ids = [f"s{i:03d}" for i in range(n)]
    refs = [be.feature_store.put(_sample(i), sample_id=sid, metadata={"run_id": "run", "num_tokens": LEN})
            for i, sid in enumerate(ids)]
    assert len(ctl.commit_samples("rollout-0", refs)) == n
    return ids


class _TinyCore:
    """A duck-typed ``TrainerCore``: one linear layer, an optimizer step every ``ACCUM`` micro-batches."""

    accumulation_steps = ACCUM
    backend = None

    def __init__(self, log: str) -> None:
        self.model = torch.nn.Linear(HID, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.strategy = SimpleNamespace(trainable_module=lambda: self.model)
        self.log, self.micro = log, 0

    @property
    def accumulation_remainder(self) -> int:
        return self.micro % ACCUM

    def train_step(self, batch: Any, ctx: Any = None) -> Any:
        from specforge.training.controller import StepResult

        x = (batch.tensors["hidden_state"].float() * batch.tensors["loss_mask"][..., None]).mean(dim=1)
        loss = self.model(x).pow(2).mean()
        loss.backward()
        self.micro += 1
        stepped = self.micro % ACCUM == 0
        if stepped:
            self.opt.step()
            self.opt.zero_grad()
        _log(self.log, {"trained": list(batch.sample_ids)})
        value = loss.detach().item()
        return StepResult(optimizer_stepped=stepped, loss=value, grad_norm=None, metrics={"loss": value})


def _log(path: str, rec: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_log(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def train(store: str, ledger: str, log: str, *, crash: str = "", crash_step: int = -1, prefetch: int = 0,
          out_dir: str = "/tmp") -> int:
    """One SpecForge trainer run, as SpecForge's online consumer wires it, on our backend."""
    from specforge.runtime.control_plane import DPAckController
    from specforge.runtime.data_plane.feature_dataloader import FeatureDataLoader
    from specforge.training.controller import TrainerController

    from torch_dataflow.specforge.runtime import SpecForgeBackend

    be = SpecForgeBackend(store, ledger, lease_ttl=120)
    be.resume()  # the dead trainer's leases come back; it is fenced out
    ctl = DPAckController("run", is_authority=True, metadata_store=be.metadata_store, feature_store=be.feature_store)
    ctl.sample_queue = be.ref_queue("rank0")
    rec = ctl.reconcile_on_restart(be.feature_store)  # SpecForge's own restart rule
    _log(log, {"released": sorted(rec["released"]), "requeued": sorted(rec["requeued"]), "step": rec["global_step"]})

    def ack_fn(ids: list[str], step: int) -> None:
        if crash == "before_ack" and step == crash_step:
            os.kill(os.getpid(), signal.SIGKILL)
        ctl.ack_train_refs("trainer-0", ids, global_step=step, optimizer_durable=True)
        _log(log, {"acked": list(ids), "step": step})
        if crash == "after_ack" and step == crash_step:
            os.kill(os.getpid(), signal.SIGKILL)

    loader = FeatureDataLoader(be.feature_store, queue=ctl.sample_queue, batch_size=BATCH, num_workers=prefetch)
    trainer = TrainerController(_TinyCore(log), run_id="run", output_dir=out_dir, ack_fn=ack_fn,
                                start_step=rec["global_step"] or 0, log_interval=10**9)
    try:
        return trainer.fit(loader)
    finally:
        loader.close()
        trainer.close_profiler()


def _check_exactly_once(be: Any, ids: list[str], log: str, steps: int) -> None:
    recs = _read_log(log)
    acked = Counter(s for r in recs if "acked" in r for s in r["acked"])
    assert set(acked) == set(ids) and set(acked.values()) == {1}, acked
    marker = be.metadata_store.durable_marker()
    assert marker["acked"] == set(ids) and marker["global_step"] == steps and marker["optimizer_durable"]
    c = be.ledger.counts(0)
    assert (c.pending, c.leased, c.trained, c.durable) == (0, 0, 0, len(ids))
    be.feature_store.drain_pending_removals(retry_interval_s=0.2)
    assert be.store.keys() == []  # every durably acked sample's bytes are gone
    assert be.feature_store.health()["release_pending"] == 0


# ------------------------------------------------------------------- tests
def test_refs_round_trip_through_the_ledger(tmp_path: Any) -> None:
    _need_specforge()
    from torch_dataflow.errors import ConfigError
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    be = SpecForgeBackend(f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db")
    meta = {"run_id": "r7", "num_tokens": LEN, "strategy": "eagle3", "target_repr": "hidden_state",
            "tokenizer_version": "tok-2", "ttt_length": 7}
    t = _sample(0) | {"target": torch.randn(LEN, HID)}
    put = be.feature_store.put(t, sample_id="a", metadata=meta)
    assert be.metadata_store.commit_samples([put]) == [True]
    got = be.metadata_store.get_committed("a")
    assert got == put  # every SpecForge field survives the ledger (here SQLite, JSON)
    assert (got.run_id, got.num_tokens, got.tokenizer_version, got.metadata["ttt_length"]) == ("r7", LEN, "tok-2", 7)
    assert got.feature_specs["target"].target_repr == "hidden_state"
    assert got.feature_specs["hidden_state"].dtype == "bfloat16" and got.feature_specs["input_ids"].shape == (LEN,)
    tensors, handle = be.feature_store.get(got, names=["input_ids", "hidden_state"])
    assert sorted(tensors) == ["hidden_state", "input_ids"] and torch.equal(tensors["input_ids"], t["input_ids"])
    be.feature_store.release(handle)
    assert be.store.keys() == [("a", 1)]  # release frees nothing: the ledger decides
    from specforge.runtime.data_plane.feature_store import LocalFeatureStore

    foreign = LocalFeatureStore().put(_sample(1), sample_id="b", metadata={})
    with pytest.raises(ConfigError, match="not written through torch_dataflow"):
        be.metadata_store.commit_samples([foreign])


def test_metadata_store_contract(tmp_path: Any) -> None:
    _need_specforge()
    from torch_dataflow.errors import SampleAborted
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    be = SpecForgeBackend(f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db")
    fs, ms = be.feature_store, be.metadata_store
    refs = [fs.put(_sample(i), sample_id=f"s{i}", metadata={}) for i in range(4)]
    assert ms.commit_samples(refs[:2] + refs[:1]) == [True, True, False]  # idempotent on sample id
    assert ms.commit_sample(refs[2]) is True and ms.commit_sample(refs[2]) is False
    assert fs.put(_sample(9), sample_id="s0", metadata={}) == refs[0]  # a retry keeps the committed bytes
    assert ms.is_committed("s1") and not ms.is_committed("s3") and ms.get_committed("s3") is None
    assert ms.committed_count() == 3 and ms.all_committed_ids() == ["s0", "s1", "s2"]
    fs.abort("s3", reason="producer failed")  # written, never committed: bytes gone, commit refused later
    assert be.store.keys() == [("s0", 1), ("s1", 1), ("s2", 1)]
    with pytest.raises(SampleAborted):
        ms.commit_samples([refs[3]])

    q = be.ref_queue("rank0")
    leased = q.get(2)
    assert [r.sample_id for r in leased] == ["s0", "s1"] and q.in_flight() == 2 and q.depth() == 1
    ms.record_train_ack(["s0"], global_step=1, optimizer_durable=False)
    assert ms.durable_marker() == {"acked": set(), "global_step": None, "optimizer_durable": False}
    ms.record_train_ack(["s1"], global_step=2, optimizer_durable=True)
    assert ms.durable_marker() == {"acked": {"s0", "s1"}, "global_step": 2, "optimizer_durable": True}
    assert sorted(be.store.keys()) == [("s2", 1)]  # durable: freed by the ledger at once
    ms.record_train_ack(["s1"], global_step=2, optimizer_durable=True)  # a repeated ack changes nothing
    with pytest.raises(KeyError):
        fs.get(refs[0])  # use after free is a KeyError, as SpecForge's stores raise
    fs.abort("s1", reason="optimizer-boundary-durable-ack")  # what DPAckController does next: a no-op
    fs.abort("s2", reason="dropped")
    assert be.store.keys() == [] and ms.all_committed_ids() == ["s0", "s1"]
    assert fs.gc()["release_pending"] == 0 and fs.health()["resident_samples"] == 0


def test_ack_of_an_unleased_sample_is_refused(tmp_path: Any) -> None:
    _need_specforge()
    from torch_dataflow.errors import LeaseLost
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    be = SpecForgeBackend(f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db")
    _produce(be, 2)
    with pytest.raises(LeaseLost, match="not leased to a trainer"):
        be.metadata_store.record_train_ack(["s000"], global_step=1, optimizer_durable=True)
    assert be.metadata_store.durable_marker()["acked"] == set() and len(be.store.keys()) == 2


@pytest.mark.parametrize("prefetch", [0, 2])
def test_specforge_trainer_trains_each_sample_once(uris: tuple[str, str], tmp_path: Any, prefetch: int) -> None:
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    store, ledger = uris
    be = SpecForgeBackend(store, ledger)
    ids = _produce(be)
    log = str(tmp_path / "log.jsonl")
    assert train(store, ledger, log, prefetch=prefetch, out_dir=str(tmp_path)) == N // (BATCH * ACCUM)
    trained = Counter(s for r in _read_log(log) if "trained" in r for s in r["trained"])
    assert set(trained.values()) == {1} and set(trained) == set(ids)
    _check_exactly_once(be, ids, log, N // (BATCH * ACCUM))


@pytest.mark.timeout(600)
def test_sigkill_before_and_after_ack_then_resume(uris: tuple[str, str], tmp_path: Any) -> None:
    """SpecForge's crash-before/after-ack flow: a trainer SIGKILLed at an optimizer boundary
    before its durable ack retrains that step's samples; one killed right after the ack does not."""
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    store, ledger = uris
    be = SpecForgeBackend(store, ledger)
    ids = _produce(be)
    log = str(tmp_path / "log.jsonl")

    def run(*args: str) -> int:
        cmd = [sys.executable, __file__, store, ledger, log, str(tmp_path), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert p.returncode in (0, -signal.SIGKILL), p.stderr[-3000:]
        return p.returncode

    assert run("before_ack", "2") == -signal.SIGKILL  # step 1 acked, step 2 trained, not acked
    assert run("after_ack", "3") == -signal.SIGKILL  # resumed: steps 2 and 3 acked, then killed
    assert run() == 0  # resumed again: step 4, done
    recs = _read_log(log)
    starts = [r for r in recs if "requeued" in r]
    assert [r["step"] for r in starts] == [None, 1, 3]
    assert [len(r["released"]) for r in starts] == [0, 4, 12] and [len(r["requeued"]) for r in starts] == [16, 12, 4]
    trained = Counter(s for r in recs if "trained" in r for s in r["trained"])
    assert sum(trained.values()) == N + BATCH * ACCUM  # only the unacked step 2 was trained twice
    assert sorted(Counter(trained.values()).items()) == [(1, N - BATCH * ACCUM), (2, BATCH * ACCUM)]
    _check_exactly_once(be, ids, log, N // (BATCH * ACCUM))


def test_a_resumed_trainer_fences_the_old_one_out(tmp_path: Any) -> None:
    _need_specforge()
    from torch_dataflow.errors import Fenced, LeaseLost
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    store, ledger = f"file://{tmp_path}/s", f"sqlite://{tmp_path}/l.db"
    old = SpecForgeBackend(store, ledger)
    ids = _produce(old)
    old.resume()
    old_queue = old.ref_queue("rank0")
    taken = [r.sample_id for r in old_queue.get(4)]
    new = SpecForgeBackend(store, ledger)
    new.resume(takeover=True)  # the old trainer looks dead (a hung host): a new one takes the run over
    new_queue = new.ref_queue("rank0")
    first = [r.sample_id for r in new_queue.get(4)]
    assert sorted(first) == sorted(taken)  # the old trainer's leases came back
    with pytest.raises(Fenced):
        old.metadata_store.record_train_ack(taken, global_step=1, optimizer_durable=True)
    with pytest.raises(Fenced):
        old_queue.get(2)
    acked = list(first)
    new.metadata_store.record_train_ack(first, global_step=1, optimizer_durable=True)
    for step in itertools.count(2):
        refs = new_queue.get(4)
        if not refs:
            break
        new.metadata_store.record_train_ack([r.sample_id for r in refs], global_step=step, optimizer_durable=True)
        acked += [r.sample_id for r in refs]
    assert sorted(acked) == ids and new.metadata_store.durable_marker()["acked"] == set(ids)
    with pytest.raises(LeaseLost):  # Fenced is a LeaseLost: old handlers that catch LeaseLost still stop
        old.metadata_store.record_train_ack(taken, global_step=9, optimizer_durable=True)
    assert new.store.keys() == []


def test_streams_from_a_capture_producer_until_it_is_done(uris: tuple[str, str], tmp_path: Any) -> None:
    """Online: a capture producer puts padded batches through ``FeatureWriter`` while SpecForge's
    loader streams them (``wait_for_stream``); the loader ends when the producer closes."""
    import threading

    from specforge.runtime.control_plane import DPAckController
    from specforge.runtime.data_plane.feature_dataloader import FeatureDataLoader

    from torch_dataflow import FeatureWriter
    from torch_dataflow.specforge.capture import CaptureBatch, put_capture
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    store, ledger = uris
    rows, batches = 4, 5
    produced: list[str] = []
    go = threading.Event()

    def producer() -> None:
        with FeatureWriter(store, ledger, name="capture-0") as w:
            for b in range(batches):
                lens = torch.tensor([LEN - (r + b) % 3 for r in range(rows)])
                att = (torch.arange(LEN)[None] < lens[:, None]).long()
                batch = CaptureBatch(input_ids=torch.randint(1, 100, (rows, LEN)) * att, attention_mask=att,
                                     loss_mask=att.clone(), hidden_states=torch.randn(rows, LEN, 3 * HID),
                                     last_hidden_states=torch.randn(rows, LEN, HID))
                ids = [f"b{b}r{r}" for r in range(rows)]
                put_capture(w, batch, ids, dtype=torch.bfloat16)
                produced.extend(ids)
                go.set()
                time.sleep(0.2)  # the trainer catches up and must wait, not end

    be = SpecForgeBackend(store, ledger)
    be.resume()
    ctl = DPAckController("run", metadata_store=be.metadata_store, feature_store=be.feature_store)
    ctl.sample_queue = be.ref_queue("rank0", wait_for_stream=True, stream_timeout_s=60)
    t = threading.Thread(target=producer)
    t.start()
    try:
        go.wait(60)
        got: list[str] = []
        for step, batch in enumerate(FeatureDataLoader(be.feature_store, queue=ctl.sample_queue, batch_size=2,
                                                       collate_fn=_pad_collate), start=1):
            got += batch.sample_ids
            ctl.ack_train_refs("trainer-0", batch.sample_ids, global_step=step, optimizer_durable=True)
    finally:
        t.join()
    assert sorted(got) == sorted(produced) and len(produced) == rows * batches
    assert be.metadata_store.durable_marker()["acked"] == set(produced)
    be.feature_store.drain_pending_removals(retry_interval_s=0.2)
    assert be.store.keys() == []


def _pad_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from torch_dataflow.eagle3 import Eagle3Collator

    return Eagle3Collator(max_len=2048)(samples)


def train_dp(store: str, ledger: str, log: str, rank: int, world: int, port: int, max_steps: int | None,
             out_dir: str) -> None:
    """One rank of a SpecForge DP trainer (gloo): ``DPAckController`` acks the ranks' union
    through ``all_gather_object``; the ranks follow one ledger plan."""
    import torch.distributed as dist
    from specforge.runtime.control_plane import DPAckController, InMemoryMetadataStore
    from specforge.runtime.data_plane.feature_dataloader import FeatureDataLoader
    from specforge.training.controller import TrainerController

    from torch_dataflow.specforge.runtime import SpecForgeBackend

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        be = SpecForgeBackend(store, ledger, lease_ttl=120)
        if rank == 0:
            be.resume()
        dist.barrier()
        if rank:
            be.join()
        ctl = DPAckController("run", is_authority=rank == 0, feature_store=be.feature_store,
                              metadata_store=be.metadata_store if rank == 0 else InMemoryMetadataStore())
        ctl.sample_queue = be.ref_queue(f"rank{rank}", rank=rank, world=world)
        start = [ctl.reconcile_on_restart(be.feature_store)["global_step"] if rank == 0 else None]
        dist.broadcast_object_list(start, src=0)

        def ack_fn(ids: list[str], step: int) -> None:
            ctl.ack_train_refs(f"trainer-{rank}", ids, global_step=step, optimizer_durable=True)
            _log(f"{log}.w{world}r{rank}", {"acked": list(ids), "step": step})

        loader = FeatureDataLoader(be.feature_store, queue=ctl.sample_queue, batch_size=BATCH)
        TrainerController(_TinyCore(f"{log}.w{world}r{rank}"), run_id="run", output_dir=out_dir, ack_fn=ack_fn,
                          max_steps=max_steps, start_step=start[0] or 0, log_interval=10**9).fit(loader)
        # Both ranks leave every collective before either tears gloo down: a rank that destroyed its
        # group while the other was still in one aborted the other (SIGABRT, about 1 run in 45 here).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_dp_two_ranks_then_resume_on_one(uris: tuple[str, str], tmp_path: Any) -> None:
    """SpecForge's DP ack on two gloo ranks for one optimizer step, then a restart with DP
    size 1 (SpecForge's own online resume refuses a changed DP size): each sample acked once."""
    from torch_dataflow.ledger.redis_server import free_port
    from torch_dataflow.specforge.runtime import SpecForgeBackend

    store, ledger = uris
    be = SpecForgeBackend(store, ledger)
    ids = _produce(be)
    log = str(tmp_path / "log")

    def run(world: int, max_steps: str) -> None:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "dp", store, ledger, log, str(tmp_path), str(rank),
                                   str(world), str(port), max_steps], stderr=subprocess.PIPE, text=True)
                 for rank in range(world)]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * world, "\n".join(e[-3000:] for e in errs)

    run(2, "1")
    logs = {f"w2r{r}": _read_log(f"{log}.w2r{r}") for r in range(2)}
    per_rank = [sum(len(x["acked"]) for x in recs if "acked" in x) for recs in logs.values()]
    assert per_rank == [BATCH * ACCUM, BATCH * ACCUM]  # one optimizer step, one full batch pair per rank
    run(1, "0")  # max_steps=0: no cap
    recs = [x for f in ("w2r0", "w2r1", "w1r0") for x in _read_log(f"{log}.{f}")]
    acked = Counter(sid for x in recs if "acked" in x for sid in x["acked"])
    assert set(acked) == set(ids) and set(acked.values()) == {1}
    steps = N // (BATCH * ACCUM) - 1  # the first optimizer step consumed both ranks' batches
    assert be.metadata_store.durable_marker() == {"acked": set(ids), "global_step": steps, "optimizer_durable": True}
    be.feature_store.drain_pending_removals(retry_interval_s=0.2)
    assert be.store.keys() == []


if __name__ == "__main__":  # the trainer processes of the SIGKILL and DP tests
    if sys.argv[1] == "dp":
        _store, _ledger, _log_path, _out, _rank, _world, _port, _max = sys.argv[2:]
        train_dp(_store, _ledger, _log_path, int(_rank), int(_world), int(_port), int(_max) or None, _out)
    else:
        _store, _ledger, _log_path, _out, *rest = sys.argv[1:]
        _crash, _step = (rest[0], int(rest[1])) if rest else ("", -1)
        train(_store, _ledger, _log_path, crash=_crash, crash_step=_step, out_dir=_out)
