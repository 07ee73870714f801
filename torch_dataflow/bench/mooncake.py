"""Scenario ``mooncake``: our Mooncake store vs raw Mooncake ``put_from`` /
``get_into`` / ``batch_get_into``, in the same run, on loopback TCP.

Two placements: *same process* (this process holds the segment: local copies)
and *cross process* (a ``mooncake_client`` store server holds the segment and
this process contributes none, so every put and get crosses loopback TCP).

*raw* is the best a direct caller of the Mooncake API does: one buffer
registered once and reused, the same object size as ours, warm-up calls, and
each put's object removed (untimed) before the next, so raw and ours both write
into segment memory that has been touched before. (A new key per put in a fresh
segment pays the segment's first-touch page faults: measured 4x slower at
16 MiB, which made an earlier raw figure no floor at all.) *ours* is
``MooncakeStore.put`` / ``get`` of one tensor (encode + xxh3, zero-copy
transfer, verified decode into memory the caller owns), with ``transfer=direct``
(the default) and ``transfer=staging``. Raw and ours alternate call by call
(the order rotating), so a load change on a shared machine hits both alike.

*batch*: ``B`` samples read into one batch buffer: raw is one
``batch_get_into`` of the ``B`` objects into a registered buffer; ours is
:func:`~torch_dataflow.batch_read.read_batch` (one
``batch_get_into_multi_buffers`` into the pooled batch buffer, xxh3 verified
over the bytes where they landed).

Target (reported, never asserted): ours >= 90% of raw. Needs the ``mooncake``
package and ``mooncake_master``; without them the scenario is skipped with the reason.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._util import Settings, memcpy_s, ratio_entry, target

TITLE = "Mooncake store vs raw put_from / get_into / batch_get_into (loopback TCP)"
SIZES = {"64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}
REPS = {64 << 10: 200, 1 << 20: 60, 16 << 20: 15}
BATCHES = {"32 x 64 KiB": (32, 64 << 10), "8 x 1 MiB": (8, 1 << 20)}
BATCH_REPS = 40
TARGET = 0.9


def unavailable() -> str | None:
    """Why Mooncake cannot be benchmarked here, or ``None``."""
    try:
        import mooncake.store  # noqa: F401

        from ..stores.mooncake_master import find_master_binary

        find_master_binary()
    except Exception as e:  # ImportError, missing libibverbs, ConfigError: all mean "not here"
        return f"{type(e).__name__}: {e}"
    return None


def interleaved(
    fns: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]], reps: int, warmup: int = 5
) -> dict[str, float]:
    """Median seconds of each ``fn`` over ``reps`` calls, the calls of all of them
    alternating (order rotating each round); ``cleanup`` runs untimed after each call."""
    names = list(fns)
    for _ in range(warmup):
        for fn, cleanup in fns.values():
            fn()
            if cleanup:
                cleanup()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            fn, cleanup = fns[n]
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
            if cleanup:
                cleanup()
    return {n: statistics.median(t) for n, t in times.items()}


def _xxh3_s(nbytes: int, reps: int) -> float:
    import xxhash

    buf = memoryview(torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy())
    return interleaved({"x": (lambda: xxhash.xxh3_64(buf).hexdigest(), None)}, max(reps, 5), warmup=2)["x"]


def _bench_size(store: Any, staging: Any, nbytes: int, reps: int) -> dict[str, float]:
    c = store._client()
    raw, cfg = c.connect(), c.put_cfg
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    # The same object size as ours (our blob adds a header): the same bytes move.
    blob = store.put(f"size-{uuid.uuid4().hex[:8]}", 1, {"x": src})
    store.delete(blob)
    src = torch.cat([src, torch.zeros(blob.nbytes - nbytes, dtype=torch.uint8)])
    dst = torch.empty(blob.nbytes, dtype=torch.uint8)
    assert raw.register_buffer(src.data_ptr(), src.numel()) == 0
    assert raw.register_buffer(dst.data_ptr(), dst.numel()) == 0
    tag = uuid.uuid4().hex[:8]
    key = f"bench/raw-{tag}"
    tensors = {"x": src[:nbytes].clone()}  # not the registered buffer: our put registers its own memory
    try:

        def raw_put() -> None:
            assert raw.put_from(key, src.data_ptr(), blob.nbytes, cfg) == 0

        def raw_remove() -> None:
            raw.remove(key, True)

        fns: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {"raw put": (raw_put, raw_remove)}
        gens = iter(range(1, 1 << 30))
        for name, s in (("ours", store), ("ours staging", staging)):
            last: list[Any] = []

            def put(s: Any = s, last: list[Any] = last) -> None:
                last.append(s.put(f"b-{tag}", next(gens), tensors))

            def drop(s: Any = s, last: list[Any] = last) -> None:
                s.delete(last.pop())

            fns[f"{name} put"] = (put, drop)
        out = interleaved(fns, reps)

        raw_put()  # the objects every get reads
        refs = {name: s.put(f"g-{tag}", 1, tensors) for name, s in (("ours", store), ("ours staging", staging))}
        gets: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
            "raw get": (lambda: raw.get_into(key, dst.data_ptr(), blob.nbytes), None),
            "ours get": (lambda: store.get(refs["ours"]), None),
            "ours staging get": (lambda: staging.get(refs["ours staging"]), None),
        }
        out.update(interleaved(gets, reps))
        assert raw.get_into(key, dst.data_ptr(), blob.nbytes) == blob.nbytes and torch.equal(dst, src)
        assert torch.equal(store.get(refs["ours"])["x"], tensors["x"])
        raw_remove()
        store.delete(refs["ours"])
        staging.delete(refs["ours staging"])
        for s in (store, staging):
            s.gc(force=True)
    finally:
        raw.unregister_buffer(src.data_ptr())
        raw.unregister_buffer(dst.data_ptr())
    return out


class _Rows:
    """A batch layout of one row per sample: what a collator declares to batch_read."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def plan_batch(self, specs: Sequence[Any]) -> Any:
        from ..batch_read import BatchPlan

        return BatchPlan(
            shapes={"x": (torch.uint8, (len(specs), self.nbytes))}, rows=[{"x": ("x", self.nbytes)}] * len(specs)
        )

    def finish_batch(self, batch: dict[str, torch.Tensor], plan: Any) -> dict[str, Any]:
        return batch


