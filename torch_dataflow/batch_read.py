"""Batch-direct reads: land each sample's bytes in its row of the collated batch.

A committed :class:`~torch_dataflow.refs.SampleRef` lists every tensor's dtype
and shape, so the loader knows a batch's layout before it reads a byte. A
collator that *declares* its layout (a :class:`BatchLayout`: ``plan_batch`` and
``finish_batch``; :class:`~torch_dataflow.eagle3.Eagle3Collator` does) gets one
buffer per batch, padded to the batch's widths, and each sample's tensors are
read straight into their rows: one copy from the page cache (``preadv`` for
``file://``) or from the stored bytes (``memory://``), no per-sample tensors, no
stack, and only the padding is zero-filled. The xxh3 checksum is verified over
the bytes where they landed (:func:`~torch_dataflow.codec.check_landed`); a
corrupt sample raises :class:`~torch_dataflow.errors.CorruptSample` exactly as
the per-sample path does. Tails cut by truncation are read into scratch memory,
only for the checksum.

A plain ``collate_fn`` never sees any of this: :class:`LazyBatch` (what
:meth:`FeaturePool.__getitems__ <torch_dataflow.pool.FeaturePool.__getitems__>`
returns) is a read-only sequence of the usual per-sample dicts, read on first
access.

**Buffer lifetime** (:class:`BufferPool`). In the main process (``num_workers=0``)
batch buffers come from a small per-process pool of anonymous mappings advised
``MADV_HUGEPAGE`` (2 MiB pages where the kernel allows: far fewer first-touch
page faults; no environment variable needed). A buffer goes back to the pool
when *every* tensor of the batch made from it is gone — views, slices and
numpy arrays of them included (torch counts the references of the storage).
Keeping a batch (or a tensor of it) keeps its buffer out of the pool; a pool
holds at most ``max_buffers`` buffers and allocates fresh memory past them.
Never hand a raw ``data_ptr()`` of a batch tensor to code that outlives the
tensor. In a DataLoader worker of a :class:`~torch_dataflow.pool.FeaturePool`
the batch lands in one of the pool's reusable shared-memory slots
(``worker_slots``, :mod:`torch_dataflow._shm_slots`): the main process builds the
batch's tensors over its own mapping of the slot, and the slot is handed to a
worker again only once every tensor of that batch in the main process is gone
(the same rule as above); a batch you keep is never overwritten. No free slot:
a one-shot ``memfd`` of the worker's (no ``/dev/shm`` name, freed with the batch's
last tensor); ``worker_slots=0`` or no pool: fresh shared memory (torch's own
``UntypedStorage._new_shared``), never reused. Either way the worker-to-main hop
copies nothing.

Example:
    >>> import torch
    >>> from torch_dataflow.stores import open_store
    >>> from torch_dataflow.eagle3 import Eagle3Collator
    >>> store = open_store("memory://br-doc")
    >>> s = {"input_ids": torch.arange(3), "loss_mask": torch.ones(3, dtype=torch.long),
    ...      "hidden_state": torch.ones(1, 3, 2), "aux_hidden_state": torch.ones(1, 3, 6)}
    >>> refs = [store.put("a", 1, s), store.put("b", 1, {k: v[..., :2] if k.endswith("ids") or k == "loss_mask"
    ...         else v[:, :2] for k, v in s.items()})]
    >>> batch = read_batch(store, refs, Eagle3Collator())
    >>> batch["attention_mask"].tolist(), batch["hidden_state"].shape
    ([[1, 1, 1], [1, 1, 0]], torch.Size([2, 3, 6]))
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import codec
from .errors import ConfigError, CorruptSample, SampleUnavailable
from .refs import FeatureSpec, SampleRef

__all__ = ["BatchLayout", "BatchPlan", "BufferPool", "LazyBatch", "default_pool", "read_batch"]

_HUGE = 2 << 20  # x86-64 / arm64 (4 KiB base) transparent huge page size
_SMALL = 1 << 20  # below this, torch.empty (glibc reuses freed blocks) is as cheap
_ALIGN = 64
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_use_count = getattr(torch._C, "_storage_Use_Count", None)


@dataclass
class BatchPlan:
    """A collated batch's layout, decided from the refs before any read.

    Attributes:
        shapes: every batch tensor to allocate, ``{key: (dtype, shape)}``, in
            the batch's key order.
        rows: per sample, ``{stored tensor name: (batch key, bytes kept)}``: the
            first ``bytes kept`` bytes of that tensor land at the start of the
            sample's row of ``key`` (the rest of the row is zero-filled; a tail
            past ``bytes kept`` is read for the checksum only). A stored tensor
            not named here is read for the checksum only.
        lengths: per sample, whatever ``finish_batch`` needs (EAGLE3: tokens kept).
    """

    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    rows: list[dict[str, tuple[str, int]]]
    lengths: list[int] = field(default_factory=list)


class BatchLayout(Protocol):
    """What a collator declares to be read batch-direct (see the module docstring)."""

    def plan_batch(self, specs: Sequence[tuple[FeatureSpec, ...]]) -> BatchPlan | None:
        """The layout of the batch of samples with these specs; ``None``: not
        plannable (the per-sample path then runs, and raises its usual errors)."""

    def finish_batch(self, batch: dict[str, torch.Tensor], plan: BatchPlan) -> dict[str, Any]:
        """Fill what is not read (masks, positions) once every row has landed."""


# ------------------------------------------------------------------ buffers
def _huge_page_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` (rounded up to 2 MiB) of fresh anonymous memory on a 2 MiB boundary, advised huge."""
    size = -(-nbytes // _HUGE) * _HUGE
    m = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _MADV_HUGEPAGE is not None:
        with contextlib.suppress(OSError):  # THP off or unsupported: 4 KiB pages, still correct
            m.madvise(_MADV_HUGEPAGE)
    storage = torch.frombuffer(m, dtype=torch.uint8).untyped_storage()  # keeps the mapping alive
    off = (-storage.data_ptr()) % _HUGE
    # set_, not a slice: a slice would keep the whole-mapping tensor alive as its _base.
    return torch.empty(0, dtype=torch.uint8).set_(storage, off, (size,))


def _shared_buffer(nbytes: int) -> torch.Tensor:
    """Fresh shared memory: a DataLoader worker sends it to the main process without a copy."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


class BufferPool:
    """A few reusable batch buffers per process (see the module docstring for the lifetime rule).

    Args:
        max_buffers: buffers kept for reuse (the loader needs prefetch + 2).
        huge_pages: advise ``MADV_HUGEPAGE``; ``False``: plain fresh memory.

    Example:
        >>> pool = BufferPool(max_buffers=2)
        >>> a = pool.take(3 << 20)
        >>> ptr = a.data_ptr(); del a          # every view gone: back in the pool
        >>> pool.take(1 << 20).data_ptr() == ptr
        True
    """

    def __init__(self, *, max_buffers: int = 4, huge_pages: bool = True) -> None:
        self.max_buffers = int(max_buffers)
        self.huge_pages = bool(huge_pages)
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, storage use count when idle)
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @staticmethod
    def _refs(buf: torch.Tensor) -> int:
        assert _use_count is not None
        return int(_use_count(buf.untyped_storage()._cdata))

    def _idle(self, entry: tuple[torch.Tensor, int]) -> bool:
        # Every tensor viewing the buffer holds its storage: idle = no reference beyond the pool's.
        return _use_count is not None and self._refs(entry[0]) <= entry[1]

    def take(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor of at least ``nbytes`` (contents undefined)."""
        if _in_worker():
            return _shared_buffer(nbytes)
        if nbytes < _SMALL or not hasattr(mmap, "MAP_ANONYMOUS"):
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's buffers are not ours to reuse
                self._buffers, self._pid = [], os.getpid()
            for entry in self._buffers:
                if entry[0].numel() >= nbytes and self._idle(entry):
                    return entry[0][:nbytes]
            fresh = _huge_page_buffer(nbytes) if self.huge_pages else torch.empty(nbytes, dtype=torch.uint8)
            if _use_count is not None:  # without torch's count nothing can be proven idle: never pool
                entry = (fresh, self._refs(fresh))
                if len(self._buffers) < self.max_buffers:
                    self._buffers.append(entry)
                else:  # replace an idle buffer too small for this batch (batch widths grow)
                    for i, old in enumerate(self._buffers):
                        if self._idle(old):
                            self._buffers[i] = entry
                            break
            return fresh[:nbytes]

    def clear(self) -> None:
        """Forget every pooled buffer (memory is freed when no batch uses it)."""
        with self._lock:
            self._buffers = []

    @property
    def pooled_bytes(self) -> int:
        """Bytes held by the pool's buffers (in use or idle)."""
        return sum(b.numel() for b, _ in self._buffers)


_DEFAULT: BufferPool | None = None


def default_pool() -> BufferPool:
    """This process's :class:`BufferPool` (4 buffers, huge pages)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = BufferPool()
    return _DEFAULT


# ------------------------------------------------------------------ reading
def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B") if t.numel() else memoryview(b"")


def read_batch(
    store: Any,
    refs: Sequence[SampleRef],
    layout: BatchLayout,
    *,
    buffers: Any = None,
    on_unreadable: Callable[[int, Exception], None] | None = None,
    fields: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Read ``refs`` straight into one collated batch laid out by ``layout``.

    Args:
        store: a :class:`~torch_dataflow.stores.FeatureStore` with ``direct_reads``.
        refs: the committed refs, in batch order.
        layout: the collator's declaration (see :class:`BatchLayout`).
        buffers: where the batch buffer comes from: anything with ``take(nbytes)`` (default:
            :func:`default_pool`; a pool's DataLoader workers pass its reusable shared slots).
        on_unreadable: called with ``(index, error)`` before a sample's
            ``CorruptSample`` / ``SampleUnavailable`` is raised (to quarantine it).
        fields: read only these stored tensors (:mod:`torch_dataflow.fields`): the
            layout plans them alone, and the other tensors' bytes are not read.

    Returns:
        ``layout.finish_batch(...)``'s batch, or ``None`` when the store or the
        layout cannot read this batch directly (use the per-sample path).

    Raises:
        CorruptSample: a sample's bytes fail their length, header or checksum check.
        SampleUnavailable: a sample's bytes are gone.
        ConfigError: ``fields`` lacks a tensor the layout needs (``needed_fields()``),
            or names one a sample does not hold.
    """
    if not refs or not getattr(store, "direct_reads", False):
        return None
    chosen = [tuple(r.specs) for r in refs] if fields is None else _chosen(refs, layout, fields)
    subset = any(len(c) < len(r.specs) for c, r in zip(chosen, refs, strict=True))
    plan = layout.plan_batch(chosen)
    if plan is None:
        return None
    offsets: dict[str, int] = {}
    total = 0
    for key, (dtype, shape) in plan.shapes.items():
        total = -(-total // _ALIGN) * _ALIGN
        offsets[key] = total
        total += math.prod(shape) * dtype.itemsize
    raw = (buffers or default_pool()).take(total)
    batch: dict[str, torch.Tensor] = {}
    rows: dict[str, tuple[int, int]] = {}  # key -> (offset in raw, bytes per row)
    n = len(refs)
    for key, (dtype, shape) in plan.shapes.items():
        size = math.prod(shape) * dtype.itemsize
        batch[key] = raw[offsets[key] : offsets[key] + size].view(dtype).view(shape)
        rows[key] = (offsets[key], size // n)
    mem = _bytes_view(raw)  # one buffer export per batch; rows are slices of it
    if hasattr(store, "read_blobs_into") and not subset:  # one transfer for the whole batch (Mooncake)
        _read_rows_at_once(store, refs, plan, rows, raw, mem, on_unreadable)
        return layout.finish_batch(batch, plan)
    for i, ref in enumerate(refs):
        what = f"sample {ref.sample_id!r} generation {ref.generation} in {store.uri}"
        try:
            if len(chosen[i]) < len(ref.specs):
                _read_row_fields(store, ref, chosen[i], plan.rows[i], rows, raw, mem, i, what)
            else:
                _read_row(store, ref, plan.rows[i], rows, raw, mem, i, what)
        except (CorruptSample, SampleUnavailable) as e:
            if on_unreadable is not None:
                on_unreadable(i, e)
            raise
    return layout.finish_batch(batch, plan)


def _read_rows_at_once(store: Any, refs: Sequence[SampleRef], plan: BatchPlan, rows: Mapping[str, tuple[int, int]],
                       raw: torch.Tensor, mem: memoryview, on_unreadable: Callable[[int, Exception], None] | None) -> None:
    """Every row through one ``store.read_blobs_into`` call; errors surface in batch order, as row by row."""
    planned: list[tuple[list[memoryview], Any, Callable[[int], None]]] = []
    failed: tuple[int, CorruptSample] | None = None
    for i, ref in enumerate(refs):
        what = f"sample {ref.sample_id!r} generation {ref.generation} in {store.uri}"
        try:
            planned.append(_plan_row(ref, plan.rows[i], rows, raw, mem, i, what))
        except CorruptSample as e:
            failed = (i, e)
            break
    sizes = store.read_blobs_into(refs[: len(planned)], [p[0] for p in planned], [p[1].update for p in planned],
                                  owner=raw) if planned else []
    for i, (size, (_, _, finish)) in enumerate(zip(sizes, planned, strict=True)):
        try:
            if isinstance(size, Exception):
                raise size
            finish(size)
        except (CorruptSample, SampleUnavailable) as e:
            if on_unreadable is not None:
                on_unreadable(i, e)
            raise
    if failed is not None:
        if on_unreadable is not None:
            on_unreadable(*failed)
        raise failed[1]


def _read_row(store: Any, ref: SampleRef, placed: Mapping[str, tuple[str, int]], rows: Mapping[str, tuple[int, int]],
              raw: torch.Tensor, mem: memoryview, i: int, what: str) -> None:
    views, landed, finish = _plan_row(ref, placed, rows, raw, mem, i, what)
    finish(store.read_blob_into(ref, views, landed.update))


def _plan_row(ref: SampleRef, placed: Mapping[str, tuple[str, int]], rows: Mapping[str, tuple[int, int]],
              raw: torch.Tensor, mem: memoryview, i: int,
              what: str) -> tuple[list[memoryview], Any, Callable[[int], None]]:
    """A row's destinations in blob order, its LandingHash, and the check to run once ``size`` bytes landed."""
    hsize = codec.header_size(ref.nbytes, ref.specs)
    if not 8 <= hsize <= codec.MAX_HEADER_BYTES + 8:
        raise CorruptSample(f"{what} is corrupt: its ref's sizes leave a {hsize}-byte header")
    header = bytearray(hsize)
    spill = sum(s.nbytes - placed[s.name][1] if s.name in placed else s.nbytes for s in ref.specs)
    scratch = _bytes_view(torch.empty(spill, dtype=torch.uint8)) if spill else memoryview(b"")
    views: list[memoryview] = [memoryview(header)]
    data: list[memoryview] = []
    used, spilled = set(), 0
    for s in ref.specs:
        key, keep = placed.get(s.name, ("", 0))
        if key:
            base, width = rows[key]
            start = base + i * width
            if keep > width or key in used:  # a layout bug, not the sample's fault: never quarantine
                raise ConfigError(f"{what}: the layout places {keep} bytes of {s.name!r} in a {width}-byte "
                                  f"row of {key!r} (or a second tensor in it): fix the collator's plan_batch")
            used.add(key)
            data.append(mem[start : start + keep])
            if keep < width:
                raw[start + keep : start + width].zero_()  # the padding, and only the padding
        if keep < s.nbytes:
            data.append(scratch[spilled : spilled + s.nbytes - keep])
            spilled += s.nbytes - keep
    views += data
    landed = codec.LandingHash(hsize)

    def finish(size: int) -> None:
        codec.check_landed(header, data, size=size, specs=ref.specs, expected_checksum=ref.checksum, what=what,
                           landed=landed)

    return views, landed, finish


def _chosen(refs: Sequence[SampleRef], layout: Any, fields: Sequence[str]) -> list[tuple[FeatureSpec, ...]]:
    """Each ref's specs that ``fields`` selects; refuse a selection the layout cannot collate."""
    from .fields import selected_specs

    needed = getattr(layout, "needed_fields", None)
    missing = [f for f in (needed() if needed is not None else ()) if f not in fields]
    if missing:
        raise ConfigError(f"{type(layout).__name__} needs the stored tensors {missing}, which fields={list(fields)} "
                          f"does not read: add them to fields= (or pass fields=None)")
    return [selected_specs(r, fields) for r in refs]  # unknown names: ConfigError before any read


def _read_row_fields(store: Any, ref: SampleRef, chosen: tuple[FeatureSpec, ...], placed: Mapping[str, tuple[str, int]],
                     rows: Mapping[str, tuple[int, int]], raw: torch.Tensor, mem: memoryview, i: int,
                     what: str) -> None:
    """A row of a field-selected batch: the header and the chosen tensors' byte ranges only,
    each tensor checked against its own sum; a format-1 blob is read and checked whole."""
    from .fields import check_header_size, plan_ranges

    hsize = check_header_size(ref, what)
    header = bytearray(hsize)
    spill = sum(s.nbytes - placed[s.name][1] if s.name in placed else s.nbytes for s in chosen)
    scratch = _bytes_view(torch.empty(spill, dtype=torch.uint8)) if spill else memoryview(b"")
    pieces: list[tuple[str, list[memoryview]]] = []
    used, spilled = set(), 0
    for s in chosen:
        key, keep = placed.get(s.name, ("", 0))
        views: list[memoryview] = []
        if key:
            base, width = rows[key]
            start = base + i * width
            if keep > width or key in used:  # a layout bug, not the sample's fault: never quarantine
                raise ConfigError(f"{what}: the layout places {keep} bytes of {s.name!r} in a {width}-byte "
                                  f"row of {key!r} (or a second tensor in it): fix the collator's plan_batch")
            used.add(key)
            views.append(mem[start : start + keep])
            if keep < width:
                raw[start + keep : start + width].zero_()
        if keep < s.nbytes:  # a truncated tail: read for its tensor's checksum only
            views.append(scratch[spilled : spilled + s.nbytes - keep])
            spilled += s.nbytes - keep
        pieces.append((s.name, views))
    landed = codec.LandingHash(hsize, [s.nbytes for s in chosen])
    size = store.read_ranges_into(ref, plan_ranges(ref, pieces, memoryview(header)), landed.update)
    if not codec.check_fields(header, dict(pieces), size=size, specs=ref.specs, expected_checksum=ref.checksum,
                              what=what, landed=landed):
        _read_row(store, ref, placed, rows, raw, mem, i, what)  # format 1: only the whole blob can be verified


# ------------------------------------------------------------------ lazy samples
class LazyBatch(Sequence[dict[str, Any]]):
    """The samples of one batch of a :class:`~torch_dataflow.pool.FeaturePool`,
    read on first access (a plain ``collate_fn`` sees the usual per-sample dicts),
    or read batch-direct by a collator that declares its layout
    (:meth:`collate_direct`). Pickles as the plain list of samples."""

    def __init__(self, pool: Any, keys: Sequence[Any]) -> None:
        self._pool = pool
        self._keys = list(keys)
        self._samples: list[dict[str, Any]] | None = None

    def samples(self) -> list[dict[str, Any]]:
        """The per-sample dicts (read now if not yet); read errors as ``pool[key]`` raises them."""
        if self._samples is None:
            self._samples = [self._pool[k] for k in self._keys]
        return self._samples

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: Any) -> Any:
        return self.samples()[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.samples())

    def __eq__(self, other: object) -> bool:
        return self.samples() == (other.samples() if isinstance(other, LazyBatch) else other)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (self.samples(),))

    def __repr__(self) -> str:
        return f"LazyBatch({len(self)} samples of {self._pool!r})"

    def collate_direct(self, layout: BatchLayout) -> dict[str, Any] | None:
        """The collated batch, read batch-direct; ``None``: use :meth:`samples` instead
        (already read, a store without direct reads, a layout that cannot plan it,
        or samples with and without a lease in one batch)."""
        from .dataset import LEASE_KEY, SAMPLE_ID_KEY
        from .pool import FeaturePool

        if self._samples is not None or type(self._pool)._read is not FeaturePool._read:
            return None  # a subclass that reads elsewhere keeps its own read path

        resolved = [self._pool._resolve(k) for k in self._keys]
        leased = [lease_id is not None for _, lease_id in resolved]
        if any(leased) and not all(leased):
            return None  # the per-sample path names the samples without a lease
        self._pool._verify_store()
        refs = [ref for ref, _ in resolved]

        def quarantine(i: int, e: Exception) -> None:
            self._pool._unreadable(resolved[i][0], resolved[i][1], e)

        fields = getattr(self._pool, "fields", None)
        slots = self._pool._worker_buffers() if hasattr(self._pool, "_worker_buffers") else None
        try:
            batch = read_batch(self._pool.store, refs, layout, buffers=slots, on_unreadable=quarantine, fields=fields)
        except ConfigError:  # a mistake (fields= vs the collator), not the samples' fault: give them back
            given = [lease_id for _, lease_id in resolved if lease_id]
            if given:
                self._pool.ledger.fail(given, retryable=True, reason="the batch could not be read as configured")
            if slots is not None:
                slots.give_back()
            raise
        except BaseException:
            if slots is not None:  # never sent: the slot is free again
                slots.give_back()
            raise
        if batch is None:
            return None
        if all(leased):
            batch[LEASE_KEY] = [lease_id for _, lease_id in resolved]
        batch[SAMPLE_ID_KEY] = [ref.sample_id for ref in refs]
        return batch
