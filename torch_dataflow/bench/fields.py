"""Scenario ``fields``: field selection (``fields=``, issue 13 part 2) vs reading every tensor.

1. **Reads.** A pool of EAGLE3 samples (``input_ids``, ``loss_mask``,
   ``hidden_state`` [1,S,H], ``aux_hidden_state`` [1,S,3H]) in the shared-directory
   store, read per sample with ``store.get`` (every tensor) and with
   ``store.get_fields`` for two subsets: ``input_ids, loss_mask, hidden_state`` (an
   EAGLE3 training subset that skips the aux states) and ``input_ids, loss_mask``.
   Per mode, one pass over the pool per repeat, after a warm-up pass (the files
   are in the page cache: this measures the read path, not the disk): bytes read
   per sample (the kernel's ``rchar`` count for this process, ``/proc/self/io``),
   samples/s, and GB/s of tensor bytes returned. Ratios are to the full read of
   the same run.
2. **Loader.** The same through ``FeatureStoreDataset(mode="offline", fields=...)``
   with a SQLite ledger (lease, read, ack), one epoch per repeat.
3. **Checksum cost.** Format 2 hashes each tensor on its own (per-tensor sums
   for subset checks) where format 1 hashed one stream: both, over the same
   buffers; and ``decode`` (verify on) of a format-2 blob vs the same tensors as
   a format-1 blob.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import xxhash

from .. import codec
from ..dataset import FeatureStoreDataset
from ..producer import FeatureWriter
from ..stores import open_store
from ._util import Settings, eagle3_sample, medians_of, ratio_entry

TITLE = "Field selection: bytes read and samples/s"
SUBSETS = {
    "all fields": None,
    "input_ids, loss_mask, hidden_state": ("input_ids", "loss_mask", "hidden_state"),
    "input_ids, loss_mask": ("input_ids", "loss_mask"),
}


def _rchar() -> int:
    """Bytes this process read through read-family syscalls (preadv included)."""
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def _format1(enc: codec.Encoded) -> bytes:
    """The same tensors as a format-1 blob (one checksum over zeroed header + data)."""
    doc = json.loads(enc.header[8:])
    doc.pop("__metadata__")
    raw = json.dumps({"__metadata__": {"td.checksum": "0" * 16, "td.format": "1"}, **doc},
                     separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 16)
    head = struct.pack("<Q", len(raw)) + raw
    h = xxhash.xxh3_64(head)
    for b in enc.buffers:
        h.update(b)
    return head.replace(b"0" * 16, h.hexdigest().encode(), 1) + b"".join(bytes(b) for b in enc.buffers)


def reads(cfg: Settings, tmp: Path) -> list[dict[str, Any]]:
    s, h, n = (128, 256, 8) if cfg.quick else (1024, 4096, 16)
    reps = cfg.reps(5, 2)
    store = open_store(f"file://{tmp}/features")
    refs = [store.put(f"s{i:03d}", 1, eagle3_sample(s, h, seed=i)) for i in range(n)]
    def one_pass(fields: tuple[str, ...] | None) -> int:
        got = 0
        for ref in refs:
            out = store.get(ref) if fields is None else store.get_fields(ref, fields)
            got += sum(t.numel() * t.element_size() for t in out.values())
            del out
        return got

    def spans(fields: tuple[str, ...] | None) -> list[list[tuple[int, int]]]:
        """Per ref, the (offset, length) ranges a field read asks for (header included)."""
        out = []
        for ref in refs:
            if fields is None:
                out.append([(0, ref.nbytes)])
                continue
            pos, got = codec.header_size(ref.nbytes, ref.specs), [(0, codec.header_size(ref.nbytes, ref.specs))]
            for sp in ref.specs:
                if sp.name in fields:
                    if got[-1][0] + got[-1][1] == pos:
                        got[-1] = (got[-1][0], got[-1][1] + sp.nbytes)
                    else:
                        got.append((pos, sp.nbytes))
                pos += sp.nbytes
            out.append(got)
        return out

    scratch = memoryview(bytearray(refs[0].nbytes))
    paths = [store.path_of(r.sample_id, r.generation) for r in refs]  # type: ignore[attr-defined]

    def raw_pass(plan: list[list[tuple[int, int]]]) -> None:
        """The floor: the same ranges, preadv into one preallocated buffer, no checks."""
        for path, ranges in zip(paths, plan, strict=True):
            fd = os.open(path, os.O_RDONLY)
            try:
                for off, n in ranges:
                    os.preadv(fd, [scratch[:n]], off)
            finally:
                os.close(fd)

    plans = {label: spans(fields) for label, fields in SUBSETS.items()}
    times: dict[str, list[float]] = {k: [] for k in SUBSETS}
    raw: dict[str, list[float]] = {k: [] for k in SUBSETS}
    read: dict[str, list[int]] = {k: [] for k in SUBSETS}
    payload: dict[str, int] = {}
    for rep in range(reps + 1):  # interleaved modes: a shared machine's drift hits each alike
        for label, fields in SUBSETS.items():
            r0, t0 = _rchar(), time.perf_counter()
            payload[label] = one_pass(fields)
            t1 = time.perf_counter()
            r1 = _rchar()
            raw_pass(plans[label])
            if rep:  # the first round is the warm-up (page cache, allocator)
                times[label].append(t1 - t0)
                raw[label].append(time.perf_counter() - t1)
                read[label].append(r1 - r0)
    rows = []
    for label in SUBSETS:
        dt = statistics.median(times[label])
        rows.append({"mode": label, "S": s, "H": h, "samples": n, "reps": reps,
                     "blob_bytes": refs[0].nbytes, "read_bytes": statistics.median(read[label]) / n,
                     "payload_bytes": payload[label] / n, "samples_per_s": n / dt,
                     "raw_samples_per_s": n / statistics.median(raw[label]), "gb_per_s": payload[label] / dt / 1e9})
    return rows


def loader(cfg: Settings, tmp: Path) -> list[dict[str, Any]]:
    s, h, n = (128, 256, 8) if cfg.quick else (1024, 4096, 16)
    reps = cfg.reps(3, 1)
    store, ledger = f"file://{tmp}/loader", f"sqlite://{tmp}/loader.db"
    with FeatureWriter(store, ledger) as w:
        for i in range(n):
            w.put(f"s{i:03d}", eagle3_sample(s, h, seed=i))
    rows = []
    for label, fields in list(SUBSETS.items())[:2]:
        times, read = [], []
        for rep in range(reps + 1):  # the first epoch is the warm-up
            ds = FeatureStoreDataset(store, ledger, mode="offline", fields=fields, seed=rep)
            ds.set_epoch(rep + 100 * (fields is not None))
            r0, t0 = _rchar(), time.perf_counter()
            got = 0
            for step, sample in enumerate(ds, start=1):
                got += 1
                ds.ack(sample, step)
            if rep:
                times.append(time.perf_counter() - t0)
                read.append(_rchar() - r0)
            assert got == n, got
        rows.append({"mode": label, "samples": n, "reps": reps, "read_bytes": statistics.median(read) / n,
                     "samples_per_s": n / statistics.median(times)})
    return rows


def checksum_cost(cfg: Settings) -> list[dict[str, Any]]:
    s, h = (128, 256) if cfg.quick else (2048, 4096)
    reps = cfg.reps(15, 3)
    enc = codec.encode(eagle3_sample(s, h))
    blob2, blob1 = enc.to_bytes(), _format1(enc)

    def stream() -> None:
        x = xxhash.xxh3_64(enc.header)
        for b in enc.buffers:
            x.update(b)
        x.hexdigest()

    def per_tensor() -> None:
        [xxhash.xxh3_64_hexdigest(b) for b in enc.buffers]
        xxhash.xxh3_64_hexdigest(enc.header)

    sample = eagle3_sample(s, h)
    fns = {
        "hash: one stream (format 1)": stream,
        "hash: per tensor + header (format 2)": per_tensor,
        "decode, verified, format 1 blob": lambda: codec.decode(blob1, copy=False),
        "decode, verified, format 2 blob": lambda: codec.decode(blob2, copy=False),
        "encode (format 2)": lambda: codec.encode(sample),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):  # interleaved, so a shared machine's drift hits every row alike
        for what, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rep:  # the first round is the warm-up
                times[what].append(time.perf_counter() - t0)
    rows = [{"what": k, "ms": statistics.median(v) * 1e3} for k, v in times.items()]
    for r in rows:
        r["MiB"] = enc.nbytes / 2**20
        r["reps"] = reps
    return rows


def run(cfg: Settings) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="td-bench-fields-"))
    try:
        rows = reads(cfg, tmp)
        loads = loader(cfg, tmp)
        cost = checksum_cost(cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    full = rows[0]
    ratios = []
    for r in rows:
        ratios.append(ratio_entry(f"samples/s, ours / raw preadv of the same ranges, fields [{r['mode']}]",
                                  r["samples_per_s"] / r["raw_samples_per_s"]))
    for r in rows[1:]:
        ratios += [
            ratio_entry(f"samples/s, fields [{r['mode']}] / all fields", r["samples_per_s"] / full["samples_per_s"]),
            ratio_entry(f"bytes read, all fields / fields [{r['mode']}]", full["read_bytes"] / max(r["read_bytes"], 1)),
        ]
    ratios.append(ratio_entry("loader samples/s, training subset / all fields",
                              loads[1]["samples_per_s"] / loads[0]["samples_per_s"]))
    by = {c["what"]: c["ms"] for c in cost}
    ratios.append(ratio_entry("hash ms, one stream (format 1) / per tensor (format 2) (1 = same cost)",
                              by["hash: one stream (format 1)"] / by["hash: per tensor + header (format 2)"]))
    ratios.append(ratio_entry("decode ms, format 1 / format 2 (1 = same cost)",
                              by["decode, verified, format 1 blob"] / by["decode, verified, format 2 blob"]))
    return {"title": TITLE, "rows": {"reads": rows, "loader": loads, "checksum": cost}, "ratios": ratios,
            "targets": []}


def _size(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def render(res: dict[str, Any]) -> str:
    rows, loads, cost = res["rows"]["reads"], res["rows"]["loader"], res["rows"]["checksum"]
    r0 = rows[0]
    full = r0["samples_per_s"]
    lines = [
        f"### {res['title']}",
        "",
        f"**Reads** ({r0['samples']} EAGLE3 samples, S={r0['S']}, H={r0['H']}: {r0['blob_bytes'] / 2**20:.1f} MiB "
        f"per blob, file:// in the page cache, one pass over the pool per repeat; "
        f"{medians_of(r0['reps'])})",
        "",
        "| fields | bytes read per sample | tensor bytes returned | samples/s | GB/s returned | samples/s vs all "
        "| raw preadv of the same ranges, samples/s | ours / raw |",
        "|---" * 8 + "|",
    ]
    lines += [
        f"| {r['mode']} | {_size(r['read_bytes'])} | {_size(r['payload_bytes'])} "
        f"| {r['samples_per_s']:,.0f} | {r['gb_per_s']:.2f} | {r['samples_per_s'] / full:.2f}x "
        f"| {r['raw_samples_per_s']:,.0f} | {r['samples_per_s'] / r['raw_samples_per_s']:.2f} |"
        for r in rows
    ]
    lf = loads[0]["samples_per_s"]
    lines += [
        "",
        "*bytes read*: the kernel's `rchar` for this process over the pass, per sample (`/proc/self/io`; the "
        "header and the chosen tensors' ranges: `preadv` per contiguous range, in 256 KiB pieces hashed while in cache). "
        "*raw*: open, `preadv` of the same ranges into one preallocated buffer, close: no checksum, no tensors.",
        "",
        f"**Loader** (`FeatureStoreDataset(mode=\"offline\", fields=...)`, SQLite ledger, lease + read + ack, "
        f"num_workers=0; {medians_of(loads[0]['reps'], 'epoch')} after a warm-up epoch)",
        "",
        "| fields | bytes read per sample | samples/s | vs all |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['mode']} | {_size(r['read_bytes'])} | {r['samples_per_s']:,.0f} "
              f"| {r['samples_per_s'] / lf:.2f}x |" for r in loads]
    lines += [
        "",
        f"**Checksum cost** (one {cost[0]['MiB']:.1f} MiB sample; {medians_of(cost[0]['reps'])}; ms)",
        "",
        "| what | ms |",
        "|---|---|",
    ]
    lines += [f"| {c['what']} | {c['ms']:.2f} |" for c in cost]
    return "\n".join(lines)
