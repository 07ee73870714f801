"""Scenario ``peers``: our consumer path against the floors and the loaders users would pick
instead, in the same run, on the same EAGLE3 samples (page cache, batch 2, a step that
only acks).

Every (loader, S, workers) runs in a fresh process started from the fork server, so
each loader's peak RSS is its own: reported as the peak minus the process's RSS
before the loader was built (``ru_maxrss``; with workers, the largest worker's peak
minus the same baseline). One warm-up epoch, then the median epoch.

Loaders (rows): ``floor_preadv_huge`` (``preadv`` of each sample's tensors straight
into a preallocated, pre-touched huge-page batch buffer: the floor), ``floor_fresh_copy``
(read each file into fresh memory, one copy into a fresh batch tensor), ``ours_pool``
(``FeaturePool`` + ``ReshardingSampler`` + ``Eagle3Collator``: the batch-direct path; workers read
into the pool's reusable shared slots), ``ours_pool_no_slots`` (the same with ``worker_slots=0``: every
worker batch in fresh shared memory, the worker path before slots; rows with workers only),
``ours_pool_per_sample`` (the same with the per-sample path forced: what it was
before batch-direct reads), ``ours_dataset`` (``FeatureStoreDataset`` offline +
``FeatureLoader``: per-sample reads), ``specforge_offline`` (SpecForge 0.2.0
``OfflineEagle3Dataset`` over ``.ckpt`` files + ``DataCollatorWithPadding`` in a
``DataLoader``), ``specforge_runtime`` (SpecForge 0.2.0 ``SharedDirFeatureStore`` +
``FeatureDataLoader``; its ``num_workers`` are threads), ``litdata`` (when installed:
``StreamingDataset`` over ``optimize``'d chunks; bfloat16 stored as its int16 bit pattern,
which litdata 0.2.76 requires, viewed back in the collate).
SpecForge is installed ``--no-deps``: its data modules import ``datasets`` and
``transformers`` for type names only, so stand-ins for those two names are installed
in the peer's process when the packages are absent (the loaders' code runs as shipped).

SpecForge calls ``torch.load(..., weights_only=False)``; this harness never unpickles
unrestricted bytes, so its ``torch.load`` runs with ``weights_only=True`` forced (the
same I/O; only the unpickler's allowed globals differ). Files live in a temporary
directory on the local disk (read from the page cache).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import math
import mmap
import os
import resource
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ._util import Settings, eagle3_sample, medians_of, mp_context, ratio_entry, target

TITLE = "Peers: our loader vs the floors and the loaders users would pick instead"
FLOOR = "floor_preadv_huge"
METHODS = ("floor_preadv_huge", "floor_fresh_copy", "ours_pool", "ours_pool_no_slots", "ours_pool_per_sample",
           "ours_dataset",
           "specforge_offline", "specforge_runtime", "litdata")
FLOORS = ("floor_preadv_huge", "floor_fresh_copy")
PEERS = ("specforge_offline", "specforge_runtime", "litdata")
WORKERS_ONLY = ("ours_pool_no_slots",)  # identical to ours_pool with 0 workers
BATCH = 2


def _rss_kb() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


@contextlib.contextmanager
def _weights_only() -> Any:
    """Force ``torch.load(weights_only=True)`` for the peers (they pass ``False``)."""
    orig = torch.load

    @functools.wraps(orig)
    def safe(*a: Any, **kw: Any) -> Any:
        kw["weights_only"] = True
        return orig(*a, **kw)

    torch.load = safe  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = orig  # type: ignore[assignment]


class _PerSample:
    """A collate that reads per sample first (the path before batch-direct reads)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, samples: Any) -> Any:
        return self.collate(list(samples))


def _ctx(workers: int) -> dict[str, Any]:
    """Every loader's workers start the same way: forked from the loader's process."""
    return {"multiprocessing_context": "fork"} if workers else {}


