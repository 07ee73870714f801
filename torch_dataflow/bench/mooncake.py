"""Scenario ``mooncake``: our Mooncake store vs raw Mooncake ``put_from`` /
``get_into``, in the same run, on loopback TCP.

Two placements: *same process* (this process holds the segment: local copies)
and *cross process* (a ``mooncake_client`` store server holds the segment and
this process contributes none, so every put and get crosses loopback TCP).
*raw* is the floor any wrapper pays: one pre-registered buffer, no encoding, no
checksum. *ours* is ``MooncakeStore.put`` / ``get`` of one tensor (encode +
xxh3, zero-copy transfer, verified decode into fresh memory), with
``transfer=direct`` (the default) and ``transfer=staging``.

Target (reported, never asserted): ours >= 90% of raw. Needs the ``mooncake``
package and ``mooncake_master``; without them the scenario is skipped with the reason.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch

from ._util import Settings, median_s, memcpy_s, ratio_entry, target

TITLE = "Mooncake store vs raw put_from / get_into (loopback TCP)"
SIZES = {"64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}
REPS = {64 << 10: 200, 1 << 20: 60, 16 << 20: 15}
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


def _bench_size(store: Any, staging: Any, nbytes: int, reps: int) -> dict[str, float]:
    raw = store._client().connect()
    cfg = store._client().put_cfg
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    assert raw.register_buffer(src.data_ptr(), nbytes) == 0 and raw.register_buffer(dst.data_ptr(), nbytes) == 0
    tag = uuid.uuid4().hex[:8]
    out: dict[str, float] = {}
    try:
        raw_keys: list[str] = []

        def raw_put(i: int) -> None:
            key = f"bench/raw-{tag}-{i}"  # a new key per rep: put never overwrites
            assert raw.put_from(key, src.data_ptr(), nbytes, cfg) == 0
            raw_keys.append(key)

        out["raw put"] = median_s(raw_put, reps, warmup=3)
        key = raw_keys[-1]
        out["raw get"] = median_s(lambda i: raw.get_into(key, dst.data_ptr(), nbytes), reps, warmup=3)
        raw.batch_remove(raw_keys, True)

        tensors = {"x": src}
        for name, s in (("ours", store), ("ours staging", staging)):
            refs: list[Any] = []

            def put(i: int, s: Any = s, refs: list[Any] = refs) -> None:
                refs.append(s.put(f"b-{tag}", len(refs) + 1, tensors))

            out[f"{name} put"] = median_s(put, reps, warmup=3)
            ref = refs[-1]

            def get(i: int, s: Any = s, ref: Any = ref) -> None:
                s.get(ref)

            out[f"{name} get"] = median_s(get, reps, warmup=3)
            assert torch.equal(s.get(ref)["x"], src)
            for r in refs:
                s.delete(r)
            s.gc(force=True)
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
    placements = (("same process", "1GiB"),) if cfg.quick else (("same process", "1GiB"), ("cross process", 0))
    rows: list[dict[str, Any]] = []
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
                    for op in ("put", "get"):
                        row[f"ratio {op}"] = t[f"raw {op}"] / t[f"ours {op}"]
                        row[f"ratio staging {op}"] = t[f"raw {op}"] / t[f"ours staging {op}"]
                    rows.append(row)
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
    return {
        "title": TITLE,
        "settings": {"date": time.strftime("%Y-%m-%d")},
        "rows": rows,
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
        "| staging put / get vs raw | memcpy | reps |",
        "|---" * 11 + "|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['placement']} | {r['size']} | {r['raw put GB/s']:.2f} | {r['ours put GB/s']:.2f} "
            f"| {r['ratio put']:.0%} | {r['raw get GB/s']:.2f} | {r['ours get GB/s']:.2f} | {r['ratio get']:.0%} "
            f"| {r['ratio staging put']:.0%} / {r['ratio staging get']:.0%} | {r['memcpy GB/s']:.1f} | {r['reps']} |"
        )
    lines += [
        "",
        "ours/raw = raw time / our time (target >= 90%). *raw*: `put_from`/`get_into` on one "
        "pre-registered buffer; *ours*: `MooncakeStore.put`/`get` of one tensor (encode + xxh3, zero-copy "
        "transfer, verified decode into fresh memory); *staging*: `transfer=staging` instead of the default "
        "`direct`. memcpy = one copy of the same size in the same run. Each figure is the median of *reps* runs.",
    ]
    return "\n".join(lines)