def _bench_batch(store: Any, b: int, nbytes: int, reps: int) -> dict[str, float]:
    from ..batch_read import BufferPool, read_batch

    c = store._client()
    raw, cfg = c.connect(), c.put_cfg
    tag = uuid.uuid4().hex[:8]
    samples = [{"x": torch.randint(0, 255, (nbytes,), dtype=torch.uint8)} for _ in range(b)]
    refs = [store.put(f"bb-{tag}-{i}", 1, t) for i, t in enumerate(samples)]
    size = refs[0].nbytes  # raw objects as large as ours: the same bytes move
    src = torch.randint(0, 255, (size,), dtype=torch.uint8)
    dst = torch.empty(b * size, dtype=torch.uint8)
    keys = [f"bench/rawb-{tag}-{i}" for i in range(b)]
    assert raw.register_buffer(src.data_ptr(), size) == 0 and raw.register_buffer(dst.data_ptr(), dst.numel()) == 0
    try:
        assert all(raw.put_from(k, src.data_ptr(), size, cfg) == 0 for k in keys)
        ptrs, sizes = [dst.data_ptr() + i * size for i in range(b)], [size] * b
        pool, layout = BufferPool(max_buffers=2), _Rows(nbytes)

        def ours() -> None:
            read_batch(store, refs, layout, buffers=pool)

        # What the store adds alone: the same landing (headers apart, data in rows), no verification.
        land = torch.empty(b * nbytes, dtype=torch.uint8)
        heads = [bytearray(size - nbytes) for _ in range(b)]
        rowv = memoryview(land.numpy())
        views = [[memoryview(heads[i]), rowv[i * nbytes : (i + 1) * nbytes]] for i in range(b)]

        def landing() -> None:
            store.read_blobs_into(refs, views, None, owner=land)

        out = interleaved(
            {
                "raw batch": (lambda: raw.batch_get_into(keys, ptrs, sizes), None),
                "ours batch": (ours, None),
                "ours landing": (landing, None),
            },
            reps,
        )
        got = read_batch(store, refs, layout, buffers=pool)
        assert got is not None and all(torch.equal(got["x"][i], s["x"]) for i, s in enumerate(samples))
        del got
        raw.batch_remove(keys, True)
        for r in refs:
            store.delete(r)
        store.gc(force=True)
    finally:
        raw.unregister_buffer(src.data_ptr())
        raw.unregister_buffer(dst.data_ptr())
    return out


