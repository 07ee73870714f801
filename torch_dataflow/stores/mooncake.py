"""``mooncake://host:port``: sample bytes in the Mooncake distributed object store.

Each sample generation is one hard-pinned Mooncake object keyed
``<namespace>/<sample_id>@<generation>``. Objects live in the segment of the
process that wrote them (its memory, mounted on its first put), so a producer
must stay alive until its samples are consumed, and a producer that dies takes
its unconsumed samples with it: readers then get :class:`SampleUnavailable`
(never a hang), and the ledger redelivers or aborts. See ``docs/mooncake.md``.

Data path (no pickle, no intermediate ``bytes``): a put registers the caller's
tensor memory and the codec header and hands Mooncake the list of buffers
(``batch_put_from_multi_buffers``); a get is one ``get_into`` into a buffer
registered once and reused (``_mooncake_buffers.RecvPool``: reused only once the
caller holds no tensor of it, so it is the caller's memory, never the store's)
and decodes zero-copy views of it, with no size query or existence check (each
a master round trip). A batch-direct read (:func:`torch_dataflow.batch_read.read_batch`)
is one ``batch_get_into_multi_buffers`` into the batch buffer's rows
(:meth:`MooncakeStore.read_blobs_into`). ``transfer=staging`` copies through one
pre-registered arena instead (measured slower on TCP; kept for transports where
registration is expensive).

Removal is lease-aware: Mooncake refuses to remove an object under a read
lease (``-706``); such a removal is parked, the generation is unreadable for
this process at once, and :meth:`MooncakeStore.gc` (also run at ``close()``
and process exit) retries it and forces it once it is ``force_after`` s old.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .. import codec
from ..auth import SecretGuard, make_verifier
from ..errors import BackendUnavailable, ConfigError, CorruptSample, DataflowError, SampleUnavailable
from ..refs import SampleRef
from ..uri import parse_size, parse_uri
from . import _mooncake_client as mc
from .base import Buffer, FeatureStore, StoreHealth

__all__ = ["MooncakeStore"]

_QUERY = {
    "protocol": str,
    "devices": str,
    "segment_size": "size",
    "buffer_size": "size",
    "metadata_server": str,
    "local_hostname": str,
    "secret": str,
    "max_bytes": "size",
    "namespace": str,
    "transfer": str,
    "force_after": float,
    "connect_timeout": float,
    "read_retries": int,
}
_AUTH_KEY = ".auth"  # sample ids may not start with '.', so this never collides
_NO_SECRET = "none"
_REVERIFY_S = 1.0  # a client that found no auth verifier and could not record one looks again this often
_PUT_ATTEMPTS = 6  # transfer failures retried with backoff for ~3 s in all


_addr = mc.buffer_address


def _put_first_wins(client: mc._Client, key: str, value: str, what: str, *, strict: bool) -> str:
    """Put a small marker object and read back what is recorded: Mooncake's put never
    overwrites, so the first writer (maybe another process) wins. ``strict``: a failed
    put is an error even if another writer's object is there."""
    store = client.store
    for attempt in range(_PUT_ATTEMPTS):
        rc = store.put(key, value.encode("utf-8"), client.put_cfg)
        if rc != mc.TRANSFER_FAIL:
            break
        time.sleep(0.1 * 2**attempt)
    if rc != mc.OK and (strict or store.get_size(key) < 0):
        raise mc.status_error(rc, "put", what)
    for _ in range(50):
        recorded = bytes(store.get(key)).decode("utf-8")
        if recorded:
            return recorded
        time.sleep(0.01)
    raise BackendUnavailable(f"{what} cannot be read back")


