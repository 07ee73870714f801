"""In-process ledger: ``memory://NAME``.

The same state machine as the SQLite ledger (it *is* the SQLite ledger, on an
in-memory database), shared by every client in one process that names the
same ``NAME``. It cannot be shared across processes: a DataLoader worker or
any other process that touches it gets a :class:`ConfigError` instead of a
silently diverging copy. Use ``sqlite:///path`` for workers.

Example:
    >>> from torch_dataflow.ledger import open_ledger
    >>> a, b = open_ledger("memory://doc"), open_ledger("memory://doc")
    >>> a.reserve(["x"]) == [1] and b.reserve(["x"]) == [2]
    True
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from ..auth import SecretGuard
from ..errors import ConfigError
from ..uri import parse_uri
from ._sqlite_schema import _td_ord
from .sqlite import SQLiteLedger

__all__ = ["MemoryLedger"]

# name -> (owning pid, connection, lock, verifier)
_REGISTRY: dict[str, tuple[int, sqlite3.Connection, threading.RLock, str | None]] = {}
_REGISTRY_LOCK = threading.Lock()


class MemoryLedger(SQLiteLedger):
    """A process-local ledger (tests, single-process tools)."""

    _closes_at_fork = False  # the connection *is* the state; a child refuses to use it anyway

    def __init__(self, name: str = "", *, secret: str | None = None) -> None:
        super().__init__(":memory:", secret=secret)
        self.name = name
        self.uri = f"memory://{name}"
        self._created_pid = os.getpid()

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> MemoryLedger:
        u = parse_uri(uri, {"secret": str})
        name = (u.host or "") + (u.path or "")
        return cls(name, **{**u.query, **overrides})

    def _config_state(self) -> dict[str, Any]:
        # The creating process travels with a pickle: a spawn-started DataLoader worker
        # (which has no registry entry yet) must refuse, not open a new empty ledger.
        return {"name": self.name, "secret": self._secret, "origin_pid": self._created_pid}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> MemoryLedger:
        state = dict(state)
        origin = state.pop("origin_pid", None)
        ledger = cls(**state)
        if origin is not None:
            ledger._created_pid = int(origin)
        return ledger

    def _attach(self) -> None:
        pid = os.getpid()
        with _REGISTRY_LOCK:
            entry = _REGISTRY.get(self.name)
            if entry is not None and entry[0] != pid:
                # Inherited through fork: the parent's state is a stale copy here.
                raise ConfigError(
                    f"ledger {self.uri} lives in process {entry[0]} and cannot be used from process {pid} "
                    "(e.g. a DataLoader worker); use sqlite:///path/ledger.db to share a ledger between processes"
                )
            if entry is None:
                if pid != self._created_pid:
                    raise ConfigError(f"ledger {self.uri} was created in process {self._created_pid}; a memory "
                                      "ledger cannot cross processes (use sqlite:///path/ledger.db)")
                con = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                con.create_function("td_ord", 3, _td_ord, deterministic=True)
                con.execute("BEGIN IMMEDIATE")
                verifier = self._ensure_schema(con)
                con.execute("COMMIT")
                entry = (pid, con, threading.RLock(), verifier)
                _REGISTRY[self.name] = entry
        _, con, lock, verifier = entry
        self._guard = SecretGuard.attach(self._secret, verifier, f"ledger {self.uri}")
        self._con, self._lock, self._pid = con, lock, pid

    def close(self) -> None:
        # The state belongs to the process-wide registry, like a server's.
        self._con, self._guard = None, None

    @staticmethod
    def drop(name: str) -> None:
        """Forget the state behind ``memory://name`` (tests)."""
        with _REGISTRY_LOCK:
            entry = _REGISTRY.pop(name, None)
        if entry is not None:
            entry[1].close()