def _epochs(make_iter: Any, step: Any, reps: int, n: int) -> list[float]:
    """Seconds per epoch: one warm-up, then ``reps`` timed."""
    times = []
    for e in range(reps + 1):
        t0 = time.perf_counter()
        got = 0
        for batch in make_iter(e):
            step(batch)
            got += BATCH
        if got < n:
            raise RuntimeError(f"epoch {e} delivered {got} of {n} samples")
        if e:
            times.append(time.perf_counter() - t0)
    return times


def _floor_preadv(paths: list[str], reps: int, n: int) -> list[float]:
    from .. import codec

    headers = []
    for p in paths:
        with open(p, "rb") as f:
            blob = f.read()
        specs, _, off = codec.read_header(blob)
        headers.append((off, [sp.nbytes for sp in specs]))
    per = sum(headers[0][1])
    size = -(-(BATCH * per) // (2 << 20)) * (2 << 20)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):
        m.madvise(mmap.MADV_HUGEPAGE)
    torch.frombuffer(m, dtype=torch.uint8).zero_()  # pre-touched: the floor pays no page fault
    buf = memoryview(m)
    scratch = bytearray(max(off for off, _ in headers))

    def batches(e: int) -> Any:
        for b in range(0, n, BATCH):
            for j in range(BATCH):
                off, sizes = headers[b + j]
                views, pos = [memoryview(scratch)[:off]], j * per
                for sz in sizes:
                    views.append(buf[pos : pos + sz])
                    pos += sz
                fd = os.open(paths[b + j], os.O_RDONLY)
                try:
                    os.preadv(fd, views, 0)
                finally:
                    os.close(fd)
            yield buf

    return _epochs(batches, lambda b: None, reps, n)


def _floor_fresh(paths: list[str], reps: int, n: int) -> list[float]:
    def batches(e: int) -> Any:
        for b in range(0, n, BATCH):
            out = None
            for j in range(BATCH):
                fd = os.open(paths[b + j], os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    t = torch.empty(size, dtype=torch.uint8)
                    os.readv(fd, [memoryview(t.numpy())])
                finally:
                    os.close(fd)
                if out is None:
                    out = torch.empty(BATCH, size, dtype=torch.uint8)
                out[j].copy_(t)  # the one copy
            yield out

    return _epochs(batches, lambda b: None, reps, n)


def _ours_pool(store: str, ledger: str, s: int, workers: int, reps: int, n: int, direct: bool,
               slots: int = 8) -> list[float]:
    from torch.utils.data import DataLoader

    from ..eagle3 import Eagle3Collator
    from ..pool import FeaturePool
    from ..sampler import ReshardingSampler

    pool = FeaturePool(store, ledger, worker_slots=slots)
    sampler = ReshardingSampler(pool, shuffle=False, lease_ttl=600)
    collate: Any = Eagle3Collator(max_len=s)
    if not direct:
        collate = _PerSample(collate)
    loader = DataLoader(pool, batch_size=BATCH, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, **_ctx(workers), collate_fn=collate)
    steps = iter(range(1, 1 << 30))

    def batches(e: int) -> Any:
        sampler.set_epoch(e)
        return iter(loader)

    return _epochs(batches, lambda b: pool.ack(b, next(steps)), reps, n)


def _ours_dataset(store: str, ledger: str, s: int, workers: int, reps: int, n: int) -> list[float]:
    from ..dataset import FeatureStoreDataset
    from ..eagle3 import Eagle3Collator
    from ..loader import FeatureLoader

    ds = FeatureStoreDataset(store, ledger, mode="offline", shuffle=False, lease_ttl=600, poll=0.005)
    loader = FeatureLoader(ds, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0, **_ctx(workers),
                           collate_fn=Eagle3Collator(max_len=s))
    steps = iter(range(1, 1 << 30))

    def batches(e: int) -> Any:
        ds.set_epoch(e)
        return iter(loader)

    return _epochs(batches, lambda b: ds.ack(b, next(steps)), reps, n)


def _specforge_data() -> None:
    """Import ``specforge.data`` under ``--no-deps``: its modules import ``datasets`` and
    ``transformers`` for type names only (the offline dataset and collator are plain
    torch), so stand-ins of those names are installed when the packages are absent."""
    import importlib.util
    import sys
    import types

    for name, attrs in {"datasets": ("Dataset",), "transformers": ("PreTrainedTokenizer",)}.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            mod = types.ModuleType(name)
            for a in attrs:
                setattr(mod, a, type(a, (), {}))
            sys.modules[name] = mod


def _specforge_offline(ckpt_dir: str, s: int, workers: int, reps: int, n: int) -> list[float]:
    _specforge_data()
    from specforge.data.preprocessing import OfflineEagle3Dataset
    from specforge.data.utils import DataCollatorWithPadding
    from torch.utils.data import DataLoader

    files = sorted(glob.glob(os.path.join(ckpt_dir, "*.ckpt")))
    ds = OfflineEagle3Dataset(files, max_len=s)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0, **_ctx(workers),
                        collate_fn=DataCollatorWithPadding())
    return _epochs(lambda e: iter(loader), lambda b: None, reps, n)


def _specforge_runtime(root: str, sample: dict[str, torch.Tensor], s: int, workers: int, reps: int,
                       n: int) -> list[float]:
    _specforge_data()
    from specforge.data.preprocessing import OfflineEagle3Dataset
    from specforge.data.utils import DataCollatorWithPadding
    from specforge.runtime.data_plane.disaggregated import SharedDirFeatureStore
    from specforge.runtime.data_plane.feature_dataloader import FeatureDataLoader

    store = SharedDirFeatureStore(root, retain_on_release=True)
    refs = [store.put(sample, sample_id=f"s{i:05d}", metadata={}) for i in range(n)]  # untimed

    def transform(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return OfflineEagle3Dataset.process_data(d, s)

    loader = FeatureDataLoader(store, refs=refs, batch_size=BATCH, collate_fn=DataCollatorWithPadding(),
                               per_sample_transform=transform, num_workers=workers, ack=False, gc_interval_s=None)
    return _epochs(lambda e: iter(loader), lambda b: None, reps, n)


def _litdata(root: str, s: int, workers: int, reps: int, n: int) -> list[float]:
    import litdata
    from torch.utils.data import DataLoader

    from ..eagle3 import Eagle3Collator

    if os.path.exists(root + ".error"):
        raise ImportError(f"litdata could not write the dataset: {Path(root + '.error').read_text()}")
    loader = DataLoader(litdata.StreamingDataset(root), batch_size=BATCH, num_workers=workers,
                        persistent_workers=workers > 0, **_ctx(workers),
                        collate_fn=_Bf16Back(Eagle3Collator(max_len=s)))
    return _epochs(lambda e: iter(loader), lambda b: None, reps, n)


def _child(method: str, s: int, h: int, n: int, workers: int, reps: int, tmp: str, out: Any) -> None:
    """One loader in its own process: epoch times and peak RSS over the starting RSS."""
    torch.set_num_threads(1)
    try:
        base = _rss_kb()
        paths = sorted(glob.glob(f"{tmp}/store/*/*.tdf"))
        ledger = f"{tmp}/ledger-{method}-{workers}.db"
        for suffix in ("", "-wal"):
            if os.path.exists(f"{tmp}/ledger.db{suffix}"):
                shutil.copy(f"{tmp}/ledger.db{suffix}", ledger + suffix)
        store, led = f"file://{tmp}/store", f"sqlite://{ledger}"
        with _weights_only():
            if method == "floor_preadv_huge":
                times = _floor_preadv(paths, reps, n)
            elif method == "floor_fresh_copy":
                times = _floor_fresh(paths, reps, n)
            elif method in ("ours_pool", "ours_pool_per_sample", "ours_pool_no_slots"):
                times = _ours_pool(store, led, s, workers, reps, n, direct=method != "ours_pool_per_sample",
                                   slots=0 if method == "ours_pool_no_slots" else 8)
            elif method == "ours_dataset":
                times = _ours_dataset(store, led, s, workers, reps, n)
            elif method == "specforge_offline":
                times = _specforge_offline(f"{tmp}/ckpt", s, workers, reps, n)
            elif method == "specforge_runtime":
                times = _specforge_runtime(f"{tmp}/sfrt-{workers}", eagle3_sample(s, h), s, workers, reps, n)
            else:
                times = _litdata(f"{tmp}/litdata", s, workers, reps, n)
        import gc  # the loaders (and their workers) ended with their frames: reap before reading rusage

        gc.collect()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out.put({"times": times, "rss_mb": (peak - base) / 1024,
                 "worker_rss_mb": (kids - base) / 1024 if workers and kids > base else None})
    except ImportError as e:
        out.put({"skipped": f"{type(e).__name__}: {e}"})
    except Exception as e:  # reported in the table, never hidden
        out.put({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)})


def _prepare(tmp: Path, s: int, h: int, n: int) -> None:
    from ..producer import FeatureWriter

    sample = eagle3_sample(s, h)
    with FeatureWriter(f"file://{tmp}/store", f"sqlite://{tmp}/ledger.db") as w:
        for i in range(n):
            w.put(f"s{i:05d}", sample)
    (tmp / "ckpt").mkdir()
    for i in range(n):  # SpecForge's offline layout: one torch.save'd dict per sample
        torch.save(sample, tmp / "ckpt" / f"data_{i:05d}.ckpt")
    # litdata's optimize sets the global start method to spawn: keep that out of this process.
    p = mp_context().Process(target=_litdata_prepare, args=(str(tmp), s, h, n))
    p.start()
    p.join(600)


def _litdata_prepare(tmp: str, s: int, h: int, n: int) -> None:
    try:
        import litdata

        litdata.optimize(fn=_litdata_item, inputs=[(s, h, i) for i in range(n)], output_dir=f"{tmp}/litdata",
                         chunk_bytes="256MB", num_workers=1, mode="overwrite")
    except Exception as e:  # the litdata rows say why
        Path(f"{tmp}/litdata.error").write_text(f"{type(e).__name__}: {str(e)[:200]}")


def _litdata_item(args: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    s, h, _ = args
    # litdata 0.2.76 cannot serialise bfloat16: store the bit pattern as int16 (viewed back, free).
    return {k: v.view(torch.int16) if v.dtype == torch.bfloat16 else v for k, v in eagle3_sample(s, h).items()}


class _Bf16Back:
    """Collate for litdata's rows: view the int16 bit patterns back as bfloat16, then collate."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> Any:
        keys = ("hidden_state", "aux_hidden_state")
        return self.collate([{k: v.view(torch.bfloat16) if k in keys else v for k, v in x.items()} for x in samples])


def _result(q: Any, p: Any, timeout: float) -> dict[str, Any]:
    """The child's result; an error row (never a wait to the timeout) if it died without one."""
    import queue

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not p.is_alive():
                with contextlib.suppress(queue.Empty):
                    return q.get(timeout=1.0)  # put just before it exited
                return {"error": f"the loader's process exited with code {p.exitcode} before reporting"}
    return {"error": f"no result within {timeout:.0f} s"}


def bench_size(s: int, h: int, n: int, reps: int, workers_list: tuple[int, ...]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"td-peers-{s}-"))
    rows: dict[str, Any] = {}
    try:
        _prepare(tmp, s, h, n)
        ctx = mp_context()
        for method in METHODS:
            for w in workers_list:
                if (w and method in FLOORS) or (not w and method in WORKERS_ONLY):
                    continue
                q = ctx.Queue()
                p = ctx.Process(target=_child, args=(method, s, h, n, w, reps, str(tmp), q))  # its workers are children
                p.start()
                try:
                    res = _result(q, p, timeout=900)
                finally:
                    p.join(60)
                    if p.is_alive():
                        p.kill()
                        p.join()
                if "times" in res:
                    res["samples_s"] = n / statistics.median(res["times"])
                rows[f"{method}/{w}"] = res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"S": s, "H": h, "n": n, "reps": reps, "rows": rows}


