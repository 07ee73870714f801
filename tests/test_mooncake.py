"""The Mooncake store against a real ``mooncake_master`` (and store server) on loopback.

Needs the ``mooncake`` wheel and libibverbs; outside CI their absence skips
these tests with the install command, in CI (``CI=true``) it fails them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
import torch

from torch_dataflow.errors import BackendUnavailable, ConfigError, SampleUnavailable, StoreFull
from torch_dataflow.refs import SampleRef
from torch_dataflow.stores import open_store
from torch_dataflow.testing import StoreConformance, sample_tensors

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LEASE_TTL_MS = 300  # short, so parked removals drain quickly
CLIENT_TTL_S = 2  # a dead writer's objects are dropped by the master after this

pytestmark = [pytest.mark.mooncake, pytest.mark.timeout(300)]


def _mooncake_problem() -> str | None:
    try:
        import mooncake.store  # noqa: F401

        from torch_dataflow.stores.mooncake_master import find_master_binary

        find_master_binary()
    except Exception as e:  # ImportError (wheel or libibverbs missing) or ConfigError (no binary)
        from torch_dataflow.stores.mooncake_master import INSTALL_HINT

        return f"{INSTALL_HINT} ({type(e).__name__}: {e})"
    return None


@pytest.fixture(scope="session")
def master() -> Any:
    problem = _mooncake_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"Mooncake tests must run in CI: {problem}")
        pytest.skip(problem)
    # multiprocessing's resource tracker is a child that lives as long as pytest:
    # start it now so the leak check does not blame the first test that spawns.
    from multiprocessing import resource_tracker

    from torch_dataflow.stores.mooncake import MooncakeStore
    from torch_dataflow.stores.mooncake_master import MooncakeMaster

    resource_tracker.ensure_running()
    m = MooncakeMaster(lease_ttl_ms=LEASE_TTL_MS, client_ttl_s=CLIENT_TTL_S, segment_size="768MiB")
    m.start()
    try:
        yield m
    finally:
        MooncakeStore.close_clients()  # before the master goes: drains parked removals
        m.stop()


def _ns() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _store(master: Any, **kw: Any) -> Any:
    from torch_dataflow.stores.mooncake import MooncakeStore

    kw.setdefault("namespace", _ns())
    kw.setdefault("segment_size", 0)  # objects go to the fixture's store server
    return MooncakeStore(master.address, **kw)


def _raw(store: Any) -> Any:
    """The process's native Mooncake client behind ``store`` (for checks through its API)."""
    return store._client().connect()


