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
  the rank with the fewest tokens that still has room), ``batch`` each, so every
  rank's token count is within the step's longest sample of every other's;
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

import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import xxhash

from .errors import ConfigError
from .refs import SampleRef

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["DEFAULT_WINDOW", "balance_step", "ensure_order", "plan_order", "sample_length", "step_stats"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 50  # global steps sorted together (the "mega-batch" factor of HF's LengthGroupedSampler)
_TRIES = 5


def sample_length(ref: SampleRef, key: str = "input_ids") -> int:
    """A sample's length from its ref alone: ``ref.metadata[key]`` if it is an int,
    else the element count of the tensor named ``key`` (``[S]`` and ``[1, S]`` give ``S``).

    Raises:
        ConfigError: neither exists; the message lists the tensors and metadata keys.

    Example:
        >>> from torch_dataflow.refs import FeatureSpec
        >>> spec = FeatureSpec(name="input_ids", dtype="int64", shape=(1, 37), nbytes=296)
        >>> sample_length(SampleRef("s", 1, "memory://", (spec,), 296, "0"))
        37
    """
    value = ref.metadata.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    for spec in ref.specs:
        if spec.name == key:
            return math.prod(spec.shape)
    raise ConfigError(
        f"sample {ref.sample_id!r} has no length under {key!r} (length_key): tensors "
        f"{sorted(s.name for s in ref.specs)}, int metadata {sorted(k for k, v in ref.metadata.items() if isinstance(v, int))}"
    )


def _h(seed: int, epoch: int, sample_id: str) -> int:
    return xxhash.xxh3_64_intdigest(f"len:{seed}:{epoch}:{sample_id}".encode())


def balance_step(items: Sequence[tuple[str, int]], world: int, batch: int) -> list[list[str]]:
    """Deal ``world × batch`` ``(sample_id, length)`` items to ``world`` ranks,
    ``batch`` each, by greedy LPT: longest first (ties by id), each to the rank with
    the fewest tokens that has room (ties to the lowest rank). Every rank's total is
    then within the longest item of every other rank's (tested, not proven here).

    Example:
        >>> balance_step([("a", 9), ("b", 5), ("c", 4), ("d", 1)], world=2, batch=2)
        [['a', 'd'], ['b', 'c']]
    """
    if len(items) != world * batch:
        raise ConfigError(f"a step of {world} x {batch} needs {world * batch} items, got {len(items)}")
    loads, ranks = [0] * world, [[] for _ in range(world)]  # type: list[int], list[list[str]]
    for sid, n in sorted(items, key=lambda it: (-it[1], it[0])):
        r = min((r for r in range(world) if len(ranks[r]) < batch), key=lambda r: (loads[r], r))
        ranks[r].append(sid)
        loads[r] += n
    return ranks


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
        refs = ledger.pending_refs(epoch)
        lengths = {r.sample_id: sample_length(r, length_key) for r in refs}
        order = plan_order(lengths, world=world, batch=batch, seed=seed, epoch=epoch, shuffle=shuffle,
                           window=window, interleave=interleave)
        got = ledger.order_pending(epoch, order, once)
        if got != "stale":
            break
    else:
        log.warning("plan %s: the pending set kept changing; the plan keeps the ledger's order", plan_key)
    if got == "ordered":
        ledger.claim_meta(once, "1")
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
    return True, batch_size, str(length_key)


def order_sampler_plan(sampler: Any, plan: Any) -> str:
    """The sampler's hook: its plans are one index per rank per step, so a global
    step of the DataLoader is ``batch_size`` plan steps, interleaved across ranks."""
    return ensure_order(sampler.dataset.ledger, plan.key, plan.epoch, world=plan.world, batch=sampler.length_batch,
                        seed=sampler.seed, shuffle=sampler.shuffle, length_key=sampler.length_key, interleave=True)
