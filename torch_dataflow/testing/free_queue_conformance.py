"""Conformance tests of the ledger's durable delete queue and byte accounting.

DESIGN invariant 12 ("freed means deleted"): every ref whose bytes the ledger
stops needing — freed by a durable mark or a reconcile, aborted, superseded by
a newer generation — is queued by the same atomic step that decided it, stays
queued (for every client) until :meth:`~torch_dataflow.ledger.base.Ledger.confirm_deleted`,
and :meth:`~torch_dataflow.ledger.base.Ledger.resident_bytes` counts it until then.

Mixed into :class:`~torch_dataflow.testing.ledger_conformance.LedgerConformance`,
so every backend that runs that suite runs these too (same two hooks).
"""

from __future__ import annotations

import random
from typing import Any

from ..ledger.base import Ledger
from ..refs import SampleRef

__all__ = ["FreeQueueConformance"]


def _ref(sample_id: str, generation: int, nbytes: int) -> SampleRef:
    return SampleRef(sample_id, generation, "memory://conformance", (), nbytes, f"{generation:016x}")


def _put(led: Ledger, sizes: dict[str, int]) -> list[SampleRef]:
    """Reserve and commit one new generation of each id, ``nbytes`` as given."""
    ids = list(sizes)
    refs = [_ref(s, g, sizes[s]) for s, g in zip(ids, led.reserve(ids), strict=True)]
    led.commit(refs)
    return refs


def _keys(refs: Any) -> set[tuple[str, int]]:
    return {(r.sample_id, r.generation) for r in refs}


def _train(led: Ledger, n: int, step: int) -> list[str]:
    leases = led.lease("t", n, ttl=30)
    assert led.ack([x.lease_id for x in leases], step=step) == []
    return [x.sample_id for x in leases]


