"""Scenario ``length``: random vs length-aware batching (``group_by_length=True``, issue 13).

1. **Delivery.** A committed pool of EAGLE3 samples whose lengths are
   log-normal (median ~490 tokens, clipped to 64-4096) in the shared-directory
   store with a SQLite ledger; ``world`` ranks of
   ``FeatureStoreDataset(mode="offline", batch_size=batch)`` iterated in
   lockstep in this process, each rank's batch collated by ``eagle3_collate``
   (padded to its longest member, no truncation) and then fed to a toy step
   (one linear layer over the padded ``hidden_state``: its cost grows with the
   padded tokens, as a draft model's does). Per mode (``random``: the seeded
   shuffle; ``by_length``: ``group_by_length=True``), one epoch per repeat, after a
   warm-up epoch: padding fraction (padded positions / all positions), real
   tokens/s delivered (read + collate) and trained (read + collate + toy step),
   and the max/min of per-rank real tokens in a step (the worst step, and the
   median step).
2. **Ordering cost.** What ``group_by_length`` adds once per plan: reading the
   pending refs, computing the order and writing it to the ledger
   (:func:`~torch_dataflow.length_batching.ensure_order`) for pools of 10k and
   100k samples (quick: 2k), per ledger; and :func:`plan_order` alone.
"""

from __future__ import annotations

import functools
import itertools
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..dataset import FeatureStoreDataset
from ..eagle3 import eagle3_collate
from ..ledger import open_ledger
from ..length_batching import ensure_order, plan_order
from ..producer import FeatureWriter
from ..refs import SampleRef
from ._util import Settings, eagle3_sample, ratio_entry
from .ledger import redis_servers, redis_unavailable

TITLE = "Length-aware batching: padding, tokens/s, balance"
MODES = ("random", "by_length")


def lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    """``n`` lengths, log-normal (mu 6.2, sigma 1.0: median ~490 tokens), clipped to 64-4096."""
    rng = random.Random(seed)
    return [min(4096, max(64, round(rng.lognormvariate(6.2, 1.0)))) for _ in range(n)]


def _epoch(store: str, ledger: str, world: int, batch: int, epoch: int, group: bool, step_fn: Any) -> dict[str, Any]:
    dss = [FeatureStoreDataset(store, ledger, mode="offline", batch_size=batch, rank=r, world_size=world, seed=1,
                               group_by_length=group) for r in range(world)]
    for ds in dss:
        ds.set_epoch(epoch)
    collate = functools.partial(eagle3_collate, max_len=None)
    its = [iter(ds) for ds in dss]
    real = padded = 0
    deliver_s = step_s = 0.0
    ratios: list[float] = []
    step = epoch * 1_000_000
    while True:
        t0 = time.perf_counter()
        got = [list(itertools.islice(it, batch)) for it in its]
        if not any(got):
            break
        batches = [collate(b) for b in got]
        t1 = time.perf_counter()
        for b in batches:
            step_fn(b)
        t2 = time.perf_counter()
        deliver_s, step_s = deliver_s + (t1 - t0), step_s + (t2 - t1)
        step += 1
        toks = []
        for ds, b, cb in zip(dss, got, batches, strict=True):
            ds.ack(b, step)
            real_here = int(cb["attention_mask"].sum())
            toks.append(real_here)
            real += real_here
            padded += cb["attention_mask"].numel()
        if all(len(b) == batch for b in got) and all(s["__lease__"] for b in got for s in b):
            ratios.append(max(toks) / max(min(toks), 1))  # full steps only: the padded tail repeats samples
    return {"real": real, "padded": padded, "deliver_s": deliver_s, "step_s": step_s, "step_ratios": ratios}


def delivery(cfg: Settings, tmp: Path) -> list[dict[str, Any]]:
    n, h, worlds = (96, 32, (2,)) if cfg.quick else (384, 64, (2, 4))
    batch, reps = 4, cfg.reps(3, 1)
    lengths = lognormal_lengths(n)
    store, ledger = f"file://{tmp}/length-store", f"sqlite://{tmp}/length.db"
    with FeatureWriter(store, ledger) as w:
        for i, s in enumerate(lengths):
            w.put(f"l{i:05d}", eagle3_sample(s, h, seed=i))
    torch.manual_seed(0)
    layer = torch.nn.Linear(3 * h, h)

    @torch.no_grad()
    def toy_step(b: dict[str, Any]) -> None:
        layer(b["hidden_state"].float())

    rows = []
    epoch = 0
    for world in worlds:
        for mode in MODES:
            runs = []
            for _ in range(reps + 1):  # + one warm-up epoch, dropped below
                epoch += 1
                runs.append(_epoch(store, ledger, world, batch, epoch, mode == "by_length", toy_step))
            runs = runs[1:]
            real = runs[0]["real"]
            rows.append({
                "mode": mode,
                "world": world,
                "batch": batch,
                "samples": n,
                "H": h,
                "reps": reps,
                "padding": 1 - real / runs[0]["padded"],
                "delivered_tokens_per_s": statistics.median(r["real"] / r["deliver_s"] for r in runs),
                "trained_tokens_per_s": statistics.median(r["real"] / (r["deliver_s"] + r["step_s"]) for r in runs),
                "worst_max_min": max(runs[0]["step_ratios"]),
                "median_max_min": statistics.median(runs[0]["step_ratios"]),
            })
    return rows


