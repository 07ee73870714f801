"""Processes that share only a directory and a SQLite file (DESIGN invariants 1, 3, 9)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import _procs
import pytest

from torch_dataflow import open_ledger

pytestmark = pytest.mark.slow
CTX = mp.get_context("spawn")


def _uris(tmp_path: Path) -> tuple[str, str]:
    return f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _join(procs: list, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail(f"{p.name} did not finish in {timeout}s")


def test_producer_and_two_consumers_exactly_once(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    open_ledger(ledger).register_producer("announced")  # consumers must wait for the real producer
    log = tmp_path / "consumed.jsonl"
    producer = CTX.Process(target=_procs.produce, args=(store, ledger, list(range(120)), 0.03), name="producer")
    ready = [tmp_path / f"ready{nw}" for nw in (0, 2)]
    consumers = [CTX.Process(target=_procs.consume, args=(store, ledger, str(log)),
                             kwargs={"num_workers": nw, "ready": str(r)}, name=f"consumer{nw}")
                 for nw, r in zip((0, 2), ready, strict=True)]
    for p in consumers:
        p.start()
    deadline = time.monotonic() + 120  # both consumers poll before the first sample: both take part
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    producer.start()
    producer.join(120)
    open_ledger(ledger).producer_done("announced")
    _join([producer, *consumers])
    assert all(p.exitcode == 0 for p in [producer, *consumers])
    entries = _read_log(log)
    ids = [sid for e in entries for sid in e["ids"]]
    assert sorted(ids) == [f"s{i:05d}" for i in range(120)], "each sample delivered exactly once"
    assert len({e["pid"] for e in entries}) == 2, "both consumers took part"
    c = open_ledger(ledger).counts()
    assert (c.trained, c.pending, c.leased) == (120, 0, 0)


def test_killed_consumer_leases_are_redelivered_after_expiry(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    _procs.produce(store, ledger, list(range(40)))
    victim_log, rescuer_log = tmp_path / "victim.jsonl", tmp_path / "rescuer.jsonl"
    # The victim takes one batch of 4, logs it, then sleeps holding the leases without acking.
    victim = CTX.Process(target=_procs.consume, args=(store, ledger, str(victim_log)),
                         kwargs={"hold": 600, "lease_ttl": 15.0}, name="victim")
    victim.start()
    deadline = time.monotonic() + 60
    while not _read_log(victim_log):
        assert time.monotonic() < deadline and victim.is_alive(), "victim never got a batch"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    held = set(_read_log(victim_log)[0]["ids"])
    assert len(held) == 4 and open_ledger(ledger).counts().leased >= 4
    expires = time.time() + 15.0  # upper bound: leased before the kill
    # A consumer that runs while the dead one's leases are live gets everything else...
    rescuer = CTX.Process(target=_procs.consume, args=(store, ledger, str(rescuer_log)), name="rescuer")
    rescuer.start()
    _join([rescuer])
    assert rescuer.exitcode == 0
    first = [sid for e in _read_log(rescuer_log) for sid in e["ids"]]
    assert sorted(first) == sorted({f"s{i:05d}" for i in range(40)} - held)
    assert time.time() < expires, "machine too slow for this test's 15 s lease"
    # ...and once the leases expire, the next consumer gets exactly the dead one's samples.
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    late = CTX.Process(target=_procs.consume, args=(store, ledger, str(tmp_path / "late.jsonl")), name="late")
    late.start()
    _join([late])
    assert {sid for e in _read_log(tmp_path / "late.jsonl") for sid in e["ids"]} == held
    c = open_ledger(ledger).counts()
    assert (c.trained, c.leased, c.pending) == (40, 0, 0)


def _ddp_round(tmp_path: Path, tag: str, world: int, store: str, ledger: str, max_batches: int | None,
               step0: int) -> list[dict]:
    init = f"file://{tmp_path}/pg-{tag}"
    out = tmp_path / f"ddp-{tag}"
    procs = [CTX.Process(target=_procs.ddp_rank, args=(r, world, init, store, ledger, str(out), max_batches, step0, 2),
                         name=f"{tag}-rank{r}") for r in range(world)]
    for p in procs:
        p.start()
    _join(procs, timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def test_ddp_equal_batches_then_reshard_to_1_and_3(tmp_path: Path) -> None:
    store, ledger = _uris(tmp_path)
    n = 61
    _procs.produce(store, ledger, list(range(n)))
    trained: list[str] = []

    # World 2 with 2 workers each, stopped after 5 batches per rank (a job that ends early).
    r2 = _ddp_round(tmp_path, "w2", 2, store, ledger, 5, 0)
    assert [r["batches"] for r in r2] == [5, 5]
    trained += [s for r in r2 for b in r["ids"] for s in b]
    assert len(trained) == len(set(trained)) == 20
    open_ledger(ledger).reconcile(max(r["last_step"] for r in r2))

    # Restart with world 1: takes 6 more batches.
    r1 = _ddp_round(tmp_path, "w1", 1, store, ledger, 6, 100)
    trained += [s for r in r1 for b in r["ids"] for s in b]
    open_ledger(ledger).reconcile(max(r["last_step"] for r in r1))

    # Restart with world 3: runs to the end; equal batch counts on every rank.
    r3 = _ddp_round(tmp_path, "w3", 3, store, ledger, None, 200)
    counts = [r["batches"] for r in r3]
    assert len(set(counts)) == 1 and counts[0] > 0, counts
    trained += [s for r in r3 for b in r["ids"] for s in b]

    assert len(trained) == len(set(trained)), "no sample trained twice"
    led = open_ledger(ledger)
    left = led.counts()
    # The tail smaller than one global step (3 ranks x batch 2) is a last, padded step: nothing stays pending.
    assert left.leased == 0 and left.pending == 0 and len(trained) == n
    assert set(led.trained_steps()) == set(trained)
