"""The read path of :class:`torch_dataflow.stores.mooncake.MooncakeStore`: ``get`` into
registered reused buffers, batched fetches, the batch-direct ``read_blobs_into`` and
field selection's ranged reads. A base class of ``MooncakeStore``, not used alone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from .. import codec
from ..errors import ConfigError, CorruptSample, DataflowError, SampleUnavailable
from ..refs import SampleRef
from . import _mooncake_client as mc
from ._mooncake_base import _MooncakeBase
from .base import Buffer

_addr = mc.buffer_address


class _MooncakeReads(_MooncakeBase):
    """Mooncake reads; the connection, keys and auth come from ``MooncakeStore``."""

    def _fetch(self, refs: Sequence[SampleRef], decode: bool) -> list[Any]:
        """Read each ref's blob into fresh memory; decode (verified) if asked."""
        c = self._client()
        store = c.store
        keys = [self._key(r.sample_id, r.generation) for r in refs]
        for ref, key in zip(refs, keys, strict=True):
            if key in c.pending:
                raise self._missing(ref.sample_id, ref.generation, self.uri)
            if ref.nbytes < 8:
                raise CorruptSample(f"{self._what(ref)} has an impossible size {ref.nbytes}")
        arena = self._staging(max(r.nbytes for r in refs))
        if arena is not None:
            out = []
            with c.lock:
                for ref, key in zip(refs, keys, strict=True):
                    rc = self._retry(lambda key=key, ref=ref: store.get_into(key, arena.data_ptr(), ref.nbytes))
                    view = self._check_read(ref, key, rc, memoryview(arena.numpy()))
                    out.append(self._decode(ref, key, view, copy=True) if decode else bytes(view))
            return out
        # Registered pooled buffers where the pool has one idle (reused once the caller
        # dropped every tensor of it), else fresh memory registered for this call.
        bufs = [c.recv.take(r.nbytes) for r in refs]
        fresh = [(i, r.nbytes) for i, (b, r) in enumerate(zip(bufs, refs, strict=True)) if b is None]
        for i, n in fresh:
            bufs[i] = torch.empty(n, dtype=torch.uint8)
        ptrs, sizes = [b.data_ptr() for b in bufs], [r.nbytes for r in refs]
        # A refused registration means the memory overlaps one held elsewhere, so it
        # is registered already: the transfer works either way.
        with c.registered([(ptrs[i], n) for i, n in fresh]):
            if len(refs) == 1:
                rcs = [self._retry(lambda: store.get_into(keys[0], ptrs[0], sizes[0]))]
            else:
                rcs = [int(rc) for rc in store.batch_get_into(keys, ptrs, sizes)]
                rcs = [
                    rc
                    if rc != mc.TRANSFER_FAIL
                    else self._retry(lambda i=i: store.get_into(keys[i], ptrs[i], sizes[i]))
                    for i, rc in enumerate(rcs)
                ]
        out = []
        for ref, key, buf, rc in zip(refs, keys, bufs, rcs, strict=True):
            view = self._check_read(ref, key, rc, memoryview(buf.numpy()))
            out.append(self._decode(ref, key, view, copy=False) if decode else view)
        return out

    def _retry(self, read: Any) -> int:
        rc = int(read())
        for attempt in range(self.read_retries):
            if rc != mc.TRANSFER_FAIL:
                break
            time.sleep(0.05 * (attempt + 1))
            rc = int(read())
        return rc

    def _check_read(self, ref: SampleRef, key: str, rc: int, view: memoryview) -> memoryview:
        what = self._what(ref)
        if rc == mc.TRANSFER_FAIL:
            raise SampleUnavailable(
                f"{what} is unreachable (mooncake get: {mc.code_name(rc)}): the segment holding it is gone, "
                "most likely because the process that wrote it exited"
            )
        if rc == mc.INVALID_PARAMS:
            raise CorruptSample(f"{what} is corrupt: the stored object is larger than the ref's {ref.nbytes} bytes")
        if rc < 0:
            raise mc.status_error(rc, "get", what)
        if rc != ref.nbytes:
            raise CorruptSample(f"{what} is corrupt: {rc} bytes stored, the ref says {ref.nbytes} (truncated?)")
        return view[:rc]

    def _decode(self, ref: SampleRef, key: str, view: memoryview, copy: bool) -> dict[str, torch.Tensor]:
        try:
            # The buffer is private to this call, so views of it are independent of the store.
            return codec.decode(view, copy=copy, expected_checksum=ref.checksum, what=self._what(ref))
        except CorruptSample:
            # A removal (forced) during the transfer tears the read: that is "gone", not corrupt.
            c = self._client()
            if key in c.pending or c.store.is_exist(key) == 0:
                raise self._missing(ref.sample_id, ref.generation, self.uri) from None
            raise

    def get(self, ref: SampleRef, *, zero_copy: bool = False) -> dict[str, torch.Tensor]:
        """Read and verify one sample: one ``get_into`` into a registered buffer owned by the
        caller (reused for a later read only once every tensor of this one is gone)."""
        self._check_auth()
        c = self._client()
        key = f"{self.namespace}/{ref.sample_id}@{ref.generation}"
        buf = c.recv.take(ref.nbytes) if self.transfer == "direct" and ref.nbytes >= 8 else None
        if buf is None or key in c.pending:
            return self._fetch([ref], decode=True)[0]  # staging, a busy pool, and every error case
        ptr = buf.data_ptr()
        rc = self._retry(lambda: c.store.get_into(key, ptr, ref.nbytes))
        return self._decode(ref, key, self._check_read(ref, key, rc, memoryview(buf.numpy())), copy=False)

    def get_many(self, refs: Sequence[SampleRef], *, zero_copy: bool = False) -> list[dict[str, torch.Tensor]]:
        """Read many samples in one batched Mooncake call; the first failure (in order) raises."""
        self._check_auth()
        return self._fetch(list(refs), decode=True) if refs else []

    direct_reads = True  # read_blobs_into: one batch_get_into_multi_buffers straight into the batch rows

    def read_blob_into(self, ref: SampleRef, views: Sequence[memoryview], feed: Any = None) -> int:
        """Land ``ref``'s blob in ``views`` (see :meth:`FeatureStore.read_blob_into`);
        memory not registered with Mooncake goes through a registered buffer."""
        got = self.read_blobs_into([ref], [views], [feed])[0]
        if isinstance(got, Exception):
            raise got
        return got

    def read_blobs_into(
        self,
        refs: Sequence[SampleRef],
        views: Sequence[Sequence[memoryview]],
        feeds: Sequence[Any] | None = None,
        *,
        owner: torch.Tensor | None = None,
    ) -> list[int | DataflowError]:
        """Land every ref's blob in its ``views`` with one ``batch_get_into_multi_buffers``.

        The batch-direct read's primitive (:func:`torch_dataflow.batch_read.read_batch`
        calls it): ``views[i]`` are ref ``i``'s destinations in blob order, covering
        the blob; ``feeds[i]`` is called with each landed piece, in blob order.
        ``owner``: the tensor whose memory most views lie in (the batch buffer); its
        storage is registered once and stays registered while it lives, so a pooled
        batch buffer is registered once for many batches. Views outside it (headers,
        scratch) land in a registered pooled buffer and are copied out.

        Returns:
            Per ref, the stored blob's length, or the error its read met
            (:class:`SampleUnavailable`, :class:`CorruptSample`, ...): the caller
            raises the first in batch order, as a per-sample loop would.

        Raises:
            AuthError: wrong or missing secret.
        """
        self._check_auth()
        c = self._client()
        keys = [self._key(r.sample_id, r.generation) for r in refs]
        out: list[int | DataflowError] = [0] * len(refs)
        todo = []
        for i, (ref, key) in enumerate(zip(refs, keys, strict=True)):
            if key in c.pending:
                out[i] = self._missing(ref.sample_id, ref.generation, self.uri)
            elif sum(len(v) for v in views[i]) != ref.nbytes:
                raise ConfigError(
                    f"views for {self._what(ref)} hold {sum(len(v) for v in views[i])} bytes, "
                    f"its blob {ref.nbytes}: pass views that cover the whole blob"
                )
            else:
                todo.append(i)
        if not todo:
            return out
        lo, hi = c.owners.cover(owner) if owner is not None else (0, 0)
        ptrs: list[list[int]] = []
        sizes: list[list[int]] = []
        bounced: list[tuple[memoryview, int]] = []  # (destination, offset in the bounce buffer)
        nbounce = 0
        for i in todo:  # per view: ~1 us of Python (this loop is the store's whole per-row cost)
            pl, sl = [], []
            for v in views[i]:
                n = len(v)
                if not n:
                    continue
                p = _addr(v)
                if p < lo or p + n > hi:
                    bounced.append((v, nbounce))
                    p, nbounce = -1 - nbounce, nbounce + n  # patched below, once the buffer exists
                pl.append(p)
                sl.append(n)
            ptrs.append(pl)
            sizes.append(sl)
        bounce = c.recv.take(nbounce) if nbounce else None
        fresh = []
        if nbounce and bounce is None:  # the pool is busy: fresh memory, registered for this call
            bounce = torch.empty(nbounce, dtype=torch.uint8)
            fresh = [(bounce.data_ptr(), nbounce)]
        if bounce is not None:
            base = bounce.data_ptr()
            ptrs = [[base - 1 - p if p < 0 else p for p in pl] for pl in ptrs]
        tkeys = [keys[i] for i in todo]
        with c.registered(fresh):
            rcs = [int(rc) for rc in c.store.batch_get_into_multi_buffers(tkeys, ptrs, sizes)]
        if bounce is not None:
            src = memoryview(bounce.numpy())
            for v, off in bounced:
                v[:] = src[off : off + len(v)]
        for j, i in enumerate(todo):
            if rcs[j] == mc.TRANSFER_FAIL:
                # Also what a scattered read of an object shorter than its views gives: read it
                # whole (a short object is then a short read, a dead segment stays TRANSFER_FAIL).
                rcs[j] = self._land_whole(c, refs[i], keys[i], views[i])
        for i, rc in zip(todo, rcs, strict=True):
            ref = refs[i]
            if not 0 <= rc <= ref.nbytes:
                try:
                    self._check_read(ref, keys[i], rc, memoryview(b""))
                except DataflowError as e:
                    out[i] = e
                    continue
            size = rc  # a short blob is named by the caller's check (check_landed), as for any store
            out[i] = size
            feed = feeds[i] if feeds is not None else None
            if feed is not None:
                pos = 0
                for v in views[i]:
                    n = max(0, min(len(v), size - pos))
                    feed(v[:n])
                    pos += n
        return out

    def _read_ranges(
        self, sample_id: str, generation: int, ranges: Sequence[tuple[int, Sequence[memoryview]]], feed: Any = None
    ) -> int:
        """Field selection's ranged read (see :meth:`FeatureStore._read_ranges`): one
        ``get_size`` (the stored length the caller checks; Mooncake refuses a range past
        the end with -600) and one ``get_into_ranges`` of every range into a registered
        pooled buffer, copied out to ``views``. Only the chosen bytes cross the network."""
        c = self._client()
        key = self._key(sample_id, generation)
        size = int(c.store.get_size(key))
        if key in c.pending or size in mc._GONE:
            raise self._missing(sample_id, generation, self.uri)
        if size < 0:
            raise mc.status_error(size, "get_size", key)
        pieces: list[tuple[memoryview, int, int]] = []  # (destination, blob offset, bytes)
        for offset, views in ranges:
            pos = offset
            for v in views:
                n = max(0, min(len(v), size - pos))
                if n:
                    pieces.append((v, pos, n))
                pos += len(v)
        total = sum(n for _, _, n in pieces)
        if not total:
            return size
        buf = c.recv.take(total)
        fresh: list[tuple[int, int]] = []
        if buf is None:
            buf = torch.empty(total, dtype=torch.uint8)
            fresh = [(buf.data_ptr(), total)]
        dsts, at = [], 0
        for _, _, n in pieces:
            dsts.append(at)
            at += n
        srcs, sizes = [p for _, p, _ in pieces], [n for _, _, n in pieces]
        with c.registered(fresh):
            rcs = self._retry_ranges(
                lambda: c.store.get_into_ranges([buf.data_ptr()], [[key]], [[dsts]], [[srcs]], [[sizes]])[0][0]
            )
        what = f"sample {sample_id!r} generation {generation} in {self.uri}"
        for rc, n in zip(rcs, sizes, strict=True):
            if rc == mc.TRANSFER_FAIL:
                raise SampleUnavailable(f"{what} is unreachable (mooncake get_into_ranges: {mc.code_name(rc)})")
            if rc < 0:
                raise mc.status_error(rc, "get_into_ranges", what)
            if rc != n:
                raise CorruptSample(f"{what} is corrupt: a ranged read returned {rc} of {n} bytes")
        src = memoryview(buf.numpy())
        for (v, _, n), d in zip(pieces, dsts, strict=True):
            v[:n] = src[d : d + n]
            if feed is not None:
                feed(v[:n])
        return size

    def _retry_ranges(self, read: Any) -> list[int]:
        rcs = [int(rc) for rc in read()]
        for attempt in range(self.read_retries):
            if mc.TRANSFER_FAIL not in rcs:
                break
            time.sleep(0.05 * (attempt + 1))
            rcs = [int(rc) for rc in read()]
        return rcs

    def _land_whole(self, c: mc._Client, ref: SampleRef, key: str, views: Sequence[memoryview]) -> int:
        """``get_into`` the whole object (retried), then copy what landed into ``views``."""
        buf = c.recv.take(ref.nbytes)
        fresh: list[tuple[int, int]] = []
        if buf is None:
            buf = torch.empty(ref.nbytes, dtype=torch.uint8)
            fresh = [(buf.data_ptr(), ref.nbytes)]
        with c.registered(fresh):
            rc = self._retry(lambda: c.store.get_into(key, buf.data_ptr(), ref.nbytes))
        src, pos = memoryview(buf.numpy()), 0
        for v in views:
            n = max(0, min(len(v), rc - pos))
            v[:n] = src[pos : pos + n]
            pos += n
        return rc

    def _read(self, sample_id: str, generation: int) -> Buffer:
        key = self._key(sample_id, generation)
        c = self._client()
        size = c.store.get_size(key)
        if key in c.pending or size in mc._GONE:
            raise self._missing(sample_id, generation, self.uri)
        if size < 0:
            raise mc.status_error(int(size), "get_size", key)
        probe = SampleRef(
            sample_id=sample_id, generation=generation, store=self.uri, specs=(), nbytes=int(size), checksum=""
        )
        return self._fetch([probe], decode=False)[0]
