"""The end of a planned pass: the last, partial global step of a
:class:`~torch_dataflow.FeatureStoreDataset` with several ranks.

A plan (:meth:`~torch_dataflow.ledger.base.Ledger.claim_step`) hands out whole
global steps of ``world × batch`` samples, so every rank gets the same number
of batches. What is left when the plan ends — the *tail*, ``T < world × batch``
samples (a pool or stream whose size the global step does not divide, or a
restart with another world size) — used to stay PENDING for a next run that,
at the same width, would leave it pending again: a run that could never finish
its data. Now the tail is one more step, **padded** the way
``DistributedSampler(drop_last=False)`` pads:

* every rank agrees on ``T`` (the first rank to see the end records it in the
  ledger: :meth:`~torch_dataflow.ledger.base.Ledger.claim_meta`, first writer wins);
* with ``q, r = divmod(T, world)``, every rank gets ``q`` real samples (a plan of
  ``world`` ranks × ``q``) and ranks ``< r`` one more (a plan of ``r`` ranks × 1):
  all ``T`` are leased, each to one rank;
* each rank fills its batch to ``batch`` samples with repeats of its own real
  samples under an empty lease (``"__lease__" == ""``: trained twice in that
  step, acked once); a rank with no real sample (``T < world``) repeats the
  sample another rank recorded for it, read without a lease;
* one DataLoader worker per rank yields the step (the first to record itself).

So every rank yields the same number of batches, every sample of the pass is
trained and acked exactly once, and nothing stays PENDING. A loader with
``drop_last=True`` (``FeatureLoader(drop_last=True)``) keeps the old rule: the
tail is not handed out and stays PENDING (logged with its size).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import CorruptSample, SampleUnavailable
from .ledger import Plan
from .refs import Lease, SampleRef

if TYPE_CHECKING:
    from .dataset import FeatureStoreDataset

__all__ = ["tail_step"]

log = logging.getLogger(__name__)

# Plan rounds of their own: never a key of a main plan (rounds < 100_000) or a sampler's.
_TAIL_ROUND = 3_000_000
_REST_ROUND = 4_000_000
PAD_WAIT = 60.0  # seconds a rank with no real sample waits for another rank's pad source


def tail_step(ds: FeatureStoreDataset, plan: Plan, rank: int, worker: int, epoch: int,
              seen_tail: int) -> Iterator[dict[str, Any]]:
    """Yield this rank's padded batch of the tail of ``plan`` (``seen_tail``: the
    pending count this worker's ``"end"`` answer reported), or nothing when another
    worker of this rank yields it or there is no tail."""
    from .dataset import LEASE_KEY

    ledger, key = ds.ledger, plan.key
    total = int(ledger.claim_meta(f"plan-tail/{key}", str(int(seen_tail))))
    me = f"{ds.consumer_id}/w{worker}"
    if total <= 0 or ledger.claim_meta(f"plan-tail/{key}/r{rank}", me) != me:
        return
    q, r = divmod(total, plan.world)
    leases: list[Lease] = []
    if q:
        leases += _claim(ds, Plan(plan.attempt, epoch, plan.world, q, _TAIL_ROUND + plan.round), rank)
    if rank < r:
        leases += _claim(ds, Plan(plan.attempt, epoch, r, 1, _REST_ROUND + plan.round), rank)
    loaded = [(lease, s) for lease in leases if (s := ds._load(lease)) is not None]
    batch = [s for _, s in loaded]
    pad_key = f"plan-tail/{key}/pad"
    if loaded:
        ledger.claim_meta(pad_key, loaded[0][0].ref.to_json())  # a pad source for ranks with none
    else:
        source = _pad_source(ds, pad_key)
        if source is None:
            log.error("rank %d: the last step of plan %s has no sample for this rank and no pad source: "
                      "this rank's batch count will differ from the others'", rank, key)
            return
        batch = [{**source, LEASE_KEY: ""}]
    log.info("rank %d: last step of plan %s: %d of the %d tail samples, padded to %d",
             rank, key, len(loaded), total, ds.batch_size)
    pads = [{**batch[i % len(batch)], LEASE_KEY: ""} for i in range(ds.batch_size - len(batch))]
    yield from batch + pads


def _claim(ds: FeatureStoreDataset, plan: Plan, rank: int) -> list[Lease]:
    claim = ds.ledger.claim_step(plan, 0, rank, ds.lease_ttl, wait_for_stream=False, fence=ds._fence)
    if claim.status != "ready":
        # Fewer pending than the tail recorded (taken by another consumer, aborted):
        # the ranks that still get samples pad the others through the pad source.
        log.warning("tail plan %s for rank %d: %s", plan.key, rank, claim.status)
        return []
    return list(claim.leases)


def _pad_source(ds: FeatureStoreDataset, pad_key: str) -> dict[str, Any] | None:
    """Another rank's tail sample, read without a lease (it is leased, not yet trained:
    its bytes exist until that rank's ack, which needs this rank's batch first)."""
    from .dataset import SAMPLE_ID_KEY

    deadline = time.monotonic() + min(PAD_WAIT, ds.lease_ttl)
    while (ref_json := ds.ledger.get_meta(pad_key)) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(ds.poll)
    ref = SampleRef.from_json(ref_json)
    try:
        tensors = ds.store.get(ref, zero_copy=ds.zero_copy)
    except (CorruptSample, SampleUnavailable) as e:
        log.error("pad source %s unreadable: %s", ref.sample_id, e)
        return None
    return {**tensors, SAMPLE_ID_KEY: ref.sample_id}
