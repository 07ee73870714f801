"""`torch-dataflow status --watch`: the live view through rich's recording console (no screenshots)."""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.ledger import open_ledger

pytest.importorskip("rich")


def test_watch_shows_rates_lag_producers_consumers_and_reason(tmp_path):
    from rich.console import Console

    from torch_dataflow.status_watch import watch

    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    w = FeatureWriter(store, ledger, name="producer-7")
    w.put("s0", {"x": torch.ones(4)})
    open_ledger(ledger).lease("rank0/w1", 1, ttl=90)
    stop = threading.Event()

    def produce() -> None:
        i = 1
        while not stop.is_set():
            w.put(f"s{i}", {"x": torch.ones(4)})
            i += 1
            stop.wait(0.01)

    t = threading.Thread(target=produce)
    t.start()
    console = Console(record=True, file=io.StringIO(), width=160)
    try:
        assert watch(ledger, console=console, interval=0.3, iterations=3) == 0
    finally:
        stop.set()
        t.join()
    w.close()
    text = console.export_text()
    last = text[text.rindex("stream open"):]  # the final frame
    assert "producer-7" in last and "alive" in last
    assert "rank0/w1" in last and "in 8" in last  # expires in ~89 s
    assert "[ready]" not in last and "ready:" in last  # things are pending: a loader would not wait
    rates = [tok for tok in last.split() if tok.endswith("/s")]
    assert rates and float(rates[0][:-2]) > 5, rates  # commits measured between two refreshes
    assert "delete queue" in last


def test_watch_json_is_one_snapshot_per_line(tmp_path, capsys):
    from torch_dataflow.status_watch import watch

    store, ledger = f"file://{tmp_path}/store", f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(store, ledger, name="p0") as w:
        w.put("a", {"x": torch.ones(2)})
    assert watch(ledger, interval=0.01, iterations=2, as_json=True) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    snap = json.loads(lines[1])
    assert snap["samples"]["committed"] == 1 and snap["stall"]["reason"] == "ready" and snap["delete_queue"] == 0


def test_cli_status_watch_json(tmp_path, capsys, monkeypatch):
    from torch_dataflow import status_watch
    from torch_dataflow.cli import main

    ledger = f"sqlite://{tmp_path}/ledger.db"
    open_ledger(ledger).counts()  # creates the file
    real = status_watch.watch
    monkeypatch.setattr(status_watch, "watch", lambda *a, **k: real(*a, **{**k, "iterations": 1}))
    assert main(["status", ledger, "--watch", "--json", "--interval", "0.01"]) == 0
    assert json.loads(capsys.readouterr().out)["stream"] == "open"


def test_cli_status_watch_redirected_prints_every_refresh_at_once(tmp_path):
    """`status --watch > log`: each refresh is in the file while the command still runs, headers whole."""
    import os
    import subprocess
    import sys
    import time

    ledger = f"sqlite://{tmp_path}/ledger.db"
    with FeatureWriter(f"file://{tmp_path}/store", ledger, name="p0") as w:
        w.put("a", {"x": torch.ones(2)})
    log = tmp_path / "watch.log"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch_dataflow.cli", "status", ledger, "--watch",
                                 "--interval", "0.2"], stdout=out, stderr=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + 60
            while log.read_text().count("-- ") < 2 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            text = log.read_text()  # read while it runs: nothing waits for the end
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert text.count("-- ") >= 2 and text.count("(stream closed, attempt 0)") >= 2, text
    assert "delete queue" in text and "quarantined" in text  # headers not cut to 80 columns