class FreeQueueConformance:
    """The delete-queue tests (see module docs); hooks as in ``LedgerConformance``."""

    def make_ledger(self, **kw: Any) -> Ledger:
        raise NotImplementedError

    def attach_ledger(self, ledger: Ledger, **kw: Any) -> Ledger:
        raise NotImplementedError

    def test_inv12_freed_refs_are_queued_until_confirmed(self) -> None:
        led = self.make_ledger()
        _put(led, {f"f{i}": 100 + i for i in range(4)})
        _train(led, 4, step=1)
        assert led.pending_deletes() == [] and led.resident_bytes() == 406
        freed = led.mark_durable(1, retain=False)
        assert len(freed) == 4
        other = self.attach_ledger(led)  # another process sees the queue: it is ledger state
        assert _keys(other.pending_deletes()) == _keys(freed)
        assert {r.nbytes for r in other.pending_deletes()} == {100, 101, 102, 103}
        assert led.resident_bytes() == 406  # freed but not deleted: still resident
        assert len(led.pending_deletes(limit=3)) == 3
        first = sorted(freed, key=lambda r: r.sample_id)[:2]
        assert other.confirm_deleted(first) == 2
        assert led.confirm_deleted(first) == 0  # idempotent
        assert _keys(led.pending_deletes()) == _keys(freed) - _keys(first)
        assert led.resident_bytes() == 406 - first[0].nbytes - first[1].nbytes
        assert led.confirm_deleted(led.pending_deletes()) == 2
        assert led.pending_deletes() == [] and led.resident_bytes() == 0
        assert led.confirm_deleted([]) == 0

    def test_inv12_abort_and_supersede_queue_the_old_bytes(self) -> None:
        led = self.make_ledger()
        assert led.resident_bytes() == 0  # from here on, every commit and confirm keeps the count
        [a1, b1, q1] = _put(led, {"a": 10, "b": 20, "q": 40})
        [b2] = _put(led, {"b": 25})  # a re-put: generation 1's bytes are no longer needed
        assert _keys(led.pending_deletes()) == {("b", 1)}
        assert led.resident_bytes() == 10 + 20 + 25 + 40
        assert led.abort(["a", "never-committed"]) == [a1]
        led.reserve(["r"])  # reserved, not committed: no bytes the ledger knows of
        assert led.abort(["r"]) == [] and led.abort(["a"]) == []  # an abort again queues nothing more
        assert _keys(led.pending_deletes()) == {("a", 1), ("b", 1)}
        # a quarantined sample keeps its bytes (kept for inspection); its abort queues them
        [lease] = [x for x in led.lease("t", 3, ttl=30) if x.sample_id == "q"] or [None]
        assert lease is not None and led.fail([lease.lease_id], retryable=False, reason="bad") == []
        assert led.resident_bytes() == 10 + 20 + 25 + 40
        assert led.abort(["q"]) == [q1]
        assert _keys(led.pending_deletes()) == {("a", 1), ("b", 1), ("q", 1)}
        assert led.confirm_deleted([a1, b1, q1]) == 3
        assert led.pending_deletes() == [] and led.resident_bytes() == b2.nbytes
        # confirming a ref that was never queued (a live generation) changes nothing
        assert led.confirm_deleted([b2]) == 0 and led.resident_bytes() == 25

    def test_inv12_reconcile_frees_into_the_queue(self) -> None:
        led = self.make_ledger()
        _put(led, {f"r{i}": 8 for i in range(6)})
        s1 = _train(led, 2, step=1)
        led.mark_durable(1)  # the first mark frees nothing (kept for a resume from no checkpoint)
        s2 = _train(led, 2, step=2)
        assert led.pending_deletes() == []
        rep = led.reconcile(2)  # resume from step 2: step 1's samples are covered by the previous mark
        assert {r.sample_id for r in rep.freed} == set(s1)
        assert _keys(led.pending_deletes()) == _keys(rep.freed)
        assert not set(s2) & {r.sample_id for r in led.pending_deletes()}
        assert led.resident_bytes() == 6 * 8

    def test_inv12_pending_deletes_limit_on_a_long_queue(self) -> None:
        led = self.make_ledger()
        sizes = {f"l{i:04d}": 3 for i in range(300)}
        first = _put(led, sizes)
        _put(led, sizes)  # every first generation superseded: 300 queued
        assert _keys(led.pending_deletes()) == _keys(first)
        some = led.pending_deletes(limit=250)
        assert len(some) == 250 and _keys(some) <= _keys(first) and len(_keys(some)) == 250
        assert led.pending_deletes(limit=0) == [] and len(led.pending_deletes(limit=1)) == 1
        assert led.confirm_deleted(some) == 250 and _keys(led.pending_deletes(limit=100)) == _keys(first) - _keys(some)

    def test_inv12_resident_bytes_matches_the_catalog(self) -> None:
        """A seeded mix of puts, re-puts, acks, marks, quarantines, aborts and confirms:
        resident_bytes is always live + quarantined + queued, as a second client sees it."""
        led = self.make_ledger()
        other = self.attach_ledger(led)
        rnd = random.Random(15)
        live: dict[str, SampleRef] = {}
        step = 0
        for _ in range(40):
            op = rnd.random()
            if op < 0.35:
                sizes = {f"m{rnd.randrange(12)}": rnd.randrange(1, 1 << 20) for _ in range(rnd.randint(1, 3))}
                live.update((r.sample_id, r) for r in _put(led, sizes))
            elif op < 0.55:
                step += 1
                _train(led, rnd.randint(1, 3), step)
            elif op < 0.65:
                for r in led.mark_durable(step, retain=rnd.random() < 0.5):
                    live.pop(r.sample_id, None)
            elif op < 0.75:
                leases = led.lease("q", 1, ttl=30)
                led.fail([x.lease_id for x in leases], retryable=False, reason="bad")
            elif op < 0.85 and live:
                for r in led.abort([rnd.choice(sorted(live))]):
                    live.pop(r.sample_id, None)
            else:
                queue = led.pending_deletes()
                led.confirm_deleted(rnd.sample(queue, len(queue) // 2))
            queued = sum(r.nbytes for r in other.pending_deletes())
            want = sum(r.nbytes for sid, r in live.items() if led.get_ref(sid) == r) + queued
            assert other.resident_bytes() == led.resident_bytes() == want
