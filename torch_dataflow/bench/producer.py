"""Scenario ``producer``: ``FeatureWriter.put`` of one EAGLE3 sample against a raw
``os.writev`` of the same bytes, measured in the same run (issue 14 item 6).

Per sequence length S (H=4096; the sample as SpecForge writes it: ``input_ids``,
``loss_mask``, ``hidden_state`` [1,S,H] and ``aux_hidden_state`` [1,S,3H] bf16):

- ``raw``: what a direct caller does at best: ``os.open`` a fresh file
  (``O_CREAT | O_EXCL``) in the store's file system, one ``os.writev`` of the
  already encoded parts, ``close``. No encoding, no checksum, no rename, no ledger.
- ``raw_rename``: the same into a temporary name, then ``os.rename``: the
  floor of any writer that publishes atomically (readers never see half a file).
- ``encode``: ``codec.encode`` alone (layout, JSON header, the xxh3 pass over
  every byte): the part of a put that the file system does not pay.
- ``store_write``: ``SharedDirStore._write`` of the pre-encoded parts (temp file,
  write, rename): the store's write path without the encode.
- ``store_put``: ``SharedDirStore.put`` (encode + write).
- ``writer_put``: ``FeatureWriter.put`` with a SQLite ledger (reserve, put, commit).
- ``writer_put_many``: ``FeatureWriter.put_many`` of 8 samples (one reserve and one
  commit for the 8), per sample: what batching the ledger round trips saves.

With ``fsync``, the store is ``fsync=True`` and ``raw`` syncs the file and then
its directory: the same host-crash durability (a direct caller that wants the
new name to survive a power cut must sync the directory too).

Every method writes the same number of files of the same size, one per call,
into directories that exist already (the store's 256 fan-out directories are
created before the clock starts, as they are after a producer's first few
thousand puts); each file is deleted after its call, untimed, so no method
inherits another's dirty pages. Methods run round robin, one call each per
round, so load drift on the shared machine hits them alike. Target (reported,
never asserted): ``writer_put`` >= 0.9 of ``raw`` at S=512 and S=2048, no fsync.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import codec
from ..producer import FeatureWriter
from ..refs import SampleRef
from ..stores.shared_dir import SharedDirStore, _mkdir_private
from ._util import Settings, eagle3_sample, medians_of, ratio_entry, table_head, target

TITLE = "Producer: FeatureWriter.put vs raw os.writev of the same bytes"
METHODS = ("raw", "raw_rename", "encode", "store_write", "store_put", "writer_put", "writer_put_many")
MANY = 8  # samples per put_many call (one reserve and one commit for all of them)
TARGET_S = (512, 2048)
GOAL = 0.9

_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _writev_all(fd: int, parts: list[Any]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


def _fsync_dir(d: str) -> None:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _round_robin(fns: dict[str, Callable[[int], Any]], cleanups: dict[str, Callable[[int], Any]],
                 reps: int) -> dict[str, float]:
    """Median seconds per method; one call of each per round, the start rotating."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(-1, reps):  # round -1 warms up (lazy attach, allocator growth)
        order = names[r % len(names):] + names[: r % len(names)] if r >= 0 else names
        for n in order:
            t0 = time.perf_counter()
            fns[n](r)
            dt = time.perf_counter() - t0
            if r >= 0:
                times[n].append(dt)
            if n in cleanups:
                cleanups[n](r)
    return {n: statistics.median(ts) for n, ts in times.items()}


def bench_one(s: int, h: int, reps: int, tmp: Path, *, fsync: bool) -> dict[str, Any]:
    """Median seconds of each method for one sample of sequence length ``s``."""
    sample = eagle3_sample(s, h)
    enc = codec.encode(sample)
    parts, nbytes = enc.parts(), enc.nbytes
    tag = f"{s}{'-fsync' if fsync else ''}"
    raw_dir = tmp / f"raw-{tag}"
    raw_dir.mkdir()
    store = SharedDirStore(tmp / f"store-{tag}", fsync=fsync)
    wstore = SharedDirStore(tmp / f"wstore-{tag}", fsync=fsync)
    writer = FeatureWriter(wstore, f"sqlite:///{tmp}/ledger-{tag}.db", name="bench-producer")
    for st in (store, wstore):  # the fan-out directories a producer in steady state finds in place
        st._check_auth()
        for i in range(256):
            _mkdir_private(os.path.join(st.root, f"{i:02x}"))
    refs: dict[tuple[str, int], SampleRef] = {}

    def raw_write(name: str, final: str | None = None) -> None:
        fd = os.open(raw_dir / name, _O_NEW, 0o600)
        try:
            _writev_all(fd, parts)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if final is not None:
            os.rename(raw_dir / name, raw_dir / final)
        if fsync:
            _fsync_dir(str(raw_dir))

    def raw(i: int) -> None:
        raw_write(f"r{i}")

    def raw_rename(i: int) -> None:
        raw_write(f".n{i}.tmp", f"n{i}")

    def store_write(i: int) -> None:
        store._write(f"w{i + 10}", 1, parts, nbytes)

    def store_put(i: int) -> None:
        refs["p", i] = store.put(f"p{i + 10}", 1, sample)

    def writer_put(i: int) -> None:
        refs["f", i] = writer.put(f"f{i + 10}", sample)

    def writer_put_many(i: int) -> None:
        for k, ref in enumerate(writer.put_many((f"m{i + 10}-{k}", sample) for k in range(MANY))):
            refs["m", i, k] = ref

    def drop_many(i: int) -> None:
        for k in range(MANY):
            wstore.delete(refs.pop(("m", i, k)))

    fns: dict[str, Callable[[int], Any]] = {
        "raw": raw, "raw_rename": raw_rename, "encode": lambda i: codec.encode(sample), "store_write": store_write,
        "store_put": store_put, "writer_put": writer_put, "writer_put_many": writer_put_many,
    }
    cleanups: dict[str, Callable[[int], Any]] = {
        "raw": lambda i: os.unlink(raw_dir / f"r{i}"),
        "raw_rename": lambda i: os.unlink(raw_dir / f"n{i}"),
        "store_write": lambda i: store._delete(f"w{i + 10}", 1),
        "store_put": lambda i: store.delete(refs.pop(("p", i))),
        "writer_put": lambda i: wstore.delete(refs.pop(("f", i))),  # the bytes only: the ledger is a scratch one
        "writer_put_many": drop_many,
    }
    try:
        med = _round_robin(fns, cleanups, reps)
    finally:
        writer.close()
        writer.ledger.close()
    med["writer_put_many"] /= MANY  # per sample
    out: dict[str, Any] = {"S": s, "H": h, "nbytes": nbytes, "fsync": fsync, "reps": reps, **med}
    out["gbps"] = {m: nbytes / med[m] / 1e9 for m in METHODS}
    out["ratios"] = {m: med["raw"] / med[m] for m in METHODS if m != "raw"}
    return out