def run(cfg: Settings) -> dict[str, Any]:
    h = 256 if cfg.quick else 4096
    sizes = ((128, 8),) if cfg.quick else ((512, 32), (2048, 12))
    reps = cfg.reps(3, 1)
    res: dict[str, Any] = {"sizes": [bench_size(s, h, n, reps, (0, 2)) for s, n in sizes], "cores": os.cpu_count()}
    # One flat row per (S, loader, workers), as the other scenarios report them.
    res["rows"] = {f"S={size['S']}/{key}": {k: v for k, v in row.items() if k != "trace"}
                   for size in res["sizes"] for key, row in size["rows"].items()}
    targets, ratios = [], []
    for size in res["sizes"]:
        rows, s = size["rows"], size["S"]

        def rate(key: str, rows: dict[str, Any] = rows) -> float:
            return float(rows.get(key, {}).get("samples_s", math.nan))

        floor = rate(f"{FLOOR}/0")
        ours0, ours2 = rate("ours_pool/0"), rate("ours_pool/2")
        goal = 0.5 if s >= 2048 else 0.6
        targets.append(target(f"S={s}: ours_pool / preadv floor, 0 workers", ours0 / floor, goal, quick=cfg.quick))
        targets.append(target(f"S={s}: ours_pool 2 workers / 0 workers", ours2 / ours0, 1.0, quick=cfg.quick))
        ratios.append(ratio_entry(f"peers S={s}: ours_pool / floor", ours0 / floor, goal))
        for peer in PEERS:
            for w in (0, 2):
                p = rate(f"{peer}/{w}")
                if math.isfinite(p):
                    ours = rate(f"ours_pool/{w}")
                    peer_goal = 3.0 if s >= 2048 else 1.5
                    targets.append(target(f"S={s}, {w} workers: ours_pool / {peer}", ours / p, peer_goal,
                                          quick=cfg.quick))
    res["targets"], res["ratios"] = targets, ratios
    return res


