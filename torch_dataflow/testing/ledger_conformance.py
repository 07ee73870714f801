"""Conformance suite for :class:`~torch_dataflow.ledger.base.Ledger` backends.

Shipped inside the package so a third-party ledger can run it::

    class TestMyLedger(LedgerConformance):
        def make_ledger(self, **kw):
            return MyLedger(..., **kw)
        def attach_ledger(self, ledger, **kw):   # a second client, same state
            return MyLedger(..., **kw)

Test names carry the DESIGN.md invariant they check (``inv1`` ... ``inv9``).
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import pytest

from ..errors import AuthError, ConfigError, SampleAborted
from ..ledger.base import Ledger, Plan
from ..refs import SampleRef
from .free_queue_conformance import FreeQueueConformance

__all__ = ["LedgerConformance", "commit_ids", "fake_ref"]


def fake_ref(sample_id: str, generation: int, store: str = "memory://conformance") -> SampleRef:
    """A tensor-free ref for ledger tests (the ledger never looks inside)."""
    return SampleRef(sample_id, generation, store, (), 0, f"{generation:016x}")


def commit_ids(ledger: Ledger, ids: list[str]) -> list[SampleRef]:
    gens = ledger.reserve(ids)
    refs = [fake_ref(s, g) for s, g in zip(ids, gens, strict=True)]
    ledger.commit(refs)
    return refs


def _ids(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


class LedgerConformance(FreeQueueConformance):
    """Base class of the ledger conformance tests; override the two hooks."""

    def make_ledger(self, **kw: Any) -> Ledger:
        raise NotImplementedError

    def attach_ledger(self, ledger: Ledger, **kw: Any) -> Ledger:
        """A second client of ``ledger``'s state (another process would see the same)."""
        raise NotImplementedError

    # ------------------------------------------------------------ life cycle
    def test_lifecycle_counts(self) -> None:
        led = self.make_ledger()
        commit_ids(led, _ids(10))
        c = led.counts()
        assert (c.pending, c.committed) == (10, 10)
        leases = led.lease("a", 4, ttl=30)
        assert len(leases) == 4 and led.counts().leased == 4
        assert led.ack([x.lease_id for x in leases], step=1) == []
        assert led.counts().trained == 4
        assert led.mark_durable(1) == []  # the first checkpoint: kept for a resume from "no checkpoint"
        assert led.counts().durable == 4
        freed = led.mark_durable(1, retain=False)  # the end of a run: free up to the mark itself
        assert sorted(r.sample_id for r in freed) == sorted(x.sample_id for x in leases)
        c = led.counts()
        assert (c.pending, c.trained, c.durable, c.freed) == (6, 0, 4, 4)
        assert set(led.trained_steps()) == {x.sample_id for x in leases}

    def test_refs_are_metadata_only(self) -> None:
        led = self.make_ledger()
        with pytest.raises(TypeError):
            led.commit([{"sample_id": "x"}])  # type: ignore[list-item]
        with pytest.raises(ConfigError):
            led.reserve(["../escape"])

    def test_lease_carries_ref(self) -> None:
        led = self.make_ledger()
        refs = commit_ids(led, ["x"])
        [lease] = led.lease("a", 5, ttl=30)
        assert lease.ref == refs[0] and lease.owner == "a" and lease.deadline > time.time()

    def test_ack_is_idempotent_and_keeps_first_step(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["x"])
        [lease] = led.lease("a", 1, ttl=30)
        assert led.ack([lease.lease_id], 3) == []
        assert led.ack([lease.lease_id], 9) == []
        assert led.trained_steps() == {"x": 3}

    def test_forged_lease_ids_are_lost(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["x"])
        [lease] = led.lease("a", 1, ttl=30)
        forged = lease.lease_id.replace(lease.lease_id.split(":")[2], "0" * 16)
        assert led.ack([forged, "garbage"], 1) == [forged, "garbage"]
        assert led.counts().leased == 1

    # ------------------------------------------------------------ invariant 1
    def test_inv1_no_loss_with_failures(self) -> None:
        led = self.make_ledger()
        ids = _ids(50)
        commit_ids(led, ids)
        trained: set[str] = set()
        rounds = 0
        while len(trained) < len(ids):
            rounds += 1
            assert rounds < 100, "samples stopped being delivered"
            leases = led.lease("a", 7, ttl=30)
            keep = [x for i, x in enumerate(leases) if (i + rounds) % 3]
            give_back = [x for x in leases if x not in keep]
            assert led.fail([x.lease_id for x in give_back], retryable=True) == []
            assert led.ack([x.lease_id for x in keep], rounds) == []
            trained |= {x.sample_id for x in keep}
        assert trained == set(ids) and led.counts().pending == 0

    # ------------------------------------------------------------ invariant 2
    def test_inv2_reconcile_replays_only_after_checkpoint(self) -> None:
        led = self.make_ledger()
        commit_ids(led, _ids(12))
        for step in range(1, 5):  # 3 samples acked at each of steps 1..4
            ls = led.lease("a", 3, ttl=30)
            led.ack([x.lease_id for x in ls], step)
        before = led.trained_steps()
        a0 = led.attempt()
        rep = led.reconcile(2)
        assert rep.attempt == a0 + 1 == led.attempt()
        assert (rep.replayed, rep.durable) == (6, 6)
        assert rep.freed == ()  # no earlier checkpoint: the step-2 samples are kept (retention)
        c = led.counts()
        assert (c.pending, c.durable) == (6, 6)
        again = {x.sample_id for x in led.lease("b", 100, ttl=30)}
        assert again == {s for s, st in before.items() if st > 2}
        assert led.checkpoints() == [2]

    # ------------------------------------------------------------ retention (issue 15 item 1)
    def test_retention_frees_what_the_previous_checkpoint_covers(self) -> None:
        led = self.make_ledger()
        commit_ids(led, _ids(8))
        by_step = {}
        for step in range(1, 5):  # 2 samples acked at each of steps 1..4
            ls = led.lease("a", 2, ttl=30)
            led.ack([x.lease_id for x in ls], step)
            by_step[step] = sorted(x.sample_id for x in ls)
        assert led.mark_durable(1) == []
        assert sorted(r.sample_id for r in led.mark_durable(3)) == by_step[1]  # previous mark: 1
        assert sorted(r.sample_id for r in led.mark_durable(4)) == sorted(by_step[2] + by_step[3])
        assert led.checkpoints() == [1, 3, 4]
        # A resume from step 3 (the previous checkpoint) replays step 4 from bytes that are still there.
        rep = led.reconcile(3)
        assert rep.replayed == 2 and rep.freed == ()
        assert sorted(x.sample_id for x in led.lease("b", 9, ttl=30)) == by_step[4]
        assert led.checkpoints() == [1, 3]

    def test_resume_older_than_what_was_freed_is_refused_and_changes_nothing(self) -> None:
        from ..errors import CheckpointTooOld

        led = self.make_ledger()
        commit_ids(led, _ids(6))
        for step in (1, 2, 3):
            led.ack([x.lease_id for x in led.lease("a", 2, ttl=30)], step)
            led.mark_durable(step)
        before, a0 = led.counts(), led.attempt()
        for rs in (None, 0, 1):
            with pytest.raises(CheckpointTooOld, match="newest checkpoint the ledger knows is at step 3") as e:
                led.reconcile(rs)
            assert e.value.needed_step == rs and e.value.newest_step == 3
        assert led.counts() == before and led.attempt() == a0
        assert led.reconcile(1, strict=False).replayed == 2  # at most once, on request: the freed stay lost
        assert led.reconcile(2).replayed == 0

    # ------------------------------------------------------------ fencing (issue 15 item 2)
    def test_session_fences_stale_leases_claims_and_marks(self) -> None:
        from ..errors import Fenced

        led = self.make_ledger()
        commit_ids(led, _ids(6))
        old = led.reconcile(None, session={"name": "old"}).attempt
        held = led.lease("old", 2, ttl=30, fence=old)
        assert led.session()["fence"] == old and led.session()["live"]
        led.session_heartbeat(old)
        new = led.reconcile(None, session={"name": "new"}, takeover=True).attempt
        assert new == old + 1 and led.session()["name"] == "new"
        with pytest.raises(Fenced, match="stale"):
            led.lease("old", 2, ttl=30, fence=old)
        with pytest.raises(Fenced):
            led.claim_step(Plan(old, 0, 1, 2), 0, 0, 30, wait_for_stream=False, fence=old)
        with pytest.raises(Fenced):
            led.claim_step(Plan(old, 0, 1, 2), 0, 0, 30, wait_for_stream=False)  # a plan of a past attempt
        with pytest.raises(Fenced):
            led.mark_durable(1, fence=old)
        with pytest.raises(Fenced):
            led.session_heartbeat(old)
        assert led.ack([x.lease_id for x in held], 1) == [x.lease_id for x in held]  # released by the takeover
        assert len(led.lease("new", 9, ttl=30, fence=new)) == 6
        led.close_session(old)  # a stale fence closes nothing
        assert led.session()["fence"] == new
        led.close_session(new)
        assert led.session() is None
        assert led.join_session.__doc__

    def test_inv2_reconcile_releases_dead_leases(self) -> None:
        led = self.make_ledger()
        commit_ids(led, _ids(5))
        held = led.lease("dead", 5, ttl=3600)
        rep = led.reconcile(None)
        assert rep.released == 5 and led.counts().pending == 5
        assert led.ack([x.lease_id for x in held], 1) == [x.lease_id for x in held]

    # ------------------------------------------------------------ invariant 3
    def test_inv3_consume_once_between_clients(self) -> None:
        led = self.make_ledger()
        other = self.attach_ledger(led)
        commit_ids(led, _ids(40))
        got: list[str] = []
        for i in range(10):
            got += [x.sample_id for x in (led if i % 2 else other).lease(f"c{i % 2}", 4, ttl=30)]
        assert len(got) == len(set(got)) == 40

    def test_inv3_expired_lease_is_redelivered_and_old_ack_lost(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["x"])
        [old] = led.lease("slow", 1, ttl=0.05)
        assert led.lease("fast", 1, ttl=30) == []
        time.sleep(0.1)
        [new] = led.lease("fast", 1, ttl=30)
        assert new.sample_id == "x" and new.lease_id != old.lease_id
        assert led.ack([old.lease_id], 1) == [old.lease_id]
        assert led.renew([old.lease_id], 30) == [old.lease_id]
        assert led.ack([new.lease_id], 1) == []

    def test_inv3_renew_keeps_lease(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["x"])
        [lease] = led.lease("a", 1, ttl=0.3)
        for _ in range(4):
            time.sleep(0.1)
            assert led.renew([lease.lease_id], 0.3) == []
            assert led.lease("b", 1, ttl=30) == []
        assert led.ack([lease.lease_id], 1) == []

    # ------------------------------------------------------------ generations
    def test_inv4_reput_supersedes_and_old_lease_cannot_ack(self) -> None:
        led = self.make_ledger()
        [r1] = commit_ids(led, ["x"])
        [old] = led.lease("a", 1, ttl=30)
        [g2] = led.reserve(["x"])
        assert g2 == 2
        superseded = led.commit([fake_ref("x", g2)])
        assert superseded == [r1]
        assert led.ack([old.lease_id], 1) == [old.lease_id]
        [new] = led.lease("a", 1, ttl=30)
        assert new.generation == 2 and led.get_ref("x") == fake_ref("x", 2)

    def test_inv4_stale_commit_rejected(self) -> None:
        led = self.make_ledger()
        [g1] = led.reserve(["x"])
        [g2] = led.reserve(["x"])
        led.commit([fake_ref("x", g2)])
        with pytest.raises(ConfigError):
            led.commit([fake_ref("x", g1)])
        with pytest.raises(ConfigError):
            led.commit([fake_ref("never", 1)])
        assert led.counts().pending == 1

    def test_inv4_abort_tombstone_survives_new_client(self) -> None:
        led = self.make_ledger()
        [r1] = commit_ids(led, ["done"])
        [g] = led.reserve(["inflight"])
        assert led.abort(["inflight", "done", "unknown"]) == [r1]
        other = self.attach_ledger(led)
        with pytest.raises(SampleAborted):
            other.commit([fake_ref("inflight", g)])
        assert other.lease("a", 10, ttl=30) == []
        assert other.counts().aborted == 3
        [g2] = other.reserve(["inflight"])  # an explicit re-put after the abort is a new generation
        other.commit([fake_ref("inflight", g2)])
        assert [x.sample_id for x in other.lease("a", 10, ttl=30)] == ["inflight"]

    def test_inv7_fail_nonretryable_quarantines(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["bad", "good"])
        leases = {x.sample_id: x for x in led.lease("a", 2, ttl=30)}
        assert led.fail([leases["bad"].lease_id], retryable=False, reason="checksum mismatch") == []
        assert led.fail([leases["good"].lease_id]) == []
        assert [x.sample_id for x in led.lease("a", 5, ttl=30)] == ["good"]
        [(ref, reason)] = led.quarantined()
        assert ref is not None and ref.sample_id == "bad" and "checksum" in reason
        assert led.counts().quarantined == 1

    # ------------------------------------------------------------ invariant 5
    def test_inv5_secret(self) -> None:
        led = self.make_ledger(secret="right")
        commit_ids(led, ["x"])
        assert self.attach_ledger(led, secret="right").counts().pending == 1
        for bad in ("wrong", None):
            with pytest.raises(AuthError):
                self.attach_ledger(led, secret=bad).lease("a", 1, ttl=30)
        plain = self.make_ledger()
        plain.counts()  # created without a secret
        with pytest.raises(AuthError):
            self.attach_ledger(plain, secret="unexpected").counts()

    def test_pickles_by_configuration(self) -> None:
        led = self.make_ledger()
        clone = pickle.loads(pickle.dumps(led))
        assert type(clone) is type(led) and clone.uri == led.uri

    # ------------------------------------------------------------ producers
    def test_stream_closes_when_all_producers_done(self) -> None:
        led = self.make_ledger()
        assert not led.is_closed()
        led.register_producer("p1")
        led.register_producer("p2")
        led.producer_done("p1")
        assert not led.is_closed()
        led.producer_done("p2")
        assert led.is_closed() and led.counts().closed
        led.reopen()
        assert not led.is_closed()

    # ------------------------------------------------------------ invariant 9
    @pytest.mark.parametrize("world", [1, 2, 3, 4])
    def test_inv9_plan_disjoint_complete_equal(self, world: int) -> None:
        led = self.make_ledger()
        ids = _ids(50)
        commit_ids(led, ids)
        plan = Plan(led.attempt(), 0, world, 3)
        per_rank: dict[int, list[str]] = {r: [] for r in range(world)}
        steps = {r: 0 for r in range(world)}
        for step in range(100):
            statuses = set()
            for rank in reversed(range(world)):  # claim order must not matter
                c = led.claim_step(plan, step, rank, ttl=30, wait_for_stream=False)
                statuses.add(c.status)
                if c.status == "ready":
                    assert len(c.leases) == 3
                    per_rank[rank] += [x.sample_id for x in c.leases]
                    steps[rank] += 1
                else:
                    assert c.status == "end" and c.tail == 50 % (3 * world)
            assert len(statuses) == 1, "ranks disagreed about a step"
            if statuses == {"end"}:
                break
        assert len(set(steps.values())) == 1
        flat = [s for v in per_rank.values() for s in v]
        assert len(flat) == len(set(flat)) == 50 - 50 % (3 * world)
        assert led.claim_step(plan, 0, 0, ttl=30, wait_for_stream=False).status == "claimed"

    def test_inv9_plan_waits_for_open_stream(self) -> None:
        led = self.make_ledger()
        led.register_producer("p")
        commit_ids(led, _ids(3))
        plan = Plan(led.attempt(), 0, 2, 2)
        assert led.claim_step(plan, 0, 0, ttl=30, wait_for_stream=True).status == "wait"
        commit_ids(led, _ids(3, "t"))
        assert len(led.claim_step(plan, 0, 1, ttl=30, wait_for_stream=True).leases) == 2
        assert led.claim_step(plan, 1, 0, ttl=30, wait_for_stream=True).status == "wait"
        led.producer_done("p")
        c = led.claim_step(plan, 1, 0, ttl=30, wait_for_stream=True)
        assert (c.status, c.tail) == ("end", 2)
        assert led.claim_step(plan, 1, 1, ttl=30, wait_for_stream=True).status == "end"
        assert len(led.claim_step(plan, 0, 0, ttl=30, wait_for_stream=True).leases) == 2

    def test_inv9_reshard_after_restart(self) -> None:
        led = self.make_ledger()
        ids = _ids(30)
        commit_ids(led, ids)
        done: list[str] = []
        plan = Plan(led.attempt(), 0, 2, 2)
        for step in range(3):  # 2 ranks train 3 steps, then the job dies holding step 3
            for rank in range(2):
                c = led.claim_step(plan, step, rank, ttl=30, wait_for_stream=False)
                led.ack([x.lease_id for x in c.leases], step + 1)
                done += [x.sample_id for x in c.leases]
        led.claim_step(plan, 3, 0, ttl=30, wait_for_stream=False)
        led.reconcile(3)  # checkpoint at step 3 covers everything acked
        plan3 = Plan(led.attempt(), 0, 3, 2)
        for step in range(10):
            cs = [led.claim_step(plan3, step, r, ttl=30, wait_for_stream=False) for r in range(3)]
            if cs[0].status == "end":
                assert {c.status for c in cs} == {"end"} and cs[0].tail == 0
                break
            for c in cs:
                led.ack([x.lease_id for x in c.leases], 10 + step)
                done += [x.sample_id for x in c.leases]
        assert sorted(done) == ids

    def test_inv9_plan_rows_expire_like_leases(self) -> None:
        led = self.make_ledger()
        commit_ids(led, _ids(4))
        plan = Plan(led.attempt(), 0, 2, 2)
        c0 = led.claim_step(plan, 0, 0, ttl=0.05, wait_for_stream=False)
        time.sleep(0.1)
        other = led.lease("rescuer", 10, ttl=30)  # rank 1's unclaimed half expired too
        assert {x.sample_id for x in other} == set(_ids(4))
        assert led.ack([x.lease_id for x in c0.leases], 1) == [x.lease_id for x in c0.leases]

    # ------------------------------------------------------------ offline epochs
    def test_offline_epochs_redeliver_in_seeded_order(self) -> None:
        led = self.make_ledger()
        ids = _ids(20)
        commit_ids(led, ids)
        led.begin_epoch(0, seed=7)
        other = self.attach_ledger(led)
        other.begin_epoch(0, seed=999)  # first caller wins: same order for everyone
        e0 = led.lease("a", 100, ttl=30, epoch=0)
        assert sorted(x.sample_id for x in e0) == ids and [x.sample_id for x in e0] != ids
        led.ack([x.lease_id for x in e0[:15]], 1)
        led.begin_epoch(1, seed=7)
        e1 = led.lease("a", 100, ttl=30, epoch=1)
        assert sorted(x.sample_id for x in e1) == ids
        assert [x.sample_id for x in e1] != [x.sample_id for x in e0]
        assert all(x.epoch == 1 for x in e1)
        assert led.counts(epoch=0).leased == 5 and led.counts(epoch=1).leased == 20

    def test_offline_resume_inside_epoch(self) -> None:
        led = self.make_ledger()
        ids = _ids(10)
        commit_ids(led, ids)
        led.begin_epoch(0)
        e0 = led.lease("a", 10, ttl=30, epoch=0)
        led.ack([x.lease_id for x in e0], 1)
        led.mark_durable(1, free=False)
        led.begin_epoch(1)
        e1 = led.lease("a", 4, ttl=30, epoch=1)
        led.ack([x.lease_id for x in e1[:2]], 2)
        led.ack([x.lease_id for x in e1[2:]], 3)
        led.reconcile(2, free=False)  # checkpoint at step 2, mid epoch 1
        again = {x.sample_id for x in led.lease("b", 100, ttl=30, epoch=1)}
        assert again == set(ids) - {x.sample_id for x in e1[:2]}
        assert led.lease("b", 100, ttl=30, epoch=0) == []
        assert led.counts().freed == 0

    def test_fresh_run_trains_late_commits_in_every_epoch(self) -> None:
        # Samples committed while epoch 1 ran had no epoch-0 delivery; a fresh run
        # (reconcile(None)) trains every live sample in epoch 0 and again in epoch 1.
        led = self.make_ledger()
        old, late = _ids(6), [f"late-{i}" for i in range(3)]
        commit_ids(led, old)
        for epoch, step in ((0, 1), (1, 2)):
            led.begin_epoch(epoch, seed=3)
            if epoch == 1:
                commit_ids(led, late)  # lands in the current epoch only
            got = led.lease("a", 100, ttl=30, epoch=epoch)
            led.ack([x.lease_id for x in got], step)
            led.mark_durable(step, free=False)
        assert led.counts(epoch=0).durable == 6 and led.counts(epoch=1).durable == 9
        led.reconcile(None, free=False)
        for epoch in (0, 1):
            led.begin_epoch(epoch, seed=3)
            again = led.lease("b", 100, ttl=30, epoch=epoch)
            assert sorted(x.sample_id for x in again) == sorted(old + late), epoch
            assert led.counts(epoch=epoch).leased == 9
        commit_ids(led, ["new-0"])  # the fresh run's current epoch is its own (it began 0 and 1)
        assert led.counts(epoch=1).pending == 1

    def test_fresh_unshuffled_run_after_a_shuffled_one_takes_commit_order(self) -> None:
        led = self.make_ledger()
        ids = _ids(12)
        commit_ids(led, ids)
        led.begin_epoch(0, seed=4, shuffle=True)
        first = led.lease("a", 5, ttl=30, epoch=0)
        led.ack([x.lease_id for x in first], 1)
        led.reconcile(None, free=False)
        led.begin_epoch(0, shuffle=False)  # DistributedSampler(shuffle=False) order: what was committed, in order
        assert [x.sample_id for x in led.lease("b", 100, ttl=30, epoch=0)] == ids

    def test_fail_mixed_held_and_lost(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["a", "b"])
        la, lb = led.lease("c", 2, ttl=30)
        assert led.ack([la.lease_id], 1) == []
        # a repeated id is handled once; lost ids come back once, in input order
        assert led.fail([la.lease_id, lb.lease_id, lb.lease_id], retryable=False, reason="bad") == [la.lease_id]
        assert [r.sample_id for r, _ in led.quarantined() if r] == [lb.sample_id]
        assert led.lease("c", 5, ttl=30) == []

    def test_inv9_ended_plan_stays_ended(self) -> None:
        led = self.make_ledger()
        commit_ids(led, _ids(5))
        plan = Plan(led.attempt(), 0, 2, 2)
        c0 = [led.claim_step(plan, 0, r, ttl=30, wait_for_stream=False) for r in range(2)]
        assert led.claim_step(plan, 1, 0, ttl=30, wait_for_stream=False).status == "end"
        led.fail([x.lease_id for c in c0 for x in c.leases])  # 4 more pending: enough for a step
        assert led.claim_step(plan, 0, 0, ttl=30, wait_for_stream=False).status == "claimed"
        assert led.claim_step(plan, 1, 1, ttl=30, wait_for_stream=False).status == "end"
        assert led.claim_step(plan, 2, 0, ttl=30, wait_for_stream=False).status == "end"

    # ------------------------------------------------------------ invariant 8
    def test_inv8_writer_waits_on_pending_budget(self) -> None:
        import secrets

        import torch

        from ..errors import StoreFull
        from ..producer import FeatureWriter

        led = self.make_ledger()
        w = FeatureWriter(f"memory://ledger-conformance-{secrets.token_hex(4)}", led, max_pending=3, put_timeout=0.3)
        for i in range(3):
            w.put(f"p{i}", {"x": torch.ones(2)})
        with pytest.raises(StoreFull, match="undelivered"):
            w.put("p3", {"x": torch.ones(2)})
        assert led.counts().committed == 3  # the refused sample was neither committed nor lost silently
        [lease] = led.lease("trainer", 1, ttl=30)
        led.ack([lease.lease_id], 1)  # trained: one slot free
        w.put("p3", {"x": torch.ones(2)})
        assert led.counts().pending == 3

    # ------------------------------------------------------------ producer liveness and resume
    def test_producer_heartbeats(self) -> None:
        import os
        import socket

        led = self.make_ledger()
        t0 = time.time()
        led.register_producer("p1")
        led.register_producer("p2", {"host": "elsewhere", "pid": 4242, "role": "gen"})
        other = self.attach_ledger(led)
        by = {p["name"]: p for p in other.producers()}
        assert set(by) == {"p1", "p2"}
        p1 = by["p1"]
        assert (p1["done"], p1["host"], p1["pid"]) == (False, socket.gethostname(), os.getpid())
        assert abs(p1["last_seen"] - t0) < 5 and 0 <= p1["age_s"] < 5
        assert (by["p2"]["host"], by["p2"]["pid"], by["p2"]["info"]) == ("elsewhere", 4242, {"role": "gen"})
        first = p1["last_seen"]
        time.sleep(0.05)
        other.producer_heartbeat("p1")
        by = {p["name"]: p for p in led.producers()}
        assert by["p1"]["last_seen"] > first and by["p1"]["pid"] == os.getpid()  # a beat keeps the identity
        assert by["p2"]["last_seen"] < by["p1"]["last_seen"]
        led.producer_done("p1")
        by = {p["name"]: p for p in led.producers()}
        assert (by["p1"]["done"], by["p2"]["done"]) == (True, False) and not led.is_closed()
        led.reopen()
        assert led.producers() == []

    def test_committed_refs_skip_aborted_and_uncommitted(self) -> None:
        led = self.make_ledger()
        refs = commit_ids(led, ["a", "b", "c", "q"])
        led.reserve(["r"])  # reserved, never committed (a producer died mid-put)
        led.abort(["b"])
        [lease] = [x for x in led.lease("t", 4, ttl=30) if x.sample_id == "q"] or [None]
        assert lease is not None
        led.fail([lease.lease_id], retryable=False)  # QUARANTINED still counts as done
        [la] = [x for x in led.leases() if x.sample_id == "a"]
        led.ack([la.lease_id], step=1)
        led.mark_durable(1)  # "a" FREED: done too
        got = self.attach_ledger(led).committed_refs(["a", "b", "c", "q", "r", "zz", "a"])
        assert sorted(got) == ["a", "c", "q"]
        assert got["c"] == refs[2] and got["a"].generation == 1

    # ------------------------------------------------------------ run metadata and requeue (issue 15)
    def test_meta_claim_first_wins(self) -> None:
        led = self.make_ledger()
        other = self.attach_ledger(led)
        assert led.get_meta("store_id") is None
        assert led.claim_meta("store_id", "file:aaa") == "file:aaa"
        assert other.claim_meta("store_id", "file:bbb") == "file:aaa"  # recorded once, never overwritten
        assert other.get_meta("store_id") == "file:aaa" and led.get_meta("other") is None
        assert led.get_meta("epoch") is None  # run metadata is kept apart from the ledger's own keys
        commit_ids(led, ["s"])  # the ledger's own bookkeeping does not disturb it
        assert other.get_meta("store_id") == "file:aaa"
        with pytest.raises(ConfigError):
            led.claim_meta("", "x")

    def test_requeue_quarantined_online(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["a", "b", "c"])
        leases = led.lease("t", 3, ttl=30)
        assert led.fail([x.lease_id for x in leases], retryable=False, reason="unavailable") == []
        assert led.counts().quarantined == 3 and led.lease("t", 3, ttl=30) == []
        other = self.attach_ledger(led)
        assert other.requeue_quarantined(["b", "zz"]) == 1  # an id that is not quarantined is skipped
        assert [x.sample_id for x in led.lease("t", 3, ttl=30)] == ["b"]
        assert led.requeue_quarantined(["b"]) == 0
        assert led.requeue_quarantined() == 2
        c = led.counts()
        assert (c.quarantined, c.pending, c.leased) == (0, 2, 1)
        assert led.quarantined() == []
        again = led.lease("t", 5, ttl=30)
        assert sorted(x.sample_id for x in again) == ["a", "c"]
        assert {x.ref.generation for x in again} == {1}
        assert led.ack([x.lease_id for x in again], 3) == []
        assert led.requeue_quarantined() == 0

    def test_requeue_quarantined_offline_epochs(self) -> None:
        led = self.make_ledger()
        commit_ids(led, _ids(4))
        led.begin_epoch(0, seed=1)
        e0 = {x.sample_id: x for x in led.lease("t", 4, ttl=30, epoch=0)}
        led.ack([e0["s00000"].lease_id], 1)  # trained in epoch 0 before it was quarantined
        led.begin_epoch(1, seed=1)
        [bad] = [x for x in led.lease("t", 4, ttl=30, epoch=1) if x.sample_id == "s00000"]
        led.fail([bad.lease_id], retryable=False, reason="unavailable")
        led.fail([e0["s00001"].lease_id], retryable=False, reason="corrupt")
        assert led.counts().quarantined == 2
        assert led.requeue_quarantined() == 2
        assert led.counts().quarantined == 0
        # epoch 0: s00000 keeps its TRAINED delivery; s00001 is pending again
        assert [x.sample_id for x in led.lease("u", 10, ttl=30, epoch=0)] == ["s00001"]
        assert led.trained_steps(epoch=0) == {"s00000": 1}
        # epoch 1: both are pending again (the other two are still leased to "t")
        assert sorted(x.sample_id for x in led.lease("u", 10, ttl=30, epoch=1)) == ["s00000", "s00001"]

    # ------------------------------------------------------------ issue 15 point 7: step checks, repeat acks, epoch meta
    def test_ack_validates_step_and_repeat_ack_of_a_durable_lease_is_a_noop(self) -> None:
        led = self.make_ledger()
        commit_ids(led, ["a", "b"])
        leases = [x.lease_id for x in led.lease("t", 2, ttl=30)]
        for bad in (-5, "7", 2.9, True, None):
            with pytest.raises(ConfigError, match="step must be an int >= 0"):
                led.ack(leases, step=bad)  # type: ignore[arg-type]
        assert led.counts().trained == 0 and led.counts().leased == 2
        assert led.ack(leases, step=1) == []
        led.mark_durable(1, free=False)
        assert led.ack(leases + leases[:1], step=2) == []  # a padded repeat after a checkpoint: not lost
        assert led.trained_steps() == {"a": 1, "b": 1} and led.counts().durable == 2

    def test_set_meta_overwrites(self) -> None:
        led = self.make_ledger()
        other = self.attach_ledger(led)
        led.set_meta("dataset-epoch/x", "0")
        led.set_meta("dataset-epoch/x", "2")
        assert other.get_meta("dataset-epoch/x") == "2"
        with pytest.raises(ConfigError):
            led.set_meta("", "1")

    # ------------------------------------------------------------ first commit wins (commit(if_absent=True))
    @staticmethod
    def _sized(sample_id: str, generation: int, nbytes: int = 100) -> SampleRef:
        return SampleRef(sample_id, generation, "memory://conformance", (), nbytes, f"{generation:016x}")

    def _snapshot(self, led: Ledger) -> tuple[Any, ...]:
        return (led.counts().as_dict(), led.resident_bytes(), led.trained_steps(),
                sorted(led.pending_deletes(), key=lambda r: r.key), led.get_ref("x"))

    @pytest.mark.parametrize("state", ["pending", "leased", "trained", "freed", "quarantined"])
    def test_inv4_if_absent_commit_after_a_commit_is_refused(self, state: str) -> None:
        """Two resumed writers saw ``x`` missing: the second commit changes nothing, in any state."""
        led = self.make_ledger()
        other = self.attach_ledger(led)
        [ga] = led.reserve(["x"])
        a = self._sized("x", ga)
        assert led.commit([a], if_absent=True).refused == []
        commit_ids(led, ["y"])  # a bystander
        if state != "pending":
            [lease] = [x for x in led.lease("t", 2, ttl=30) if x.sample_id == "x"] or [None]
            assert lease is not None
            if state == "trained":
                led.ack([lease.lease_id], step=1)
            elif state == "freed":
                led.ack([lease.lease_id], step=1)
                led.mark_durable(1, retain=False)
                led.confirm_deleted(led.pending_deletes())
            elif state == "quarantined":
                led.fail([lease.lease_id], retryable=False, reason="bad")
        before = self._snapshot(led)
        [gb] = other.reserve(["x"])
        assert gb == ga + 1
        b = self._sized("x", gb, nbytes=7)
        out = other.commit([b], if_absent=True)
        assert out == [] and out.refused == [b] and out.existing == {"x": a}
        assert self._snapshot(led) == before  # counts, resident bytes, trained steps, delete queue, ref
        assert other.commit([b], if_absent=True).refused == [b]  # a retry is refused the same way

    def test_inv4_if_absent_first_commit_wins_over_a_higher_reservation(self) -> None:
        led = self.make_ledger()
        other = self.attach_ledger(led)
        [ga] = led.reserve(["x"])
        [gb] = other.reserve(["x"])  # B reserved later (higher) but has not committed yet
        a, b = self._sized("x", ga), self._sized("x", gb)
        out = led.commit([a], if_absent=True)  # stale only because of B's uncommitted reservation: A wins
        assert out == [] and out.refused == []
        assert led.get_ref("x") == a and led.counts().pending == 1
        before = self._snapshot(led)
        out = other.commit([b], if_absent=True)
        assert out.refused == [b] and out.existing == {"x": a}
        assert self._snapshot(led) == before
        [lease] = led.lease("t", 5, ttl=30)
        assert lease.generation == ga and led.lease("t", 5, ttl=30) == []

    def test_inv4_if_absent_batch_commits_the_absent_and_refuses_the_rest(self) -> None:
        led = self.make_ledger()
        other = self.attach_ledger(led)
        [r0] = commit_ids(led, ["x"])
        gens = other.reserve(["w", "x", "z"])
        refs = [self._sized(s, g) for s, g in zip(["w", "x", "z"], gens, strict=True)]
        out = other.commit(refs, if_absent=True)
        assert out == [] and out.refused == [refs[1]] and out.existing == {"x": r0}
        assert {x.sample_id: x.generation for x in led.lease("t", 9, ttl=30)} == {"x": 1, "w": 1, "z": 1}
        assert other.commit(refs, if_absent=True).refused == [refs[1]]  # idempotent for w and z

    def test_inv4_if_absent_recommit_of_the_committed_generation_is_not_refused(self) -> None:
        """A retry of one's own commit (a reply lost) must not look refused: the caller would delete live bytes."""
        led = self.make_ledger()
        [g] = led.reserve(["x"])
        a = self._sized("x", g)
        led.commit([a], if_absent=True)
        assert led.commit([a], if_absent=True).refused == []
        assert led.commit([a]).refused == [] and led.counts().pending == 1

    def test_inv4_plain_commit_still_supersedes_an_if_absent_commit(self) -> None:
        led = self.make_ledger()
        other = self.attach_ledger(led)
        [ga] = led.reserve(["x"])
        [gb] = other.reserve(["x"])
        a, b = self._sized("x", ga), self._sized("x", gb)
        led.commit([a], if_absent=True)
        [lease] = led.lease("t", 1, ttl=30)
        out = other.commit([b])  # an explicit rewrite
        assert out == [a] and out.refused == []
        assert led.ack([lease.lease_id], step=1) == [lease.lease_id]  # the old lease is lost
        with pytest.raises(ConfigError):
            led.commit([self._sized("x", ga)])  # stale without if_absent, as always
        [new] = led.lease("t", 1, ttl=30)
        assert new.generation == gb

    def test_inv4_if_absent_after_abort_commits_and_aborted_generation_stays_aborted(self) -> None:
        led = self.make_ledger()
        [g] = led.reserve(["x"])
        led.abort(["x"])
        with pytest.raises(SampleAborted):
            led.commit([self._sized("x", g)], if_absent=True)
        commit_ids(led, ["y"])
        led.abort(["y"])
        [g2] = led.reserve(["y"])  # a re-put after an abort is absent, not refused
        assert led.commit([self._sized("y", g2)], if_absent=True).refused == []
        assert [x.sample_id for x in led.lease("t", 5, ttl=30)] == ["y"]

    # ------------------------------------------------------------ acks after a resume (reconcile)
    def test_inv2_an_ack_at_or_before_the_resumed_step_is_refused(self) -> None:
        """A resumed loop that restarted its step counter would ack samples into a checkpoint
        that never trained them (made DURABLE by the next reconcile): refused, nothing changes."""
        led = self.make_ledger()
        commit_ids(led, ["a", "b", "c", "d"])
        [x] = led.lease("t", 1, ttl=30)
        assert led.ack([x.lease_id], step=5) == []
        led.mark_durable(5)
        led.reconcile(5)
        leases = led.lease("t", 2, ttl=30)
        before = led.counts().as_dict()
        for step in (1, 5):
            with pytest.raises(ConfigError, match="resumed from the checkpoint of step 5"):
                led.ack([leases[0].lease_id], step=step)
        assert led.counts().as_dict() == before
        assert led.ack([y.lease_id for y in leases], step=6) == []
        led.reconcile(None)  # a fresh start without a checkpoint: any step again
        [z] = led.lease("t", 1, ttl=30)
        assert led.ack([z.lease_id], step=1) == []

