"""Prometheus metrics: a real HTTP scrape during a real producer -> DataLoader(num_workers=2) run,
with forked and spawned workers, checked against the ledger."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch
from torch.utils.data import DataLoader

from torch_dataflow import FeatureStoreDataset, FeatureWriter
from torch_dataflow.ledger import open_ledger
from torch_dataflow.metrics import read, serve

pytest.importorskip("prometheus_client")

N = 48


def _produce(store: str, ledger: str) -> None:
    with FeatureWriter(store, ledger, name="p0") as w:
        for i in range(N):
            w.put(f"s{i:03d}", {"x": torch.full((16,), float(i))})
            time.sleep(0.005)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_scrape_counts_every_worker(tmp_path, context):
    store, ledger_uri = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    ledger = open_ledger(ledger_uri)
    with serve(0, ledger=ledger_uri) as server:
        assert server.host == "127.0.0.1"
        producer = mp.get_context("fork").Process(target=_produce, args=(store, ledger_uri))
        producer.start()
        try:
            ds = FeatureStoreDataset(store, ledger_uri, batch_size=4, poll=0.01, idle_timeout=60)
            loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
            seen, mid = [], None
            for step, batch in enumerate(loader, start=1):
                seen += batch["__sample_id__"]
                ds.ack(batch, step=step)
                if step == 3:  # mid-run: only this process acks, so trained counts are exact
                    mid = read(server.url)
                    c = ledger.counts()
                    assert mid["torch_dataflow_acked_total"] == 12
                    assert mid['torch_dataflow_ledger_deliveries{state="trained"}'] == 12
                    assert 12 <= mid["torch_dataflow_leased_total"] <= c.leased + c.trained
                    assert mid["torch_dataflow_producer_put_total"] <= c.committed
        finally:
            producer.join(30)
        assert producer.exitcode == 0 and mid is not None
        assert sorted(seen) == [f"s{i:03d}" for i in range(N)]
        # The workers have exited: what they counted must still be there.
        got = read(server.url)
        c = ledger.counts()
        assert c.trained == N and c.committed == N
        assert got["torch_dataflow_leased_total"] == N
        assert got["torch_dataflow_get_seconds_count"] == N
        assert got["torch_dataflow_acked_total"] == N
        assert got["torch_dataflow_producer_put_total"] == N
        nbytes = sum(ref.nbytes for ref in ledger.committed_refs(seen).values())
        assert got["torch_dataflow_loaded_bytes_total"] == nbytes == got["torch_dataflow_producer_put_bytes_total"]
        assert got['torch_dataflow_ledger_deliveries{state="trained"}'] == N
        assert got['torch_dataflow_ledger_samples{status="committed"}'] == N
        assert got["torch_dataflow_ledger_lag_samples"] == 0
        assert got["torch_dataflow_ledger_stream_open"] == 0
        assert got['torch_dataflow_stall{reason="stream_closed"}'] == 1
        assert got['torch_dataflow_lease_seconds_count'] >= N / 4
        # One file per process that counted: two workers, the producer, this process.
        pids = {f.rsplit("_", 1)[1].split(".")[0] for f in os.listdir(server.directory)}
        assert len(pids) >= 4, pids
        directory = server.directory
    assert not os.path.exists(directory)  # the private directory goes with the server
    assert "TORCH_DATAFLOW_METRICS_DIR" not in os.environ


def test_metrics_off_by_default(tmp_path):
    from torch_dataflow.metrics import _record

    assert _record.active() is None
    with FeatureWriter("memory://m-off", "memory://m-off") as w:
        w.put("a", {"x": torch.ones(1)})  # nothing recorded, nothing raised


def test_serves_on_loopback(tmp_path):
    import socket

    with serve(0) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
        assert read(server.url)["torch_dataflow_leased_total"] == 0
