"""``memory://NAME``: an in-process store, for tests and single-process jobs.

Clients that open the same ``NAME`` in one process share one store, the way
clients of a server share it (``memory://`` with no name is one more store).

The store is **process-local**. A DataLoader worker started by ``fork`` sees a
snapshot of the parent's store taken at fork time (later puts are invisible,
its own puts are invisible to the parent); in a process started by ``spawn`` or
``forkserver`` the store raises :class:`ConfigError` instead of looking empty. Use ``file://`` or ``mooncake://`` when
producers and trainers are different processes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..auth import SecretGuard, make_verifier
from ..errors import ConfigError
from ..uri import parse_size, parse_uri
from .base import Buffer, FeatureStore, StoreHealth

__all__ = ["MemoryStore"]

_QUERY = {"secret": str, "max_bytes": "size"}


@dataclass
class _Shared:
    """What all clients of one name share: the bytes, the verifier, the lock."""

    verifier: str | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    blobs: dict[tuple[str, int], bytes] = field(default_factory=dict)
    resident: int = 0


_REGISTRY: dict[str, _Shared] = {}
_REGISTRY_LOCK = threading.Lock()


class MemoryStore(FeatureStore):
    """Sample bytes in this process's memory, shared by name.

    Args:
        name: clients with the same name share one store.
        secret: the first client of a name fixes the store's secret (or its
            absence); later clients must present the same one.
        max_bytes: byte budget the producer respects (backpressure waits in
            the producer; the store itself never refuses or evicts).

    Example:
        >>> import torch
        >>> a = MemoryStore("doc-mem")
        >>> ref = a.put("s1", 1, {"x": torch.ones(2)})
        >>> MemoryStore("doc-mem").get(ref)["x"].tolist()   # another client, same store
        [1.0, 1.0]
        >>> MemoryStore.destroy("doc-mem")
    """

    direct_reads = True  # the default read_blob_into copies straight out of the stored bytes

    def __init__(self, name: str = "", *, secret: str | None = None, max_bytes: int | str | None = None,
                 _home_pid: int | None = None) -> None:
        if not isinstance(name, str) or "?" in name or "#" in name:
            raise ConfigError(f"memory store name must be a str without '?' or '#', got {name!r}")
        self.name = name
        self.secret = secret
        self.max_bytes = None if max_bytes is None else parse_size(max_bytes)
        self.uri = f"memory://{name}"
        self._shared: _Shared | None = None
        self._home_pid = os.getpid() if _home_pid is None else _home_pid

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> MemoryStore:
        """Build from ``memory://NAME?secret=...&max_bytes=64MiB``; keyword overrides win."""
        parsed = parse_uri(uri, _QUERY)
        if parsed.scheme != "memory":
            raise ConfigError(f"not a memory:// URI: {uri!r}")
        parts = urlsplit(uri)
        name = parts.netloc + parts.path  # netloc keeps the name's case; hostname would not
        kwargs: dict[str, Any] = {**parsed.query, **overrides}
        return cls(name, **kwargs)

    @classmethod
    def destroy(cls, name: str) -> None:
        """Forget the store ``name`` and free its bytes (clients that reattach get a new one)."""
        with _REGISTRY_LOCK:
            _REGISTRY.pop(name, None)

    # ------------------------------------------------------------- internals
    def _attach(self) -> None:
        with _REGISTRY_LOCK:
            shared = _REGISTRY.get(self.name)
            if shared is None and self._home_pid != os.getpid():
                # Unpickled in another process (e.g. a spawned DataLoader worker): an
                # empty store here would make every committed sample look lost.
                raise ConfigError(f"store {self.uri} lives in process {self._home_pid} and cannot be used from "
                                  f"process {os.getpid()}; use file:///dir or mooncake:// across processes")
            if shared is None:
                shared = _REGISTRY[self.name] = _Shared(
                    verifier=None if self.secret is None else make_verifier(self.secret)
                )
        # Set the guard before publishing the shared entry: a failed attach leaves no access.
        self._guard = SecretGuard.attach(self.secret, shared.verifier, f"store {self.uri}")
        self._shared = shared

    def _store(self) -> _Shared:
        if self._shared is None:
            self._attach()
        assert self._shared is not None
        return self._shared

    def _write(self, sample_id: str, generation: int, parts: Sequence[Buffer], nbytes: int) -> None:
        blob = b"".join(parts)  # the one copy: the store must not alias the caller's tensors
        if len(blob) != nbytes:
            raise ConfigError(f"parts hold {len(blob)} bytes, expected {nbytes}")
        s = self._store()
        with s.lock:
            old = s.blobs.get((sample_id, generation))
            s.blobs[(sample_id, generation)] = blob
            s.resident += nbytes - (len(old) if old is not None else 0)

    def _read(self, sample_id: str, generation: int) -> Buffer:
        s = self._store()
        with s.lock:
            blob = s.blobs.get((sample_id, generation))
        if blob is None:
            raise self._missing(sample_id, generation, self.uri)
        # bytes are immutable and never modified in place, so a delete after this
        # point cannot pull memory out from under a zero-copy reader.
        return blob

    def _delete(self, sample_id: str, generation: int) -> bool:
        s = self._store()
        with s.lock:
            blob = s.blobs.pop((sample_id, generation), None)
            if blob is not None:
                s.resident -= len(blob)
        return blob is not None

    def _exists(self, sample_id: str, generation: int) -> bool:
        s = self._store()
        with s.lock:
            return (sample_id, generation) in s.blobs

    def _keys(self) -> Iterator[tuple[str, int]]:
        s = self._store()
        with s.lock:
            keys = list(s.blobs)
        return iter(keys)

    def store_id(self) -> str:
        """``memory:<name>``: clients of one name in one process share one store."""
        self._check_auth()
        return f"memory:{self.name}"

    def health(self) -> StoreHealth:
        """Resident bytes and sample count (O(1): kept up to date under the lock)."""
        self._check_auth()
        s = self._store()
        with s.lock:
            return StoreHealth(resident_bytes=s.resident, count=len(s.blobs))

    def close(self) -> None:
        """Drop this client's handle; the named store lives on for other clients."""
        self._shared = None
        self._guard = None

    def _config_state(self) -> dict[str, Any]:
        return {"name": self.name, "secret": self.secret, "max_bytes": self.max_bytes, "_home_pid": self._home_pid}
