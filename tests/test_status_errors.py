"""`torch-dataflow status` against a wrong address: one typed line on stderr, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from torch_dataflow.errors import ConfigError

pytest.importorskip("redis")

ROOT = Path(__file__).resolve().parents[1]


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch_dataflow.cli", "status", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture
def http_port() -> Iterator[int]:
    """A plain TCP listener on loopback that answers everything like a small HTTP server."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()
    t.join(5)


def test_status_of_a_port_that_is_not_redis_is_one_line(http_port: int) -> None:
    r = _status(f"redis://127.0.0.1:{http_port}/0")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert lines[0].startswith("torch-dataflow: error: ")
    assert f"127.0.0.1:{http_port}" in lines[0] and "does not answer as a Redis server" in lines[0]
    assert "check the URI's host and port" in lines[0]


def test_the_error_is_typed_in_the_library(http_port: int) -> None:
    from torch_dataflow.status import collect_status

    with pytest.raises(ConfigError, match="does not answer as a Redis server"):
        collect_status(f"redis://127.0.0.1:{http_port}/0")


def test_status_of_a_closed_port_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there afterwards
    r = _status(f"redis://127.0.0.1:{port}/0?retries=1")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "unreachable" in r.stderr


def test_status_of_a_port_that_never_answers_ends_with_one_line() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:  # accept and keep every connection open, never write a byte
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        r = _status(f"redis://127.0.0.1:{srv.getsockname()[1]}/0")  # default timeouts: a status look is short
    finally:
        srv.close()
        t.join(5)
        for c in held:
            c.close()
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "unreachable after 2 retries" in r.stderr and "Timeout" in r.stderr


def test_status_of_a_mistyped_redis_namespace_creates_nothing(redis_uri: str) -> None:
    import redis

    from torch_dataflow import FeatureWriter

    with FeatureWriter("memory://status-ns", f"{redis_uri}?namespace=run1") as w:
        w.put("a", {"x": __import__("torch").zeros(1)})
    r = _status(f"{redis_uri}?namespace=run1")
    assert r.returncode == 0 and "rnu1" not in r.stdout, r.stderr  # the right namespace: its status
    r = _status(f"{redis_uri}?namespace=rnu1")
    assert r.returncode == 2 and "no ledger in namespace 'rnu1'" in r.stderr, r.stderr
    r = _status(redis_uri.rsplit("/", 1)[0] + "/3?namespace=run1")  # the wrong db number
    assert r.returncode == 2 and "of db 3" in r.stderr, r.stderr
    client = redis.Redis.from_url(redis_uri)
    assert not client.keys("{rnu1}*")  # nothing was created for the typo
    client.flushdb()
    client.close()
