"""Ledger life-cycle throughput: memory, SQLite and Redis in one run, against bare engines.

One sample's life cycle is reserve+commit -> lease -> ack -> mark_durable, done
in batches of 1, 64 and 1024. The bare baselines do the equivalent minimal work
with no library code around it (notes/LEDGER.md): four SQLite transactions, or
four Redis Lua scripts, per batch. Results: ``benchmarks/results/ledger.json``
and the ``bench:ledger`` section of ``docs/benchmarks.md``. Not a pass/fail test.

Example:
    $ .venv/bin/python -m benchmarks.bench_ledger --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch_dataflow.ledger import open_ledger
from torch_dataflow.ledger.base import Ledger
from torch_dataflow.ledger.redis_server import RedisServer
from torch_dataflow.testing.ledger_conformance import fake_ref

ROOT = Path(__file__).resolve().parent.parent
BATCHES = {1: 1_000, 64: 20_000, 1024: 51_200}  # batch -> samples per repeat
TARGET = 20_000  # samples/s at batch 64 (reported, not asserted)


def lifecycle(led: Ledger, n: int, batch: int, tag: str) -> float:
    """Seconds for ``n`` samples through the whole life cycle, ``batch`` at a time."""
    ids = [f"{tag}-{i}" for i in range(n)]
    t0 = time.perf_counter()
    for step, i in enumerate(range(0, n, batch), 1):
        chunk = ids[i:i + batch]
        gens = led.reserve(chunk)
        led.commit([fake_ref(s, g) for s, g in zip(chunk, gens, strict=True)])
        leases = led.lease("bench", batch, ttl=60)
        led.ack([x.lease_id for x in leases], step)
        led.mark_durable(step)
    return time.perf_counter() - t0


def bare_sqlite(path: str, n: int, batch: int) -> float:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("CREATE TABLE IF NOT EXISTS d(id TEXT PRIMARY KEY, state INT, owner TEXT, deadline REAL, step INT)")
    con.execute("CREATE INDEX IF NOT EXISTS d_state ON d(state)")
    t0 = time.perf_counter()
    for step, i in enumerate(range(0, n, batch), 1):
        ids = [(f"s{i + j}",) for j in range(batch)]
        for sql, args in (("INSERT INTO d VALUES (?, 0, NULL, NULL, NULL)", ids),):
            con.execute("BEGIN IMMEDIATE")
            con.executemany(sql, args)
            con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        rows = con.execute("SELECT id FROM d WHERE state=0 LIMIT ?", (batch,)).fetchall()
        con.executemany("UPDATE d SET state=1, owner='b', deadline=? WHERE id=?", [(time.time() + 60, r[0]) for r in rows])
        con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        con.executemany("UPDATE d SET state=2, step=? WHERE id=? AND state=1", [(step, r[0]) for r in rows])
        con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE d SET state=3 WHERE state=2 AND step<=?", (step,))
        con.execute("COMMIT")
    dt = time.perf_counter() - t0
    con.close()
    return dt


_BARE_LUA = {
    "commit": "for i = 2, #ARGV do redis.call('HSET', ARGV[1]..'r:'..ARGV[i], 'ref', 'x') "
              "redis.call('RPUSH', ARGV[1]..'q', ARGV[i]) end return #ARGV - 1",
    "lease": "local ids = redis.call('LPOP', ARGV[1]..'q', tonumber(ARGV[2])) or {} "
             "for _, s in ipairs(ids) do redis.call('HSET', ARGV[1]..'o', s, 'b') "
             "redis.call('ZADD', ARGV[1]..'l', 1e12, s) end return ids",
    "ack": "for i = 3, #ARGV do redis.call('HDEL', ARGV[1]..'o', ARGV[i]) redis.call('ZREM', ARGV[1]..'l', ARGV[i]) "
           "redis.call('HSET', ARGV[1]..'t', ARGV[i], ARGV[2]) end return 0",
    "durable": "local t = redis.call('HKEYS', ARGV[1]..'t') for _, s in ipairs(t) do "
               "redis.call('DEL', ARGV[1]..'r:'..s) end redis.call('DEL', ARGV[1]..'t') return #t",
}


def bare_redis(port: int, n: int, batch: int, tag: str) -> float:
    import redis

    r = redis.Redis(port=port, decode_responses=True)
    sc = {k: r.register_script(v) for k, v in _BARE_LUA.items()}
    p = f"bare{tag}:"
    t0 = time.perf_counter()
    for step, i in enumerate(range(0, n, batch), 1):
        sc["commit"](args=[p, *(f"s{i + j}" for j in range(batch))])
        ids = sc["lease"](args=[p, batch])
        sc["ack"](args=[p, step, *ids])
        sc["durable"](args=[p])
    dt = time.perf_counter() - t0
    r.close()
    return dt


def measure(fn: Callable[[int], float], n: int, repeats: int) -> float:
    """Median samples/s over ``repeats`` runs (``fn(rep)`` returns seconds)."""
    return statistics.median(n / fn(rep) for rep in range(repeats))


def _batch_row(batch: int, n: int, repeats: int, plain: RedisServer, aof: RedisServer, tmp: str) -> dict[str, float]:
    row: dict[str, float] = {}
    k = 0

    def fresh(kind: str) -> Ledger:
        nonlocal k
        k += 1
        if kind == "memory":
            return open_ledger(f"memory://bench{batch}-{k}")
        if kind == "sqlite":
            return open_ledger(f"sqlite://{tmp}/l{batch}-{k}.db")
        srv = plain if kind == "redis" else aof
        return open_ledger(f"{srv.uri}?namespace=b{batch}-{k}")

    for kind in ("memory", "sqlite", "redis", "redis+aof"):
        row[kind] = measure(lambda rep, kind=kind: lifecycle(fresh(kind), n, batch, f"r{rep}"), n, repeats)
    row["bare sqlite"] = measure(lambda rep: bare_sqlite(f"{tmp}/bare{batch}-{rep}.db", n, batch), n, repeats)
    row["bare redis"] = measure(lambda rep: bare_redis(plain.port, n, batch, f"{batch}-{rep}"), n, repeats)
    row["sqlite/bare"] = row["sqlite"] / row["bare sqlite"]
    row["redis/bare"] = row["redis"] / row["bare redis"]
    row["redis/sqlite"] = row["redis"] / row["sqlite"]
    return row


def run(repeats: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="td-bench-ledger-")
    out: dict[str, Any] = {"batches": {}, "repeats": repeats, "machine": _machine()}
    with RedisServer() as plain, RedisServer(aof=True) as aof:
        for batch, n in BATCHES.items():
            row = _batch_row(batch, n, repeats, plain, aof, tmp)
            out["batches"][str(batch)] = row
            print(f"batch {batch}: " + ", ".join(f"{k}={v:,.2f}" for k, v in row.items()), flush=True)
    return out


def _machine() -> str:
    import redis

    ver = os.popen("redis-server --version").read().split()[2].removeprefix("v=")
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, redis-server {ver}, redis-py {redis.__version__}")


def markdown(res: dict[str, Any]) -> str:
    cols = ["memory", "sqlite", "redis", "redis+aof", "bare sqlite", "bare redis", "sqlite/bare", "redis/bare",
            "redis/sqlite"]
    lines = ["### Ledger life cycle (reserve+commit -> lease -> ack -> mark_durable), samples/s", "",
             "| batch | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for b, row in res["batches"].items():
        cells = [f"{row[c]:.2f}" if "/" in c else f"{row[c]:,.0f}" for c in cols]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    r64 = res["batches"].get("64", {}).get("redis", 0.0)
    lines += ["", f"Target >= {TARGET:,} samples/s at batch 64 on Redis: measured {r64:,.0f} "
              f"({'met' if r64 >= TARGET else 'NOT met'}).",
              "One client, one process; redis is redis-server without persistence, redis+aof with "
              "`appendonly yes, appendfsync always`; SQLite in WAL with synchronous=normal. "
              "bare = the same four steps per batch with no library code (four SQLite transactions, four Lua "
              "scripts); x/bare is the share of the bare engine's rate the ledger keeps.",
              f"Machine: {res['machine']}; medians of {res['repeats']} repeats."]
    return "\n".join(lines)


def write_docs(md: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"  # re-read right before writing
    block = f"<!-- bench:ledger -->\n{md}\n<!-- /bench:ledger -->"
    pat = re.compile(r"<!-- bench:ledger -->.*?<!-- /bench:ledger -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    res = run(args.repeats)
    md = markdown(res)
    print(md)
    if not args.no_write:
        out = ROOT / "benchmarks" / "results" / "ledger.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        write_docs(md)


if __name__ == "__main__":
    main()
