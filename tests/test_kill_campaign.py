"""The seeded SIGKILL campaign across the matrix (issue 15, "How to prove it").

Cells of {producer killed, trainer killed} × {plain loop, Lightning} ×
{file://, mooncake://} × {SQLite, Redis}; not the whole cross product, but every
value of every axis, and ≥ 20 seeded kills in all (:data:`SEED` is fixed; the
plan is printed when a cell fails). Kill points (tests/_campaign_procs.py):

- trainer: mid-batch, between step and ack, between ack and checkpoint, half
  way through a checkpoint write, between a complete write and the durable
  mark, between the durable mark and the store deletes. Each next run resumes
  from the newest complete checkpoint; the chain ends with a run that finishes.
- producer: between reserve and put, half way through a file write, between
  the put (bytes written) and the commit, mid-stream. The producer restarts under
  the same name with ``resume=True`` / ``if_absent=True`` and puts only what is
  missing, while the trainer runs (file://) or after it (Mooncake, where the
  objects of a killed producer die with its segment: the restarted producer must
  put them again, or the library must say why it cannot).

Verdict per cell: every committed sample trained exactly once, from the model's
own state (the ``seen`` per-sample counter in the final checkpoint and the
per-sample log cut back on every resume); ledger counts pending = leased =
trained = 0, durable = N, quarantined = aborted = 0; and **zero leftover bytes**:
after the final run and ``torch-dataflow gc STORE LEDGER --grace 0``, the store
holds exactly the generations the ledger still needs (online, freed: none) and,
for file://, no other file at all (temporary files included) but the marker.
Mooncake cannot list keys: every ``namespace/sid@gen`` a run could have written
is probed on the master.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _campaign_procs as cp
import _train_procs as tp
import pytest
import torch

from torch_dataflow import FeatureWriter, open_ledger

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SEED = 20261115
LEASE_TTL_MS = 300  # Mooncake read leases: probes and reads must not park removals for long
CLIENT_TTL_S = 2  # a killed Mooncake writer's objects are dropped by the master after this
MAX_GEN = 8  # generations probed per id on Mooncake (a producer chain writes at most kills + 1)
_AT = {"mid_batch": 6, "after_step": 3, "after_ack": 3, "ckpt_write": 2, "after_write": 2, "before_delete": 8,
       "after_reserve": 6, "mid_write": 6, "after_put": 6, "mid_stream": 6}
CTL = Path(sys.executable).with_name("torch-dataflow")


@dataclass(frozen=True)
class Cell:
    role: str  # "trainer" or "producer": who is killed
    loop: str  # "plain" or "lightning"
    store: str  # "file" or "mooncake"
    ledger: str  # "sqlite" or "redis"
    phases: tuple[str, ...]  # one seeded kill per phase, order shuffled
    n: int

    @property
    def name(self) -> str:
        return f"{self.role}-{self.loop}-{self.store}-{self.ledger}"


CELLS = (
    Cell("trainer", "plain", "file", "sqlite", cp.TRAINER_PHASES, 120),
    Cell("trainer", "lightning", "file", "redis", cp.TRAINER_PHASES, 120),
    Cell("trainer", "plain", "mooncake", "redis", ("after_ack", "after_write", "before_delete"), 64),
    Cell("trainer", "lightning", "mooncake", "sqlite", ("mid_batch", "ckpt_write", "before_delete"), 64),
    Cell("producer", "plain", "file", "redis", cp.PRODUCER_PHASES, 40),
    Cell("producer", "lightning", "file", "sqlite", cp.PRODUCER_PHASES, 40),
    Cell("producer", "plain", "mooncake", "sqlite", ("after_reserve", "after_put", "mid_stream"), 24),
)


def kill_plan(cell: Cell) -> list[tuple[str, int, int]]:
    """Seeded ``(phase, at, num_workers)`` for a cell: one kill per phase, order shuffled."""
    rng = random.Random(f"{SEED}/{cell.name}")
    plan = [(phase, rng.randint(1, _AT[phase]), rng.choice([0, 2])) for phase in cell.phases]
    rng.shuffle(plan)
    return plan


def test_kill_plan_is_seeded_and_covers_the_matrix() -> None:
    plans = {c.name: kill_plan(c) for c in CELLS}
    assert plans == {c.name: kill_plan(c) for c in CELLS}
    assert sum(len(p) for p in plans.values()) >= 20
    for axis, values in (("role", {"trainer", "producer"}), ("loop", {"plain", "lightning"}),
                         ("store", {"file", "mooncake"}), ("ledger", {"sqlite", "redis"})):
        assert {getattr(c, axis) for c in CELLS} == values, axis
    phases = Counter(p[0] for plan in plans.values() for p in plan)
    assert set(phases) == {*cp.TRAINER_PHASES, *cp.PRODUCER_PHASES}
    assert len({c.name for c in CELLS}) == len(CELLS)


# ---------------------------------------------------------------- servers
# Both servers start before any cell (module scope, so before the leak check's snapshot);
# a missing one skips only the cells that need it outside CI, and fails them in CI.
@dataclass(frozen=True)
class Missing:
    reason: str


def _need(uri: str | Missing) -> str:
    if isinstance(uri, Missing):
        if IN_CI:
            pytest.fail(f"the kill campaign must run in CI: {uri.reason}")
        pytest.skip(uri.reason)
    return uri


@pytest.fixture(scope="module")
def redis_uri() -> Any:
    import shutil

    from torch_dataflow.ledger.redis_server import INSTALL_HINT, RedisServer

    if not shutil.which("redis-server"):
        yield Missing(INSTALL_HINT)
        return
    with RedisServer() as srv:
        yield srv.uri


@pytest.fixture(scope="module")
def mooncake_uri() -> Any:
    try:
        import mooncake.store  # noqa: F401

        from torch_dataflow.stores.mooncake_master import find_master_binary

        find_master_binary()
        problem = None
    except Exception as e:
        from torch_dataflow.stores.mooncake_master import INSTALL_HINT

        problem = f"{INSTALL_HINT} ({type(e).__name__}: {e})"
    if problem:
        yield Missing(problem)
        return
    from torch_dataflow.stores.mooncake import MooncakeStore
    from torch_dataflow.stores.mooncake_master import MooncakeMaster

    m = MooncakeMaster(lease_ttl_ms=LEASE_TTL_MS, client_ttl_s=CLIENT_TTL_S)
    m.start()
    try:
        yield m.uri
    finally:
        MooncakeStore.close_clients()
        m.stop()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Any:
    z = tp.Zygote(str(tmp_path_factory.mktemp("zygote") / "stderr.log"))
    yield z
    z.close()


# ---------------------------------------------------------------- leftovers
def _file_leftovers(root: Path) -> tuple[set[tuple[str, int]], list[tuple[str, int]]]:
    """``(sample generations on disk, every other file but the marker: (path, bytes))``."""
    from torch_dataflow.stores.shared_dir import MARKER

    gens: set[tuple[str, int]] = set()
    strays: list[tuple[str, int]] = []
    for d, _, files in os.walk(root):
        for f in files:
            p = Path(d) / f
            rel = str(p.relative_to(root))
            if rel == MARKER:
                continue
            if f.endswith(".tdf") and "@" in f and not f.startswith("."):
                sid, _, gen = f[: -len(".tdf")].rpartition("@")
                gens.add((sid, int(gen)))
            else:
                strays.append((rel, p.stat().st_size))
    return gens, strays


def _mooncake_objects(store_uri: str, ids: list[str]) -> set[tuple[str, int]]:
    """Every ``(sid, gen)`` object the master still has, probed key by key (Mooncake cannot list)."""
    from torch_dataflow.stores import _mooncake_client as mc
    from torch_dataflow.stores import open_store

    s = open_store(store_uri, segment_size=0)
    pairs = [(sid, g) for sid in ids for g in range(1, MAX_GEN + 1)]
    # The raw client, not the store: attaching the store writes its markers, which needs a segment.
    rcs = mc.get_client(s.cfg).connect().batch_is_exist([s._key(sid, g) for sid, g in pairs])
    return {p for p, rc in zip(pairs, rcs, strict=True) if rc == 1}


def _stored(cell: Cell, store_uri: str, root: Path, ids: list[str]) -> tuple[set[tuple[str, int]], list[Any]]:
    if cell.store == "file":
        return _file_leftovers(root)
    objs = _mooncake_objects(store_uri, ids)
    time.sleep(3 * LEASE_TTL_MS / 1000)  # the probe took read leases: let them end before anyone deletes
    return objs, []


def _needed(ledger_uri: str, ids: list[str]) -> set[tuple[str, int]]:
    """Generations whose bytes the ledger still needs (LIVE or QUARANTINED)."""
    from torch_dataflow.ledger.base import SampleStatus

    led = open_ledger(ledger_uri)
    status = led.sample_statuses(ids)
    keep = (SampleStatus.LIVE, SampleStatus.QUARANTINED)
    return {(sid, r.generation) for sid, r in led.committed_refs(ids).items() if status.get(sid) in keep}


# ---------------------------------------------------------------- verdict
def verdict(cell: Cell, work: Path, store_uri: str, ledger_uri: str) -> list[str]:
    """Everything wrong with the end state of a cell (empty: exactly once, nothing left)."""
    problems: list[str] = []
    ids = [cp.sample_id(i) for i in range(cell.n)]
    c = open_ledger(ledger_uri).counts()
    got = (c.pending, c.leased, c.trained, c.durable, c.quarantined, c.aborted)
    if got != (0, 0, 0, cell.n, 0, 0):
        problems.append(f"ledger counts (pending, leased, trained, durable, quarantined, aborted) = {got}, "
                        f"expected (0, 0, 0, {cell.n}, 0, 0)")
    if cell.role == "producer":
        # A restarted producer puts only what is missing: a new generation only for the id
        # whose put a kill interrupted before its commit, never for a committed one.
        interrupted = sum(p in ("after_reserve", "mid_write", "after_put") for p, _, _ in kill_plan(cell))
        gens = {sid: r.generation for sid, r in open_ledger(ledger_uri).committed_refs(ids).items()}
        extra = {sid: g - 1 for sid, g in gens.items() if g > 1}  # each interrupted put costs one generation
        if cell.store == "mooncake":
            # Objects live in their writer's segment: a killed attempt loses every sample it
            # committed, and the next attempt must put those again (FeatureWriter.readable
            # check); that training saw none twice is checked below, not here.
            interrupted += len(kill_plan(cell)) * cell.n
        if sum(extra.values()) > interrupted:
            problems.append(f"the restarted producer put committed samples again: {sum(extra.values())} "
                            f"generations past the first {sorted(extra.items())[:8]} for {interrupted} interrupted puts")
    # Exactly once, from the model's own state.
    final_path = work / "final.ckpt"
    if not final_path.exists():
        problems.append("no final checkpoint: the last trainer run did not finish")
    else:
        final = torch.load(final_path, map_location="cpu", weights_only=False)
        seen = (final["state_dict"]["seen"] if "state_dict" in final else final["seen"]).tolist()
        twice = [ids[i] for i, v in enumerate(seen) if v > 1]
        never = [ids[i] for i, v in enumerate(seen) if v < 1]
        if twice or never:
            problems.append(f"model's seen counter: {len(twice)} trained more than once {twice[:8]}, "
                            f"{len(never)} never trained {never[:8]}")
        log = Counter(sid for sid, _ in tp.History.read(str(work / "history.0.log")))
        if sorted(log) != ids or set(log.values()) != {1}:
            problems.append(f"per-sample log: {len(set(ids) - set(log))} missing, "
                            f"duplicated {[s for s, k in log.items() if k > 1][:8]}")
        result = json.loads((work / "result.0.json").read_text())
        if result.get("lost"):
            problems.append(f"the last run lost {result['lost']} leases before their ack")
    # Zero leftover bytes: the library's own convergence first (reported), then after gc (asserted).
    root = Path(store_uri.split("://", 1)[1].split("?", 1)[0])
    # The committed generations the ledger freed must be gone without an operator (the delete
    # queue, drained by the runs themselves); generations never committed are gc's to find.
    before, strays_before = _stored(cell, store_uri, root, ids)
    led = open_ledger(ledger_uri)
    committed = {(sid, r.generation) for sid, r in led.committed_refs(ids).items()}
    needed = _needed(ledger_uri, ids)
    if needed:  # online, everything durable and freed: the ledger must need no byte any more
        problems.append(f"the ledger still needs {len(needed)} generations after training ended {sorted(needed)[:8]}")
    undeleted = (before & committed) - needed
    if undeleted:
        queued = {(r.sample_id, r.generation) for r in led.pending_deletes()}
        problems.append(f"after the final run (before gc) {len(undeleted)} freed committed generations are still "
                        f"stored {sorted(undeleted)[:8]}, {len(undeleted & queued)} of them in the ledger's delete "
                        f"queue (uncommitted ones, left for gc: "
                        f"{sorted(before - committed)[:8]}; temporary files: {strays_before[:8]})")
    gc = subprocess.run([str(CTL), "gc", store_uri, ledger_uri, "--grace", "0", "--json"],
                        capture_output=True, text=True, timeout=120)
    if gc.returncode != 0:
        problems.append(f"torch-dataflow gc failed ({gc.returncode}): {gc.stderr.strip()[-800:]}")
    after, strays = _stored(cell, store_uri, root, ids)
    if after or strays:
        problems.append(f"leftover bytes after `torch-dataflow gc --grace 0` ({gc.stdout.strip()}): "
                        f"{len(after)} generations still stored {sorted(after)[:8]}, stray files {strays[:8]} "
                        f"({sum(b for _, b in strays)} bytes)")
    return problems


# ---------------------------------------------------------------- running cells
def _uris(cell: Cell, work: Path, servers: dict[str, Any]) -> tuple[str, str, str]:
    """``(consumer store URI, producer store URI, ledger URI)`` for a cell."""
    ns = f"kc{uuid.uuid4().hex[:10]}"
    if cell.store == "file":
        store = producer_store = f"file://{work}/store"
    else:
        base = f"{_need(servers['mooncake'])}?namespace={ns}"
        store, producer_store = f"{base}&segment_size=0", f"{base}&segment_size=64MiB"  # objects in the writer
    sqlite = f"sqlite://{work}/ledger.db"
    ledger = sqlite if cell.ledger == "sqlite" else f"{_need(servers['redis'])}?namespace={ns}"
    return store, producer_store, ledger


def _trainer_cfg(cell: Cell, work: Path, store: str, ledger: str) -> dict[str, Any]:
    # Mooncake cannot start a client in a process forked from one that has one, and a resume
    # drains the delete queue (a Mooncake client) before the DataLoader starts its workers.
    mp_context = "forkserver" if cell.store == "mooncake" else None
    return {"store": store, "ledger": ledger, "dir": str(work), "n": cell.n, "bs": 2, "accumulate": 2,
            "ckpt_every": 2, "loop": cell.loop, "finish": True, "mp_context": mp_context}


def _run_trainer_chain(zygote: tp.Zygote, cell: Cell, cfg: dict[str, Any], outcomes: list[Any]) -> None:
    for phase, at, nw in kill_plan(cell):
        [rc] = zygote.run({"fn": "_campaign_procs:trainer", "cfg": {**cfg, "kill": [phase, at], "nw": nw}})
        outcomes.append(((phase, at, nw), rc))
        if rc != -9:
            return  # the kill did not fire (the run finished or failed): reported by the caller
    [rc] = zygote.run({"fn": "_campaign_procs:trainer", "cfg": {**cfg, "nw": 2}})
    outcomes.append((("final", 0, 2), rc))


def _run_producer_chain(zygote: tp.Zygote, cell: Cell, work: Path, store: str, producer_store: str,
                        ledger: str, outcomes: list[Any]) -> list[str]:
    """Producer attempts (killed, restarted) and one trainer run, concurrently; returns the
    verdict, taken while the last producer still holds its Mooncake segment."""
    plan = kill_plan(cell)
    pcfg = {"store": producer_store, "ledger": ledger, "dir": str(work), "n": cell.n, "delay": 0.01,
            "kills": [[phase, at] for phase, at, _ in plan], "hold": cell.store == "mooncake"}
    tcfg = {**_trainer_cfg(cell, work, store, ledger), "nw": plan[0][2]}
    if cell.store == "mooncake":
        tcfg["wait_for"] = "produced"  # a killed producer's objects are gone: train what the restart put back
    rcs: list[Any] = []
    runner = threading.Thread(target=lambda: rcs.extend(zygote.run(
        {"fn": "_campaign_procs:producer_chain", "cfg": pcfg}, {"fn": "_campaign_procs:trainer", "cfg": tcfg})))
    runner.start()
    try:
        assert cp._wait_file(work / "trainer.exit", 180), "the trainer did not end within 180 s"
        if cell.store == "mooncake":
            time.sleep(CLIENT_TTL_S + 1)  # the master has dropped every killed producer's client by now
        problems = verdict(cell, work, store, ledger)
    finally:
        (work / "release").touch()
        runner.join(120)
    assert not runner.is_alive()
    prod = json.loads((work / "producer.json").read_text())["rcs"] if (work / "producer.json").exists() else []
    outcomes.extend([((phase, at, None), rc) for (phase, at, _), rc in zip(plan, prod, strict=False)])
    outcomes.append((("producer-final", 0, None), prod[len(plan)] if len(prod) > len(plan) else None))
    outcomes.append((("trainer", 0, tcfg["nw"]), rcs[1] if len(rcs) > 1 else None))
    return problems


def _chain_problems(cell: Cell, outcomes: list[Any]) -> list[str]:
    plan = kill_plan(cell)
    fired = [o for o, rc in outcomes[: len(plan)] if rc == -9]
    problems = []
    if len(fired) != len(plan):
        problems.append(f"only {len(fired)} of {len(plan)} planned kills fired")
    problems += [f"{what} exited with {rc}, expected 0" for what, rc in outcomes[len(plan):] if rc != 0]
    return problems


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cell", CELLS, ids=[c.name for c in CELLS])
def test_kill_campaign(cell: Cell, zygote: tp.Zygote, tmp_path: Path, redis_uri: Any, mooncake_uri: Any) -> None:
    err = Path(zygote._err.name)
    err_at = err.stat().st_size
    store, producer_store, ledger = _uris(cell, tmp_path, {"redis": redis_uri, "mooncake": mooncake_uri})
    outcomes: list[Any] = []
    holder = None
    try:
        if cell.role == "trainer":
            if cell.store == "mooncake":  # the objects live in the filler's segment: it must outlive the chain
                with err.open("ab") as log:
                    holder = subprocess.Popen([sys.executable, cp.__file__, "hold", producer_store, ledger,
                                               str(cell.n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=log, text=True)
                assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            else:
                with FeatureWriter(store, ledger, name="filler") as w:
                    for i in range(cell.n):
                        w.put(cp.sample_id(i), tp.sample(i, cp.FEATURE_SIZE))
            _run_trainer_chain(zygote, cell, _trainer_cfg(cell, tmp_path, store, ledger), outcomes)
            problems = _chain_problems(cell, outcomes)
            if not problems:
                problems = verdict(cell, tmp_path, store, ledger)
        else:
            problems = _run_producer_chain(zygote, cell, tmp_path, store, producer_store, ledger, outcomes)
            problems = _chain_problems(cell, outcomes) + problems
    finally:
        if holder is not None:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(60)
    if problems:
        with err.open("rb") as f:
            f.seek(err_at)
            lines = f.read().decode(errors="replace").splitlines()
        glog = re.compile(r"^[IWE]\d{4} |^WARNING: Logging before InitGoogleLogging")  # Mooncake's native log
        tail = "\n".join(line for line in lines if not glog.match(line))[-3000:]
        pytest.fail(f"cell {cell.name} (seed {SEED}): " + "; ".join(problems)
                    + f"\nkill plan and outcomes (phase, at, num_workers) -> exit code: {outcomes}"
                    + f"\nstderr of the jobs (tail):\n{tail}")
