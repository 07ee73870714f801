"""The Redis ledger on a real redis-server: conformance, contention, restarts, failures.

redis-server starts in fixtures on a free loopback port. Without the binary the
tests skip (with the install command), except under CI, where they fail.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from torch_dataflow.errors import AuthError, BackendUnavailable, ConfigError
from torch_dataflow.ledger import open_ledger
from torch_dataflow.ledger.base import Ledger, Plan
from torch_dataflow.ledger.redis import RedisLedger
from torch_dataflow.ledger.redis_server import INSTALL_HINT, RedisServer
from torch_dataflow.ledger.sqlite import SQLiteLedger
from torch_dataflow.testing.ledger_conformance import LedgerConformance, commit_ids, fake_ref
from torch_dataflow.testing.ledger_model import make_state_machine

pytestmark = pytest.mark.redis

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_names = itertools.count()
_SERVER: dict[str, RedisServer] = {}


def _need_redis() -> None:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail(f"redis-server missing under CI: {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server (no persistence) on a free loopback port for the session."""
    _need_redis()
    with RedisServer() as srv:
        _SERVER["main"] = srv
        yield srv
        _SERVER.pop("main", None)


@pytest.fixture(autouse=True)
def _server_for_module(redis_server: RedisServer) -> None:
    """Every test here needs the server (the state machine reads it from ``_SERVER``)."""


def _ns() -> str:
    return f"t{os.getpid()}n{next(_names)}"


class TestRedisLedger(LedgerConformance):
    def make_ledger(self, **kw: Any) -> Ledger:
        return open_ledger(f"{_SERVER['main'].uri}?namespace={_ns()}", **kw)

    def attach_ledger(self, ledger: Ledger, **kw: Any) -> Ledger:
        assert isinstance(ledger, RedisLedger)
        return RedisLedger(ledger.host, ledger.port, ledger.db, namespace=ledger.namespace, **kw)


class TestRedisLedgerClientClock(TestRedisLedger):
    def make_ledger(self, **kw: Any) -> Ledger:
        return super().make_ledger(clock="client", **kw)


TestRedisLedgerModel = make_state_machine(
    lambda: open_ledger(f"{_SERVER['main'].uri}?namespace={_ns()}")
).TestCase


# ---------------------------------------------------------------- same answers as SQLite
def _pick(rnd: random.Random, mine: list[Any]) -> list[str]:
    """Lease ids for ack/fail/renew: a mix of held and lost ones (acked, expired,
    superseded, reclaimed), some repeated, sometimes a bogus id, in random order."""
    if not mine:
        return ["bogus"] if rnd.random() < .5 else []
    ids = [x.lease_id for x in rnd.sample(mine, min(len(mine), rnd.randint(1, 4)))]
    ids += rnd.choices(ids, k=rnd.randint(0, 2))  # repeated ids: handled once, reported once
    if rnd.random() < .3:
        ids += ["bogus", "bogus"] if rnd.random() < .5 else ["bogus"]
    rnd.shuffle(ids)
    return ids


