"""Issue 15 item 2: one trainer group per ledger, fenced; and checkpoint-true retention.

Two trainers on one ledger run as two real processes (SQLite, and a real
redis-server): the second is refused with a ``SessionConflict`` naming the
first; asked to take over, it fences the first, whose next ack and lease raise
``Fenced``; no sample is acked by both, and every sample is trained once.

Retention (item 1): a durable mark frees only what the *previous* checkpoint
covers, so a resume from that older checkpoint replays exactly what it lacks;
a resume from an even older one is refused with ``CheckpointTooOld`` and
changes nothing; ``finish()`` leaves zero bytes in the store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from torch_dataflow import FeatureStoreDataset, FeatureWriter, StepAcker
from torch_dataflow.errors import CheckpointTooOld, SessionConflict
from torch_dataflow.ledger import open_ledger
from torch_dataflow.stores import open_store

N = 24


def _produce(store: str, ledger: str, n: int = N) -> None:
    with FeatureWriter(store, ledger, name="p") as w:
        for i in range(n):
            w.put(f"s{i:03d}", {"x": torch.full((2,), float(i))})


# The first trainer: opens its session, trains 2 steps of 4, holds a third batch, then waits
# for the takeover and tries to ack it and to lease more.
_FIRST = textwrap.dedent("""
    import json, sys, time
    from torch_dataflow import FeatureStoreDataset, StepAcker
    from torch_dataflow.errors import Fenced
    store, ledger, go, out = sys.argv[1:5]
    ds = FeatureStoreDataset(store, ledger, batch_size=4, idle_timeout=30)
    acker = StepAcker(ds, session_name="first")
    acker.resume(None)
    it = iter(ds)
    acked, res = [], {}
    for step in (1, 2):
        batch = [next(it) for _ in range(4)]
        for s in batch:
            acker.add({"__lease__": [s["__lease__"]]})
        acker.after_step(step)
        acked += [s["__sample_id__"] for s in batch]
    held = [next(it) for _ in range(4)]
    for s in held:
        acker.add({"__lease__": [s["__lease__"]]})
    open(out + ".ready", "w").write("1")
    while not __import__("os").path.exists(go):
        time.sleep(0.05)
    try:
        acker.after_step(3)
        res["ack"] = "accepted"
        acked += [s["__sample_id__"] for s in held]
    except Fenced as e:
        res["ack"] = "Fenced: " + str(e)
    try:
        next(it)
        res["lease"] = "accepted"
    except Fenced as e:
        res["lease"] = "Fenced: " + str(e)
    res["acked"] = acked
    open(out, "w").write(json.dumps(res))
