"""Scenario ``e2e``: can the loader keep a trainer fed?

A producer process (spawned) writes EAGLE3-shaped samples with a
:class:`~torch_dataflow.FeatureWriter` into the shared-directory store and the
SQLite ledger (the embedded default) while this process runs
``DataLoader(FeatureStoreDataset(...), num_workers=W, collate_fn=eagle3_collate)``
and hands each batch to a no-op training step that acks the batch and marks
the step durable (which frees the bytes, so the producer's byte budget never
stalls it for good).

Reported per (S, W), medians over repeats: samples/s and GB/s of feature bytes
delivered to the step, the ratio of that rate to one ``memcpy`` of a sample
(same run), the fraction of the loop's wall time the step spent waiting in
``next(loader)``, and the producer's own put rate in the same run (the pipeline
cannot beat its producer). The clock starts when the producer starts writing
(after its process and torch have started) and stops after the last ack.
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
from ..producer import FeatureWriter
from ._util import Settings, eagle3_sample, medians_of, memcpy_s, mp_context, ratio_entry, sample_nbytes

TITLE = "End to end: producer process -> store -> DataLoader -> eagle3_collate -> no-op step"


def _producer(
    store: str, ledger: str, n: int, s: int, h: int, budget: int | None, ready: Any, go: Any, out: Any
) -> None:
    """Producer process body: one sample's tensors put ``n`` times under new ids."""
    torch.set_num_threads(1)
    sample = eagle3_sample(s, h)
    writer = FeatureWriter(store, ledger, name="bench-producer", max_resident_bytes=budget, poll=0.005)
    writer.ledger.register_producer(writer.name)  # the stream is open before the consumer starts
    writer.store.health()  # attach before the clock starts
    ready.set()
    go.wait()
    t0 = time.perf_counter()
    for i in range(n):
        writer.put(f"s{i:06d}", sample)
    writer.close()
    out.put({"put_s": time.perf_counter() - t0, "waited_s": writer.waited_s})


def one_run(
    s: int, h: int, n: int, batch: int, workers: int, tmp: Path, tag: str, prefilled: bool = False
) -> dict[str, float]:
    """One producer + consumer run; returns the consumer's and producer's timings.

    ``prefilled``: the producer writes the whole pool first (no byte budget) and
    the clock starts after it is done: the loader's own ceiling, with no producer
    competing for the cores.
    """
    store, ledger = f"file://{tmp}/{tag}-store", f"sqlite://{tmp}/{tag}-ledger.db"
    nbytes = s * (8 + 8 + 2 * h + 6 * h)  # payload bytes: int64 ids + mask, bf16 [S,H] + [S,3H]
    # The budget must exceed what the loader keeps in flight un-acked (each worker's
    # prefetched batches, a partial batch per worker, the batch in the step), else an
    # in-order DataLoader can wait on a worker that waits for room: a deadlock.
    in_flight = (max(workers, 1) * 2 + 2) * batch
    budget = None if prefilled else max(4, 4 * batch, in_flight + batch) * nbytes
    ctx = mp_context()
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_producer, args=(store, ledger, n, s, h, budget, ready, go, out), daemon=True)
    proc.start()
    try:
        if not ready.wait(180):
            raise RuntimeError("the producer process did not start within 180 s")
        ds = FeatureStoreDataset(store, ledger, batch_size=batch, idle_timeout=120, poll=0.005)
        loader = DataLoader(
            ds, batch_size=batch, num_workers=workers, collate_fn=eagle3_collate, prefetch_factor=2 if workers else None
        )
        go.set()
        prod = out.get(timeout=600) if prefilled else None
        t0 = time.perf_counter()
        waited, steps, samples = 0.0, 0, 0
        it = iter(loader)
        while True:
            tw = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            waited += time.perf_counter() - tw
            steps += 1
            samples += len(b["__lease__"])
            assert b["hidden_state"].shape[-1] == 3 * h  # the no-op step looks at its batch, acks, checkpoints
            ds.ack(b, steps, strict=True)
            ds.mark_durable(steps)
        total = time.perf_counter() - t0
        prod = prod or out.get(timeout=60)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if samples != n:
        raise RuntimeError(f"the consumer got {samples} samples, the producer wrote {n}")
    return {
        "total_s": total,
        "waited_s": waited,
        "steps": steps,
        "samples": samples,
        "nbytes": nbytes,
        "put_s": prod["put_s"],
        "producer_waited_s": prod["waited_s"],
    }


