"""Byte-level file I/O for :mod:`torch_dataflow.stores.shared_dir`: private
directories, fresh read buffers, one ``writev`` loop and one ``preadv`` loop."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import xxhash

from .base import Buffer

__all__: list[str] = []

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_CHUNK = 256 << 10  # fits L2 on this class of machine: hashed before it leaves the cache


def _mkdir_private(path: str) -> None:
    """Create ``path`` as 0700 (umask-independent); an existing directory is kept as is."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


# First-touch page faults, not the copy, dominate reading into fresh multi-MB
# memory. Measured on a 67 MB read: torch.empty 26 ms, bytearray 28 ms,
# MAP_POPULATE 18 ms, MADV_HUGEPAGE 12 ms, a reused buffer 6.5 ms.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_MMAP_MIN = 32 << 20  # below this glibc reuses freed blocks: fewer page faults than a fresh mapping
_HUGE_MIN = 8 << 20


def _private_buffer(size: int) -> memoryview | mmap.mmap:
    """Fresh, writable, aligned memory for one read (never zero-filled first)."""
    if size < _MMAP_MIN or not hasattr(mmap, "MAP_ANONYMOUS"):
        return memoryview(torch.empty(size, dtype=torch.uint8).numpy()).cast("B")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if size >= _HUGE_MIN and _HUGEPAGE is not None:
        m = mmap.mmap(-1, size, flags=flags)
        try:
            m.madvise(_HUGEPAGE)  # 2 MiB pages: 512x fewer faults during the read
            return m
        except OSError:  # THP disabled: fall back to pre-faulting
            m.close()
    return mmap.mmap(-1, size, flags=flags | _POPULATE)


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    """Write ``parts`` in order to a new file with as few ``pwritev`` calls as the kernel
    allows (one for a sample below 2 GiB: the header and every tensor, no joined copy)."""
    return _pwritev_all(fd, [v for v in (memoryview(p).cast("B") for p in parts) if len(v)], 0)


_HASH_CHUNK = 4 << 20  # measured best of 1-16 MiB for hash-then-write of 16 and 67 MB samples (L3: 32 MiB)


def _pwritev_all(fd: int, views: list[memoryview], pos: int) -> int:
    """``pwritev`` all of ``views`` at ``pos`` (resuming after a short write); return the end offset."""
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], pos)
        if n <= 0:
            raise OSError(f"pwritev wrote nothing with {sum(len(v) for v in views)} bytes left")
        pos += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return pos


def _write_hashed(fd: int, lay: Any) -> int:
    """Write a :class:`~torch_dataflow.codec.Layout`'s blob to ``fd``, hashing each
    tensor piece right before it is written, while it is still in the CPU cache (one
    read of the tensor's memory instead of two: a hash pass, then the write's copy).
    The data goes first, the header (which holds the sums) last at offset 0. Returns the
    bytes written and sets ``lay.checksum``; the file is what ``codec.encode`` gives."""
    pos, sums, small, small_at = lay.header_size, [], [], lay.header_size
    for buf in lay.buffers:
        if buf is None:
            sums.append(None)
            continue
        if len(buf) <= _HASH_CHUNK:  # small tensors are hashed now, and written together
            sums.append(xxhash.xxh3_64_hexdigest(buf))
            small.append(buf)
            pos += len(buf)
            continue
        if small:
            _pwritev_all(fd, small, small_at)
            small = []
        h = xxhash.xxh3_64()
        for i in range(0, len(buf), _HASH_CHUNK):
            piece = buf[i : i + _HASH_CHUNK]
            h.update(piece)
            pos = _pwritev_all(fd, [piece], pos)
        sums.append(h.hexdigest())
        small_at = pos
    if small:
        _pwritev_all(fd, small, small_at)
    header, lay.checksum = lay.header(sums)
    _pwritev_all(fd, [memoryview(header)], 0)
    return pos


def _preadv_into(fd: int, views: Sequence[memoryview], pos: int, size: int,
                 feed: Callable[[memoryview], object] | None = None) -> None:
    """Fill ``views`` in order from file offset ``pos`` with ``preadv``, stopping
    at ``size`` (the file's length). Without ``feed``: as few calls as
    ``IOV_MAX`` allows. With ``feed``: one ``_CHUNK`` per call, each piece fed
    right after it lands, while it is still in the CPU cache. A file shorter
    than ``size`` leaves the tail unfilled: the caller's check reports it."""
    todo = [v for v in views if len(v)]
    if feed is not None:
        todo = [v[i : i + _CHUNK] for v in todo for i in range(0, len(v), _CHUNK)]
    while todo and pos < size:
        n = os.preadv(fd, todo[:1] if feed is not None else todo[:_IOV_MAX], pos)
        if n == 0:
            break  # shorter than fstat said
        pos += n
        while todo and n >= len(todo[0]):  # drop the filled views, trim a partly filled one
            n -= len(todo[0])
            done = todo.pop(0)
            if feed is not None:
                feed(done)
        if n:
            if feed is not None:
                feed(todo[0][:n])
            todo[0] = todo[0][n:]
