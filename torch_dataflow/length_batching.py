"""Length-aware batching: global steps of similar-length samples, tokens balanced across ranks.

A batch is padded to its longest member, so random batching of EAGLE3 samples
(tens to thousands of tokens) computes on padding. ``group_by_length=True``
(the name of the Hugging Face ``Trainer`` option) on
:class:`~torch_dataflow.FeatureStoreDataset` (offline) and
:class:`~torch_dataflow.sampler.ReshardingSampler` orders an epoch's pending
samples so that

* every global step (``world × batch`` samples) holds samples of similar
  length: the epoch, in a seeded shuffled order, is cut into *windows* of
  ``window`` global steps; each window is sorted by length and cut into steps;
  the steps of all windows are shuffled (seeded) and the step holding the
  longest sample goes first, so an out-of-memory shows at once;
* each step's samples are dealt to the ranks by greedy LPT (longest first, to
  the rank with the fewest tokens that still has room), ``batch`` each, then
  swapped between the heaviest and lightest rank while needed, so every rank's
  token count is within the step's longest sample of every other's (a
  guarantee: see :func:`balance_step`);
* a step that is not full (the epoch's last, ``N % (world × batch)`` samples)
  comes last, where the faces' tail rules apply.

The order is a pure function of the pending samples' lengths, the seed, the
epoch, ``world`` and ``batch``: every rank computes the same one, and the first
to write it wins (:meth:`~torch_dataflow.ledger.base.Ledger.order_pending`,
once per plan). Lengths come from the committed refs (a tensor's shape, or an
int in the ref's metadata): no byte is read. Nothing about delivery changes:
the ledger still hands out each pending sample once per epoch through the same
plans, so exactly-once, equal batch counts, resharding and replay after a
restart hold as without it; a restart or a new world size orders what is still
pending for the new plan.

Example:
    >>> lengths = {"a": 10, "b": 900, "c": 12, "d": 880, "e": 15, "f": 870, "g": 11, "h": 905}
    >>> order = plan_order(lengths, world=2, batch=2, seed=0)
    >>> steps = [order[i : i + 4] for i in range(0, 8, 4)]  # blocked: rank r gets step[2r : 2r + 2]
    >>> [sorted(lengths[s] for s in step) for step in steps]
    [[870, 880, 900, 905], [10, 11, 12, 15]]
    >>> [[lengths[s] for s in steps[0][r * 2 : r * 2 + 2]] for r in range(2)]
    [[905, 870], [900, 880]]
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import xxhash

from .errors import ConfigError
from .ledger.ordering import length_of, sample_length

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["DEFAULT_WINDOW", "balance_step", "ensure_order", "length_of", "pending_lengths", "plan_order",
           "sample_length", "step_stats"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 50  # global steps sorted together (the "mega-batch" factor of HF's LengthGroupedSampler)
_TRIES = 5


def pending_lengths(ledger: Ledger, epoch: int, key: str = "input_ids") -> dict[str, int]:
    """``sample_id -> length`` of ``epoch``'s pending deliveries, from their committed refs
    (no byte is read; ``key`` as in :func:`sample_length`).

    Example:
        >>> import torch
        >>> from torch_dataflow import FeatureWriter, open_ledger
        >>> with FeatureWriter("memory://pl-doc", "memory://pl-doc") as w:
        ...     _ = w.put("a", {"input_ids": torch.zeros(7)})
        >>> led = open_ledger("memory://pl-doc")
        >>> led.begin_epoch(0)
        >>> pending_lengths(led, 0)
        {'a': 7}
    """
    fast = getattr(ledger, "pending_lengths", None)
    if fast is not None:
        return dict(fast(epoch, key))
    return {r.sample_id: sample_length(r, key) for r in ledger.pending_refs(epoch)}


def _h(seed: int, epoch: int, sample_id: str) -> int:
    return xxhash.xxh3_64_intdigest(f"len:{seed}:{epoch}:{sample_id}".encode())


def balance_step(items: Sequence[tuple[str, int]], world: int, batch: int) -> list[list[str]]:
    """Deal ``world × batch`` ``(sample_id, length)`` items to ``world`` ranks,
    ``batch`` each: greedy LPT (longest first, ties by id, each to the rank with
    the fewest tokens that has room, ties to the lowest rank), then swaps between
    the heaviest and the lightest rank while they differ by more than the longest
    item. The result: **every rank's total is within the step's longest item of
    every other rank's.** (The swaps make it a guarantee: while the gap exceeds
    the longest item, the heavier rank holds some item longer than one of the
    lighter's, by less than the gap; swapping them strictly lowers the sum of
    squared loads, so the loop ends, and only when the bound holds. Greedy LPT
    met the bound alone in every step checked: exhaustive small steps and 200,000
    random ones.) Each rank's ids come longest first. Cost ``O(g log g)``
    for ``g = world × batch``.

    Example:
        >>> balance_step([("a", 9), ("b", 5), ("c", 4), ("d", 1)], world=2, batch=2)
        [['a', 'd'], ['b', 'c']]
    """
    if len(items) != world * batch:
        raise ConfigError(f"a step of {world} x {batch} needs {world * batch} items, got {len(items)}")
    ranks: list[list[tuple[str, int]]] = [[] for _ in range(world)]
    heap = [(0, r) for r in range(world)]  # (load, rank) of the ranks with room: min = fewest tokens, lowest rank
    for sid, n in sorted(items, key=lambda it: (-it[1], it[0])):
        load, r = heapq.heappop(heap)
        ranks[r].append((sid, n))
        if len(ranks[r]) < batch:
            heapq.heappush(heap, (load + n, r))
    _within_longest(ranks, max((n for _, n in items), default=0))
    return [[sid for sid, _ in sorted(rank, key=lambda it: (-it[1], it[0]))] for rank in ranks]


def _within_longest(ranks: list[list[tuple[str, int]]], longest: int) -> None:
    """Swap items between the heaviest and the lightest rank until no two ranks'
    totals differ by more than ``longest`` (in place; deterministic)."""
    while True:
        loads = [sum(n for _, n in rank) for rank in ranks]
        hi = max(range(len(ranks)), key=lambda r: (loads[r], -r))
        lo = min(range(len(ranks)), key=lambda r: (loads[r], r))
        gap = loads[hi] - loads[lo]
        if gap <= longest:
            return
        # Exists: equal counts and a larger total mean some item of hi beats some item of lo.
        _, i, j = min((abs(2 * (u - v) - gap), i, j) for i, (_, u) in enumerate(ranks[hi])
                      for j, (_, v) in enumerate(ranks[lo]) if 0 < u - v < gap)
        ranks[hi][i], ranks[lo][j] = ranks[lo][j], ranks[hi][i]


def plan_order(lengths: Mapping[str, int], *, world: int, batch: int, seed: int = 0, epoch: int = 0,
               shuffle: bool = True, window: int | None = DEFAULT_WINDOW, interleave: bool = False) -> list[str]:
    """The length-aware order of the samples ``lengths`` (``sample_id -> length``).

    Consecutive runs of ``world × batch`` ids are global steps. ``interleave=False``
    lays a step out as the dataset's plans read it (rank ``r`` takes positions
    ``r*batch .. r*batch + batch - 1``); ``interleave=True`` as the sampler's (rank
    ``r`` takes ``r, r + world, ...``). ``window``: global steps sorted together
    (``None``: the whole epoch). ``shuffle=False``: no randomness, longest steps
    first. Depends on nothing but the arguments (not the mapping's order).

    Example:
        >>> plan_order({"x": 3, "y": 1, "z": 2}, world=1, batch=1, shuffle=False)
        ['x', 'z', 'y']
    """
    if world < 1 or batch < 1:
        raise ConfigError(f"plan_order needs world >= 1 and batch >= 1, got {world} and {batch}")
    if window is not None and window < 1:
        raise ConfigError(f"window must be >= 1 global steps or None, got {window}")
    g = world * batch
    ids = sorted(lengths, key=lambda s: (_h(seed, epoch, s), s)) if shuffle else sorted(lengths)
    size = len(ids) if window is None else window * g
    steps: list[list[tuple[str, int]]] = []
    for lo in range(0, len(ids), max(size, 1)):
        win = sorted(((s, lengths[s]) for s in ids[lo : lo + size]), key=lambda it: (-it[1], it[0]))
        steps += [win[i : i + g] for i in range(0, len(win), g)]
    part = steps.pop() if steps and len(steps[-1]) < g else []
    if shuffle:
        random.Random(f"td-length:{seed}:{epoch}:{world}:{batch}").shuffle(steps)
        if steps:  # the longest sample first: an out-of-memory shows in the first step
            first = max(range(len(steps)), key=lambda k: (steps[k][0][1], -k))
            steps.insert(0, steps.pop(first))
    else:
        steps.sort(key=lambda st: -st[0][1])
    order: list[str] = []
    for step in steps:
        ranks = balance_step(step, world, batch)
        if interleave:
            order += [ranks[r][t] for t in range(batch) for r in range(world)]
        else:
            order += [s for rank in ranks for s in rank]
    return order + [s for s, _ in part]


def step_stats(order: Sequence[str], lengths: Mapping[str, int], *, world: int, batch: int,
               interleave: bool = False) -> dict[str, Any]:
    """Padding and balance of an order's full global steps: ``padding`` (padded
    tokens / all tokens, each rank's batch padded to its longest), ``max_min``
    (the largest max/min ratio of per-rank real tokens in a step), ``max_gap``
    (the largest max − min of per-rank tokens in a step, in tokens) and ``steps``.

    Example:
        >>> step_stats(["a", "b"], {"a": 3, "b": 1}, world=1, batch=2)["padding"]
        0.333...
    """
    g = world * batch
    real = padded = 0
    ratio, gap, steps = 1.0, 0, 0
    for lo in range(0, len(order) - g + 1, g):
        step = order[lo : lo + g]
        per = [step[r::world] if interleave else step[r * batch : (r + 1) * batch] for r in range(world)]
        toks = [sum(lengths[s] for s in p) for p in per]
        real += sum(toks)
        padded += sum(len(p) * max(lengths[s] for s in p) for p in per)
        ratio = max(ratio, max(toks) / max(min(toks), 1))
        gap = max(gap, max(toks) - min(toks))
        steps += 1
    return {"padding": 1 - real / padded if padded else 0.0, "max_min": ratio, "max_gap": gap, "steps": steps}


def ensure_order(ledger: Ledger, plan_key: str, epoch: int, *, world: int, batch: int, seed: int,
                 shuffle: bool, length_key: str = "input_ids", window: int | None = DEFAULT_WINDOW,
                 interleave: bool = False) -> str:
    """Give ``epoch``'s pending deliveries the length-aware order for the plan
    ``plan_key``, unless a rank did already (call before the plan's first claim,
    on every rank and worker). Returns the ledger's answer (``"ordered"``,
    ``"done"``; ``"stale"`` if the pending set kept moving: the plan then runs in
    the order it has, still exactly once)."""
    once = f"length-order/{plan_key}"
    if ledger.get_meta(once) is not None:
        return "done"
    got = "stale"
    for _ in range(_TRIES):
        lengths = pending_lengths(ledger, epoch, length_key)
        order = plan_order(lengths, world=world, batch=batch, seed=seed, epoch=epoch, shuffle=shuffle,
                           window=window, interleave=interleave)
        got = ledger.order_pending(epoch, order, once)
        if got != "stale":
            break
    else:
        log.warning("plan %s: the pending set kept changing; the plan keeps the ledger's order", plan_key)
    # Recorded either way: no rank reorders a plan another rank may have started claiming.
    ledger.claim_meta(once, "1" if got == "ordered" else got)
    return got


def check_ledger(ledger: Ledger) -> None:
    """Refuse, at construction, a ledger that cannot reorder its pending deliveries."""
    from .ledger import Ledger as _Base

    if type(ledger).order_pending is _Base.order_pending or type(ledger).pending_refs is _Base.pending_refs:
        raise ConfigError(f"group_by_length=True needs a ledger with order_pending/pending_refs; "
                          f"{type(ledger).__name__} has none")


# A plan round no claim ever uses: the key of a one-rank dataset's order (it leases, it has no plan).
FREE_ROUND = 5_000_000


def check_length_batching(ds: Any) -> None:
    """Refuse ``group_by_length=True`` where it cannot work (an online stream, a ledger
    that cannot reorder), at construction."""
    if getattr(ds, "mode", "offline") != "offline":
        raise ConfigError("group_by_length=True needs mode='offline': an online stream's pending set "
                          "changes with every commit, so there is no epoch to sort")
    check_ledger(ds.ledger)


def order_plan(ds: Any, plan: Any, *, interleave: bool = False) -> str | None:
    """The hook of the faces: order ``plan``'s pending samples when ``ds.group_by_length``."""
    if not getattr(ds, "group_by_length", False):
        return None
    batch = getattr(ds, "length_batch", None) or plan.batch
    return ensure_order(ds.ledger, plan.key, plan.epoch, world=plan.world, batch=batch, seed=ds.seed,
                        shuffle=ds.shuffle, length_key=ds.length_key, interleave=interleave)


def check_sampler(pool: Any, group_by_length: bool, batch_size: int | None,
                  length_key: str) -> tuple[bool, int | None, str]:
    """Validate a :class:`~torch_dataflow.sampler.ReshardingSampler`'s length options."""
    if not group_by_length:
        return False, batch_size, str(length_key)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"group_by_length=True needs the DataLoader's batch_size (an int >= 1), got {batch_size!r}")
    check_ledger(pool.ledger)
    first = pool.ledger.get_ref(pool.sample_id(0)) if len(pool) else None
    if first is not None:  # a wrong length_key fails here, not at the first iter() of the run
        sample_length(first, str(length_key))
    return True, batch_size, str(length_key)


def order_sampler_plan(sampler: Any, plan: Any) -> str:
    """The sampler's hook: its plans are one index per rank per step, so a global
    step of the DataLoader is ``batch_size`` plan steps, interleaved across ranks."""
    return ensure_order(sampler.dataset.ledger, plan.key, plan.epoch, world=plan.world, batch=sampler.length_batch,
                        seed=sampler.seed, shuffle=sampler.shuffle, length_key=sampler.length_key, interleave=True)
