"""Scenario ``scaling``: how the figures change with more consumers and bigger pools.

1. **Consumer processes** (1 to 4): a committed pool of EAGLE3 samples in the
   shared-directory store, its refs committed to each ledger; K spawned
   processes (ranks of one world) each iterate
   ``DataLoader(FeatureStoreDataset(..., rank, world_size=K), collate_fn=eagle3_collate)``
   and ack. One epoch per repeat (offline mode re-delivers the pool), after
   one warm-up epoch. Aggregate samples/s = pool / (last end - first start).
2. **Control plane alone** (1 to 4 processes): K processes lease batches of 64
   from one pre-committed ledger and ack them, no bytes.
3. **Pool size**: per-operation cost of each ledger with 1k, 10k and 100k
   committed, pending samples (commit 64 new, lease 64, ack 64, mark_durable,
   counts); the pool size stays constant during the measurement. The hot-path
   cost must stay flat as the pool grows.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..dataset import FeatureStoreDataset
from ..eagle3 import eagle3_collate
from ..ledger import open_ledger
from ..ledger.base import Ledger
from ..producer import FeatureWriter
from ..testing.ledger_conformance import fake_ref
from ._util import Settings, eagle3_sample, medians_of, mp_context, ratio_entry, target
from .ledger import redis_servers, redis_unavailable

TITLE = "Scaling: consumer processes and pool size"
OPS = ("commit", "lease", "ack", "mark_durable")  # the hot path; counts() is reported beside it
FLAT = 1.5  # hot-path cost at the largest pool may be at most this multiple of the smallest
WARM = 5  # untimed cycles first (a freshly filled Redis may still be rehashing its dicts)


def _consumer(
    store: str, ledger: str, rank: int, world: int, batch: int, epochs: list[int], barrier: Any, out: Any
) -> None:
    torch.set_num_threads(1)
    ds = FeatureStoreDataset(
        store, ledger, mode="offline", batch_size=batch, rank=rank, world_size=world, shuffle=False
    )
    loader = DataLoader(ds, batch_size=batch, num_workers=0, collate_fn=eagle3_collate)
    ds.ledger.attempt()  # attach before the clock starts
    times = []
    for epoch in epochs:
        ds.set_epoch(epoch)
        barrier.wait()
        t0, n = time.monotonic(), 0
        for step, b in enumerate(loader, 1):
            n += len(b["__lease__"])
            ds.ack(b, epoch * 1_000_000 + step)
        times.append((t0, time.monotonic(), n))
    out.put(times)


def _ledger_worker(uris: list[str], owner: str, batch: int, barrier: Any, out: Any) -> None:
    times = []
    for uri in uris:
        led = open_ledger(uri)
        led.attempt()
        barrier.wait()
        t0, n, step = time.monotonic(), 0, 0
        while leases := led.lease(owner, batch, ttl=600):
            step += 1
            led.ack([x.lease_id for x in leases], step)
            n += len(leases)
        times.append((t0, time.monotonic(), n))
        led.close()
    out.put(times)


def _spawn(target_fn: Any, per_proc_args: list[tuple[Any, ...]], n_rounds: int) -> list[float]:
    """Run one process per args tuple; return the aggregate seconds of each round (first start to last end)."""
    ctx = mp_context()
    barrier, out = ctx.Barrier(len(per_proc_args)), ctx.Queue()
    procs = [ctx.Process(target=target_fn, args=(*a, barrier, out), daemon=True) for a in per_proc_args]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    spans = []
    for r in range(n_rounds):
        start = min(res[r][0] for res in results)
        end = max(res[r][1] for res in results)
        spans.append((end - start, sum(res[r][2] for res in results)))
    return [n / dt for dt, n in spans]


def _commit_pool(led: Ledger, ids: list[str], refs: dict[str, Any] | None = None) -> None:
    for i in range(0, len(ids), 1024):
        chunk = ids[i : i + 1024]
        gens = led.reserve(chunk)
        led.commit([refs[s] if refs else fake_ref(s, g) for s, g in zip(chunk, gens, strict=True)])


def consumers(cfg: Settings, ledgers: dict[str, str], tmp: Path) -> list[dict[str, Any]]:
    s, h, n, ks = (64, 256, 24, (1, 2)) if cfg.quick else (512, 4096, 48, (1, 2, 3, 4))
    batch, reps = 2, cfg.reps(3, 1)
    store = f"file://{tmp}/pool-store"
    sample = eagle3_sample(s, h)
    with FeatureWriter(store, list(ledgers.values())[0]) as w:
        refs = {r.sample_id: r for r in w.put_many((f"p{i:05d}", sample) for i in range(n))}
    for uri in list(ledgers.values())[1:]:  # the same bytes, committed to each other ledger
        _commit_pool(open_ledger(uri), list(refs), refs)
    nbytes = sum(t.numel() * t.element_size() for t in sample.values())
    rows: list[dict[str, Any]] = []
    for name, uri in ledgers.items():
        base = None
        for k in ks:
            epochs = [100 * k + e for e in range(reps + 1)]  # + one warm-up epoch, dropped below
            rates = _spawn(_consumer, [(store, uri, r, k, batch, epochs) for r in range(k)], reps + 1)[1:]
            sps = statistics.median(rates)
            base = base or sps
            rows.append(
                {
                    "ledger": name,
                    "processes": k,
                    "S": s,
                    "H": h,
                    "pool": n,
                    "batch": batch,
                    "reps": reps,
                    "samples_per_s": sps,
                    "gbps": sps * nbytes / 1e9,
                    "vs_1": sps / base,
                }
            )
    return rows


def control_plane(cfg: Settings, ledgers: dict[str, str]) -> list[dict[str, Any]]:
    n, ks, batch, reps = (1_280, (1, 2), 64, cfg.reps(3, 1)) if cfg.quick else (10_240, (1, 2, 4), 64, cfg.reps(3, 1))
    rows: list[dict[str, Any]] = []
    for name, base_uri in ledgers.items():
        base = None
        for k in ks:
            uris = [_fresh_uri(base_uri, f"cp{k}r{r}") for r in range(reps)]
            for uri in uris:
                _commit_pool(open_ledger(uri), [f"c{i:06d}" for i in range(n)])
            rates = _spawn(_ledger_worker, [(uris, f"w{j}", batch) for j in range(k)], reps)
            sps = statistics.median(rates)
            base = base or sps
            rows.append(
                {
                    "ledger": name,
                    "processes": k,
                    "pool": n,
                    "batch": batch,
                    "reps": reps,
                    "samples_per_s": sps,
                    "vs_1": sps / base,
                }
            )
    return rows


def _fresh_uri(uri: str, tag: str) -> str:
    if uri.startswith("sqlite://"):
        return uri.removesuffix(".db") + f"-{tag}.db"
    if uri.startswith("memory://"):
        return f"{uri}-{tag}"
    return f"{uri.split('?')[0]}?namespace={tag}-{time.monotonic_ns()}"


def pool_sizes(cfg: Settings, ledgers: dict[str, str]) -> list[dict[str, Any]]:
    pools, cycles = ((200, 2_000), 10) if cfg.quick else ((1_000, 10_000, 100_000), 60)
    rows: list[dict[str, Any]] = []
    for name, base_uri in ledgers.items():
        for pool in pools:
            led = open_ledger(_fresh_uri(base_uri, f"pool{pool}"))
            _commit_pool(led, [f"q{i:07d}" for i in range(pool)])
            state = {"step": 0, "leases": []}

            def commit(i: int, led: Ledger = led, state: dict[str, Any] = state) -> None:
                ids = [f"n{state['step']}-{i}-{j}" for j in range(64)]
                gens = led.reserve(ids)
                led.commit([fake_ref(s, g) for s, g in zip(ids, gens, strict=True)])

            def lease(i: int, led: Ledger = led, state: dict[str, Any] = state) -> None:
                state["leases"] = led.lease("pool-bench", 64, ttl=600)

            def ack(i: int, led: Ledger = led, state: dict[str, Any] = state) -> None:
                state["step"] += 1
                led.ack([x.lease_id for x in state["leases"]], state["step"])

            def durable(i: int, led: Ledger = led, state: dict[str, Any] = state) -> None:
                led.mark_durable(state["step"])

            ops: dict[str, list[float]] = {op: [] for op in (*OPS, "counts")}
            fns = {
                "commit": commit,
                "lease": lease,
                "ack": ack,
                "mark_durable": durable,
                "counts": lambda i, led=led: led.counts(),
            }
            for c in range(cycles + WARM):  # the pool stays at `pool` pending: 64 in, 64 out per cycle
                for op, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(c)
                    ops[op].append(time.perf_counter() - t0)
            led.close()
            row: dict[str, Any] = {"ledger": name, "pool": pool, "cycles": cycles}
            row.update({f"{op} us": statistics.median(v[WARM:]) * 1e6 for op, v in ops.items()})
            row["hot path us"] = sum(row[f"{op} us"] for op in OPS)
            rows.append(row)
    for r in rows:
        first = next(x for x in rows if x["ledger"] == r["ledger"])
        r["vs_smallest"] = r["hot path us"] / first["hot path us"]
        r["counts vs_smallest"] = r["counts us"] / first["counts us"]
    return rows


def run(cfg: Settings) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="td-bench-scaling-"))
    skipped = {}
    try:
        with redis_servers(aof=False) as servers:
            ledgers = {"sqlite": f"sqlite://{tmp}/ledger.db"}
            if servers is None:
                skipped["redis"] = redis_unavailable()
            else:
                ledgers["redis"] = f"{servers[0].uri}?namespace=scaling"
            cons = consumers(cfg, ledgers, tmp)
            cp = control_plane(cfg, ledgers)
            pools = pool_sizes(cfg, {"memory": f"memory://scaling-{time.monotonic_ns()}", **ledgers})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios, targets = [], []
    for r in cons:
        if r["processes"] > 1:
            ratios.append(ratio_entry(f"loader {r['ledger']}, {r['processes']} procs / 1 proc", r["vs_1"]))
    for r in cp:
        if r["processes"] > 1:
            ratios.append(ratio_entry(f"ledger {r['ledger']}, {r['processes']} procs / 1 proc", r["vs_1"]))
    biggest = max(r["pool"] for r in pools)
    for r in pools:
        if r["pool"] == biggest:
            smallest = min(x["pool"] for x in pools)
            what = f"{r['ledger']} hot-path cost at {smallest:,} / at {biggest:,} pending"
            ratios.append(ratio_entry(what, 1 / r["vs_smallest"], 1 / FLAT))
            targets.append(
                target(
                    f"{r['ledger']} ledger per-op cost flat from {smallest:,} to {biggest:,} "
                    f"samples (cost ratio <= {FLAT})",
                    1 / r["vs_smallest"],
                    1 / FLAT,
                    quick=cfg.quick,
                )
            )
    return {
        "title": TITLE,
        "rows": {"consumers": cons, "control_plane": cp, "pool_sizes": pools},
        "ratios": ratios,
        "targets": targets,
        "skipped": skipped,
        "settings": {"flat": FLAT},
    }


def render(res: dict[str, Any]) -> str:
    cons, cp, pools = res["rows"]["consumers"], res["rows"]["control_plane"], res["rows"]["pool_sizes"]
    c0 = cons[0]
    lines = [
        f"### {res['title']}",
        "",
        f"**Consumer processes** (loader + eagle3_collate + ack; pool of {c0['pool']} samples, S={c0['S']}, "
        f"H={c0['H']}, batch {c0['batch']} per rank; {medians_of(c0['reps'], 'epoch')} after a warm-up epoch)",
        "",
        "| ledger | processes | samples/s | GB/s | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['ledger']} | {r['processes']} | {r['samples_per_s']:.1f} | {r['gbps']:.2f} | {r['vs_1']:.2f} |"
        for r in cons
    ]
    p0 = cp[0]
    lines += [
        "",
        f"**Control plane alone** (K processes lease {p0['batch']} + ack from one pool of {p0['pool']:,}; "
        f"{medians_of(p0['reps'])})",
        "",
        "| ledger | processes | samples/s | vs 1 process |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['ledger']} | {r['processes']} | {r['samples_per_s']:,.0f} | {r['vs_1']:.2f} |" for r in cp]
    lines += [
        "",
        f"**Pool size** (microseconds per call on 64 samples, median of {pools[0]['cycles']} cycles; the "
        "pool stays at the given number of pending samples)",
        "",
        "| ledger | pending | commit | lease | ack | mark_durable | hot path | vs smallest pool "
        "| counts() | counts vs smallest |",
        "|---" * 10 + "|",
    ]
    lines += [
        f"| {r['ledger']} | {r['pool']:,} | {r['commit us']:.0f} | {r['lease us']:.0f} | {r['ack us']:.0f} "
        f"| {r['mark_durable us']:.0f} | {r['hot path us']:.0f} | {r['vs_smallest']:.2f} | {r['counts us']:.0f} "
        f"| {r['counts vs_smallest']:.2f} |"
        for r in pools
    ]
    lines += [
        "",
        f"Flat means the hot path (commit + lease + ack + mark_durable) at the largest pool costs at most "
        f"{res['settings']['flat']}x what it costs at the smallest. `counts()` is a status query (it scans); "
        "it is on the producer's path only when `max_pending` is set. The machine has 2 cores: 3-4 "
        "processes share them with the benchmark driver.",
    ]
    for k, why in res.get("skipped", {}).items():
        lines.append(f"Skipped {k}: {why}.")
    return "\n".join(lines)