def run(cfg: Settings) -> dict[str, Any]:
    if cfg.quick:
        h, plan, batch = 256, {64: 16}, 2
        configs = [("concurrent", 0), ("concurrent", 1), ("concurrent", 2), ("prefilled", 0)]
    else:
        h, plan, batch = 4096, {512: 64, 2048: 24}, 2
        configs = [(mode, w) for mode in ("concurrent", "prefilled") for w in (0, 1, 2)]
    reps = cfg.reps(3, 1)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="td-bench-e2e-"))
    rows: list[dict[str, Any]] = []
    try:
        for s, n in plan.items():
            nbytes = sample_nbytes(eagle3_sample(s, h))
            memcpy_gbps = nbytes / memcpy_s(nbytes, 9) / 1e9
            for mode, w in configs:
                pre = mode == "prefilled"
                runs = [one_run(s, h, n, batch, w, tmp, f"s{s}w{w}{mode[0]}{r}", pre) for r in range(reps)]
                med = statistics.median(r["total_s"] for r in runs)
                sps = statistics.median(r["samples"] / r["total_s"] for r in runs)
                gbps = sps * nbytes / 1e9
                put_sps = statistics.median(r["samples"] / r["put_s"] for r in runs)
                rows.append(
                    {
                        "mode": mode,
                        "S": s,
                        "H": h,
                        "workers": w,
                        "batch": batch,
                        "samples": n,
                        "nbytes": nbytes,
                        "reps": reps,
                        "total_s": med,
                        "samples_per_s": sps,
                        "gbps": gbps,
                        "memcpy_gbps": memcpy_gbps,
                        "vs_memcpy": gbps / memcpy_gbps,
                        "wait_fraction": statistics.median(r["waited_s"] / r["total_s"] for r in runs),
                        "producer_samples_per_s": put_sps,
                        "vs_producer": sps / put_sps,
                        "producer_backpressure_s": statistics.median(r["producer_waited_s"] for r in runs),
                    }
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = []
    for r in rows:
        where = f"S={r['S']}, W={r['workers']}, {r['mode']}"
        ratios.append(ratio_entry(f"delivered / memcpy, {where}", r["vs_memcpy"]))
        if r["mode"] == "concurrent":
            ratios.append(ratio_entry(f"delivered / producer rate, {where}", r["vs_producer"]))
    return {
        "title": TITLE,
        "settings": {"H": h, "batch": batch, "reps": reps, "tmp": tempfile.gettempdir()},
        "rows": rows,
        "ratios": ratios,
        "targets": [],
    }


def render(res: dict[str, Any]) -> str:
    st = res["settings"]
    lines = [
        f"### {res['title']}, H={st['H']}, batch {st['batch']}",
        "",
        "| S | MB/sample | mode | workers | samples | samples/s | GB/s to step | memcpy GB/s | delivered/memcpy "
        "| step waited | producer's put rate, samples/s | delivered/producer |",
        "|---" * 12 + "|",
    ]
    for r in res["rows"]:
        per_producer = f"{r['vs_producer']:.2f}" if r["mode"] == "concurrent" else "-"
        lines.append(
            f"| {r['S']} | {r['nbytes'] / 1e6:.1f} | {r['mode']} | {r['workers']} | {r['samples']} "
            f"| {r['samples_per_s']:.1f} | {r['gbps']:.2f} | {r['memcpy_gbps']:.1f} | {r['vs_memcpy']:.3f} "
            f"| {r['wait_fraction']:.0%} | {r['producer_samples_per_s']:.1f} | {per_producer} |"
        )
    lines += [
        "",
        "*concurrent*: the producer (one spawned process) writes while the loader reads, on the same machine, "
        "with a byte budget of max(4, 4 x batch) samples; the clock starts when it starts writing. "
        "*prefilled*: the producer writes the whole pool first and the clock starts after: the loader's own "
        "ceiling with no producer competing for the cores. *workers* are DataLoader workers (forked). "
        "*step waited* = time in `next(loader)` / loop wall time. *producer's put rate* = samples / the "
        "producer's own put loop time in the same run (in concurrent mode it includes waits for its budget). "
        f"Store: `file://` in {st['tmp']} (page cache, no fsync); ledger: SQLite. The no-op step checks the "
        "batch shape, acks, and marks the step durable (which frees the bytes). "
        f"{medians_of(st['reps'], capital=True)}.",
    ]
    return "\n".join(lines)
