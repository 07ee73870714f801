"""Producer liveness and resume (issue 15 item 6): a SIGKILLed producer ends the
trainer's wait with a named error; restarted with ``resume=True`` it puts only
what is missing and nothing is trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from torch_dataflow import SAMPLE_ID_KEY, FeatureStoreDataset, FeatureWriter, ProducerSilent
from torch_dataflow.cli import main
from torch_dataflow.ledger import open_ledger
from torch_dataflow.status import collect_status, format_status

N = 40

_PRODUCER = r"""
import json, sys, time, torch
from torch_dataflow import FeatureWriter
store, ledger, stop_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = FeatureWriter(store, ledger, name="gen-0", resume=True, heartbeat_every=0.1)
ids = [f"s{i:03d}" for i in range(int(sys.argv[4]))]
todo = w.missing(ids)
generated = []
for sid in todo:
    if len(generated) == stop_after:
        print(json.dumps({"hang": True}), flush=True)
        time.sleep(3600)  # hung: the test SIGKILLs it
    generated.append(sid)
    w.put(sid, {"x": torch.full((8,), float(int(sid[1:])))})
w.close()
print(json.dumps({"generated": generated, "written": w.written, "skipped": w.skipped}), flush=True)
"""


def _producer(store: str, ledger: str, stop_after: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _PRODUCER, store, ledger, str(stop_after), str(N)],
                            stdout=subprocess.PIPE, text=True)


def _consume(store: str, ledger: str, seen: list[str], step0: int, **kw: float) -> int:
    ds = FeatureStoreDataset(store, ledger, batch_size=5, **kw)
    step = step0
    it = iter(DataLoader(ds, batch_size=5, num_workers=1))  # a real worker re-raises the typed error
    try:
        for batch in it:
            step += 1
            seen += list(batch[SAMPLE_ID_KEY])
            assert ds.ack(batch, step) == []
    finally:
        it._shutdown_workers()  # type: ignore[attr-defined]  # the traceback keeps the iterator alive
    return step


def test_killed_producer_is_named_and_resume_trains_nothing_twice(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    proc = _producer(store, ledger, stop_after=15)
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline()) == {"hang": True}
    led = open_ledger(ledger)
    assert led.counts().committed == 15
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()

    seen: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(ProducerSilent) as err:
        # idle_timeout is long: the wait must end early because the producer's pid is gone
        _consume(store, ledger, seen, 0, idle_timeout=60, producer_ttl=0.5, poll=0.02)
    waited = time.monotonic() - t0
    assert waited < 20
    msg = str(err.value)
    assert "gen-0" in msg and "last heartbeat" in msg and f"close-stream {led.uri} --producer gen-0" in msg
    assert isinstance(err.value, TimeoutError)
    assert sorted(seen) == [f"s{i:03d}" for i in range(15)]

    snap = collect_status(ledger, producer_ttl=0.5)
    [p] = snap["producers"]
    assert (p["name"], p["done"], p["dead"], p["silent"], snap["stream_silent"]) == ("gen-0", False, True, True, True)
    assert p["pid"] == proc.pid and p["age_s"] > 0.5
    text = format_status(snap)
    assert "producer open: gen-0" in text and "DEAD" in text and "close-stream" in text

    # Restarted under the same name with resume=True: only the 25 missing ids are generated and put.
    proc = _producer(store, ledger, stop_after=10**6)
    out, _ = proc.communicate(timeout=60)
    report = json.loads(out)
    assert report["generated"] == [f"s{i:03d}" for i in range(15, N)]
    assert (report["written"], report["skipped"]) == (25, 0)
    step = _consume(store, ledger, seen, 3, idle_timeout=60, producer_ttl=0.5, poll=0.02)
    assert step == N // 5
    assert len(seen) == N and sorted(seen) == [f"s{i:03d}" for i in range(N)]  # none twice, none lost
    trained = led.trained_steps()
    assert len(trained) == N and sorted(trained.values()) == sorted([s for s in range(1, 9) for _ in range(5)])
    c = led.counts()
    assert (c.committed, c.trained, c.pending, c.closed) == (N, N, 0, True)
    assert {led.get_ref(f"s{i:03d}").generation for i in range(N)} == {1}  # type: ignore[union-attr]
    led.close()


def test_resume_put_returns_existing_ref_and_skips_trained() -> None:
    led = open_ledger("memory://producers-resume")
    w = FeatureWriter("memory://producers-resume", led, name="gen")
    first = [w.put(f"a{i}", {"x": torch.ones(2)}) for i in range(4)]
    [lease] = led.lease("t", 1, ttl=30)
    led.ack([lease.lease_id], step=1)
    led.mark_durable(1)  # one FREED: still done
    again = FeatureWriter("memory://producers-resume", led, name="gen", resume=True)
    refs = again.put_many([(f"a{i}", {"x": torch.zeros(2)}) for i in range(6)])
    assert [r.generation for r in refs] == [1] * 6 and refs[:4] == first
    assert (again.written, again.skipped) == (2, 4)
    assert again.put("a0", {"x": torch.zeros(2)}) == first[0]
    assert w.put("a1", {"x": torch.zeros(2)}, if_absent=True) == first[1]
    assert w.put("a2", {"x": torch.zeros(2)}).generation == 2  # without resume a put is a new generation
    assert again.missing(["a0", "a5", "a9"]) == ["a9"]


def test_resume_puts_again_what_the_store_lost_before_training(tmp_path: Path) -> None:
    """Committed ids whose bytes vanished (Mooncake objects die with their writer's
    segment) are missing for a resumed producer, unless already trained."""
    store, ledger = f"file://{tmp_path}/feats", f"sqlite://{tmp_path}/l.db"
    with FeatureWriter(store, ledger, name="gen") as w:
        refs = [w.put(f"b{i}", {"x": torch.full((2,), float(i))}) for i in range(4)]
    led = open_ledger(ledger)
    [lease] = [x for x in led.lease("t", 4, ttl=30) if x.sample_id == "b0"] or [None]
    led.ack([lease.lease_id], step=1)  # b0 trained (not yet durable), the rest given back by expiry below
    led.fail([x.lease_id for x in led.leases() if x.sample_id != "b0"], retryable=True)
    for r in refs[:3]:  # b0 (trained), b1, b2 lose their bytes; b3 keeps them
        os.unlink(next((tmp_path / "feats").rglob(f"*{r.sample_id}*")))
    again = FeatureWriter(store, ledger, name="gen", resume=True)
    assert again.missing(["b0", "b1", "b2", "b3", "b4"]) == ["b1", "b2", "b4"]
    assert again.put("b1", {"x": torch.full((2,), 1.0)}).generation == 2
    assert [r.generation for r in again.put_many([(s, {"x": torch.ones(2)}) for s in ("b0", "b2", "b3")])] == [1, 2, 1]
    again.close()
    ds = FeatureStoreDataset(store, ledger, batch_size=1, idle_timeout=5)
    got = sorted(b[SAMPLE_ID_KEY][0] for b in DataLoader(ds, batch_size=1))
    assert got == ["b1", "b2", "b3"]  # b0 trained once already, the lost ones delivered, none quarantined
    assert led.counts().quarantined == 0
    led.close()


def test_idle_timeout_names_remote_producer_and_close_stream_cli(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    led = open_ledger(ledger)
    led.register_producer("remote-7", {"host": "other-host", "pid": 1})  # cannot be proven dead from here
    t0 = time.monotonic()
    with pytest.raises(ProducerSilent, match=r"remote-7 \(other-host pid 1, last heartbeat"):
        next(iter(FeatureStoreDataset(store, ledger, idle_timeout=1.0, producer_ttl=0.1, poll=0.02)))
    assert 1.0 <= time.monotonic() - t0 < 10
    assert main(["close-stream", ledger, "--producer", "remote-7"]) == 0
    assert "closed producer remote-7" in capsys.readouterr().out and led.is_closed()
    assert FeatureStoreDataset(store, ledger).idle_timeout == 600.0
    led.close()


def test_resumed_producer_on_another_store_is_refused_before_skipping(tmp_path: Path) -> None:
    """A resumed producer pointed at the wrong store used to print `written 0` and exit 0 when
    every id was committed already (the store check came only with the first put)."""
    from torch_dataflow.errors import ConfigError

    ledger = f"sqlite://{tmp_path}/l.db"
    ids = [f"s{i}" for i in range(4)]
    with FeatureWriter(f"file://{tmp_path}/a", ledger, name="p") as w:
        for sid in ids:
            w.put(sid, {"x": torch.ones(2)})
    with FeatureWriter(f"file://{tmp_path}/b", ledger, name="p", resume=True) as w:
        with pytest.raises(ConfigError, match="is not the store of ledger"):
            w.missing(ids)
        with pytest.raises(ConfigError, match="is not the store of ledger"):
            w.put("s0", {"x": torch.ones(2)})
        with pytest.raises(ConfigError, match="is not the store of ledger"):
            w.put_many([("s1", {"x": torch.ones(2)})])
    with FeatureWriter(f"file://{tmp_path}/a", ledger, name="p", resume=True) as w:
        assert w.missing(ids) == []  # the right store: nothing to do
