"""Issue 13 part 1: length-aware batching (``group_by_length=True``) on both faces.

What is checked, on SQLite and a real redis-server, at world sizes 1-4:

* the plan alone (:func:`plan_order`): a permutation of the pool, a pure
  function of lengths, seed, epoch, world and batch; every full global step
  balanced: **every rank's tokens within the step's longest sample of every
  other rank's**; padding below random batching on log-normal lengths
  (64-4096 tokens);
* ``FeatureStoreDataset(mode="offline", group_by_length=True)``: every sample
  delivered and acked exactly once per epoch, every rank ``batch`` samples in
  every step and the same number of steps, the delivered steps equal to the
  plan (so determinism and balance carry over), less padding than the same
  run without it; a reshard 2 -> 3 mid-epoch; a SIGKILL'd 2-rank run
  (tests/_length_procs.py) resumed by 3 ranks trains every sample once; ranks
  in separate processes racing to write the order follow one plan;
* ``ReshardingSampler(group_by_length=True, batch_size=B)`` over a
  ``FeaturePool``: the same, with the DataLoader's batches (rank ``r`` takes
  plan positions ``r, r + world, ...``), a reshard 2 -> 3 mid-epoch, the
  same SIGKILL + resume by 3 ranks, and a DataLoader with workers;
* the ledger primitive (``pending_refs`` / ``order_pending``): once per key,
  refused when stale, nothing changed then;
* the ConfigErrors: online mode, a missing length key (before any lease), a
  sampler without ``batch_size``.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from torch_dataflow import ConfigError, FeatureStoreDataset, FeatureWriter, open_ledger
from torch_dataflow.length_batching import _within_longest, balance_step, plan_order, sample_length, step_stats
from torch_dataflow.pool import FeaturePool
from torch_dataflow.sampler import ReshardingSampler

PROCS = Path(__file__).with_name("_length_procs.py")
LEDGERS = ("sqlite", "redis")


def lognormal_lengths(n: int, seed: int = 0) -> dict[str, int]:
    """``n`` sample lengths, log-normal (median ~490 tokens), clipped to 64-4096."""
    rng = random.Random(seed)
    return {f"s{i:04d}": min(4096, max(64, round(rng.lognormvariate(6.2, 1.0)))) for i in range(n)}


@pytest.fixture
def make(tmp_path: Path, redis_uri: str) -> Any:
    """``make(kind, lengths)`` -> (store, ledger) URIs of a fresh committed pool (``input_ids`` of each length).
    (The module's redis-server starts before any test that makes a pool: the leak check must not see it.)"""

    def _make(kind: str, lengths: dict[str, int], *, metadata: bool = False) -> tuple[str, str]:
        tag = uuid.uuid4().hex[:8]
        store = f"file://{tmp_path}/store-{tag}"
        ledger = f"sqlite://{tmp_path}/ledger-{tag}.db" if kind == "sqlite" else f"{redis_uri}?namespace=len{tag}"
        with FeatureWriter(store, ledger) as w:
            if metadata:  # the length in the metadata, no tensor of that name
                w.put_many([(s, {"x": torch.zeros(1)}, {"num_tokens": n}) for s, n in lengths.items()])
            else:
                w.put_many([(s, {"input_ids": torch.zeros(n, dtype=torch.int32)}) for s, n in lengths.items()])
        return store, ledger

    return _make


def assert_balanced(per_rank: list[list[int]]) -> None:
    """The stated bound: every rank's tokens within the step's longest sample of every other's."""
    toks, longest = [sum(r) for r in per_rank], max(max(r) for r in per_rank)
    assert max(toks) - min(toks) <= longest, (per_rank, toks)


def padding(batches: list[list[int]]) -> float:
    """Padded tokens / all tokens when each batch is padded to its longest member."""
    padded = sum(len(b) * max(b) for b in batches)
    return 1 - sum(map(sum, batches)) / padded


# ---------------------------------------------------------------- the plan alone
def blocked(order: list[str], world: int, batch: int) -> list[list[list[str]]]:
    g = world * batch
    return [[order[k + r * batch : k + (r + 1) * batch] for r in range(world)] for k in range(0, len(order) - g + 1, g)]


def interleaved(order: list[str], world: int, batch: int) -> list[list[list[str]]]:
    g = world * batch
    return [[order[k:k + g][r::world] for r in range(world)] for k in range(0, len(order) - g + 1, g)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("window", [1, 8, None])
def test_plan_is_a_balanced_permutation(world: int, batch: int, window: int | None) -> None:
    lengths = lognormal_lengths(203, seed=world * 10 + batch)
    for interleave, layout in ((False, blocked), (True, interleaved)):
        order = plan_order(lengths, world=world, batch=batch, seed=5, window=window, interleave=interleave)
        assert sorted(order) == sorted(lengths)  # each sample once
        steps = layout(order, world, batch)
        assert len(steps) == 203 // (world * batch)
        for step in steps:
            assert_balanced([[lengths[s] for s in rank] for rank in step])
        first = [lengths[s] for rank in steps[0] for s in rank] if steps else []
        assert not first or max(first) == max(lengths.values())  # the longest step first: OOM shows at once
        stats = step_stats(order, lengths, world=world, batch=batch, interleave=interleave)
        assert stats["steps"] == len(steps)
        assert stats["max_gap"] <= max(lengths.values())


def test_plan_is_deterministic_and_seeded() -> None:
    lengths = lognormal_lengths(300)
    order = plan_order(lengths, world=3, batch=2, seed=1, epoch=4)
    shuffled = dict(sorted(lengths.items(), key=lambda kv: kv[0][::-1]))  # another mapping order
    assert plan_order(shuffled, world=3, batch=2, seed=1, epoch=4) == order
    assert plan_order(lengths, world=3, batch=2, seed=2, epoch=4) != order
    assert plan_order(lengths, world=3, batch=2, seed=1, epoch=5) != order
    fixed = plan_order(lengths, world=3, batch=2, shuffle=False)
    assert fixed == plan_order(lengths, world=3, batch=2, shuffle=False, seed=9, epoch=9)
    firsts = [max(lengths[s] for s in fixed[k:k + 6]) for k in range(0, 300, 6)]
    assert firsts == sorted(firsts, reverse=True)  # no shuffle: longest steps first


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_pads_less_than_random_batching(world: int) -> None:
    lengths = lognormal_lengths(2000, seed=world)
    batch = 4
    grouped = plan_order(lengths, world=world, batch=batch, seed=0)
    rand = sorted(lengths, key=lambda s: random.Random(f"r{s}").random())
    ours = step_stats(grouped, lengths, world=world, batch=batch)["padding"]
    theirs = step_stats(rand, lengths, world=world, batch=batch)["padding"]
    assert ours < theirs / 4, (ours, theirs)  # measured ~0.02 vs ~0.5 at window 50


def test_balance_step_bound_on_adversarial_steps() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        world, batch = rng.randint(2, 6), rng.randint(1, 6)
        pick = rng.choice([lambda: rng.randint(1, 9), lambda: rng.choice([1, 2, 500, 4096]),
                           lambda: round(rng.lognormvariate(6.2, 1.0)) + 1])
        items = [(f"i{k}", pick()) for k in range(world * batch)]
        ranks = balance_step(items, world, batch)
        assert sorted(s for r in ranks for s in r) == sorted(s for s, _ in items)
        assert [len(r) for r in ranks] == [batch] * world
        d = dict(items)
        assert_balanced([[d[s] for s in r] for r in ranks])
    with pytest.raises(ConfigError, match="needs 4 items"):
        balance_step([("a", 1)], 2, 2)


def test_swap_repair_restores_the_bound_from_any_deal() -> None:
    # The repair is what turns the bound into a guarantee: start from the worst deal there is.
    rng = random.Random(3)
    for _ in range(500):
        world, batch = rng.randint(2, 5), rng.randint(2, 6)
        lens = sorted((rng.choice([1, 3, 50, 700, 4096]) for _ in range(world * batch)), reverse=True)
        ranks = [[(f"i{r}-{k}", lens[r * batch + k]) for k in range(batch)] for r in range(world)]
        before = [sum(n for _, n in r) for r in ranks]
        _within_longest(ranks, max(lens))
        assert sorted(n for r in ranks for _, n in r) == sorted(lens) and {len(r) for r in ranks} == {batch}
        assert_balanced([[n for _, n in r] for r in ranks]) if max(before) - min(before) else None


def test_sample_length_from_shape_or_metadata() -> None:
    from torch_dataflow.refs import FeatureSpec, SampleRef

    spec = FeatureSpec(name="input_ids", dtype="int64", shape=(1, 37), nbytes=296)
    ref = SampleRef("s", 1, "memory://", (spec,), 296, "0", {"num_tokens": 12, "flag": True})
    assert sample_length(ref) == 37
    assert sample_length(ref, "num_tokens") == 12
    with pytest.raises(ConfigError, match=r"no length under 'flag'.*\['input_ids'\].*\['num_tokens'\]"):
        sample_length(ref, "flag")  # a bool is not a length


# ---------------------------------------------------------------- FeatureStoreDataset (offline)
def run_lockstep(dss: list[FeatureStoreDataset], batch: int, step0: int = 0,
                 steps: int | None = None) -> list[list[list[tuple[str, str, int]]]]:
    """Iterate ``world`` ranks in lockstep, ack every step; ``[(sample_id, lease, length)]`` per rank per step."""
    its = [iter(ds) for ds in dss]
    out = []
    step = step0
    while steps is None or len(out) < steps:
        got = [list(itertools.islice(it, batch)) for it in its]
        if not any(got):
            break
        # Every rank a full batch in every step (one rank: no DDP to hang, the last batch may be short).
        assert [len(b) for b in got] == [batch] * len(dss) or (len(dss) == 1 and all(got[0]))
        step += 1
        for ds, b in zip(dss, got, strict=True):
            assert ds.ack(b, step, strict=True) == []
        out.append([[(s["__sample_id__"], s["__lease__"], s["input_ids"].numel()) for s in b] for b in got])
    return out


def datasets(store: str, ledger: str, world: int, batch: int, **kw: Any) -> list[FeatureStoreDataset]:
    kw = {"seed": 3, "group_by_length": True, **kw}
    return [FeatureStoreDataset(store, ledger, mode="offline", batch_size=batch, rank=r, world_size=world, **kw)
            for r in range(world)]


def trained_once(steps: list[list[list[tuple[str, str, int]]]]) -> Counter[str]:
    return Counter(sid for step in steps for rank in step for sid, lease, _ in rank if lease)


@pytest.mark.parametrize("kind", LEDGERS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_dataset_epoch_exactly_once_balanced_and_as_planned(make: Any, kind: str, world: int) -> None:
    batch = 3
    lengths = lognormal_lengths(62, seed=world)
    store, ledger = make(kind, lengths)
    g = world * batch
    for epoch in (0, 1):
        dss = datasets(store, ledger, world, batch)
        for ds in dss:
            ds.set_epoch(epoch)
        steps = run_lockstep(dss, batch, step0=epoch * 1000)
        assert trained_once(steps) == Counter(list(lengths))  # every sample once: no loss, no repeat
        assert len(steps) == -(-len(lengths) // g)  # the tail is one more (padded) step
        plan = blocked(plan_order(lengths, world=world, batch=batch, seed=3, epoch=epoch), world, batch)
        full = steps[: len(lengths) // g]
        assert [[[sid for sid, _, _ in r] for r in st] for st in full] == plan  # the plan, rank by rank
        for st in full:
            assert_balanced([[n for _, _, n in r] for r in st])
        c = open_ledger(ledger).counts(epoch=epoch)
        assert (c.pending, c.leased, c.trained + c.durable) == (0, 0, len(lengths))
        if epoch == 0:
            first = full
    assert full != first  # the next epoch is another order


@pytest.mark.parametrize("kind", LEDGERS)
def test_dataset_deterministic_and_pads_less_than_random(make: Any, kind: str) -> None:
    world, batch = 2, 4
    lengths = lognormal_lengths(96, seed=11)
    runs = []
    for group in (True, True, False):
        store, ledger = make(kind, lengths)
        steps = run_lockstep(datasets(store, ledger, world, batch, group_by_length=group), batch)
        runs.append([[[n for _, _, n in r] for r in st] for st in steps])
    assert runs[0] == runs[1]  # the same seed and pool on another ledger: the same steps
    ours, theirs = (padding([r for st in run for r in st]) for run in (runs[0], runs[2]))
    assert ours < theirs / 2, (ours, theirs)


@pytest.mark.parametrize("world", [1, 2])
def test_dataset_with_dataloader_workers(make: Any, world: int) -> None:
    batch = 2
    lengths = lognormal_lengths(41, seed=5)
    store, ledger = make("sqlite", lengths)
    plan = blocked(plan_order(lengths, world=world, batch=batch, seed=3), world, batch)
    seen: Counter[str] = Counter()
    counts = []
    for rank, ds in enumerate(datasets(store, ledger, world, batch)):
        loader = DataLoader(ds, batch_size=batch, num_workers=2, collate_fn=list)
        got = []
        for b in loader:
            ds.ack(b, 1, strict=True)
            got.append([s["__sample_id__"] for s in b])
            seen.update(s["__sample_id__"] for s in b if s["__lease__"])
        counts.append(len(got))
        full = [b for b in got if len(set(b)) == batch and all(x in lengths for x in b)][: len(plan)]
        assert sorted(map(sorted, full)) == sorted(sorted(st[rank]) for st in plan)  # the planned batches
    assert counts == [-(-41 // (world * batch))] * world  # one rank: the last batch is short, not padded
    assert seen == Counter(list(lengths))


@pytest.mark.parametrize("kind", LEDGERS)
def test_dataset_reshard_2_to_3_mid_epoch(make: Any, kind: str) -> None:
    batch = 2
    lengths = lognormal_lengths(58, seed=2)
    store, ledger = make(kind, lengths)
    dss = datasets(store, ledger, 2, batch)
    before = run_lockstep(dss, batch, steps=4)
    dss[0].mark_durable(4)
    _prefetched = [list(itertools.islice(iter(ds), batch)) for ds in dss]  # claimed, never trained: the job dies
    dss[0].reconcile(4)
    rest = {s: n for s, n in lengths.items() if s not in trained_once(before)}
    assert len(rest) == 58 - 16
    after = run_lockstep(datasets(store, ledger, 3, batch), batch, step0=4)
    assert trained_once(before) + trained_once(after) == Counter(list(lengths))  # exactly once across the reshard
    plan = blocked(plan_order(rest, world=3, batch=batch, seed=3), 3, batch)  # the rest, planned for 3 ranks
    assert [[[sid for sid, _, _ in r] for r in st] for st in after[: len(plan)]] == plan
    for st in after[: len(plan)]:
        assert_balanced([[n for _, _, n in r] for r in st])


def _proc(cfg: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROCS), json.dumps(cfg)], capture_output=True, text=True, timeout=300)


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("face", ["dataset", "sampler"])
@pytest.mark.parametrize("kind", LEDGERS)
def test_sigkill_then_resume_with_another_world_size_trains_each_sample_once(
    make: Any, kind: str, face: str, tmp_path: Path
) -> None:
    batch = 2
    lengths = lognormal_lengths(50, seed=4)
    store, ledger = make(kind, lengths)
    log1, log2 = tmp_path / "run1.jsonl", tmp_path / "run2.jsonl"
    base = {"store": store, "ledger": ledger, "batch": batch, "seed": 3, "ckpt_every": 2, "face": face}
    res = _proc({**base, "world": 2, "log": str(log1), "kill_after": 5})
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    recs = _log(log1)
    durable = max(r["durable"] for r in recs if "durable" in r)
    assert durable == 4 and max(r["step"] for r in recs if "step" in r) == 5  # step 5 acked, not checkpointed
    kept = [r for r in recs if "step" in r and r["step"] <= durable]  # what the resumed checkpoint holds

    res = _proc({**base, "world": 3, "log": str(log2), "resume": durable, "step0": durable})
    assert res.returncode == 0, res.stderr[-3000:]
    recs2 = _log(log2)
    assert recs2[-1].get("done") is not None
    steps2 = [r for r in recs2 if "step" in r]
    trained = Counter(s for r in kept + steps2 for ids, leases in zip(r["ids"], r["leases"], strict=True)
                      for s, lease in zip(ids, leases, strict=True) if lease)
    assert trained == Counter(list(lengths))  # every sample exactly once: nothing lost to the kill, nothing twice
    for r in kept + steps2:  # every rank the same batch size in every step (full ones: the dataset pads its tail)
        assert len({len(ids) for ids in r["ids"]}) == 1 and (face == "sampler" or len(r["ids"][0]) == batch)
    rest = {s: n for s, n in lengths.items() if s not in {x for r in kept for ids in r["ids"] for x in ids}}
    if face == "dataset":
        plan = blocked(plan_order(rest, world=3, batch=batch, seed=3), 3, batch)
    else:
        plan = interleaved(plan_order(rest, world=3, batch=batch, seed=3, interleave=True), 3, batch)
    assert [r["ids"] for r in steps2[: len(plan)]] == plan  # the resumed run is length-planned over 3 ranks
    for r in steps2[: len(plan)]:
        assert_balanced([[lengths[s] for s in ids] for ids in r["ids"]])
    c = open_ledger(ledger).counts(epoch=0)
    assert (c.pending, c.leased) == (0, 0)


@pytest.mark.parametrize("kind", LEDGERS)
def test_ranks_in_separate_processes_race_to_one_plan(make: Any, kind: str, tmp_path: Path) -> None:
    world, batch = 3, 2
    lengths = lognormal_lengths(45, seed=13)
    store, ledger = make(kind, lengths)
    logs = [tmp_path / f"rank{r}.jsonl" for r in range(world)]
    cfgs = [{"store": store, "ledger": ledger, "batch": batch, "seed": 3, "ckpt_every": 10**9, "world": world,
             "ranks": [r], "log": str(logs[r])} for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(PROCS), json.dumps(c)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cfgs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    recs = [[r for r in _log(log) if "step" in r] for log in logs]
    assert len({len(r) for r in recs}) == 1  # the same number of batches on every rank
    trained = Counter(s for rank in recs for r in rank for s, lease in zip(r["ids"][0], r["leases"][0], strict=True)
                      if lease)
    assert trained == Counter(list(lengths))
    plan = blocked(plan_order(lengths, world=world, batch=batch, seed=3), world, batch)
    assert [[recs[r][k]["ids"][0] for r in range(world)] for k in range(len(plan))] == plan  # one plan, whoever wrote it


# ---------------------------------------------------------------- ReshardingSampler over a FeaturePool
def sampler_run(pool: FeaturePool, world: int, batch: int, **kw: Any) -> list[list[Any]]:
    """Every rank's indices for the current epoch (ranks one after another, as the ledger allows)."""
    out = []
    for r in range(world):
        s = ReshardingSampler(pool, world, r, seed=3, group_by_length=True, batch_size=batch, **kw)
        out.append(list(s))
        assert len(out[-1]) == s.remaining()
    return out


def lengths_of(pool: FeaturePool, idx: list[Any], lengths: dict[str, int]) -> list[int]:
    return [lengths[pool.sample_id(int(i))] for i in idx]


@pytest.mark.parametrize("kind", LEDGERS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_epoch_exactly_once_balanced_and_as_planned(make: Any, kind: str, world: int, drop_last: bool) -> None:
    batch = 3
    lengths = lognormal_lengths(59, seed=20 + world)
    pool = FeaturePool(*make(kind, lengths))
    per = sampler_run(pool, world, batch, drop_last=drop_last)
    assert len({len(p) for p in per}) == 1  # the same count, so the same number of DataLoader batches
    leased = Counter(pool.sample_id(int(i)) for p in per for i in p if i.lease_id)
    if drop_last:
        assert set(leased.values()) == {1} and len(leased) == 59 - 59 % world
    else:
        assert leased == Counter(list(lengths))
    plan = interleaved(plan_order(lengths, world=world, batch=batch, seed=3, interleave=True), world, batch)
    for k, step in enumerate(plan):  # DataLoader batch k of rank r = indices [k*batch, (k+1)*batch)
        got = [[pool.sample_id(int(i)) for i in p[k * batch:(k + 1) * batch]] for p in per]
        assert got == step
        assert_balanced([lengths_of(pool, p[k * batch:(k + 1) * batch], lengths) for p in per])


@pytest.mark.parametrize("kind", LEDGERS)
def test_sampler_deterministic_and_pads_less_than_random(make: Any, kind: str) -> None:
    world, batch = 2, 4
    lengths = lognormal_lengths(96, seed=12)
    runs = []
    for group in (True, True, False):
        pool = FeaturePool(*make(kind, lengths))
        per = [list(ReshardingSampler(pool, world, r, seed=3, group_by_length=group, batch_size=batch))
               for r in range(world)]
        runs.append([[lengths_of(pool, p[k:k + batch], lengths) for p in per] for k in range(0, len(per[0]), batch)])
    assert runs[0] == runs[1]
    ours, theirs = (padding([r for st in run for r in st]) for run in (runs[0], runs[2]))
    assert ours < theirs / 2, (ours, theirs)


@pytest.mark.parametrize("kind", LEDGERS)
def test_sampler_reshard_2_to_3_mid_epoch(make: Any, kind: str) -> None:
    batch = 2
    lengths = lognormal_lengths(61, seed=6)
    pool = FeaturePool(*make(kind, lengths))
    its = [iter(ReshardingSampler(pool, 2, r, seed=3, group_by_length=True, batch_size=batch)) for r in range(2)]
    done = []
    for step in range(1, 4):  # three DataLoader batches per rank, acked
        got = [[pool[next(it)] for _ in range(batch)] for it in its]
        for b in got:
            pool.ack(b, step, strict=True)
        assert_balanced([[s["input_ids"].numel() for s in b] for b in got])
        done += [s["__sample_id__"] for b in got for s in b]
    _prefetched = [next(it) for it in its]  # leased, never trained
    pool.mark_durable(3)
    pool.reconcile(3)
    rest = {s: n for s, n in lengths.items() if s not in done}
    per = sampler_run(pool, 3, batch)
    leased = Counter(pool.sample_id(int(i)) for p in per for i in p if i.lease_id)
    assert leased == Counter(list(rest)) and not set(leased) & set(done)  # exactly once across the reshard
    plan = interleaved(plan_order(rest, world=3, batch=batch, seed=3, interleave=True), 3, batch)
    for k, step in enumerate(plan):
        assert [[pool.sample_id(int(i)) for i in p[k * batch:(k + 1) * batch]] for p in per] == step


def test_sampler_through_a_dataloader_with_workers(make: Any) -> None:
    world, batch = 2, 4
    lengths = lognormal_lengths(40, seed=8)
    pool = FeaturePool(*make("sqlite", lengths))
    plan = interleaved(plan_order(lengths, world=world, batch=batch, seed=3, interleave=True), world, batch)
    counts, seen = [], Counter()
    samplers = [ReshardingSampler(pool, world, r, seed=3, group_by_length=True, batch_size=batch) for r in range(world)]
    assert [s.remaining() for s in samplers] == [20, 20]  # every rank sizes the epoch before any ack (as under DDP)
    for r, s in enumerate(samplers):
        got = []
        for step, b in enumerate(DataLoader(pool, batch_size=batch, sampler=s, num_workers=2, collate_fn=list), 1):
            pool.ack(b, step, strict=True)
            got.append([x["__sample_id__"] for x in b])
            seen.update(x["__sample_id__"] for x in b if x["__lease__"])
        counts.append(len(got))
        assert got[: len(plan)] == [st[r] for st in plan]
    assert counts == [len(lengths) // (world * batch)] * world  # 40 = 5 x 8: no tail
    assert seen == Counter(list(lengths))


def test_length_from_metadata(make: Any) -> None:
    lengths = lognormal_lengths(24, seed=9)
    store, ledger = make("sqlite", lengths, metadata=True)
    pool = FeaturePool(store, ledger)
    per = [list(ReshardingSampler(pool, 2, r, seed=3, group_by_length=True, batch_size=2, length_key="num_tokens"))
           for r in range(2)]
    plan = interleaved(plan_order(lengths, world=2, batch=2, seed=3, interleave=True), 2, 2)
    assert [[[pool.sample_id(int(i)) for i in p[k * 2:(k + 1) * 2]] for p in per] for k in range(6)] == plan


# ---------------------------------------------------------------- the ledger primitive
@pytest.mark.parametrize("kind", LEDGERS)
def test_order_pending_once_and_refused_when_stale(make: Any, kind: str) -> None:
    lengths = {f"s{i}": 64 + i for i in range(6)}
    _, uri = make(kind, lengths)
    led = open_ledger(uri)
    led.begin_epoch(0, seed=0, shuffle=True)
    ids = [r.sample_id for r in led.pending_refs(0)]
    assert sorted(ids) == sorted(lengths)
    want = sorted(ids, reverse=True)
    assert led.order_pending(0, want, "k1") == "ordered"
    assert [r.sample_id for r in led.pending_refs(0)] == want
    assert led.order_pending(0, sorted(ids), "k1") == "done"  # once per key
    assert led.order_pending(0, want[:-1], "k2") == "stale"  # not the pending set: nothing changes
    assert led.order_pending(0, [*want[:-1], "nope"], "k3") == "stale"
    assert [r.sample_id for r in led.pending_refs(0)] == want
    assert led.pending_lengths(0, "input_ids") == [(s, lengths[s]) for s in want]  # the fast path agrees
    with pytest.raises(ConfigError, match="no length under 'nope'"):
        led.pending_lengths(0, "nope")
    leases = led.lease("me", 2, 60, epoch=0)
    assert [x.sample_id for x in leases] == want[:2]  # leases follow the order
    assert led.order_pending(0, want, "k4") == "stale"  # two are leased now
    assert [r.sample_id for r in led.pending_refs(0)] == want[2:]
    with pytest.raises(ConfigError, match="same sample id twice"):
        led.order_pending(0, ["s1", "s1"], "k5")


# ---------------------------------------------------------------- misuse
def test_config_errors(make: Any) -> None:
    lengths = lognormal_lengths(8)
    store, ledger = make("sqlite", lengths)
    with pytest.raises(ConfigError, match="mode='offline'"):
        FeatureStoreDataset(store, ledger, group_by_length=True)  # online (the default)
    for world in (1, 2):
        ds = FeatureStoreDataset(store, ledger, mode="offline", rank=0, world_size=world, batch_size=2,
                                 group_by_length=True, length_key="num_tokens")
        with pytest.raises(ConfigError, match=r"no length under 'num_tokens'.*\['input_ids'\].*length_key"):
            next(iter(ds))
        assert open_ledger(ledger).counts(epoch=0).leased == 0  # refused before any lease
    pool = FeaturePool(store, ledger)
    for bad in (None, 0, True, 2.0):
        with pytest.raises(ConfigError, match="batch_size"):
            ReshardingSampler(pool, 2, 0, group_by_length=True, batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_tokens"):
        ReshardingSampler(pool, 2, 0, group_by_length=True, batch_size=2, length_key="num_tokens")
    ReshardingSampler(pool, 2, 0, batch_size=None)  # without group_by_length nothing is needed
