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
from collections.abc import Iterator
from typing import Any

import torch

from ..auth import SecretGuard, make_verifier
from ..errors import ConfigError
from ..refs import SampleRef
from ..uri import parse_size, parse_uri
from . import _mooncake_client as mc
from ._mooncake_reads import _MooncakeReads
from ._mooncake_writes import _MooncakeWrites, _put_first_wins
from .base import StoreHealth

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


class MooncakeStore(_MooncakeWrites, _MooncakeReads):
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