def _wait_drained(store: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while store.gc() and time.monotonic() < deadline:
        time.sleep(LEASE_TTL_MS / 1000)
    assert store.pending_removals() == []


# ------------------------------------------------------------ conformance
class TestMooncakeStore(StoreConformance):
    """The whole store contract, real master, real clients, objects in the store server."""

    zero_copy_survives_delete = True  # views are of a buffer private to the caller
    transfer = "direct"

    @pytest.fixture(autouse=True)
    def _master(self, master: Any) -> None:
        self.master = master

    def make_store(self, **kw: Any) -> Any:
        return _store(self.master, transfer=self.transfer, **kw)

    def attach_store(self, store: Any, **kw: Any) -> Any:
        return _store(self.master, namespace=store.namespace, transfer=self.transfer, **kw)

    def discard_store(self, store: Any) -> None:
        try:
            for sid, gen in list(store.keys()):
                store._delete(sid, gen)
            store.gc(force=True)
        except Exception:  # a test that left the store unusable (auth) still closes it
            pass
        store.close()

    def corrupt(self, store: Any, ref: SampleRef, how: Any) -> None:
        data = how if isinstance(how, bytes) else how(self.raw_read(store, ref))
        # Mooncake cannot hold an empty object (put of 0 bytes: -600), so the
        # shortest truncation it can hold is one byte.
        self.raw_write(store, ref, data or b"\0")


class TestMooncakeStoreStaging(TestMooncakeStore):
    """The same contract through the pre-registered staging arena."""

    transfer = "staging"


# ------------------------------------------------------ configuration, errors
def test_uri_options_and_overrides() -> None:
    from torch_dataflow.stores.mooncake import MooncakeStore

    s = open_store(
        "mooncake://127.0.0.1:50051?protocol=rdma&devices=mlx5_0&segment_size=2GiB&buffer_size=32MiB"
        "&metadata_server=P2PHANDSHAKE&local_hostname=10.0.0.1&max_bytes=1GiB&namespace=run7",
        segment_size=0,
    )
    assert isinstance(s, MooncakeStore)
    assert (s.cfg.protocol, s.cfg.devices, s.cfg.segment_size, s.cfg.buffer_size) == ("rdma", "mlx5_0", 0, 32 << 20)
    assert (s.cfg.local_hostname, s.max_bytes, s.namespace) == ("10.0.0.1", 1 << 30, "run7")
    assert s.uri == "mooncake://127.0.0.1:50051?namespace=run7"
    assert pickle.loads(pickle.dumps(s))._config_state() == s._config_state()
    for bad in ("mooncake://h:1?bogus=1", "mooncake://h:1?protocol=udp", "mooncake://h", "mooncake://h:1/p"):
        with pytest.raises(ConfigError):
            open_store(bad)


def test_package_imports_without_mooncake_and_hints_install() -> None:
    code = (
        "import sys; sys.modules['mooncake'] = None\n"
        "import torch_dataflow, torch_dataflow.stores.mooncake\n"
        "from torch_dataflow.stores import open_store\n"
        "s = open_store('mooncake://127.0.0.1:1')\n"
        "try:\n    s.keys()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'torch-dataflow[mooncake-cpu]'" in out.stdout
    assert "mooncake-transfer-engine-non-cuda" in out.stdout


def test_unreachable_master_fails_fast(master: Any) -> None:
    from torch_dataflow.stores.mooncake_master import free_port

    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="not reachable"):
        open_store(f"mooncake://127.0.0.1:{free_port()}?connect_timeout=1").keys()
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------- lifetime, removal
def test_removal_under_read_lease_is_parked_then_drained(master: Any) -> None:
    s = _store(master)
    ref = s.put("s", 1, sample_tensors())
    s.get(ref)  # takes a read lease: Mooncake refuses the remove (-706)
    assert s.delete(ref) is True
    assert s.pending_removals() == [("s", 1)]
    assert not s.exists(ref) and s.keys() == [] and s.health().count == 0
    with pytest.raises(SampleUnavailable):
        s.get(ref)
    assert _raw(s).is_exist(s._key("s", 1)) == 1  # bytes still held under the lease
    _wait_drained(s)
    assert _raw(s).is_exist(s._key("s", 1)) == 0
    s.close()


def test_parked_removal_is_forced_after_force_after(master: Any) -> None:
    s = _store(master, force_after=0.0)
    ref = s.put("s", 1, sample_tensors())
    s.get(ref)
    s.delete(ref)  # parked: the lease is live, but force_after=0 forces at the next gc
    assert s.gc() == 0
    assert _raw(s).is_exist(s._key("s", 1)) == 0
    s.close()


def test_close_forces_parked_removals(master: Any) -> None:
    s = _store(master)
    ref = s.put("s", 1, sample_tensors())
    s.get(ref)
    s.delete(ref)
    s.close()
    assert _raw(_store(master)).is_exist(f"{s.namespace}/s@1") == 0


def test_objects_are_hard_pinned_and_keyed_per_generation(master: Any) -> None:
    s = _store(master)
    r1 = s.put("s", 1, {"x": torch.zeros(4)})
    r2 = s.put("s", 2, {"x": torch.ones(4)})
    descs = _raw(s).get_replica_desc(s._key("s", 2))
    assert descs, "no replica"
    assert s.get(r1)["x"].sum() == 0 and s.get(r2)["x"].sum() == 4
    assert s._client().put_cfg.with_hard_pin
    s.close()


def test_store_full_is_store_full(tmp_path: Any) -> None:
    if problem := _mooncake_problem():
        if IN_CI:
            pytest.fail(f"Mooncake tests must run in CI: {problem}")
        pytest.skip(problem)
    from torch_dataflow.stores.mooncake import MooncakeStore
    from torch_dataflow.stores.mooncake_master import MooncakeMaster

    with MooncakeMaster(lease_ttl_ms=LEASE_TTL_MS) as m:  # no store server: only the writer's segment
        s = MooncakeStore(m.address, segment_size="16MiB", namespace=_ns())
        refs = []
        try:
            with pytest.raises(StoreFull, match="-200"):
                for i in range(40):  # Mooncake rounds segments up: fill until it refuses
                    refs.append(s.put(f"b{i}", 1, {"x": torch.zeros(1 << 20)}))  # 4 MiB each
            assert 0 < len(refs) < 40
            s.delete(refs.pop())  # room again once a sample is freed
            refs.append(s.put("again", 1, {"x": torch.zeros(1 << 20)}))
            assert s.exists(refs[-1])
        finally:
            s._client().close()  # this master's client only; the session's stays


# -------------------------------------------------------------- no leak
def test_no_leak_after_1000_samples(master: Any) -> None:
    s = _store(master)
    refs: list[SampleRef] = []
    for b in range(0, 1000, 50):
        refs += s.put_many([(f"n{i}", 1, {"x": torch.full((256,), i)}, None) for i in range(b, b + 50)])
    read = refs[::2]  # "trained" samples are read first (leased), the others aborted unread
    for got, ref in zip(s.get_many(read), read, strict=True):
        assert int(got["x"][0]) == int(ref.sample_id[1:])
    for ref in refs:
        assert s.delete(ref)
    _wait_drained(s)
    keys = [s._key(r.sample_id, r.generation) for r in refs]
    assert set(_raw(s).batch_is_exist(keys)) == {0}
    assert s.keys() == [] and s.health().count == 0
    s.close()


# ------------------------------------------------------------ processes
def _producer(uri: str, ledger_uri: str, n: int, segment_size: int, die: bool, done: Any,
              ready: Any = None) -> None:
    from torch_dataflow.ledger import open_ledger

    store, ledger = open_store(uri, segment_size=segment_size), open_ledger(ledger_uri)
    if ready is not None:
        ready.wait(120)
    for i in range(n):
        sid = f"p{i}"
        [gen] = ledger.reserve([sid])
        ledger.commit([store.put(sid, gen, {"x": torch.full((4096,), i), "i": torch.tensor(i)})])
    if die:
        os.kill(os.getpid(), 9)  # mid-run: committed, unconsumed samples in its segment
    ledger.producer_done("producer")
    done.wait(120)  # objects live in this process's segment: stay until consumers finish


def _consumer(uri: str, ledger_uri: str, owner: str, out: Any, ready: Any = None) -> None:
    from torch_dataflow.ledger import open_ledger

    store, ledger = open_store(uri, segment_size=0), open_ledger(ledger_uri)
    if ready is not None:
        ready.wait(120)
    seen, step = [], 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        leases = ledger.lease(owner, 3, ttl=60)
        if not leases:
            if ledger.is_closed() and ledger.counts().pending == 0:
                break
            time.sleep(0.02)
            continue
        got = store.get_many([lease.ref for lease in leases])
        for lease, t in zip(leases, got, strict=True):
            i = int(t["i"])
            assert lease.sample_id == f"p{i}" and bool((t["x"] == i).all())
            seen.append(lease.sample_id)
        step += 1
        assert ledger.ack([lease.lease_id for lease in leases], step) == []
    out.put(seen)


@pytest.mark.slow
def test_cross_process_producer_two_consumers_exactly_once(master: Any, tmp_path: Any) -> None:
    from torch_dataflow.ledger import open_ledger

    ledger_uri, ns, n = f"sqlite:///{tmp_path}/ledger.db", _ns(), 40
    uri = f"{master.uri}?namespace={ns}"
    ledger = open_ledger(ledger_uri)
    ledger.register_producer("producer")
    ctx = mp.get_context("spawn")
    done, out = ctx.Event(), ctx.Queue()
    ready = ctx.Barrier(3)  # every process is up before the first put: the split does not hang on start-up times
    prod = ctx.Process(target=_producer, args=(uri, ledger_uri, n, 64 << 20, False, done, ready))
    cons = [ctx.Process(target=_consumer, args=(uri, ledger_uri, f"c{k}", out, ready)) for k in range(2)]
    prod.start()
    for c in cons:
        c.start()
    try:
        seen = [out.get(timeout=180) for _ in cons]
        for c in cons:
            c.join(60)
            assert c.exitcode == 0
        assert not set(seen[0]) & set(seen[1]), "a sample was delivered twice"
        assert sorted(seen[0] + seen[1]) == sorted(f"p{i}" for i in range(n))
        assert seen[0] and seen[1], "both consumers should have taken part"
        assert ledger.counts().trained == n
        freed = ledger.mark_durable(10**6, retain=False)  # then free while the producer still holds them
        s = open_store(uri, segment_size=0)
        assert all(s.delete(r) for r in freed) and len(freed) == n
        _wait_drained(s)
        assert set(_raw(s).batch_is_exist([s._key(r.sample_id, r.generation) for r in freed])) == {0}
    finally:
        done.set()  # the producer exits only after the consumers finished
        prod.join(60)
        for p in [prod, *cons]:
            if p.is_alive():
                p.kill()
                p.join()
    assert prod.exitcode == 0


@pytest.mark.slow
@pytest.mark.parametrize("holder", ["writer", "store-server"])
def test_producer_death_mid_run(master: Any, tmp_path: Any, holder: str) -> None:
    """Defined behaviour: objects in the dead writer's own segment are gone; a read
    raises SampleUnavailable promptly (before and after the master drops the
    writer), never hangs, and the consumer aborts the sample. Objects placed in a
    store server (writer segment_size=0) survive their writer."""
    from torch_dataflow.ledger import open_ledger

    ledger_uri, ns, n = f"sqlite:///{tmp_path}/ledger.db", _ns(), 6
    uri = f"{master.uri}?namespace={ns}"
    ledger = open_ledger(ledger_uri)
    ledger.register_producer("producer")
    ctx = mp.get_context("spawn")
    seg = 64 << 20 if holder == "writer" else 0
    unused = ctx.Event()  # keep a reference: the child unpickles it after start()
    prod = ctx.Process(target=_producer, args=(uri, ledger_uri, n, seg, True, unused))
    prod.start()
    prod.join(120)
    assert prod.exitcode == -9
    s = open_store(uri, segment_size=0)
    leases = ledger.lease("consumer", n, ttl=60)
    assert len(leases) == n
    for k, lease in enumerate(leases):
        if k == n // 2 and holder == "writer":
            time.sleep(CLIENT_TTL_S + 1.5)  # the master has dropped the dead client by now
        t0 = time.monotonic()
        if holder == "writer":
            with pytest.raises(SampleUnavailable, match=lease.sample_id):
                s.get(lease.ref)
            assert ledger.abort([lease.sample_id]) is not None
        else:
            assert int(s.get(lease.ref)["i"]) == int(lease.sample_id[1:])
            assert ledger.ack([lease.lease_id], 1) == []
            assert s.delete(lease.ref)
        assert time.monotonic() - t0 < 10, "a read of a dead writer's sample must not hang"
    counts = ledger.counts()
    assert (counts.aborted, counts.trained) == ((n, 0) if holder == "writer" else (0, n))
    if holder == "writer":  # nothing is left behind either way
        time.sleep(CLIENT_TTL_S + 0.5)
    else:
        _wait_drained(s)
    keys = [f"{ns}/p{i}@1" for i in range(n)]
    assert set(_raw(s).batch_is_exist(keys)) == {0}


_FORK_SCRIPT = """
import multiprocessing as mp, sys
from torch_dataflow.refs import SampleRef
from torch_dataflow.stores import open_store

def read(store, ref_json, q):
    try:
        q.put(store.get(SampleRef.from_json(ref_json))["input_ids"].tolist())
    except Exception as e:
        q.put(f"{type(e).__name__}: {e}")

def fork_read(store, ref_json):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=read, args=(store, ref_json, q))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    return got

if __name__ == "__main__":
    uri, ref_json = sys.argv[1], sys.argv[2]
    store = open_store(uri, segment_size=0)
    print(repr(fork_read(store, ref_json)))   # forked before this process connected
    print(repr(store.get(SampleRef.from_json(ref_json))["input_ids"].tolist()))
    print(repr(fork_read(store, ref_json)))   # forked after
    type(store).close_clients()
    print(repr(fork_read(store, ref_json)))   # forked after the parent closed its client: still refused
"""


@pytest.mark.slow
def test_fork_before_and_after_connect(master: Any, tmp_path: Any) -> None:
    """Stores connect lazily, so DataLoader workers forked before the parent used
    the store connect on their own. Forked after, Mooncake would deadlock: the
    worker gets a ConfigError that says to use spawn/forkserver, never a hang."""
    s = _store(master)
    ref, t = s.put("f", 1, sample_tensors()), sample_tensors()
    script = tmp_path / "fork_script.py"
    script.write_text(_FORK_SCRIPT)
    uri = f"{master.uri}?namespace={s.namespace}"
    out = subprocess.run([sys.executable, str(script), uri, ref.to_json()], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    before, parent, after, closed = out.stdout.strip().splitlines()[-4:]
    want = repr(t["input_ids"].tolist())
    assert before == want and parent == want
    assert after.lstrip("'\"").startswith("ForkedClient") and "spawn" in after  # a ConfigError subclass
    assert closed.lstrip("'\"").startswith("ForkedClient"), closed  # it used to hang here
    s.close()


@pytest.mark.slow
@pytest.mark.allow_leaks  # multiprocessing's forkserver lives on, as it does for users
def test_feature_loader_workers_after_the_parent_used_the_store(master: Any, tmp_path: Any) -> None:
    """A resumed online run drains deletes in the main process (this pytest process has used
    Mooncake clients too) before the loader starts its workers: FeatureLoader then starts them
    with forkserver, so 2 workers deliver every sample once instead of failing to connect."""
    from torch_dataflow import FeatureLoader, FeatureStoreDataset, FeatureWriter

    s = _store(master)
    uri, led = f"{master.uri}?namespace={s.namespace}&segment_size=0", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(uri, led, name="p") as w:
        for i in range(12):
            w.put(f"s{i}", {"x": torch.full((4,), float(i))})
    ds = FeatureStoreDataset(uri, led, mode="online", idle_timeout=5)
    ds.reconcile(None)  # the main process drains (and so uses the store) before any worker exists
    assert ds.store.get(ds.ledger.committed_refs(["s0"])["s0"])["x"][0] == 0  # used here, for sure
    from torch.utils.data import DataLoader

    from torch_dataflow.errors import ForkedClient

    with pytest.raises(ForkedClient) as got:  # a plain DataLoader forks: the error says what to do
        next(iter(DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="fork")))
    assert "forkserver" in str(got.value) and "cannot serve ledger" not in str(got.value)  # not a path problem
    loader = FeatureLoader(ds, batch_size=4, num_workers=2)
    assert loader.multiprocessing_context is not None  # chosen for the user: fork would fail
    seen = []
    for step, batch in enumerate(loader, 1):
        seen += list(batch["__sample_id__"])
        ds.ack(batch, step, strict=True)
    assert sorted(seen) == sorted(f"s{i}" for i in range(12))


def test_delete_queue_on_a_real_master(master: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 3 on Mooncake: a removal that fails stays in the ledger's delete
    queue (not in process memory), and the next drain (any process) removes it from the master."""
    from torch_dataflow.gc import drain_deletes
    from torch_dataflow.ledger import open_ledger
    from torch_dataflow.stores.mooncake import MooncakeStore

    s = _store(master)
    led = open_ledger(f"sqlite://{tmp_path}/l.db")
    gens = led.reserve(["a", "b"])
    refs = [s.put(sid, g, sample_tensors()) for sid, g in zip(["a", "b"], gens, strict=True)]
    led.commit(refs)
    leases = led.lease("t", 2, ttl=30)
    led.ack([x.lease_id for x in leases], 1)
    real = MooncakeStore._delete

    def failing(self: Any, sid: str, gen: int) -> bool:
        if sid == "a":
            raise BackendUnavailable("mooncake remove: transfer failed")
        return real(self, sid, gen)

    monkeypatch.setattr(MooncakeStore, "_delete", failing)
    freed = led.mark_durable(1, retain=False)
    assert drain_deletes(led, s, freed) == (1, 1)
    assert [r.sample_id for r in led.pending_deletes()] == ["a"] and s.exists(refs[0]) and not s.exists(refs[1])
    monkeypatch.setattr(MooncakeStore, "_delete", real)
    other = _store(master, namespace=s.namespace)  # another client, as a new process would be
    deadline = time.monotonic() + 30
    while drain_deletes(led, other) != (1, 0):  # parked behind exists()'s read lease: retried, not lost
        assert time.monotonic() < deadline and len(led.pending_deletes()) == 1
        time.sleep(LEASE_TTL_MS / 1000)
    assert led.pending_deletes() == [] and not s.exists(refs[0])
    assert set(_raw(s).batch_is_exist([s._key(r.sample_id, r.generation) for r in refs])) == {0}
    s.close()


_BP_PRODUCER = """
import os, sys, time, torch
from torch_dataflow import FeatureWriter
uri, ledger, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t = time.monotonic()
with FeatureWriter(uri, ledger, name="bp", put_timeout=60) as w:
    for i in range(n):
        w.put(f"b{i:03d}", {"x": torch.full((256 * 1024,), float(i))})  # 1 MiB each
print(f"produced {n} in {time.monotonic() - t:.1f}s waited {w.waited_s:.1f}s", flush=True)
while not os.path.exists(go):  # the writer's segment holds the objects: outlive the consumer
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_backpressure_sees_frees_made_by_another_process(master: Any, tmp_path: Any) -> None:
    """Issue 15 item 4: with max_bytes set, a producer process never stalls once the
    consumer process has freed: residency comes from the ledger, not this process's writes."""
    from torch_dataflow import FeatureStoreDataset

    n, ns = 16, _ns()
    ledger = f"sqlite://{tmp_path}/l.db"
    go = tmp_path / "go"
    uri = f"{master.uri}?namespace={ns}&segment_size=64MiB&max_bytes=5MiB"
    prod = subprocess.Popen([sys.executable, "-c", _BP_PRODUCER, uri, ledger, str(n), str(go)],
                            stdout=subprocess.PIPE, text=True)
    try:
        ds = FeatureStoreDataset(f"{master.uri}?namespace={ns}&segment_size=0", ledger, idle_timeout=90)
        seen = []
        for step, s in enumerate(ds, 1):
            assert ds.ack(s, step) == []
            ds.mark_durable(step, final=True)  # frees at once: the producer must see it
            seen.append(s["__sample_id__"])
        assert sorted(seen) == [f"b{i:03d}" for i in range(n)]
        # The last removals may be parked behind the consumer's own read leases: the next drain
        # (the consumer's next mark, the producer, or `torch-dataflow gc`) finishes them.
        from torch_dataflow.gc import drain_deletes

        deadline = time.monotonic() + 30
        while drain_deletes(ds.ledger, ds.store)[1]:
            assert time.monotonic() < deadline, ds.ledger.pending_deletes()
            time.sleep(LEASE_TTL_MS / 1000)
        go.write_text("1")
        out, _ = prod.communicate(timeout=60)
    finally:
        go.write_text("1")
        prod.kill()
        prod.wait()
    assert prod.returncode == 0 and f"produced {n}" in out, out
    led = __import__("torch_dataflow").open_ledger(ledger)
    assert led.resident_bytes() == 0 and led.pending_deletes() == []


@pytest.mark.slow
def test_mooncake_master_cli_stops_its_children_on_sigterm(tmp_path: Any) -> None:
    """`kill PID` (or `timeout`) of `torch-dataflow mooncake-master` used to leave the
    mooncake_master child running under pid 1."""
    problem = _mooncake_problem()
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    import signal as _signal

    from torch_dataflow.stores.mooncake_master import free_port

    cli = subprocess.Popen([sys.executable, "-m", "torch_dataflow.cli", "mooncake-master", "--port", str(free_port())],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = cli.stdout.readline()  # type: ignore[union-attr]
        assert "listening" in line, line
        child = int(line.split("mooncake_master pid ", 1)[1].split()[0])
        os.kill(child, 0)  # running
        cli.send_signal(_signal.SIGTERM)
        assert cli.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, _signal.SIGKILL)
            pytest.fail(f"mooncake_master {child} outlived the CLI's SIGTERM")
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
