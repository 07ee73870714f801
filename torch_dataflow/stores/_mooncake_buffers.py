"""Registered memory for Mooncake reads: register once, reuse (Mooncake's own guidance).

A Mooncake transfer lands only in registered memory, and a fresh buffer costs
first-touch page faults plus a registration on every call (measured on loopback
TCP: a fresh, freshly registered 1 MiB buffer reads ~1.8x slower than one
registered once). Two pieces keep reads on registered, warm memory:

- :class:`RecvPool`: the buffers a ``get`` decodes its tensors from. Each is
  registered when made and reused once nothing references it any more (torch
  counts the references of a storage: the pool takes a buffer back only when
  every tensor viewing it, and every numpy array of one, is gone), so a reader
  that drops its samples reads into the same registered pages every time. Past
  ``max_buffers`` / ``max_bytes`` in use the caller falls back to fresh memory.
- :class:`OwnerRegistry`: memory a caller lends for a batch read (a batch
  buffer of :mod:`torch_dataflow.batch_read`, which its pool reuses) stays
  registered for as long as its storage lives: a weak reference to the storage
  tells when it died, and the registration is dropped at the next call, before
  any other registration could overlap the freed addresses.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from typing import Any

import torch

__all__ = ["OwnerRegistry", "RecvPool", "fresh_buffer"]

_HUGE = 2 << 20
_PAGE = 4096
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def fresh_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh memory: from 1 MiB on, an anonymous mapping advised huge (far fewer page faults)."""
    if nbytes < (1 << 20) or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)
    size = -(-nbytes // _HUGE) * _HUGE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _MADV_HUGEPAGE is not None:
        with contextlib.suppress(OSError):  # THP off: 4 KiB pages, still correct
            m.madvise(_MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=torch.uint8)  # the storage keeps the mapping alive


def _refs(buf: torch.Tensor) -> int:
    assert _use_count is not None
    return int(_use_count(buf.untyped_storage()._cdata))


class RecvPool:
    """Receive buffers registered once with ``store`` and reused when idle.

    Args:
        store: the ``MooncakeDistributedStore`` the buffers are registered with.
        max_buffers: buffers kept registered.
        max_bytes: bytes kept registered in all.
        before_register: called before each registration (drops registrations of dead memory).
    """

    def __init__(
        self, store: Any, *, max_buffers: int = 8, max_bytes: int = 512 << 20, before_register: Any = None
    ) -> None:
        self.store = store
        self.before_register = before_register  # OwnerRegistry.sweep: no stale registration may overlap ours
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self._entries: list[tuple[torch.Tensor, int]] = []  # (buffer, storage use count when idle)
        self._lock = threading.Lock()

    @staticmethod
    def _idle(entry: tuple[torch.Tensor, int]) -> bool:
        return _refs(entry[0]) <= entry[1]

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A registered 1-D uint8 tensor of ``nbytes`` (contents undefined), or ``None``
        when every pooled buffer is in use and the pool is at its limits."""
        if _use_count is None or nbytes <= 0:
            return None  # nothing can be proven idle without torch's count: never reuse
        with self._lock:
            best: tuple[torch.Tensor, int] | None = None
            for entry in self._entries:
                size = entry[0].numel()
                # At most twice the request (and a page): a small read never pins a large buffer.
                fits = nbytes <= size <= 2 * nbytes + _PAGE and (best is None or size < best[0].numel())
                if fits and self._idle(entry):
                    best = entry
            if best is not None:
                return best[0][:nbytes]
            size = -(-nbytes // _PAGE) * _PAGE
            held = sum(b.numel() for b, _ in self._entries)
            while self._entries and (len(self._entries) >= self.max_buffers or held + size > self.max_bytes):
                # By position: list.remove would compare the tuples' tensors element-wise
                at = next((i for i, e in enumerate(self._entries) if self._idle(e)), None)
                if at is None:
                    return None
                idle = self._entries.pop(at)
                self.store.unregister_buffer(idle[0].data_ptr())
                held -= idle[0].numel()
            if size > self.max_bytes:
                return None
            buf = fresh_buffer(size)[:size]
            if self.before_register is not None:
                self.before_register()
            if self.store.register_buffer(buf.data_ptr(), size) != 0:
                return None
            self._entries.append((buf, _refs(buf)))
            return buf[:nbytes]

    def close(self) -> list[torch.Tensor]:
        """Unregister every buffer; returns them (keep them alive until the client is closed)."""
        with self._lock:
            bufs = [b for b, _ in self._entries]
            self._entries = []
        for b in bufs:
            self.store.unregister_buffer(b.data_ptr())
        return bufs

    @property
    def pooled_bytes(self) -> int:
        return sum(b.numel() for b, _ in self._entries)


class OwnerRegistry:
    """Registrations of caller memory that last as long as the memory's storage.

    Args:
        store: the ``MooncakeDistributedStore`` the memory is registered with.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self._live: dict[int, tuple[int, int]] = {}  # start -> (end, weak ref to the storage)
        self._lock = threading.Lock()

    def sweep(self) -> None:
        """Drop the registrations whose storage died."""
        with self._lock:
            dead = [p for p, (_, w) in self._live.items() if torch.UntypedStorage._expired(w)]
            for p in dead:
                _, w = self._live.pop(p)
                self.store.unregister_buffer(p)
                torch.UntypedStorage._free_weak_ref(w)

    def cover(self, owner: torch.Tensor) -> tuple[int, int]:
        """Register ``owner``'s whole storage (once) and return its ``[start, end)`` addresses,
        or ``(0, 0)`` when Mooncake refuses it (the caller then bounces through the pool)."""
        storage = owner.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        self.sweep()
        with self._lock:
            got = self._live.get(start)
            if got is not None and got[0] >= end:
                return start, end
            if got is not None:  # a storage that grew in place (resize): register it anew
                self.store.unregister_buffer(start)
                torch.UntypedStorage._free_weak_ref(self._live.pop(start)[1])
            if end == start or self.store.register_buffer(start, end - start) != 0:
                return 0, 0
            self._live[start] = (end, storage._weak_ref())
            return start, end

    def close(self) -> None:
        """Unregister everything (the client is closing)."""
        with self._lock:
            live, self._live = self._live, {}
        for p, (_, w) in live.items():
            self.store.unregister_buffer(p)
            torch.UntypedStorage._free_weak_ref(w)

    def __contains__(self, ptr: object) -> bool:
        """Whether a live registration covers address ``ptr``."""
        with self._lock:
            return any(p <= ptr < end for p, (end, _) in self._live.items())  # type: ignore[operator]

    def __len__(self) -> int:
        return len(self._live)
