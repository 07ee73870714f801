"""Scenario ``store``: one EAGLE3 sample's round trip (put -> get -> tensors ready)
through the shared-directory and in-memory stores, against baselines measured in
the same run on the same bytes:

- ``raw_file``: ``os.write`` of the encoded blob + ``readinto`` a reused buffer
  (an upper bound no store reaches while handing out fresh memory);
- ``raw_file_fresh``: the same, reading into a new ``bytearray`` each time;
- ``torch_save``: ``torch.save`` + ``torch.load(weights_only=True)`` + ``clone``
  per tensor (the per-sample path of existing feature tools);
- ``memcpy``: one copy of the blob's bytes between preallocated tensors.

Targets (reported, never asserted), at S=512: shared_dir >= 3x the torch.save
path and >= 0.7 of raw file I/O. Files go to a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import codec
from ..stores.memory import MemoryStore
from ..stores.shared_dir import SharedDirStore
from ._util import Settings, eagle3_sample, median_s, medians_of, ratio_entry, table_head, target

TITLE = "Store round trip (put -> get), one EAGLE3 sample"
METHODS = ("shared_dir", "memory", "raw_file", "raw_file_fresh", "torch_save", "memcpy")
TARGET_S = 512


def _write_blob(path: str, blob: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def bench_one(s: int, h: int, reps: int, tmp: Path) -> dict[str, Any]:
    """Median seconds of each method for one sample of sequence length ``s``."""
    sample = eagle3_sample(s, h)
    blob = codec.encode(sample).to_bytes()
    nbytes = len(blob)
    out: dict[str, Any] = {"S": s, "H": h, "nbytes": nbytes, "reps": reps}

    store = SharedDirStore(tmp / f"store-{s}")
    refs: dict[int, Any] = {}

    def ours(i: int) -> None:
        refs[i] = store.put(f"s{i + 10}", 1, sample)
        store.get(refs[i])

    out["shared_dir"] = median_s(ours, reps, lambda i: store.delete(refs.pop(i)))

    mem_name = f"bench-{os.getpid()}-{s}"
    mem = MemoryStore(mem_name)
    mrefs: dict[int, Any] = {}

    def memory(i: int) -> None:
        mrefs[i] = mem.put(f"s{i + 10}", 1, sample)
        mem.get(mrefs[i])

    out["memory"] = median_s(memory, reps, lambda i: mem.delete(mrefs.pop(i)))
    MemoryStore.destroy(mem_name)

    raw_path = str(tmp / f"raw-{s}.bin")
    dst = bytearray(nbytes)

    def raw(i: int) -> None:
        _write_blob(raw_path, blob)
        with open(raw_path, "rb", buffering=0) as f:
            f.readinto(dst)

    out["raw_file"] = median_s(raw, reps, lambda i: os.unlink(raw_path))

    def raw_fresh(i: int) -> None:
        _write_blob(raw_path, blob)
        with open(raw_path, "rb", buffering=0) as f:
            f.readinto(bytearray(nbytes))  # fresh memory per read, as any reader that hands it out

    out["raw_file_fresh"] = median_s(raw_fresh, reps, lambda i: os.unlink(raw_path))

    pt_path = tmp / f"sample-{s}.pt"

    def save_load(i: int) -> None:
        torch.save(sample, pt_path)
        loaded = torch.load(pt_path, weights_only=True)
        {k: v.clone() for k, v in loaded.items()}

    out["torch_save"] = median_s(save_load, reps, lambda i: pt_path.unlink())

    src = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    copy_dst = torch.empty_like(src)
    out["memcpy"] = median_s(lambda i: copy_dst.copy_(src), max(reps, 5), warmup=2)

    out["gbps"] = {m: nbytes / out[m] / 1e9 for m in METHODS}
    out["ratios"] = {
        "vs_raw_file": out["raw_file"] / out["shared_dir"],
        "vs_raw_file_fresh": out["raw_file_fresh"] / out["shared_dir"],
        "vs_torch_save": out["torch_save"] / out["shared_dir"],
        "vs_memcpy": out["memcpy"] / out["shared_dir"],
        "memory_vs_memcpy": out["memcpy"] / out["memory"],
        # the ceiling of vs_torch_save for any store that writes and reads a file
        "raw_file_vs_torch_save": out["torch_save"] / out["raw_file"],
    }
    return out


def bench_extras(tmp: Path, n_files: int, h: int) -> dict[str, Any]:
    """The costs the store's docs quote: health() over many files, and a put with fsync."""
    store = SharedDirStore(tmp / "many")
    small = {"x": torch.arange(8)}
    for i in range(n_files):
        store.put(f"m{i}", 1, small)
    t0 = time.perf_counter()
    for _ in range(3):
        health = store.health()
    health_ms = (time.perf_counter() - t0) / 3 * 1e3
    assert health.count == n_files
    sample = eagle3_sample(32, h)
    synced, plain = SharedDirStore(tmp / "fsync", fsync=True), SharedDirStore(tmp / "nofsync")
    fs = median_s(lambda i: synced.put(f"f{i + 10}", 1, sample), 10)
    nf = median_s(lambda i: plain.put(f"f{i + 10}", 1, sample), 10)
    return {"health_files": n_files, "health_ms": health_ms, "put_fsync_ms_S32": fs * 1e3, "put_ms_S32": nf * 1e3}