def render(res: dict[str, Any]) -> str:
    lines = [f"### {TITLE}", ""]
    for size in res["sizes"]:
        rows = size["rows"]
        mb = None
        floor = rows.get(f"{FLOOR}/0", {}).get("samples_s", math.nan)
        lines += [f"S={size['S']}, H={size['H']}, batch {BATCH}, {size['n']} samples per epoch, "
                  f"{medians_of(size['reps'], 'epoch')} after a warm-up epoch.", "",
                  "| loader | workers | samples/s | / floor | ours_pool / this | peak RSS MB (main / worker) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for key, r in rows.items():
            method, w = key.split("/")
            if "samples_s" not in r:
                why = r.get("skipped") or r.get("error", "?")
                lines.append(f"| {method} | {w} | – ({why[:80]}) | | | |")
                continue
            ours = rows.get(f"ours_pool/{w}", {}).get("samples_s", math.nan)
            wr = r.get("worker_rss_mb")
            mb = f"{r['rss_mb']:.0f}" + (f" / {wr:.0f}" if wr is not None else "")
            lines.append(f"| {method} | {w} | {r['samples_s']:.1f} | {r['samples_s'] / floor:.2f} | "
                         f"{ours / r['samples_s']:.2f} | {mb} |")
        lines.append("")
    lines.append(f"Machine: {res.get('cores')} cores shared with other jobs (other sessions ran beside this one): "
                 "absolute rates move between runs; compare ratios within one table. Peak RSS is each "
                 "loader process's peak minus its RSS before the loader was built.")
    return "\n".join(lines)
