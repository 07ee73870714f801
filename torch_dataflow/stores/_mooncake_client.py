"""One Mooncake client per process, shared by every :class:`MooncakeStore` of it.

A ``MooncakeDistributedStore`` takes 1-2 s to close and mounts memory, so each
process keeps one per configuration and reuses it; a process that finds itself
forked (another pid) starts fresh clients and never touches the inherited ones
(closing them would unmount the parent's memory). Clients are closed at exit,
which is also when the objects in their segment disappear.

This module also holds the two pieces of bookkeeping Mooncake does not do for
us: the keys this process wrote (Mooncake cannot list keys) and the removals
that met a read lease (``-706``) and wait in a queue for :meth:`_Client.gc`.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, ConfigError, DataflowError, ForkedClient, SampleUnavailable, StoreFull
from ._mooncake_buffers import OwnerRegistry, RecvPool
from .mooncake_master import INSTALL_HINT

__all__ = ["MooncakeConfig", "get_client", "close_all", "status_error", "buffer_address"]

log = logging.getLogger("torch_dataflow.stores.mooncake")

# Mooncake ErrorCode values (mooncake-store/include/types.h) this adapter acts on.
OK = 0
NO_AVAILABLE_HANDLE = -200  # segment full
INVALID_PARAMS = -600  # e.g. destination buffer smaller than the object
OBJECT_NOT_FOUND = -704
OBJECT_HAS_LEASE = -706
REPLICA_NOT_FOUND = -710
REPLICA_IS_GONE = -712
TRANSFER_FAIL = -800
RPC_FAIL = -900
_GONE = {OBJECT_NOT_FOUND, REPLICA_NOT_FOUND, REPLICA_IS_GONE}
_NAMES = {
    -1: "INTERNAL_ERROR",
    -101: "SEGMENT_NOT_FOUND",
    -103: "CLIENT_NOT_FOUND",
    -200: "NO_AVAILABLE_HANDLE",
    -400: "INVALID_KEY",
    -500: "WRITE_FAIL",
    -600: "INVALID_PARAMS",
    -703: "REPLICA_IS_NOT_READY",
    -704: "OBJECT_NOT_FOUND",
    -705: "OBJECT_ALREADY_EXISTS",
    -706: "OBJECT_HAS_LEASE",
    -707: "LEASE_EXPIRED",
    -710: "REPLICA_NOT_FOUND",
    -712: "REPLICA_IS_GONE",
    -800: "TRANSFER_FAIL",
    -900: "RPC_FAIL",
}


def code_name(rc: int) -> str:
    return f"{_NAMES.get(rc, 'error')} {rc}"


def status_error(rc: int, op: str, what: str) -> DataflowError:
    """The project error for Mooncake status ``rc`` returned by ``op`` on ``what``."""
    msg = f"mooncake {op} of {what} failed: {code_name(rc)}"
    if rc in _GONE:
        return SampleUnavailable(f"{what} is not in the store (mooncake {op}: {code_name(rc)})")
    if rc == NO_AVAILABLE_HANDLE:
        return StoreFull(f"{msg}: the segments are full (free samples, or raise segment_size)")
    return BackendUnavailable(msg)


def buffer_address(buf: Any) -> int:
    """Address of the first byte of a C-contiguous buffer (read-only buffers too)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # ~1 us; writable buffers only
    except (TypeError, ValueError):  # read-only or empty: numpy's route (~6 us)
        return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of ``(ptr, n)`` ranges: Mooncake refuses overlapping registrations."""
    out: list[list[int]] = []
    for ptr, n in sorted((p, n) for p, n in ranges if n > 0):
        if out and ptr <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], ptr + n - out[-1][0])
        else:
            out.append([ptr, n])
    return [(p, n) for p, n in out]


@dataclass(frozen=True, kw_only=True)
class MooncakeConfig:
    """Everything that identifies one Mooncake client (see ``MooncakeStore``)."""

    master: str
    protocol: str = "tcp"
    devices: str = ""
    segment_size: int = 1 << 30
    buffer_size: int = 16 << 20
    metadata_server: str = "P2PHANDSHAKE"
    local_hostname: str = "127.0.0.1"
    connect_timeout: float = 10.0


@dataclass
class _Client:
    cfg: MooncakeConfig
    lock: threading.RLock = field(default_factory=threading.RLock)
    store: Any = None
    mounted: bool = False
    put_cfg: Any = None
    # namespace -> {key: nbytes} written by this process and not deleted.
    written: dict[str, dict[str, int]] = field(default_factory=dict)
    # key -> (namespace, first -706 time): freed by us, bytes still held under a read lease.
    pending: dict[str, tuple[str, float]] = field(default_factory=dict)
    # transfer=staging: one registered arena per client, guarded by ``lock``.
    arena: Any = None
    # A small registered buffer for readability probes (MooncakeStore.readable), guarded by ``lock``.
    probe_buf: Any = None
    # Reads land in memory registered once and reused (_mooncake_buffers); made at connect.
    recv: Any = None
    owners: Any = None

    # ----------------------------------------------------------- connection
    def connect(self) -> Any:
        if self.store is not None:
            return self.store
        with self.lock:
            if self.store is not None:
                return self.store
            # Quiet by default: Mooncake writes ~16 INFO lines per client through glog, at the level
            # MC_LOG_LEVEL names when its native module loads. MC_LOG_LEVEL=INFO brings them back.
            os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
            try:
                from mooncake.store import MooncakeDistributedStore, ReplicateConfig
            except ImportError as e:
                raise ImportError(f"{INSTALL_HINT} ({e})") from e
            host, _, port = self.cfg.master.rpartition(":")
            try:  # setup() retries for ~90 s against a dead master: fail fast instead
                socket.create_connection((host, int(port)), timeout=self.cfg.connect_timeout).close()
            except (OSError, ValueError) as e:
                raise BackendUnavailable(f"mooncake master {self.cfg.master} is not reachable: {e}") from e
            global _NATIVE_PID
            _NATIVE_PID = os.getpid()  # Mooncake's native state now lives in this process (see get_client)
            store = MooncakeDistributedStore()
            # Readers contribute no memory: the segment is mounted on the first put.
            rc = store.setup(
                self.cfg.local_hostname,
                self.cfg.metadata_server,
                0,
                self.cfg.buffer_size,
                self.cfg.protocol,
                self.cfg.devices,
                self.cfg.master,
            )
            if rc != OK:
                raise BackendUnavailable(f"mooncake setup against {self.cfg.master} failed: {code_name(rc)}")
            cfg = ReplicateConfig()
            cfg.with_hard_pin = True  # never evicted: the ledger is the only authority over lifetime
            cfg.replica_num = 1
            self.put_cfg = cfg
            self.owners = OwnerRegistry(store)
            self.recv = RecvPool(store, before_register=self.owners.sweep)
            self.store = store
            return store

    def ensure_segment(self) -> None:
        """Mount this process's segment (once) and place our puts in it."""
        if self.mounted:
            return
        with self.lock:
            if self.mounted:
                return
            store = self.connect()
            if self.cfg.segment_size > 0:
                res = store.allocate_and_mount_segment(self.cfg.segment_size, self.cfg.protocol)
                rc = int(res.get("ret", -1)) if isinstance(res, dict) else int(res)
                if rc != OK:
                    raise BackendUnavailable(
                        f"mounting a {self.cfg.segment_size}-byte mooncake segment failed: {code_name(rc)}"
                    )
                # Objects live with their writer, so a producer's death loses only its own samples.
                self.put_cfg.preferred_segment = store.get_hostname()
            self.mounted = True

    # --------------------------------------------------------- registration
    def staging_arena(self) -> Any:
        """The client's registered staging arena (``buffer_size`` bytes), made on first use."""
        with self.lock:
            if self.arena is None:
                import torch

                arena = torch.empty(self.cfg.buffer_size, dtype=torch.uint8)
                rc = self.connect().register_buffer(arena.data_ptr(), arena.numel())
                if rc != OK:
                    raise BackendUnavailable(f"registering a staging arena failed: {code_name(rc)}")
                self.arena = arena  # registered until the client closes
            return self.arena

    def probe(self, key: str, nbytes: int = 16) -> int:
        """Read the first ``nbytes`` of ``key`` into a small registered buffer: the
        transfer's return code (``nbytes`` when the bytes are really readable)."""
        with self.lock:
            store = self.connect()
            if self.probe_buf is None:
                import torch

                buf = torch.empty(4096, dtype=torch.uint8)
                rc = store.register_buffer(buf.data_ptr(), buf.numel())
                if rc != OK:
                    raise BackendUnavailable(f"registering a probe buffer failed: {code_name(rc)}")
                self.probe_buf = buf  # registered until the client closes
            ptr = self.probe_buf.data_ptr()
            return int(store.get_into_ranges([ptr], [[key]], [[[0]]], [[[0]]], [[[nbytes]]])[0][0][0])

    @contextmanager
    def registered(self, ranges: Sequence[tuple[int, int]]) -> Iterator[bool]:
        """Register ``ranges`` for the duration; yields ``False`` if any could not be."""
        store = self.connect()
        done: list[int] = []
        ok = True
        if ranges and self.owners is not None:
            self.owners.sweep()  # a registration of dead memory must not overlap these
        for ptr, n in _merge(ranges):
            if store.register_buffer(ptr, n) == OK:
                done.append(ptr)
            else:  # overlaps a registration held elsewhere (another thread): caller copies
                ok = False
        try:
            yield ok
        finally:
            for ptr in done:
                store.unregister_buffer(ptr)

    # ------------------------------------------------------------- removal
    def remove(self, key: str, namespace: str) -> bool:
        """Remove ``key``; a live read lease parks it in the queue. ``False`` if absent."""
        store = self.connect()
        with self.lock:
            self.written.get(namespace, {}).pop(key, None)
            if key in self.pending:
                return False
        rc = store.remove(key)
        if rc == OK:
            return True
        if rc == OBJECT_NOT_FOUND:
            return False
        if rc == OBJECT_HAS_LEASE:
            with self.lock:
                self.pending.setdefault(key, (namespace, time.monotonic()))
            return True
        raise status_error(rc, "remove", key)

    def gc(self, namespace: str | None, force_after: float, force: bool = False) -> int:
        """Retry parked removals; force those older than ``force_after`` s. Returns how many remain."""
        store = self.connect()
        now = time.monotonic()
        with self.lock:
            todo = [(k, t) for k, (ns, t) in self.pending.items() if namespace is None or ns == namespace]
        for key, since in todo:
            rc = store.remove(key)
            if rc == OBJECT_HAS_LEASE and (force or now - since >= force_after):
                # Safe: the ledger freed this generation, so a reader still holding a
                # lease is a stale one; a torn read fails its checksum, then finds no key.
                rc = store.remove(key, True)
            if rc in (OK, OBJECT_NOT_FOUND):
                with self.lock:
                    self.pending.pop(key, None)
            elif rc != OBJECT_HAS_LEASE:
                msg = f"mooncake could not remove freed object {key!r}: {code_name(rc)}; it stays queued"
                log.error(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
        with self.lock:
            return sum(1 for ns, _ in self.pending.values() if namespace is None or ns == namespace)

    def close(self) -> None:
        with self.lock:
            if self.store is None:
                return
            left = self.gc(None, 0.0, force=True) if self.pending else 0
            if left:
                msg = f"mooncake client closing with {left} freed objects it could not remove: {list(self.pending)}"
                log.error(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            store, self.store = self.store, None
            self.mounted = False
            # Registered memory outlives the client using it.
            kept = (self.arena, self.probe_buf, self.recv.close() if self.recv else None)
            if self.owners is not None:
                self.owners.close()
            self.arena = self.probe_buf = self.recv = self.owners = None
            self.written.clear()
            self.pending.clear()
        store.close()
        del kept


_LOCK = threading.Lock()
_CLIENTS: dict[MooncakeConfig, _Client] = {}
_PID = os.getpid()
_INHERITED: list[_Client] = []  # a forked child's copies of the parent's clients: never closed
# The pid that started Mooncake's native client state (a fork copies the value, not the state).
_NATIVE_PID: int | None = None


def get_client(cfg: MooncakeConfig) -> _Client:
    """The process's client for ``cfg`` (a new one after a fork)."""
    global _PID
    with _LOCK:
        if os.getpid() != _PID:
            _INHERITED.extend(_CLIENTS.values())
            _CLIENTS.clear()
            _PID = os.getpid()
        if _NATIVE_PID is not None and os.getpid() != _NATIVE_PID:
            # Measured: a client set up after fork() deadlocks in Mooncake's native state
            # inherited from the parent, even when the parent closed its client before
            # forking (mooncake-transfer-engine 0.3.x). Fail loudly instead of hanging.
            raise ForkedClient(
                "this process was forked from one that used a Mooncake client, and Mooncake cannot start "
                "another one here (it deadlocks): start DataLoader workers with "
                "multiprocessing_context='spawn' or 'forkserver', or fork before the parent uses the store"
            )
        client = _CLIENTS.get(cfg)
        if client is None:
            if not isinstance(cfg.master, str) or ":" not in cfg.master:
                raise ConfigError(f"mooncake master must be host:port, got {cfg.master!r}")
            client = _CLIENTS[cfg] = _Client(cfg)
        return client


def close_all() -> None:
    """Close this process's clients: drain removals, then unmount (its objects go with it)."""
    with _LOCK:
        clients = list(_CLIENTS.values()) if os.getpid() == _PID else []
        _CLIENTS.clear()
    for client in clients:
        try:
            client.close()
        except Exception as e:  # at exit: report, never mask the real exit status
            log.error("closing mooncake client %s failed: %s", client.cfg.master, e)


atexit.register(close_all)