def run(cfg: Settings) -> dict[str, Any]:
    why = unavailable()
    if why:
        return {"title": TITLE, "skipped": {"mooncake": why}, "rows": [], "ratios": [], "targets": []}
    from ..stores.mooncake import MooncakeStore
    from ..stores.mooncake_master import MooncakeMaster

    sizes = {k: v for k, v in SIZES.items() if not cfg.quick or v <= 1 << 20}
    batches = {k: v for k, v in BATCHES.items() if not cfg.quick or v[0] * v[1] <= 2 << 20}
    placements = (("same process", "1GiB"),) if cfg.quick else (("same process", "1GiB"), ("cross process", 0))
    rows: list[dict[str, Any]] = []
    batch_rows: list[dict[str, Any]] = []
    with MooncakeMaster(segment_size="1GiB") as master:
        for placement, segment in placements:
            ns = f"bench{uuid.uuid4().hex[:6]}"
            direct = MooncakeStore(master.address, segment_size=segment, namespace=ns, force_after=0)
            staging = MooncakeStore(
                master.address,
                segment_size=segment,
                namespace=ns + "s",
                transfer="staging",
                buffer_size="64MiB",
                force_after=0,
            )
            try:
                for label, nbytes in sizes.items():
                    reps = cfg.reps(REPS[nbytes], 5)
                    t = _bench_size(direct, staging, nbytes, reps)
                    row: dict[str, Any] = {"placement": placement, "size": label, "bytes": nbytes, "reps": reps}
                    for k, v in t.items():
                        row[f"{k} s"] = v
                        row[f"{k} GB/s"] = nbytes / v / 1e9
                    row["memcpy GB/s"] = nbytes / memcpy_s(nbytes, max(reps, 5)) / 1e9
                    row["xxh3 GB/s"] = nbytes / _xxh3_s(nbytes, reps) / 1e9
                    for op in ("put", "get"):
                        row[f"ratio {op}"] = t[f"raw {op}"] / t[f"ours {op}"]
                        row[f"ratio staging {op}"] = t[f"raw {op}"] / t[f"ours staging {op}"]
                    rows.append(row)
                for label, (b, nbytes) in batches.items():
                    reps = cfg.reps(BATCH_REPS, 5)
                    t = _bench_batch(direct, b, nbytes, reps)
                    batch_rows.append(
                        {
                            "placement": placement,
                            "batch": label,
                            "bytes": b * nbytes,
                            "reps": reps,
                            "raw batch GB/s": b * nbytes / t["raw batch"] / 1e9,
                            "ours batch GB/s": b * nbytes / t["ours batch"] / 1e9,
                            "ratio batch": t["raw batch"] / t["ours batch"],
                            "ours landing GB/s": b * nbytes / t["ours landing"] / 1e9,
                            "ratio landing": t["raw batch"] / t["ours landing"],
                        }
                    )
            finally:
                direct.close()
                staging.close()
                MooncakeStore.close_clients()  # the next placement is another client configuration
    ratios, targets = [], []
    for r in rows:
        for op in ("put", "get"):
            what = f"ours / raw {op}, {r['placement']}, {r['size']}"
            ratios.append(ratio_entry(what, r[f"ratio {op}"], TARGET))
            targets.append(target(f"Mooncake {what}", r[f"ratio {op}"], TARGET, quick=cfg.quick))
    for r in batch_rows:
        what = f"ours / raw batch read, {r['placement']}, {r['batch']}"
        ratios.append(ratio_entry(what, r["ratio batch"], TARGET))
        targets.append(target(f"Mooncake {what}", r["ratio batch"], TARGET, quick=cfg.quick))
    return {
        "title": TITLE,
        "settings": {"date": time.strftime("%Y-%m-%d")},
        "rows": rows + batch_rows,
        "ratios": ratios,
        "targets": targets,
        "skipped": {},
    }


def render(res: dict[str, Any]) -> str:
    if not res["rows"]:
        return f"### {res['title']}\n\nSkipped: {res['skipped'].get('mooncake')}."
    lines = [
        f"### {res['title']}, GB/s",
        "",
        "| placement | size | raw put | ours put | ours/raw | raw get | ours get | ours/raw "
        "| staging put / get vs raw | xxh3 | memcpy | reps |",
        "|---" * 12 + "|",
    ]
    batch = [r for r in res["rows"] if "batch" in r]
    for r in res["rows"]:
        if "batch" in r:
            continue
        lines.append(
            f"| {r['placement']} | {r['size']} | {r['raw put GB/s']:.2f} | {r['ours put GB/s']:.2f} "
            f"| {r['ratio put']:.0%} | {r['raw get GB/s']:.2f} | {r['ours get GB/s']:.2f} | {r['ratio get']:.0%} "
            f"| {r['ratio staging put']:.0%} / {r['ratio staging get']:.0%} | {r['xxh3 GB/s']:.1f} "
            f"| {r['memcpy GB/s']:.1f} | {r['reps']} |"
        )
    if batch:
        lines += [
            "",
            "| placement | batch | raw batch_get_into | ours read_batch | ours/raw | ours landing only "
            "| landing/raw | reps |",
            "|---" * 8 + "|",
        ]
        for r in batch:
            lines.append(
                f"| {r['placement']} | {r['batch']} | {r['raw batch GB/s']:.2f} | {r['ours batch GB/s']:.2f} "
                f"| {r['ratio batch']:.0%} | {r['ours landing GB/s']:.2f} | {r['ratio landing']:.0%} | {r['reps']} |"
            )
    lines += [
        "",
        "ours/raw = raw time / our time (target >= 90%). *raw*: `put_from`/`get_into`/`batch_get_into` with "
        "buffers registered once and reused, objects the size of ours, each put's object removed (untimed) before "
        "the next so both write warm segment memory; *ours*: `MooncakeStore.put`/`get` of one tensor (encode + "
        "xxh3, zero-copy transfer, verified decode into memory the caller owns); *staging*: `transfer=staging`; "
        "*ours read_batch*: `batch_read.read_batch` into a pooled batch buffer (one `batch_get_into_multi_buffers`, "
        "xxh3 over the landed bytes); *landing only*: the store's `read_blobs_into` alone, same destinations, "
        "no verification (what the store adds to raw). Raw and ours alternate call by call. xxh3 / memcpy: one "
        "hash / one copy of the same size in the same run (ours pays one xxh3 per put and per get). Medians of "
        "*reps* calls.",
    ]
    return "\n".join(lines)