""")


def _wait(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_second_trainer_is_refused_then_takes_over_and_fences_the_first(
        tmp_path: Path, backend: str, redis_uri: str) -> None:
    store = f"file://{tmp_path / 'store'}"
    ledger = (f"sqlite://{tmp_path / 'ledger.db'}" if backend == "sqlite"
              else redis_uri + f"?namespace=fence{tmp_path.name[-8:]}")
    _produce(store, ledger)
    script = tmp_path / "first.py"
    script.write_text(_FIRST)
    go, out = tmp_path / "go", tmp_path / "first.json"
    proc = subprocess.Popen([sys.executable, str(script), store, ledger, str(go), str(out)])
    try:
        _wait(Path(str(out) + ".ready"), proc)
        # The same script started twice by mistake: refused, naming the holder; nothing changed.
        before = open_ledger(ledger).counts()
        second = FeatureStoreDataset(store, ledger, batch_size=4, idle_timeout=30)
        with pytest.raises(SessionConflict, match=rf"pid {proc.pid}.*takeover=True"):
            StepAcker(second).resume(None)
        with pytest.raises(SessionConflict, match="live trainer session"):
            next(iter(second))  # a fence-less consumer cannot split the data either
        assert open_ledger(ledger).counts() == before
        # Taking over on purpose fences the first trainer.
        acker = StepAcker(second, takeover=True)
        acker.resume(None)
        go.write_text("1")
        mine: list[str] = []
        it = iter(second)
        for step in range(1, 100):
            try:
                batch = [next(it) for _ in range(4)]
            except StopIteration:
                break
            for s in batch:
                acker.add({"__lease__": [s["__lease__"]]})
            acker.after_step(step)
            mine += [s["__sample_id__"] for s in batch]
            if len(mine) + 8 >= N:
                break
        assert proc.wait(60) == 0
        res = json.loads(out.read_text())
    finally:
        proc.kill()
        proc.wait()
    assert res["ack"].startswith("Fenced:") and "took over" in res["ack"], res
    assert res["lease"].startswith("Fenced:"), res
    first = res["acked"]
    assert len(first) == 8
    # reconcile(None) replays what the first trained (no checkpoint): the new trainer trains
    # everything, once; nothing the first did after the takeover counts.
    rest = [next(it)["__sample_id__"] for _ in range(N - len(mine))] if len(mine) < N else []
    assert sorted(mine + rest) == [f"s{i:03d}" for i in range(N)]
    assert len(set(mine + rest)) == N


def test_session_ends_cleanly_and_a_dead_holder_needs_no_takeover(tmp_path: Path) -> None:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    _produce(store, ledger, 4)
    # A holder that died (SIGKILL) on this host: the next trainer starts at once.
    code = ("import sys; from torch_dataflow import FeatureStoreDataset, StepAcker;"
            "ds = FeatureStoreDataset(sys.argv[1], sys.argv[2]); StepAcker(ds).resume(None);"
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code, store, ledger]).returncode == -9
    led = open_ledger(ledger)
    assert led.session() is not None and not led.session()["live"]
    ds = FeatureStoreDataset(store, ledger, batch_size=2)
    acker = StepAcker(ds)
    acker.resume(None)
    assert led.session()["live"] and led.session()["fence"] == ds.fence
    acker.finish()
    assert led.session() is None


def _train_steps(ds: FeatureStoreDataset, acker: StepAcker, it: Iterator, steps: range) -> list[str]:
    seen = []
    for step in steps:
        batch = [next(it) for _ in range(ds.batch_size)]
        for s in batch:
            acker.add({"__lease__": [s["__lease__"]]})
        acker.after_step(step)
        seen += [s["__sample_id__"] for s in batch]
    return seen


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_resume_from_the_previous_checkpoint_replays_what_it_lacks(
        tmp_path: Path, backend: str, redis_uri: str) -> None:
    store = f"file://{tmp_path / 'store'}"
    ledger = (f"sqlite://{tmp_path / 'ledger.db'}" if backend == "sqlite"
              else redis_uri + f"?namespace=ret{tmp_path.name[-8:]}")
    n = 16
    _produce(store, ledger, n)
    ds = FeatureStoreDataset(store, ledger, batch_size=2, idle_timeout=5)
    acker = StepAcker(ds)
    acker.resume(None)
    it = iter(ds)
    trained = {}
    for s in _train_steps(ds, acker, it, range(1, 7)):
        trained[s] = trained.get(s, 0) + 1
    acker.checkpoint_written(2)
    acker.checkpoint_written(4)
    acker.checkpoint_written(6)  # last.ckpt never written: a crash leaves only the step-4 file
    led = open_ledger(ledger)
    assert led.checkpoints() == [2, 4, 6]
    assert len(open_store(store).keys()) == n - 8  # freed up to the previous mark (step 4), not to 6
    # A resume from step 2 is older than what was freed: refused, nothing changes.
    before = led.counts()
    with pytest.raises(CheckpointTooOld, match=r"step 2.*newest checkpoint the ledger knows is at step 6") as e:
        StepAcker(FeatureStoreDataset(store, ledger, batch_size=2), takeover=True).resume(2)
    assert (e.value.needed_step, e.value.newest_step) == (2, 6)
    assert led.counts() == before
    # A resume from step 4 (the checkpoint a stale last.ckpt points at) replays steps 5-6.
    ds2 = FeatureStoreDataset(store, ledger, batch_size=2, idle_timeout=5)
    a2 = StepAcker(ds2, takeover=True)
    report = a2.resume(4)
    assert report.replayed == 4
    it2 = iter(ds2)
    replay = _train_steps(ds2, a2, it2, range(5, 5 + (n - 8) // 2))
    steps_5_6 = [s for s, k in trained.items() if k and s not in _upto(led, 4)]
    assert len(steps_5_6) == 4 and set(steps_5_6) <= set(replay)  # what the step-4 file lacks comes back
    # Every sample trained once in the history the step-4 checkpoint continues.
    kept = [s for s, step in led.trained_steps().items() if step <= 4]
    assert len(kept) == 8 and set(kept).isdisjoint(replay)
    assert sorted(kept + replay) == [f"s{i:03d}" for i in range(n)]
    a2.checkpoint_written(a2.step)
    a2.finish()
    assert open_store(store).keys() == []  # zero leftover bytes
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    c = led.counts()
    assert (c.pending, c.leased, c.trained, c.durable, c.freed) == (0, 0, 0, n, n)


def _upto(led: object, step: int) -> set[str]:
    return {s for s, k in led.trained_steps().items() if k <= step}  # type: ignore[attr-defined]
