"""A Mooncake producer's objects live in its own segment and die with its process.
A producer that exits before its consumers trained them loses them: it must say so
when it closes, `wait_consumed()` must keep them alive until they are trained, and
a trainer that ends with quarantined samples must say they were not trained."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_mooncake import master  # noqa: F401 - the session's real mooncake_master (a fixture)
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset
from torch_dataflow.acking import StepAcker

pytestmark = [pytest.mark.mooncake, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
N = 4

_PRODUCER = """
import sys, torch
from torch_dataflow import FeatureWriter
store, ledger, wait = sys.argv[1], sys.argv[2], sys.argv[3] == "wait"
w = FeatureWriter(store, ledger, name="producer-0")
for i in range(%d):
    w.put(f"s{i}", {"x": torch.full((1024,), float(i))})
if wait:
    print("consumed", w.wait_consumed(timeout=180), flush=True)
else:
    w.close()
""".replace("%d", str(N))


def _producer(store: str, ledger: str, mode: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", _PRODUCER, store, ledger, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _train(store: str, ledger: str) -> tuple[list[str], StepAcker]:
    ds = FeatureStoreDataset(store, ledger, batch_size=2, idle_timeout=120)
    acker = StepAcker(ds)
    acker.resume(None)
    seen: list[str] = []
    for batch in DataLoader(ds, batch_size=2):
        seen += batch["__sample_id__"]
        acker.add(batch)
        acker.after_step()
    acker.checkpoint_written()
    return seen, acker


def test_a_producer_that_exits_first_warns_and_the_trainer_reports_the_loss(
        master: Any, tmp_path: Path, caplog) -> None:  # noqa: F811 - the fixture
    ns = f"t{uuid.uuid4().hex[:10]}"
    ledger = f"sqlite://{tmp_path}/l.db"
    prod = _producer(f"{master.uri}?namespace={ns}&segment_size=64MiB", ledger, "close")
    _, err = prod.communicate(timeout=120)
    assert prod.returncode == 0, err
    assert "become unreadable" in err and "wait_consumed()" in err  # said at close, before the loss
    with caplog.at_level(logging.ERROR, logger="torch_dataflow.acking"):
        seen, acker = _train(f"{master.uri}?namespace={ns}", ledger)
        acker.finish(warn=False)
    assert seen == []
    assert any(f"{N} samples of" in r.getMessage() and "NOT trained" in r.getMessage() for r in caplog.records)


def test_wait_consumed_keeps_the_segment_until_the_trainer_is_done(
        master: Any, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    ns = f"t{uuid.uuid4().hex[:10]}"
    ledger = f"sqlite://{tmp_path}/l.db"
    prod = _producer(f"{master.uri}?namespace={ns}&segment_size=64MiB", ledger, "wait")
    try:
        seen, acker = _train(f"{master.uri}?namespace={ns}", ledger)
        acker.finish()
        out, err = prod.communicate(timeout=120)
    finally:
        if prod.poll() is None:
            prod.kill()
            prod.communicate()
    assert sorted(seen) == [f"s{i}" for i in range(N)]
    assert prod.returncode == 0 and "consumed True" in out, err
    assert "become unreadable" not in err
