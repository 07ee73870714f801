"""A producer started twice by mistake under one name: the name check and the
registration are one step (``claim_producer``), so of two writers that both
checked before either registered, exactly one runs and the other gets
``SessionConflict``; on SQLite, memory and a real Redis."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.errors import SessionConflict
from torch_dataflow.ledger import open_ledger
from torch_dataflow.ledger.heartbeats import holder_key

_NS = itertools.count()
IDS = [f"s{i:02d}" for i in range(20)]


def _uri(kind: str, tmp_path: Path, redis_uri: str) -> str:
    if kind == "sqlite":
        return f"sqlite://{tmp_path}/ledger.db"
    if kind == "memory":
        return f"memory://claim{next(_NS)}"
    return f"{redis_uri}?namespace=claim{next(_NS)}"


@pytest.fixture(params=["sqlite", "memory", "redis"])
def ledger_uri(request: Any, tmp_path: Path, redis_uri: str) -> str:
    return _uri(request.param, tmp_path, redis_uri)


@pytest.fixture(params=["sqlite", "redis"])
def shared_ledger_uri(request: Any, tmp_path: Path, redis_uri: str) -> str:
    """Ledgers two processes share (a memory ledger lives in one process)."""
    return _uri(request.param, tmp_path, redis_uri)


def _key(led: Any, name: str) -> str:
    return holder_key(next((p for p in led.producers() if p["name"] == name), None))


def test_claim_registers_only_if_the_holder_is_unchanged(ledger_uri: str) -> None:
    led = open_ledger(ledger_uri)
    assert _key(led, "p") == "-"
    assert led.claim_producer("p", {"pid": 101, "host": "h1"}, "-")
    assert _key(led, "p") == "0|h1|101"
    # a second claimant that checked the name before the first registered finds it changed
    assert not led.claim_producer("p", {"pid": 202, "host": "h2"}, "-")
    [p] = led.producers()
    assert (p["host"], p["pid"], p["done"]) == ("h1", 101, False)  # nothing changed
    led.producer_done("p")
    assert _key(led, "p") == "1|h1|101"
    assert led.claim_producer("p", {"pid": 202, "host": "h2", "max_resident_bytes": 5}, "1|h1|101")  # a restart
    [p] = led.producers()
    assert (p["host"], p["pid"], p["done"], p["info"]) == ("h2", 202, False, {"max_resident_bytes": 5})
    assert not led.claim_producer("p", {"pid": 303, "host": "h3"}, "1|h1|101")


def _racer(store: str, ledger: str, who: int, bar: Any, q: Any) -> None:
    try:
        w = FeatureWriter(store, ledger, name="producer-0", resume=True)
        todo = w.missing(IDS)  # both check the name here: neither has registered yet
        bar.wait(timeout=60)
        for sid in todo:
            w.put(sid, {"x": torch.full((8,), float(who))})
        w.close()
        q.put((who, "ran", w.written))
    except SessionConflict:
        q.put((who, "refused", 0))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put((who, f"{type(e).__name__}: {e}", 0))


@pytest.mark.allow_leaks  # multiprocessing's forkserver lives on, as it does for users
@pytest.mark.parametrize("rounds", [3])
def test_two_producers_of_one_name_started_at_once_one_is_refused(tmp_path: Path, shared_ledger_uri: str,
                                                                   rounds: int) -> None:
    ledger_uri = shared_ledger_uri
    ctx = mp.get_context("forkserver")
    for r in range(rounds):
        store = f"file://{tmp_path}/feats{r}"
        ledger = ledger_uri.replace("ledger.db", f"ledger{r}.db").replace("claim", f"claim-r{r}-")
        bar, q = ctx.Barrier(2), ctx.Queue()
        ps = [ctx.Process(target=_racer, args=(store, ledger, i, bar, q)) for i in (1, 2)]
        for p in ps:
            p.start()
        got = sorted((q.get(timeout=120) for _ in ps), key=lambda x: x[1])
        for p in ps:
            p.join(30)
        assert [x[1] for x in got] == ["ran", "refused"], got
        assert got[0][2] == len(IDS)
        led = open_ledger(ledger)
        assert led.counts().committed == len(IDS)
        assert sorted(p.name for p in (tmp_path / f"feats{r}").rglob("*.tdf")) == sorted(f"{s}@1.tdf" for s in IDS)
        assert [x["name"] for x in led.producers()] == ["producer-0"]
        assert os.path.exists(tmp_path / f"feats{r}")
