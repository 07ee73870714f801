"""Shared fixtures: fail any test that leaks a thread or a child process."""

from __future__ import annotations

import os
import threading
import time

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _children() -> set[int]:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            pids = {int(p) for p in f.read().split()}
    except OSError:
        return set()
    # multiprocessing's resource tracker is started once by the first spawned
    # process and lives for the whole session by design: not a leak.
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return pids - {tracker}


@pytest.fixture(autouse=True)
def no_leaked_threads_or_processes(request: pytest.FixtureRequest):
    threads = set(threading.enumerate())
    children = _children()
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        new_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive() and not t.daemon]
        new_children = _children() - children
        if not new_threads and not new_children:
            return
        time.sleep(0.05)
    if request.node.get_closest_marker("allow_leaks"):
        return
    pytest.fail(f"test leaked threads {new_threads} or child processes {sorted(new_children)}")


@pytest.fixture(scope="module")
def redis_uri():
    """A real redis-server on 127.0.0.1 (a free port) for one test module; stopped by pid after it."""
    import shutil

    from torch_dataflow.ledger.redis_server import INSTALL_HINT, RedisServer

    if shutil.which("redis-server") is None:
        pytest.fail(f"redis-server is needed: {INSTALL_HINT}")
    with RedisServer() as srv:
        yield srv.uri
