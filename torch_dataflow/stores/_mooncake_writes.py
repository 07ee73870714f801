"""The write path of :class:`torch_dataflow.stores.mooncake.MooncakeStore`: puts from the
caller's registered memory (or a staging arena), retried and tracked per namespace.
A base class of ``MooncakeStore``, not used alone."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import BackendUnavailable, ConfigError
from ..refs import SampleRef
from . import _mooncake_client as mc
from ._mooncake_base import _MooncakeBase
from .base import Buffer

_addr = mc.buffer_address

_PUT_ATTEMPTS = 6  # transfer failures retried with backoff for ~3 s in all


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


class _MooncakeWrites(_MooncakeBase):
    """Mooncake puts; the connection, keys and auth come from ``MooncakeStore``."""

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
