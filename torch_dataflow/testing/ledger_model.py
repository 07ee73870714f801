"""A Hypothesis state machine that checks a ledger against a simple model.

``make_state_machine(factory)`` returns a ``TestCase`` class; ``factory()``
must return a fresh, empty ledger. Rules: reserve+commit (including re-puts
and re-puts after abort), lease (some with already-expired deadlines),
ack, fail, abort, mark_durable, reconcile. After every rule the ledger's
counts must equal the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ..errors import SampleAborted
from ..ledger.base import Ledger
from .ledger_conformance import fake_ref

__all__ = ["make_state_machine"]

IDS = [f"m{i}" for i in range(6)]


@dataclass
class _Sample:
    gen: int = 0
    committed: int = 0
    tomb: int = 0
    status: str = "none"  # none | live | aborted | freed
    state: str = ""  # "" | P | L | T | D
    lease: str | None = None
    expired: bool = False
    step: int | None = None
    seq: int = 0


@dataclass
class _Model:
    samples: dict[str, _Sample] = field(default_factory=lambda: {s: _Sample() for s in IDS})
    seq: int = 0

    def reclaim(self) -> None:
        for m in self.samples.values():
            if m.state == "L" and m.expired:
                m.state, m.lease, m.expired = "P", None, False


def make_state_machine(factory: Callable[[], Ledger]) -> type:
    class LedgerMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.led = factory()
            self.model = _Model()
            self.issued: list[str] = []
            self.step = 0
            self.floor = 0  # the step the last reconcile resumed from: acks at or before it are refused

        @rule(sid=st.sampled_from(IDS))
        def put(self, sid: str) -> None:
            m = self.model.samples[sid]
            [gen] = self.led.reserve([sid])
            m.gen += 1
            assert gen == m.gen
            superseded = self.led.commit([fake_ref(sid, gen)])
            expect_old = m.committed > 0 and m.status in ("live",)
            assert [r.sample_id for r in superseded] == ([sid] if expect_old else [])
            self.model.seq += 1
            m.committed, m.status, m.state, m.lease, m.expired, m.step = gen, "live", "P", None, False, None
            m.seq = self.model.seq

        @rule(sid=st.sampled_from(IDS))
        def put_after_abort_races(self, sid: str) -> None:
            m = self.model.samples[sid]
            [gen] = self.led.reserve([sid])
            m.gen += 1
            self.led.abort([sid])
            m.tomb, m.status = m.gen, "aborted"
            if m.state in ("P", "L"):
                m.state, m.lease = "", None
            try:
                self.led.commit([fake_ref(sid, gen)])
                raise AssertionError("commit of an aborted generation succeeded")
            except SampleAborted:
                pass

        @rule(n=st.integers(1, 4), expire=st.booleans())
        def lease(self, n: int, expire: bool) -> None:
            self.model.reclaim()
            got = self.led.lease("c", n, ttl=-1.0 if expire else 3600.0)
            pending = sorted((m.seq, s) for s, m in self.model.samples.items() if m.state == "P")
            assert [x.sample_id for x in got] == [s for _, s in pending[:n]]
            for x in got:
                m = self.model.samples[x.sample_id]
                assert x.generation == m.committed
                m.state, m.lease, m.expired = "L", x.lease_id, expire
                self.issued.append(x.lease_id)

        @precondition(lambda self: self.issued)
        @rule(data=st.data(), bump=st.booleans())
        def ack(self, data: st.DataObject, bump: bool) -> None:
            lid = data.draw(st.sampled_from(self.issued))
            self.step += int(bump)
            sid = lid.split(":", 3)[3]
            m = self.model.samples[sid]
            held = m.lease == lid and m.state in ("L", "T", "D")  # a repeat ack of the same lease: a no-op
            if self.floor > 0 and self.step <= self.floor:
                from ..errors import ConfigError

                try:
                    self.led.ack([lid], self.step)
                except ConfigError:
                    return  # refused: nothing changed (the invariant below checks the counts)
                raise AssertionError(f"an ack at step {self.step} after a resume from {self.floor} was taken")
            assert self.led.ack([lid], self.step) == ([] if held else [lid])
            if held and m.state == "L":
                m.state, m.step, m.expired = "T", self.step, False

        @precondition(lambda self: self.issued)
        @rule(data=st.data())
        def fail(self, data: st.DataObject) -> None:
            lid = data.draw(st.sampled_from(self.issued))
            m = self.model.samples[lid.split(":", 3)[3]]
            held = m.lease == lid and m.state == "L"
            assert self.led.fail([lid]) == ([] if held else [lid])
            if held:
                m.state, m.lease, m.expired = "P", None, False

        @rule(sid=st.sampled_from(IDS))
        def abort(self, sid: str) -> None:
            m = self.model.samples[sid]
            freed = self.led.abort([sid])
            assert [r.sample_id for r in freed] == ([sid] if m.committed and m.status == "live" else [])
            m.tomb, m.status = m.gen, "aborted"
            if m.state in ("P", "L"):
                m.state, m.lease = "", None

        def _durable(self, step: int) -> set[str]:
            """The retention rule (ledger/retention.py): T <= step -> D; free the D
            deliveries trained in (horizon, previous mark]."""
            for m in self.model.samples.values():
                if m.state == "T" and m.step is not None and m.step <= step:
                    m.state = "D"
            marks = getattr(self, "marks", [])
            prev = max((k for k in marks if k < step), default=None)
            self.marks = sorted({*marks, step})
            hz = getattr(self, "horizon", None)
            expect: set[str] = set()
            if prev is not None and (hz is None or prev > hz):
                for s, m in self.model.samples.items():
                    if m.state == "D" and m.status == "live" and m.step is not None and m.step <= prev and \
                            (hz is None or m.step > hz):
                        m.status = "freed"
                        expect.add(s)
                self.horizon = prev
            return expect

        @rule(back=st.integers(0, 3))
        def mark_durable(self, back: int) -> None:
            step = max(self.step - back, 0)
            freed = {r.sample_id for r in self.led.mark_durable(step)}
            assert freed == self._durable(step)

        @rule(back=st.one_of(st.none(), st.integers(0, 3)))
        def reconcile(self, back: int | None) -> None:
            from ..errors import CheckpointTooOld

            resume = None if back is None else max(self.step - back, 0)
            after = -1 if resume is None else resume
            lost = [m for m in self.model.samples.values()
                    if m.state == "D" and m.status == "freed" and (m.step or 0) > after]
            if lost:
                try:
                    self.led.reconcile(resume)
                except CheckpointTooOld:
                    return  # refused: nothing changed (the invariant below checks the counts)
                raise AssertionError("a resume older than what was freed was not refused")
            rep = self.led.reconcile(resume)
            self.floor = resume or 0
            for m in self.model.samples.values():
                if m.state == "L":
                    m.state, m.lease, m.expired = "P", None, False
                elif (m.state == "T" or (m.state == "D" and m.status == "live")) and (m.step or 0) > after:
                    m.state, m.step = "P", None  # not in the checkpoint resumed: replayed while bytes last
            self.marks = [k for k in getattr(self, "marks", []) if k < after]
            self.horizon = None
            expect = set() if resume is None else self._durable(resume)
            assert {r.sample_id for r in rep.freed} == expect
            assert rep.attempt >= 1

        @invariant()
        def counts_match(self) -> None:
            if not hasattr(self, "led"):
                return
            c = self.led.counts()
            states = [m.state for m in self.model.samples.values()]
            status = [m.status for m in self.model.samples.values()]
            assert (c.pending, c.leased, c.trained, c.durable) == tuple(states.count(x) for x in "PLTD"), (c, states)
            assert (c.aborted, c.freed) == (status.count("aborted"), status.count("freed")), (c, status)

        def teardown(self) -> None:
            if hasattr(self, "led"):
                self.led.close()

    LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    return LedgerMachine