def _pool(led: Any, n: int, tag: str) -> None:
    lengths = lognormal_lengths(n, seed=n)
    for lo in range(0, n, 5000):
        ids = [f"{tag}{i:07d}" for i in range(lo, min(n, lo + 5000))]
        gens = led.reserve(ids)
        led.commit([SampleRef(s, g, "memory://bench-length", (), 0, f"{g:016x}", {"num_tokens": lengths[int(s[-7:])]})
                    for s, g in zip(ids, gens, strict=True)])


def ordering(cfg: Settings, ledgers: dict[str, str]) -> list[dict[str, Any]]:
    sizes, reps = ((2_000,), cfg.reps(3, 1)) if cfg.quick else ((10_000, 100_000), cfg.reps(3, 1))
    rows = []
    for n in sizes:
        lengths = dict(zip((f"x{i}" for i in range(n)), lognormal_lengths(n, seed=n), strict=True))
        alone = []
        for rep in range(reps):
            t0 = time.perf_counter()
            plan_order(lengths, world=8, batch=4, seed=0, epoch=rep)
            alone.append(time.perf_counter() - t0)
        rows.append({"ledger": "(plan_order alone)", "pool": n, "ms": statistics.median(alone) * 1e3})
        for name, uri in ledgers.items():
            led = open_ledger(f"{uri}{'&' if '?' in uri else '?'}namespace=len{n}" if name == "redis" else
                              uri.replace(".db", f"-{n}.db"))
            _pool(led, n, "o")
            times = []
            for rep in range(reps):
                led.begin_epoch(rep, seed=0, shuffle=True)
                t0 = time.perf_counter()
                got = ensure_order(led, f"bench/{n}/{rep}", rep, world=8, batch=4, seed=0, shuffle=True,
                                   length_key="num_tokens")
                times.append(time.perf_counter() - t0)
                assert got == "ordered", got
            led.close()
            rows.append({"ledger": name, "pool": n, "ms": statistics.median(times) * 1e3})
    return rows


def run(cfg: Settings) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="td-bench-length-"))
    skipped = {}
    try:
        rows = delivery(cfg, tmp)
        with redis_servers(aof=False) as servers:
            ledgers = {"sqlite": f"sqlite://{tmp}/order.db"}
            if servers is None:
                skipped["redis"] = redis_unavailable()
            else:
                ledgers["redis"] = servers[0].uri
            cost = ordering(cfg, ledgers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = []
    for world in sorted({r["world"] for r in rows}):
        rnd, lng = (next(r for r in rows if r["world"] == world and r["mode"] == m) for m in MODES)
        ratios += [
            ratio_entry(f"tokens/s delivered, by_length / random, world {world}",
                        lng["delivered_tokens_per_s"] / rnd["delivered_tokens_per_s"]),
            ratio_entry(f"tokens/s with a toy step, by_length / random, world {world}",
                        lng["trained_tokens_per_s"] / rnd["trained_tokens_per_s"]),
            ratio_entry(f"positions computed per real token, random / by_length, world {world}",
                        (1 - lng["padding"]) / (1 - rnd["padding"])),
        ]
    return {"title": TITLE, "rows": {"delivery": rows, "ordering": cost}, "ratios": ratios, "targets": [],
            "skipped": skipped}


def render(res: dict[str, Any]) -> str:
    rows, cost = res["rows"]["delivery"], res["rows"]["ordering"]
    r0 = rows[0]
    lines = [
        f"### {res['title']}",
        "",
        f"**Delivery** ({r0['samples']} EAGLE3 samples, log-normal lengths 64-4096 tokens (median ~490), H={r0['H']}, "
        f"batch {r0['batch']} per rank, ranks in lockstep in one process, file:// + SQLite; medians of "
        f"{r0['reps']} epoch(s) after a warm-up epoch)",
        "",
        "| world | batching | padding | real tokens/s delivered | real tokens/s with toy step "
        "| worst step max/min tokens per rank | median step max/min |",
        "|---" * 7 + "|",
    ]
    lines += [
        f"| {r['world']} | {r['mode']} | {r['padding']:.1%} | {r['delivered_tokens_per_s']:,.0f} "
        f"| {r['trained_tokens_per_s']:,.0f} | {r['worst_max_min']:.2f} | {r['median_max_min']:.3f} |"
        for r in rows
    ]
    lines += [
        "",
        "*padding*: padded positions / all positions of the collated batches (each rank's batch padded to its "
        "longest member). *delivered*: read + `eagle3_collate` (no truncation); *with toy step*: plus one "
        "`Linear(3H, H)` over the padded `hidden_state`, a stand-in for a step whose cost grows with padded "
        "tokens. *max/min*: per-rank real tokens in a full step (the padded tail excluded); `by_length` keeps "
        "every rank within the step's longest sample of every other.",
        "",
        "**Ordering cost** (once per plan: read the pending refs, compute the order for 8 ranks x batch 4, write "
        "it; milliseconds, median)",
        "",
        "| ledger | pool | ms |",
        "|---|---|---|",
    ]
    lines += [f"| {r['ledger']} | {r['pool']:,} | {r['ms']:,.0f} |" for r in cost]
    for k, why in res.get("skipped", {}).items():
        lines.append(f"\nSkipped {k}: {why}.")
    return "\n".join(lines)