def _diff_run(seed: int, sqlite: Ledger, red: Ledger) -> None:
    """Random operations on both ledgers; every answer must be the same."""
    rnd = random.Random(seed)
    ids = [f"s{i}" for i in range(8)]
    held: dict[str, list[Any]] = {"a": [], "b": []}
    for i in range(60):
        op = rnd.choice(["rc", "rc", "reserve", "commit", "lease", "ack", "fail", "fail", "failq", "renew", "abort",
                         "durable", "reconcile", "begin", "claim", "done", "counts"])
        sel, step = rnd.sample(ids, rnd.randint(1, 3)), rnd.randint(0, 5)
        out: dict[str, Any] = {}
        for name, led in (("a", sqlite), ("b", red)):
            mine, r2 = held[name], random.Random(i)  # the same draws for both ledgers

            def pos(lost: list[str], mine: list[Any] = mine) -> list[Any]:
                return [x if x == "bogus" else [m.lease_id for m in mine].index(x) for x in lost]
            try:
                if op == "rc":
                    gens = led.reserve(sel)
                    r: Any = (gens, led.commit([fake_ref(s, g) for s, g in zip(sel, gens, strict=True)]))
                elif op == "reserve":
                    r = led.reserve(sel)
                elif op == "commit":
                    r = led.commit([fake_ref(s, r2.randint(1, 3)) for s in sel])
                elif op == "lease":
                    got = led.lease("o", 2, 100, epoch=r2.choice([0, 0, 1]))
                    mine += got
                    r = [(x.sample_id, x.generation, x.epoch) for x in got]
                elif op == "ack":
                    r = pos(led.ack(_pick(r2, mine), step))
                elif op in ("fail", "failq"):
                    r = pos(led.fail(_pick(r2, mine), retryable=op == "fail", reason="bad"))
                    r = (r, sorted((x[0].key if x[0] else None, x[1]) for x in led.quarantined()), led.counts())
                elif op == "renew":
                    r = pos(led.renew(_pick(r2, mine), 100))
                elif op == "abort":
                    r = sorted(x.key for x in led.abort(sel))
                elif op == "durable":
                    r = sorted(x.key for x in led.mark_durable(step))
                elif op == "reconcile":
                    rep = led.reconcile(r2.choice([None, step]))
                    r = (rep.attempt, rep.replayed, rep.durable, rep.released, sorted(x.key for x in rep.freed))
                elif op == "begin":
                    led.begin_epoch(1, seed=3)
                    r = None
                elif op == "claim":
                    plan = Plan(led.attempt(), r2.choice([0, 1]), 2, 1)
                    c = led.claim_step(plan, r2.randint(0, 2), r2.randint(0, 1), 100, wait_for_stream=r2.random() < .5)
                    mine += c.leases
                    r = (c.status, c.tail, [(x.sample_id, x.owner, x.generation) for x in c.leases])
                elif op == "done":
                    led.register_producer("p")
                    led.producer_done("p")
                    r = led.is_closed()
                else:
                    r = (led.counts(), led.counts(0), led.counts(1), led.trained_steps(),
                         sorted((x[0].key if x[0] else None, x[1]) for x in led.quarantined()),
                         sorted((x.sample_id, x.epoch, x.owner) for x in led.leases()), led.attempt())
            except Exception as e:  # the same error, with the same message (the ledger's URI aside)
                r = (type(e).__name__, str(e).replace(led.uri, "<ledger>"))
            out[name] = r
        assert out["a"] == out["b"], f"seed {seed} step {i} {op} {sel}"


@pytest.mark.parametrize("block", range(4))
def test_same_answers_as_sqlite(block: int, tmp_path: Any) -> None:
    for seed in range(block * 25, block * 25 + 25):
        sqlite = SQLiteLedger(str(tmp_path / f"l{seed}.db"))
        red = open_ledger(f"{_SERVER['main'].uri}?namespace={_ns()}&clock=client")
        _diff_run(seed, sqlite, red)
        sqlite.close()
        red.close()


def test_shuffled_order_matches_sqlite(tmp_path: Any) -> None:
    a = SQLiteLedger(str(tmp_path / "o.db"))
    b = open_ledger(f"{_SERVER['main'].uri}?namespace={_ns()}")
    ids = [f"x{i}" for i in range(300)]
    for led in (a, b):
        commit_ids(led, ids)
        led.begin_epoch(2, seed=11)
    assert [x.sample_id for x in a.lease("o", 400, 30, epoch=2)] == [x.sample_id for x in b.lease("o", 400, 30, epoch=2)]


# ---------------------------------------------------------------- configuration
def test_uris_and_options() -> None:
    led = RedisLedger.from_uri("rediss://user:pw@10.1.2.3:6390/3?namespace=r1&secret=s&retries=2&clock=client")
    st = led._config_state()
    assert (st["host"], st["port"], st["db"], st["username"], st["password"], st["ssl"]) == \
        ("10.1.2.3", 6390, 3, "user", "pw", True)
    assert led.uri == "rediss://10.1.2.3:6390/3?namespace=r1" and "pw" not in repr(led)
    assert type(open_ledger("rediss://127.0.0.1:1/0")) is RedisLedger
    for bad in ("redis://h:1/0?bogus=1", "redis://h:1/notadb", "redis://h:1/0?clock=sundial",
                "redis://h:1/0?namespace=a:b"):
        with pytest.raises(ConfigError):
            open_ledger(bad)


def test_down_server_is_backend_unavailable() -> None:
    srv = RedisServer()  # never started: nothing listens on its port
    led = open_ledger(f"redis://127.0.0.1:{srv.port}/0?retries=2&connect_timeout=0.5")
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable):
        led.counts()
    assert time.monotonic() - t0 < 10


def test_redis_password_passes_through() -> None:
    with RedisServer(password="hunter2") as srv:
        led = open_ledger(srv.uri + "?namespace=pw")
        commit_ids(led, ["x"])
        assert led.counts().pending == 1
        with pytest.raises(AuthError):
            open_ledger(f"redis://:wrong@127.0.0.1:{srv.port}/0?namespace=pw").counts()
        with pytest.raises(AuthError):
            open_ledger(f"redis://127.0.0.1:{srv.port}/0?namespace=pw").counts()
        led.close()