def run(cfg: Settings) -> dict[str, Any]:
    h, seqs, n_files = (256, (32, 128), 200) if cfg.quick else (4096, (32, 512, 2048), 10_000)
    reps = cfg.reps(11, 3)
    tmp = Path(tempfile.mkdtemp(prefix="td-bench-store-"))
    try:
        rows = [bench_one(s, h, reps, tmp) for s in seqs]
        extras = bench_extras(tmp, n_files, h)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = []
    for r in rows:
        q = r["ratios"]
        tgt = r["S"] == TARGET_S
        ratios += [
            ratio_entry(f"shared_dir / torch.save, S={r['S']}", q["vs_torch_save"], 3.0 if tgt else None),
            ratio_entry(f"shared_dir / raw file, S={r['S']}", q["vs_raw_file"], 0.7 if tgt else None),
            ratio_entry(f"raw file / torch.save (ceiling), S={r['S']}", q["raw_file_vs_torch_save"]),
            ratio_entry(f"shared_dir / memcpy, S={r['S']}", q["vs_memcpy"]),
        ]
    # The targets are stated at S=512; the quick setting has no S=512, so it checks its largest S.
    at = next((r for r in rows if r["S"] == TARGET_S), rows[-1])
    where = f"S={at['S']}, H={at['H']}"
    targets = [
        target(
            f"shared_dir round trip vs torch.save path ({where})", at["ratios"]["vs_torch_save"], 3.0, quick=cfg.quick
        ),
        target(f"shared_dir round trip vs raw file I/O ({where})", at["ratios"]["vs_raw_file"], 0.7, quick=cfg.quick),
    ]
    return {
        "title": TITLE,
        "settings": {"H": h, "S": list(seqs), "reps": reps, "tmp": tempfile.gettempdir()},
        "rows": rows,
        "extras": extras,
        "ratios": ratios,
        "targets": targets,
    }


def render(res: dict[str, Any]) -> str:
    st = res["settings"]
    lines = table_head(f"### {res['title']}, H={st['H']}", [
        "S", "MB", "shared_dir (ours)", "memory store", "raw file", "raw file, fresh buf", "torch.save+load+clone",
        "memcpy", "ours/raw file", "ours/raw fresh", "ours/torch.save", "raw file/torch.save", "ours/memcpy",
    ])
    for r in res["rows"]:
        cells = [f"{r[m] * 1e3:.2f} ms ({r['gbps'][m]:.2f} GB/s)" for m in METHODS]
        q = r["ratios"]
        lines.append(
            f"| {r['S']} | {r['nbytes'] / 1e6:.2f} | "
            + " | ".join(cells)
            + f" | {q['vs_raw_file']:.2f} | {q['vs_raw_file_fresh']:.2f} | {q['vs_torch_save']:.2f}x "
            f"| {q['raw_file_vs_torch_save']:.2f}x | {q['vs_memcpy']:.2f} |"
        )
    ex = res["extras"]
    lines += [
        "",
        f"health() over {ex['health_files']:,} files: {ex['health_ms']:.1f} ms. A put at S=32 with fsync: "
        f"{ex['put_fsync_ms_S32']:.2f} ms, without: {ex['put_ms_S32']:.2f} ms.",
        "",
        "Ratios are throughput ratios (> 1: ours faster). *raw file* reads into one reused buffer (an upper "
        "bound no store reaches while handing out fresh memory); *raw file, fresh buf* reads into a new "
        "bytearray each time; *raw file/torch.save* is the ceiling of ours/torch.save for any store that "
        "writes and reads a file; *memcpy* is one copy (a round trip makes at least two). "
        f"Files in {st['tmp']} (page cache; no fsync). {medians_of(st['reps'], capital=True)}, "
        "torch with 1 intra-op thread.",
    ]
    return "\n".join(lines)