def run(cfg: Settings) -> dict[str, Any]:
    """S=512 and 2048 at H=4096 (quick: S=32 and 128 at H=256), no fsync, then the first S with fsync."""
    h, seqs = (256, (32, 128)) if cfg.quick else (4096, (512, 2048))
    reps = cfg.reps(15, 3)
    tmp = Path(tempfile.mkdtemp(prefix="td-bench-producer-"))
    load0 = os.getloadavg()[0]
    try:
        rows = [bench_one(s, h, reps, tmp, fsync=False) for s in seqs]
        rows += [bench_one(seqs[0], h, reps, tmp, fsync=True)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [ratio_entry(f"writer.put / raw writev, S={r['S']}{', fsync' if r['fsync'] else ''}",
                          r["ratios"]["writer_put"], GOAL if not r["fsync"] and r["S"] in TARGET_S else None)
              for r in rows]
    ratios += [ratio_entry(f"store.put / raw writev, S={r['S']}", r["ratios"]["store_put"])
               for r in rows if not r["fsync"]]
    plain = [r for r in rows if not r["fsync"]]
    at = [r for r in plain if r["S"] in TARGET_S] or plain[-1:]  # quick has no S=512: its largest S stands in
    targets = [target(f"FeatureWriter.put vs raw os.writev (S={r['S']}, H={r['H']}, no fsync)",
                      r["ratios"]["writer_put"], GOAL, quick=cfg.quick) for r in at]
    return {
        "title": TITLE,
        "settings": {"H": h, "S": list(seqs), "reps": reps, "tmp": tempfile.gettempdir(),
                     "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]},
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
    }


def render(res: dict[str, Any]) -> str:
    """The markdown table of one run (docs/benchmarks.md, section ``producer``)."""
    st = res["settings"]
    lines = table_head(f"### {res['title']}, H={st['H']}", [
        "S", "MB", "fsync", "raw writev", "raw + rename", "encode", "store write (pre-encoded)", "store.put",
        "writer.put", "writer.put_many, per sample", "raw/rename", "raw/store write", "raw/store.put", "raw/writer.put",
        "raw/put_many",
    ])
    for r in res["rows"]:
        q = r["ratios"]
        cells = [f"{r[m] * 1e3:.2f} ms" + (f" ({r['gbps'][m]:.2f} GB/s)" if m != "encode" else "") for m in METHODS]
        lines.append(
            f"| {r['S']} | {r['nbytes'] / 1e6:.2f} | {'yes' if r['fsync'] else 'no'} | " + " | ".join(cells)
            + f" | {q['raw_rename']:.2f} | {q['store_write']:.2f} | {q['store_put']:.2f} | {q['writer_put']:.2f} "
            f"| {q['writer_put_many']:.2f} |"
        )
    lo, hi = st["load_1m"]
    lines += [
        "",
        "*raw writev*: `os.open(O_CREAT|O_EXCL)` + one `os.writev` of the encoded parts + `close` (no encode, "
        "no checksum, no rename, no ledger); *raw + rename*: the same to a temporary name, then `os.rename` "
        "(the floor of an atomic publish); *encode*: `codec.encode` alone (JSON header + the xxh3 pass); "
        "*store write*: `SharedDirStore._write` of pre-encoded parts; *writer.put*: `FeatureWriter.put` with a "
        "SQLite ledger (reserve + put + commit); *put_many*: `FeatureWriter.put_many` of 8 samples (one reserve, "
        "one commit), time per sample. With fsync the store syncs file and directory, and so does raw. "
        "Ratios are raw time / method time (target: writer.put >= 0.9 at S=512 and 2048, no fsync). Same file "
        "count and sizes for every method, fan-out directories created beforehand, each file deleted after its "
        f"call (untimed), methods round robin. Files in {st['tmp']} (page cache). "
        f"{medians_of(st['reps'], 'round', capital=True)}; 1-minute load {lo} at the start, {hi} at the end.",
    ]
    return "\n".join(lines)