def test_foreign_namespace_is_refused() -> None:
    import redis

    ns = _ns()
    redis.Redis(port=_SERVER["main"].port).hset("{" + ns + "}:meta", "schema", "something/else")
    with pytest.raises(ConfigError, match="not a torch_dataflow ledger"):
        open_ledger(f"{_SERVER['main'].uri}?namespace={ns}").counts()


def test_retried_call_is_answered_from_reply_cache() -> None:
    led = open_ledger(f"{_SERVER['main'].uri}?namespace={_ns()}")
    assert isinstance(led, RedisLedger)
    commit_ids(led, [f"s{i}" for i in range(6)])
    args = [led._prefix, "tok1", "", "", "0", "3", "me", "30", "abcd0123", "", "me"]
    first = led._scripts["lease"](args=args)
    again = led._scripts["lease"](args=args)  # a retry after a lost reply: same answer, nothing leased twice
    assert first == again and led.counts().leased == 3
    claim = Plan(led.attempt(), 0, 1, 3)
    c1 = led.claim_step(claim, 0, 0, ttl=30, wait_for_stream=False)
    assert c1.status == "ready" and len(c1.leases) == 3


# ---------------------------------------------------------------- contention
def _consumer(led: Ledger, name: str, out: Any) -> None:
    acked: list[str] = []
    rnd = random.Random(name)
    while True:
        stall = rnd.random() < 0.05
        leases = led.lease(name, 32, ttl=0.2 if stall else 30)
        if not leases:
            if led.counts().leased == 0:
                break
            time.sleep(0.05)
            continue
        if stall:  # let the lease expire: someone else may take it over
            time.sleep(0.3)
        lost = set(led.ack([x.lease_id for x in leases], 1))
        acked += [x.sample_id for x in leases if x.lease_id not in lost]
    out.put((name, acked))


@pytest.mark.slow
def test_contention_8_processes_20000_samples() -> None:
    led = open_ledger(f"{_SERVER['main'].uri}?namespace={_ns()}")
    ids = [f"c{i:05d}" for i in range(20_000)]
    for i in range(0, len(ids), 1000):
        commit_ids(led, ids[i:i + 1000])
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_consumer, args=(led, f"w{i}", q)) for i in range(8)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    flat = [s for v in results.values() for s in v]
    assert len(flat) == len(set(flat)) == 20_000, "a sample was acked twice or never"
    assert sorted(flat) == ids
    assert sum(1 for v in results.values() if v) >= 2, "one consumer took everything"
    c = led.counts()
    assert (c.pending, c.leased, c.trained) == (0, 0, 20_000)
    assert len(led.trained_steps()) == 20_000


# ---------------------------------------------------------------- restart with AOF
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("trainer_dies", [False, True], ids=["trainer-survives", "trainer-restarts"])
def test_restart_with_aof(sig: int, trainer_dies: bool) -> None:
    ids = [f"r{i:04d}" for i in range(2_000)]
    with RedisServer(aof=True, dir=tempfile.mkdtemp(prefix="td-aof-")) as srv:
        led = open_ledger(srv.uri + "?namespace=aof&retries=20&retry_cap=0.5")
        commit_ids(led, ids[:1000])
        trained: dict[str, int] = {}  # what the "model" learnt: sample -> step
        ckpt_step, ckpt_trained = 0, dict(trained)
        step = 0
        restarted = False
        while True:
            leases = led.lease("trainer", 64, ttl=60)
            if not leases:
                if len(ids) > led.counts().committed:
                    commit_ids(led, ids[1000:])  # the producer finishes after the restart
                    continue
                break
            step += 1
            for x in leases:
                assert x.sample_id not in trained, f"{x.sample_id} delivered again after it was trained"
                trained[x.sample_id] = step
            assert led.ack([x.lease_id for x in leases], step) == []
            if step % 4 == 0:  # checkpoint
                led.mark_durable(step)
                ckpt_step, ckpt_trained = step, dict(trained)
            if step == 10 and not restarted:
                restarted = True
                srv.stop(sig)
                down = open_ledger(srv.uri + "?namespace=aof&retries=1&connect_timeout=0.5")
                with pytest.raises(BackendUnavailable):
                    down.counts()
                if trainer_dies:  # the trainer process died with Redis: resume from the checkpoint
                    srv.start()
                    led = open_ledger(srv.uri + "?namespace=aof")
                    led.reconcile(ckpt_step)
                    trained, step = dict(ckpt_trained), ckpt_step
                else:  # Redis comes back while the trainer is retrying its next call
                    threading.Timer(0.5, srv.start).start()
        assert sorted(trained) == ids, "a committed sample was lost"
        c = led.counts()
        assert (c.pending, c.leased, c.committed) == (0, 0, len(ids))
        assert set(led.trained_steps()) == set(ids)
        led.close()
