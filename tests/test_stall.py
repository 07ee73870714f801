"""Why is my trainer waiting: one test per stall reason, in the diagnosis, the loader's
log line, `status` and the metric label."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.errors import ProducerSilent, StoreFull
from torch_dataflow.ledger import open_ledger
from torch_dataflow.stall import diagnose
from torch_dataflow.status import collect_status, format_status

X = {"x": torch.zeros(64)}  # 256 bytes


@pytest.fixture
def uris(tmp_path):
    return f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"


def _stall(ledger_uri: str, **kw):
    """The diagnosis, and the same through `status` (JSON and table)."""
    got = diagnose(open_ledger(ledger_uri), **kw)
    snap = collect_status(ledger_uri, producer_ttl=kw.get("producer_ttl", 60.0))
    if "mine" not in kw:
        assert snap["stall"]["reason"] == got.reason
        assert f"[{got.reason}]" in format_status(snap)
    return got


def test_ready(uris):
    store, ledger = uris
    with FeatureWriter(store, ledger, name="p0") as w:
        w.put("a", X)
    s = _stall(ledger)
    assert (s.reason, s.details["pending"]) == ("ready", 1)
    assert diagnose(open_ledger(ledger), need=2).reason == "stream_closed"  # a step of 2 never fills


def test_producers_slow_names_live_producers(uris):
    store, ledger = uris
    w = FeatureWriter(store, ledger, name="p0")
    w.put("a", X)
    open_ledger(ledger).lease("someone", 1, ttl=60)
    s = _stall(ledger)
    assert s.reason == "producers_slow"
    assert "p0 (" in s.message and "last heartbeat 0s ago" in s.message
    assert s.details["producers"] == ["p0"] and s.details["holders"][0]["owner"] == "someone"
    w.close()


def test_producers_silent(uris):
    store, ledger = uris
    assert "no producer registered" in _stall(ledger).message
    w = FeatureWriter(store, ledger, name="p-silent")
    w.put("a", X)
    open_ledger(ledger).lease("t", 1, ttl=60)
    time.sleep(0.3)
    s = _stall(ledger, producer_ttl=0.1)
    assert s.reason == "producers_silent"
    assert "p-silent" in s.message and "close-stream" in s.message
    assert _stall(ledger, producer_ttl=60).reason == "producers_slow"
    w.close()


def test_store_full_names_resident_and_budget(uris):
    store, ledger = uris
    w = FeatureWriter(store, ledger, name="p0", max_resident_bytes=2 * 1024 + 512, put_timeout=0.2)
    n = 0
    with pytest.raises(MemoryError):  # the producer really is blocked once the budget is full
        for i in range(100):
            w.put(f"s{i}", X)
            n += 1
    led = open_ledger(ledger)
    leases = led.lease("trainer", n, ttl=60)
    assert len(leases) == n >= 5
    led.ack([lease.lease_id for lease in leases], step=1)  # trained, not yet durable: bytes stay
    s = _stall(ledger)
    assert s.reason == "store_full"
    assert s.details["budget_bytes"] == 2560 and s.details["resident_bytes"] == led.resident_bytes() > 2000
    assert "checkpoint" in s.message
    from torch_dataflow.gc import drain_deletes

    drain_deletes(led, w.store, led.mark_durable(1, retain=False))  # a checkpoint frees them: room again
    assert _stall(ledger).reason == "producers_slow"
    w.close()


def test_leased_elsewhere_names_holder_and_expiry(uris):
    store, ledger = uris
    with FeatureWriter(store, ledger, name="p0") as w:
        w.put("a", X)
        w.put("b", X)
    open_ledger(ledger).lease("crashed-trainer/w0", 2, ttl=120)
    s = _stall(ledger)
    assert s.reason == "leased_elsewhere"
    [h] = s.details["holders"]
    assert h["owner"] == "crashed-trainer/w0" and h["leases"] == 2 and 100 < h["expires_in_s"] <= 120
    assert "crashed-trainer/w0 (2 leases" in s.message
    # The holder asking about itself is not waiting on someone else.
    assert diagnose(open_ledger(ledger), mine="crashed-trainer").reason == "stream_closed"


def test_stream_closed(uris):
    store, ledger = uris
    with FeatureWriter(store, ledger, name="p0") as w:
        w.put("a", X)
    led = open_ledger(ledger)
    led.ack([lease.lease_id for lease in led.lease("t", 1, ttl=60)], step=1)
    s = _stall(ledger)
    assert s.reason == "stream_closed" and "nothing is left" in s.message


@pytest.mark.redis
def test_ledger_unreachable_on_a_real_redis_that_went_away():
    from torch_dataflow.ledger.redis_server import RedisServer

    with RedisServer() as srv:
        led = open_ledger(srv.uri + "?retries=1&retry_cap=0.05")
        assert diagnose(led).reason == "producers_silent"
    s = diagnose(led)
    assert s.reason == "ledger_unreachable" and srv.uri.split("?")[0].split("/0")[0] in s.message


def test_loader_logs_the_reason_once_then_rate_limited(uris, caplog, monkeypatch):
    store, ledger = uris
    w = FeatureWriter(store, ledger, name="p-alive")
    w.put("a", X)
    ds = FeatureStoreDataset(store, ledger, batch_size=2, poll=0.02, idle_timeout=0.6)
    monkeypatch.setattr(FeatureStoreDataset, "STALL_AFTER", 0.2)
    with caplog.at_level(logging.WARNING, logger="torch_dataflow.stall"), pytest.raises(ProducerSilent):
        list(ds)  # one sample held while the batch of 2 waits for the producer
    lines = [r.getMessage() for r in caplog.records if r.name == "torch_dataflow.stall"]
    assert len(lines) == 1, lines  # at 0.2 s, then not again within a minute
    assert "[producers_slow]" in lines[0] and "p-alive" in lines[0]
    w.close()


def test_stall_reason_is_a_metric_label(uris, monkeypatch):
    pytest.importorskip("prometheus_client")
    from torch_dataflow.metrics import read, serve

    store, ledger = uris
    with FeatureWriter(store, ledger, name="p0") as w:
        w.put("a", X)
    open_ledger(ledger).lease("other", 1, ttl=60)
    monkeypatch.setattr(FeatureStoreDataset, "STALL_AFTER", 0.05)
    with serve(0, ledger=ledger) as server:
        ds = FeatureStoreDataset(store, ledger, poll=0.02)
        assert list(ds) == []  # closed stream: returns at once, nothing to wait for
        got = read(server.url)
    assert got['torch_dataflow_stall{reason="leased_elsewhere"}'] == 1
    assert sum(v for k, v in got.items() if k.startswith("torch_dataflow_stall{")) == 1


def _fill(store: str, ledger: str, budget: int) -> tuple[FeatureWriter, int]:
    """A live producer blocked by its byte budget; returns it and how many samples fit."""
    w = FeatureWriter(store, ledger, name="p0", max_resident_bytes=budget, put_timeout=0.2)
    n = 0
    with pytest.raises(MemoryError):
        for i in range(100):
            w.put(f"s{i}", X)
            n += 1
    return w, n


def test_a_budget_smaller_than_one_step_is_a_clear_error_and_gives_the_leases_back(uris, monkeypatch):
    store, ledger = uris
    w, n = _fill(store, ledger, 3 * 300)
    assert 2 <= n < 8
    monkeypatch.setattr(FeatureStoreDataset, "STALL_AFTER", 0.5)
    ds = FeatureStoreDataset(store, ledger, batch_size=8, poll=0.05)
    t0 = time.monotonic()
    with pytest.raises(StoreFull, match="no step can ever form") as e:
        next(iter(ds))
    assert time.monotonic() - t0 < 30  # long before idle_timeout (600 s), and not ProducerSilent
    assert "max_resident_bytes" in str(e.value) and f"holds about {n} samples" in str(e.value)
    c = ds.ledger.counts()
    assert (c.pending, c.leased) == (n, 0)  # the partial batch's leases were given back at once
    w.close()


def test_idle_timeout_while_the_store_is_full_blames_the_budget_not_the_producer(uris):
    store, ledger = uris
    w, n = _fill(store, ledger, 5 * 300)
    assert n >= 3
    ds = FeatureStoreDataset(store, ledger, batch_size=2, poll=0.05, idle_timeout=1.0)
    got = []
    with pytest.raises(StoreFull, match="checkpoint more often") as e:
        for s in ds:
            got.append(s)
            if len(got) % 2 == 0:
                ds.ledger.ack([x["__lease__"] for x in got[-2:]], step=len(got) // 2)  # trained, never checkpointed
    assert not isinstance(e.value, ProducerSilent)
    assert len(got) == n - n % 2  # whole batches were delivered, then the wait was diagnosed
    w.close()