class MooncakeStore(FeatureStore):
    """Sample bytes in a Mooncake cluster, read zero-copy over TCP or RDMA.

    Args:
        master: ``host:port`` of ``mooncake_master``.
        protocol: ``tcp`` or ``rdma``.
        devices: RDMA device names (``mlx5_0,mlx5_1``); empty for TCP.
        segment_size: memory this process contributes, mounted on its first put
            (readers contribute none). Objects are placed in the writer's segment.
        buffer_size: the client's local transfer buffer, and with
            ``transfer=staging`` the size of the registered staging arena.
        metadata_server: ``P2PHANDSHAKE`` (no server) or a metadata server URL.
        local_hostname: address this client advertises (loopback by default).
        secret: shared secret; its verifier is kept in the store as an object.
        max_bytes: byte budget the producer respects (backpressure waits in the
            producer; the store itself refuses only when Mooncake is full).
        namespace: key prefix, so runs sharing a master never see each other.
        transfer: ``direct`` (register the caller's memory per put; read into
            registered buffers reused across reads) or ``staging`` (copy through
            one pre-registered arena).
        force_after: seconds after which a removal blocked by a read lease is forced.
        connect_timeout: seconds to wait for the master's port before failing.
        read_retries: retries of a read that fails in transfer before the
            sample is reported unavailable.

    Example:
        >>> import torch
        >>> from torch_dataflow.stores import open_store
        >>> store = open_store("mooncake://127.0.0.1:50051?segment_size=256MiB")  # doctest: +SKIP
        >>> ref = store.put("s1", 1, {"x": torch.arange(3)})                      # doctest: +SKIP
        >>> store.get(ref)["x"].tolist()                                          # doctest: +SKIP
        [0, 1, 2]
        >>> store.delete(ref)                                                     # doctest: +SKIP
        True
    """

    def __init__(
        self,
        master: str = "127.0.0.1:50051",
        *,
        protocol: str = "tcp",
        devices: str = "",
        segment_size: int | str = "1GiB",
        buffer_size: int | str = "16MiB",
        metadata_server: str = "P2PHANDSHAKE",
        local_hostname: str = "127.0.0.1",
        secret: str | None = None,
        max_bytes: int | str | None = None,
        namespace: str = "td",
        transfer: str = "direct",
        force_after: float = 30.0,
        connect_timeout: float = 10.0,
        read_retries: int = 2,
    ) -> None:
        if protocol not in ("tcp", "rdma"):
            raise ConfigError(f"mooncake protocol must be tcp or rdma, got {protocol!r}")
        if transfer not in ("direct", "staging"):
            raise ConfigError(f"mooncake transfer must be direct or staging, got {transfer!r}")
        if not namespace or "/" in namespace or "@" in namespace or namespace.startswith("."):
            raise ConfigError(f"mooncake namespace must be non-empty, without '/', '@' or a leading '.': {namespace!r}")
        self.cfg = mc.MooncakeConfig(
            master=master,
            protocol=protocol,
            devices=devices,
            segment_size=parse_size(segment_size),
            buffer_size=parse_size(buffer_size),
            metadata_server=metadata_server,
            local_hostname=local_hostname,
            connect_timeout=float(connect_timeout),
        )
        self.secret = secret
        self.max_bytes = None if max_bytes is None else parse_size(max_bytes)
        self.namespace = namespace
        self.transfer = transfer
        self.force_after = float(force_after)
        self.read_retries = int(read_retries)
        self.uri = f"mooncake://{master}" + ("" if namespace == "td" else f"?namespace={namespace}")
        self._c: mc._Client | None = None
        self._pid = -1
        self._last_gc = 0.0
        self._unverified_at: float | None = None  # no verifier found and none recordable (see _attach)

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> MooncakeStore:
        """Build from ``mooncake://host:port?protocol=tcp&segment_size=4GiB&...``; keyword overrides win."""
        parsed = parse_uri(uri, _QUERY)
        if parsed.scheme != "mooncake" or not parsed.host or not parsed.port:
            raise ConfigError(f"not a mooncake://host:port URI: {uri!r}")
        if parsed.path not in ("", "/"):
            raise ConfigError(f"a mooncake:// URI has no path (use ?namespace=...): {uri!r}")
        return cls(f"{parsed.host}:{parsed.port}", **{**parsed.query, **overrides})

    @staticmethod
    def close_clients() -> None:
        """Close this process's Mooncake clients now (also done at exit). Their objects go with them."""
        mc.close_all()

    # ------------------------------------------------------------- plumbing
    def _key(self, sample_id: str, generation: int) -> str:
        return f"{self.namespace}/{sample_id}@{generation}"

    def _client(self) -> mc._Client:
        if self._c is None or self._pid != os.getpid():
            self._attach()
        assert self._c is not None
        return self._c

    def _attach(self) -> None:
        client = mc.get_client(self.cfg)
        store = client.connect()
        key = f"{self.namespace}/{_AUTH_KEY}"
        with client.lock:  # threads of one process attach one at a time
            recorded = bytes(store.get(key)).decode("utf-8")
            if not recorded and store.get_size(key) >= 0:
                # Listed but unreadable: it lived in the segment of a client that died.
                # Lost with it; the next client that holds a segment records it again.
                mc.log.warning("the auth verifier of %s was lost with its holder; recording it again", self.uri)
                store.remove(key, True)
            if not recorded and (client.mounted or self.cfg.segment_size > 0):
                # The first client fixes the namespace's secret, or its absence ("none"),
                # so a secret given to a store created without one is refused too.
                client.ensure_segment()
                mark = _NO_SECRET if self.secret is None else make_verifier(self.secret)
                recorded = _put_first_wins(client, key, mark, f"the auth verifier of {self.uri}", strict=True)
        if recorded:
            verifier = None if recorded == _NO_SECRET else recorded
            self._guard = SecretGuard.attach(self.secret, verifier, f"store {self.uri}")
            self._unverified_at = None
        else:
            # A reader (no segment) before any writer, or after the verifier's holder died:
            # it cannot hold the verifier, so it checks again until a writer has recorded it.
            self._guard = SecretGuard(f"store {self.uri}", None, None)
            self._unverified_at = time.monotonic()
        self._c, self._pid = client, os.getpid()

    def _check_auth(self) -> None:
        if self._unverified_at is not None and time.monotonic() - self._unverified_at >= _REVERIFY_S:
            self._guard = None  # look for a verifier a writer recorded since
        super()._check_auth()

    def store_id(self) -> str:
        """``mooncake:<namespace>``: the namespace is the store (the master is reached
        by address, so a mistyped one fails to connect). Derived, not kept as an object:
        every object lives in its writer's segment, and an id lost with a dead producer
        would make its restart look like another store."""
        self._check_auth()  # the master answers and this client may use the namespace
        return "mooncake:" + self.namespace

    def _staging(self, nbytes: int) -> torch.Tensor | None:
        """The client's registered arena when ``transfer=staging`` and the blob fits, else ``None``."""
        if self.transfer != "staging" or nbytes > self.cfg.buffer_size:
            return None
        return self._client().staging_arena()

    def _maybe_gc(self) -> None:
        c = self._client()
        if c.pending and time.monotonic() - self._last_gc > 1.0:
            self._last_gc = time.monotonic()
            c.gc(self.namespace, self.force_after)

    # ------------------------------------------------------------ writes
    def _publish(self, items: Sequence[tuple[str, Sequence[Buffer], int]]) -> None:
        """Put each ``(key, parts, nbytes)``; raise the first failure after tracking successes."""
        c = self._client()
        c.ensure_segment()
        store = c.store
        for key, _, _ in items:  # Mooncake's put never overwrites: replace what this process holds
            if key in c.written.get(self.namespace, {}) or key in c.pending:
                store.remove(key, True)
                with c.lock:
                    c.pending.pop(key, None)
        todo, gc_done = list(items), False
        for attempt in range(_PUT_ATTEMPTS):
            rcs = self._put_once(c, todo)
            with c.lock:
                w = c.written.setdefault(self.namespace, {})
                for (key, _, n), rc in zip(todo, rcs, strict=True):
                    if rc == mc.OK:
                        w[key] = n
            failed = [(it, rc) for it, rc in zip(todo, rcs, strict=True) if rc != mc.OK]
            if not failed:
                return
            codes = {rc for _, rc in failed}
            if codes == {mc.NO_AVAILABLE_HANDLE} and c.pending and not gc_done:
                c.gc(self.namespace, self.force_after)  # parked removals may free room
                gc_done = True
            elif codes == {mc.TRANSFER_FAIL} and attempt + 1 < _PUT_ATTEMPTS:
                # The master may place a put in the segment of a writer that died and
                # that it has not dropped yet (client_ttl): another try lands elsewhere.
                time.sleep(0.1 * 2**attempt)
            else:
                break
            todo = [it for it, _ in failed]
        (key, _, _), rc = failed[0]
        raise mc.status_error(rc, "put", key)

    def _put_once(self, c: mc._Client, items: Sequence[tuple[str, Sequence[Buffer], int]]) -> list[int]:
        store = c.store
        arena = self._staging(max(n for _, _, n in items))
        if arena is not None:
            rcs = []
            with c.lock:
                view = memoryview(arena.numpy())
                for key, parts, n in items:
                    pos = 0
                    for p in parts:
                        view[pos : pos + len(p)] = memoryview(p).cast("B")
                        pos += len(p)
                    rcs.append(store.put_from(key, arena.data_ptr(), n, c.put_cfg))
            return rcs
        keys = [key for key, _, _ in items]
        ptrs = [[_addr(p) for p in parts if len(p)] for _, parts, _ in items]
        sizes = [[len(p) for p in parts if len(p)] for _, parts, _ in items]
        ranges = [(p, n) for pl, sl in zip(ptrs, sizes, strict=True) for p, n in zip(pl, sl, strict=True)]
        with c.registered(ranges) as ok:
            if ok:
                return [int(rc) for rc in store.batch_put_from_multi_buffers(keys, ptrs, sizes, c.put_cfg)]
        # Some caller memory is registered elsewhere (another thread's put of the same
        # tensor): copy each blob once into fresh memory of our own.
        rcs = []
        for key, parts, n in items:
            blob = torch.empty(n, dtype=torch.uint8)
            view, pos = memoryview(blob.numpy()), 0
            for p in parts:
                view[pos : pos + len(p)] = memoryview(p).cast("B")
                pos += len(p)
            with c.registered([(blob.data_ptr(), n)]):
                rcs.append(store.put_from(key, blob.data_ptr(), n, c.put_cfg))
        return rcs

    def _write(self, sample_id: str, generation: int, parts: Sequence[Buffer], nbytes: int) -> None:
        if sum(len(p) for p in parts) != nbytes:
            raise ConfigError(f"parts hold {sum(len(p) for p in parts)} bytes, expected {nbytes}")
        if nbytes == 0:  # Mooncake refuses empty objects (-600), or reports 0 and stores nothing
            raise ConfigError("mooncake cannot store an empty object")
        self._maybe_gc()
        self._publish([(self._key(sample_id, generation), parts, nbytes)])

    def put_many(
        self, items: Iterable[tuple[str, int, Mapping[str, torch.Tensor], Mapping[str, Any] | None]]
    ) -> list[SampleRef]:
        """Encode every sample, then put them all in one batched Mooncake call."""
        self._check_auth()
        encoded = []
        for sid, gen, tensors, meta in items:
            encoded.append((sid, gen, self._encode(sid, gen, tensors), meta))
        if not encoded:
            return []
        refs = [self._ref(s, g, e, m) for s, g, e, m in encoded]  # validate metadata before any byte moves
        for _, _, e, _ in encoded:
            if e.nbytes == 0:
                raise ConfigError("mooncake cannot store an empty object")
        self._maybe_gc()
        self._publish([(self._key(s, g), e.parts(), e.nbytes) for s, g, e, _ in encoded])
        return refs

    # ------------------------------------------------------------- reads
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

    # ----------------------------------------------------- lifetime, listing
    def _delete(self, sample_id: str, generation: int) -> bool:
        removed = self._client().remove(self._key(sample_id, generation), self.namespace)
        self._maybe_gc()
        return removed

    def settle(self, ref: SampleRef, *, force: bool = False) -> bool:
        """Remove ``ref``'s object; ``True`` only once it is gone from the master (a removal
        parked behind a read lease is not settled: the ledger keeps it queued). ``force``
        removes it under a read lease too (the end of a run, ``torch-dataflow gc``): the
        ledger freed it, so a lease is a finished read's or a stale reader's."""
        self._check_auth()
        key = self._key(ref.sample_id, ref.generation)
        self._delete(ref.sample_id, ref.generation)
        c = self._client()
        if key in c.pending:
            self.gc(force=force)
        return key not in c.pending and int(c.store.is_exist(key)) == 0

    def gc(self, *, force: bool = False) -> int:
        """Retry removals that met a read lease; force those older than ``force_after``
        (all of them with ``force=True``). Returns how many are still pending."""
        self._check_auth()
        self._last_gc = time.monotonic()
        return self._client().gc(self.namespace, self.force_after, force=force)

    def _exists(self, sample_id: str, generation: int) -> bool:
        c = self._client()
        key = self._key(sample_id, generation)
        if key in c.pending:
            return False
        rc = int(c.store.is_exist(key))
        if rc < 0:
            raise mc.status_error(rc, "is_exist", key)
        return rc == 1

    def readable(self, ref: SampleRef) -> bool:
        """Listed and really readable: after its writer's SIGKILL an object stays listed
        (``is_exist`` 1) for the master's client TTL while every read fails, so this
        reads its first bytes (a ranged read of 16 bytes, ``TRANSFER_FAIL`` if its segment died)."""
        if not self.exists(ref):
            return False
        n = min(16, ref.nbytes) or 1
        return self._client().probe(self._key(ref.sample_id, ref.generation), n) == n

    def _keys(self) -> Iterator[tuple[str, int]]:
        """Keys this process wrote and that still exist (freed ones are never listed).

        Mooncake cannot list keys, so samples other processes wrote are not
        listed; written keys are probed with ``batch_is_exist`` (which takes a
        read lease: a delete right after is parked until the lease ends).
        """
        c = self._client()
        with c.lock:
            written = list(c.written.get(self.namespace, {}))
        probed = c.store.batch_is_exist(written) if written else []
        for key, rc in zip(written, probed, strict=True):
            if rc == 1:
                sid, _, gen = key[len(self.namespace) + 1 :].rpartition("@")
                yield sid, int(gen)

    def pending_removals(self) -> list[tuple[str, int]]:
        """Freed generations whose bytes still wait for a read lease to end (see :meth:`gc`)."""
        self._check_auth()
        c = self._client()
        prefix = self.namespace + "/"
        with c.lock:
            keys = [k[len(prefix) :] for k, (ns, _) in c.pending.items() if ns == self.namespace]
        return sorted((sid, int(gen)) for sid, _, gen in (k.rpartition("@") for k in keys))

    fork_safe = False  # Mooncake's native client state does not survive fork() (_mooncake_client.get_client)
    health_is_local = True  # health() counts this process's writes: FeatureWriter asks the ledger instead

    def health(self) -> StoreHealth:
        """Bytes and samples this process holds in the store (Mooncake has no per-prefix totals)."""
        self._check_auth()
        c = self._client()
        with c.lock:
            w = c.written.get(self.namespace, {})
            return StoreHealth(resident_bytes=sum(w.values()), count=len(w))

    def close(self) -> None:
        """Drain this namespace's parked removals (forcing them), then drop the handle.

        The process's Mooncake client stays open for reuse (closing takes 1-2 s
        and drops every object this process wrote); see :meth:`close_clients`.
        """
        if self._c is not None and self._pid == os.getpid() and self._c.store is not None:
            left = self._c.gc(self.namespace, self.force_after, force=True)
            if left:
                mc.log.error("store %s closed with %d removals it could not complete", self.uri, left)
        self._c, self._guard = None, None

    def _config_state(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "master": cfg.master,
            "protocol": cfg.protocol,
            "devices": cfg.devices,
            "segment_size": cfg.segment_size,
            "buffer_size": cfg.buffer_size,
            "metadata_server": cfg.metadata_server,
            "local_hostname": cfg.local_hostname,
            "secret": self.secret,
            "max_bytes": self.max_bytes,
            "namespace": self.namespace,
            "transfer": self.transfer,
            "force_after": self.force_after,
            "connect_timeout": cfg.connect_timeout,
            "read_retries": self.read_retries,
        }
