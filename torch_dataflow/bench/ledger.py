"""Scenario ``ledger``: one sample's life cycle (reserve+commit -> lease -> ack ->
mark_durable) through each ledger in batches of 1, 64 and 1024, against bare
engines doing the equivalent minimal work with no library code around it
(notes/LEDGER.md): four SQLite transactions, or four Redis Lua scripts, per batch.

Target (reported, never asserted; issue 14 item 5): every ledger >= 30,000
samples/s at batch 64. Also measured: ``counts()`` at 100,000 pending samples, from
the maintained counters and (SQLite) by the table scan it used to be. Redis needs
``redis-server`` on PATH and the ``redis`` package; without them the Redis columns
are skipped with the reason. The bench starts its own servers on free loopback
ports (plain, AOF ``appendfsync always``, AOF ``appendfsync everysec``) and stops
them by process id.
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from ..ledger import open_ledger
from ..ledger.base import Ledger
from ..testing.ledger_conformance import fake_ref
from ._util import Settings, medians_of, ratio_entry, target

TITLE = "Ledger life cycle (reserve+commit -> lease -> ack -> mark_durable)"
TARGET = 30_000.0  # samples/s at batch 64
KINDS = ("memory", "sqlite", "redis", "redis+aof", "redis+everysec")
COUNTS_PENDING = 100_000  # pending samples behind the counts() latency figure


def redis_unavailable() -> str | None:
    """Why the Redis ledger cannot be benchmarked here, or ``None``."""
    if shutil.which("redis-server") is None:
        return "redis-server not on PATH (apt-get install -y redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'torch-dataflow[redis]')"
    return None


@contextmanager
def redis_servers(aof: bool = True) -> Iterator[tuple[Any, ...] | None]:
    """``(plain, aof always, aof everysec)`` RedisServer instances (the AOF ones ``None``
    unless ``aof``), or ``None`` if Redis is unavailable."""
    if redis_unavailable():
        yield None
        return
    from ..ledger.redis_server import RedisServer

    with ExitStack() as stack:
        plain = stack.enter_context(RedisServer())
        always = stack.enter_context(RedisServer(aof=True)) if aof else None
        everysec = stack.enter_context(RedisServer(aof=True, appendfsync="everysec")) if aof else None
        yield plain, always, everysec


def lifecycle(led: Ledger, n: int, batch: int, tag: str) -> float:
    """Seconds for ``n`` samples through the whole life cycle, ``batch`` at a time."""
    ids = [f"{tag}-{i}" for i in range(n)]
    t0 = time.perf_counter()
    for step, i in enumerate(range(0, n, batch), 1):
        chunk = ids[i : i + batch]
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
        con.execute("BEGIN IMMEDIATE")
        con.executemany("INSERT INTO d VALUES (?, 0, NULL, NULL, NULL)", [(f"s{i + j}",) for j in range(batch)])
        con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        rows = con.execute("SELECT id FROM d WHERE state=0 LIMIT ?", (batch,)).fetchall()
        con.executemany(
            "UPDATE d SET state=1, owner='b', deadline=? WHERE id=?", [(time.time() + 60, r[0]) for r in rows]
        )
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


def _rate(fn: Callable[[int], float], n: int, repeats: int) -> float:
    """Median samples/s over ``repeats`` runs (``fn(rep)`` returns seconds)."""
    return statistics.median(n / fn(rep) for rep in range(repeats))


def _row(batch: int, n: int, repeats: int, servers: tuple[Any, Any] | None, tmp: str) -> dict[str, float]:
    row: dict[str, float] = {"batch": batch, "samples": n}
    k = 0

    def fresh(kind: str) -> Ledger:
        nonlocal k
        k += 1
        if kind == "memory":
            return open_ledger(f"memory://bench{batch}-{k}-{time.monotonic_ns()}")
        if kind == "sqlite":
            return open_ledger(f"sqlite://{tmp}/l{batch}-{k}.db")
        assert servers is not None
        srv = servers[{"redis": 0, "redis+aof": 1, "redis+everysec": 2}[kind]]
        return open_ledger(f"{srv.uri}?namespace=b{batch}-{k}")

    for kind in KINDS:
        if kind.startswith("redis") and servers is None:
            continue

        def one(rep: int, kind: str = kind) -> float:
            led = fresh(kind)
            try:
                return lifecycle(led, n, batch, f"r{rep}")
            finally:
                led.close()

        row[kind] = _rate(one, n, repeats)
    row["bare sqlite"] = _rate(lambda rep: bare_sqlite(f"{tmp}/bare{batch}-{rep}.db", n, batch), n, repeats)
    row["sqlite/bare"] = row["sqlite"] / row["bare sqlite"]
    if servers is not None:
        row["bare redis"] = _rate(lambda rep: bare_redis(servers[0].port, n, batch, f"{batch}-{rep}"), n, repeats)
        row["redis/bare"] = row["redis"] / row["bare redis"]
        row["redis+aof/bare"] = row["redis+aof"] / row["bare redis"]
        row["redis+everysec/bare"] = row["redis+everysec"] / row["bare redis"]
    return row


def _fill(led: Ledger, n: int) -> None:
    ids = [f"c{i}" for i in range(n)]
    for i in range(0, n, 1000):
        chunk = ids[i : i + 1000]
        led.commit([fake_ref(s, g) for s, g in zip(chunk, led.reserve(chunk), strict=True)])


def _latency_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of one call (after one warm-up call)."""
    fn()
    times = []
    for _ in range(max(5, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def counts_latency(n: int, repeats: int, servers: tuple[Any, ...] | None, tmp: str) -> dict[str, float]:
    """``counts()`` latency (ms) with ``n`` pending samples: SQLite counters vs the table scan, Redis."""
    out: dict[str, float] = {"pending": n}
    led = open_ledger(f"sqlite://{tmp}/counts.db")
    try:
        _fill(led, n)
        assert led.counts().pending == n
        out["sqlite counts()"] = _latency_ms(led.counts, repeats)
        out["sqlite table scan"] = _latency_ms(led.scan_counts, repeats)  # what counts() did before the counters
    finally:
        led.close()
    if servers is not None:
        led = open_ledger(f"{servers[0].uri}?namespace=counts")
        try:
            _fill(led, n)
            assert led.counts().pending == n
            out["redis counts()"] = _latency_ms(led.counts, repeats)
        finally:
            led.close()
    return out


def run(cfg: Settings) -> dict[str, Any]:
    sizes = {1: 50, 64: 640, 1024: 2048} if cfg.quick else {1: 1_000, 64: 20_000, 1024: 51_200}
    repeats = cfg.reps(3, 1)
    skipped = redis_unavailable()
    tmp = tempfile.mkdtemp(prefix="td-bench-ledger-")
    rows = []
    counts_n = 2_000 if cfg.quick else COUNTS_PENDING
    try:
        with redis_servers() as servers:
            for batch, n in sizes.items():
                rows.append(_row(batch, n, repeats, servers, tmp))
            counts = counts_latency(counts_n, repeats, servers, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios, targets = [], []
    for r in rows:
        ratios.append(ratio_entry(f"sqlite / bare sqlite, batch {r['batch']}", r["sqlite/bare"]))
        if "redis/bare" in r:
            ratios.append(ratio_entry(f"redis / bare redis, batch {r['batch']}", r["redis/bare"]))
    r64 = next(r for r in rows if r["batch"] == 64)
    for kind in KINDS:
        if kind in r64:
            targets.append(
                target(f"{kind} ledger life cycle at batch 64", r64[kind], TARGET, "samples/s", quick=cfg.quick)
            )
            ratios.append(ratio_entry(f"{kind} / 30k target, batch 64", r64[kind] / TARGET, 1.0))
    ratios.append(ratio_entry(f"sqlite counts() / table scan, {counts_n:,} pending",
                              counts["sqlite counts()"] / counts["sqlite table scan"]))
    versions = {"sqlite": sqlite3.sqlite_version}
    if not skipped:
        import redis

        versions["redis-py"] = redis.__version__
    return {
        "title": TITLE,
        "settings": {"samples": sizes, "repeats": repeats, **versions},
        "rows": rows,
        "counts": counts,
        "ratios": ratios,
        "targets": targets,
        "skipped": {"redis": skipped} if skipped else {},
    }


def render(res: dict[str, Any]) -> str:
    cols = [
        c
        for c in (
            "memory",
            "sqlite",
            "redis",
            "redis+aof",
            "redis+everysec",
            "bare sqlite",
            "bare redis",
            "sqlite/bare",
            "redis/bare",
            "redis+aof/bare",
            "redis+everysec/bare",
        )
        if c in res["rows"][0]
    ]
    lines = [
        f"### {res['title']}, samples/s",
        "",
        "| batch | samples | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for row in res["rows"]:
        cells = [f"{row[c]:.2f}" if "/" in c else f"{row[c]:,.0f}" for c in cols]
        lines.append(f"| {row['batch']} | {row['samples']:,} | " + " | ".join(cells) + " |")
    st = res["settings"]
    lines += [
        "",
        "One client in one process. *redis*: redis-server without persistence; *redis+aof*: "
        "`appendonly yes, appendfsync always`; *redis+everysec*: `appendonly yes, appendfsync everysec`; "
        "SQLite in WAL with synchronous=NORMAL "
        f"(SQLite {st['sqlite']}{', redis-py ' + st['redis-py'] if 'redis-py' in st else ''}). "
        "*bare* = the same four steps per batch with no library code (four SQLite transactions, four Lua "
        "scripts); x/bare is the share of the bare engine's rate the ledger keeps. "
        f"{medians_of(st['repeats'], capital=True)}.",
    ]
    c = res.get("counts")
    if c:
        cells = [f"{k}: {v:.2f} ms" for k, v in c.items() if k != "pending"]
        lines += ["", f"`counts()` with {c['pending']:,} pending samples (median of one call): " + "; ".join(cells)
                  + ". *table scan* is what SQLite's counts() did before the maintained counters "
                  "(`scan_counts()`, kept for audits)."]
    for k, why in res.get("skipped", {}).items():
        lines.append(f"Skipped {k}: {why}.")
    return "\n".join(lines)
