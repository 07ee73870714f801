"""Our Mooncake store vs raw Mooncake ``put_from`` / ``get_into``, in the same run.

Sizes 64 KiB, 1 MiB and 16 MiB; two placements:

* ``same process``: the benchmarking process holds the segment (local copies);
* ``cross process``: a store server (``mooncake_client``, another process)
  holds the segment and this process contributes none, so every put and get
  crosses loopback TCP.

"raw" is the floor any wrapper pays: one pre-registered buffer, ``put_from`` /
``get_into``, no encoding, no checksum. "ours" is ``MooncakeStore.put`` /
``get`` of one tensor (encode + xxh3 checksum, zero-copy transfer, verified
decode into fresh memory), with ``transfer=direct`` (register per call, the
default) and ``transfer=staging`` (copy through a pre-registered arena).
Medians of repeated runs; ratios are ours / raw. Not a pass/fail test.

Run: ``python -m benchmarks.bench_mooncake`` (writes
``benchmarks/results/mooncake.json`` and the ``bench:mooncake`` section of
``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torch_dataflow.stores.mooncake import MooncakeStore
from torch_dataflow.stores.mooncake_master import MooncakeMaster

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}
REPS = {64 << 10: 200, 1 << 20: 60, 16 << 20: 15}
BEGIN, END = "<!-- bench:mooncake -->", "<!-- /bench:mooncake -->"


def _median(fn: Callable[[int], None], reps: int, warmup: int = 3) -> float:
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_size(store: MooncakeStore, staging: MooncakeStore, nbytes: int, reps: int) -> dict[str, float]:
    raw = store._client().connect()
    cfg = store._client().put_cfg
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    assert raw.register_buffer(src.data_ptr(), nbytes) == 0 and raw.register_buffer(dst.data_ptr(), nbytes) == 0
    tag = uuid.uuid4().hex[:8]
    out: dict[str, float] = {}
    try:
        # raw put_from: a new key per rep (put never overwrites), removed afterwards
        raw_keys: list[str] = []

        def raw_put(i: int) -> None:
            key = f"bench/raw-{tag}-{i}"
            assert raw.put_from(key, src.data_ptr(), nbytes, cfg) == 0
            raw_keys.append(key)

        out["raw put"] = _median(raw_put, reps)
        key = raw_keys[-1]
        out["raw get"] = _median(lambda i: raw.get_into(key, dst.data_ptr(), nbytes), reps)
        raw.batch_remove(raw_keys, True)

        tensors = {"x": src}
        for name, s in (("ours", store), ("ours staging", staging)):
            refs = []

            def put(i: int, s: MooncakeStore = s, refs: list[Any] = refs) -> None:
                refs.append(s.put(f"b-{tag}", len(refs) + 1, tensors))

            out[f"{name} put"] = _median(put, reps)
            ref = refs[-1]
            out[f"{name} get"] = _median(lambda i, s=s, ref=ref: s.get(ref), reps)
            assert torch.equal(s.get(ref)["x"], src)
            for r in refs:
                s.delete(r)
            s.gc(force=True)
    finally:
        raw.unregister_buffer(src.data_ptr())
        raw.unregister_buffer(dst.data_ptr())
    return out


def run(quick: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
    }
    with MooncakeMaster(segment_size="1GiB") as master:
        for placement, segment in (("same process", "1GiB"), ("cross process", 0)):
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
            for label, nbytes in SIZES.items():
                reps = max(3, REPS[nbytes] // (5 if quick else 1))
                t = _bench_size(direct, staging, nbytes, reps)
                row: dict[str, Any] = {"placement": placement, "size": label, "bytes": nbytes, "reps": reps}
                for k, v in t.items():
                    row[f"{k} s"] = v
                    row[f"{k} GB/s"] = nbytes / v / 1e9
                for op in ("put", "get"):
                    row[f"ratio {op}"] = t[f"raw {op}"] / t[f"ours {op}"]
                    row[f"ratio staging {op}"] = t[f"raw {op}"] / t[f"ours staging {op}"]
                results["rows"].append(row)
                print(_line(row), flush=True)
            direct.close()
            staging.close()
            MooncakeStore.close_clients()  # the next placement is another client configuration
    return results


def _line(r: dict[str, Any]) -> str:
    return (
        f"| {r['placement']} | {r['size']} "
        f"| {r['raw put GB/s']:.2f} | {r['ours put GB/s']:.2f} | {r['ratio put']:.0%} "
        f"| {r['raw get GB/s']:.2f} | {r['ours get GB/s']:.2f} | {r['ratio get']:.0%} "
        f"| {r['ratio staging put']:.0%} / {r['ratio staging get']:.0%} |"
    )


def markdown(results: dict[str, Any]) -> str:
    head = (
        f"Mooncake store, loopback TCP ({results['machine']}; {results['date']}). GB/s from medians; "
        "ratio = raw time / our time (target >= 90%). *raw*: `put_from`/`get_into` on one pre-registered "
        "buffer; *ours*: `MooncakeStore.put`/`get` of one tensor (encode + xxh3, zero-copy transfer, "
        "verified decode into fresh memory). Last column: `transfer=staging` instead of the default "
        "`direct`. Source: `benchmarks/bench_mooncake.py`.\n\n"
        "| placement | size | raw put | ours put | ratio | raw get | ours get | ratio | staging put / get |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    return head + "\n".join(_line(r) for r in results["rows"]) + "\n"


def write(results: dict[str, Any]) -> None:
    out = ROOT / "benchmarks" / "results" / "mooncake.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    doc = ROOT / "docs" / "benchmarks.md"
    section = f"{BEGIN}\n{markdown(results)}{END}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + f"\n\n## Mooncake store\n\n{section}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    results = run(quick=args.quick)
    if not args.no_write:
        write(results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
