"""Exact replay after SIGKILL (DESIGN invariant 2), for Lightning and a plain loop.

A training job runs in a forked subprocess and is killed (the whole process
group, DataLoader workers included) at seeded kill points spread over every
phase: mid-batch, between the optimizer step and its ack, between the ack and
the checkpoint, half way through a checkpoint write, and after a complete
write but before the ledger hears of it. Each next run resumes from the
newest complete checkpoint and the chain ends with a run that finishes. Then,
from the ledger *and* from the history the model itself carries (a per-sample
log cut back to the length stored in the checkpoint, and a ``seen`` counter
buffer in the model's state), every committed sample was trained exactly once
and at the step the ledger recorded.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import _train_procs as tp
import pytest
import torch

from torch_dataflow import open_ledger

SEED = 20261107
N_KILLS = 22
_MAX_AT = {"mid_batch": 6, "after_step": 3, "after_ack": 3, "ckpt_write": 2, "after_write": 2}


def kill_points(seed: int, n: int) -> list[tuple[str, int, int]]:
    """``n`` seeded ``(phase, at, num_workers)``: every phase equally often, order shuffled."""
    rng = random.Random(seed)
    points = [(phase, rng.randint(1, _MAX_AT[phase]), rng.choice([0, 2]))
              for phase in (tp.PHASES * n)[:n]]
    rng.shuffle(points)
    return points


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory):
    z = tp.Zygote(str(tmp_path_factory.mktemp("zygote") / "stderr.log"))
    yield z
    z.close()


def run_chain(zygote: tp.Zygote, work: Path, fn: str, n: int, extra: dict[str, Any]) -> list[tuple[Any, int]]:
    store, ledger = f"file://{work}/store", f"sqlite://{work}/ledger.db"
    tp.fill(store, ledger, n)
    cfg = {"store": store, "ledger": ledger, "dir": str(work), "n": n, "bs": 2, "accumulate": 2, "ckpt_every": 2,
           **extra}
    outcomes = []
    for phase, at, nw in kill_points(SEED, N_KILLS):
        [rc] = zygote.run({"fn": fn, "cfg": {**cfg, "kill": [phase, at], "nw": nw}})
        assert rc in (0, -9), f"{fn} failed with exit code {rc} at kill point {(phase, at)}"
        outcomes.append(((phase, at, nw), rc))
        if rc == 0:
            break
    else:
        [rc] = zygote.run({"fn": fn, "cfg": {**cfg, "nw": 2}})
        assert rc == 0
    return outcomes


def check_exactly_once(work: Path, n: int) -> None:
    ids = [f"s{i:05d}" for i in range(n)]
    led = open_ledger(f"sqlite://{work}/ledger.db")
    c = led.counts()
    assert (c.pending, c.leased, c.trained, c.durable) == (0, 0, 0, n), c
    steps = led.trained_steps()
    # The history the final model carries: the log, cut on every resume to the checkpoint's length...
    log = tp.History.read(str(work / "history.0.log"))
    final = torch.load(work / "final.ckpt", map_location="cpu", weights_only=False)
    assert final["log_len"] == (work / "history.0.log").stat().st_size
    counts = Counter(sid for sid, _ in log)
    assert sorted(counts) == ids and set(counts.values()) == {1}, counts.most_common(3)
    assert dict(log) == steps  # ...matches the ledger sample by sample, step by step
    # ...and the model's own per-sample counter agrees.
    seen = final["state_dict"]["seen"] if "state_dict" in final else final["seen"]
    assert seen.tolist() == [1.0] * n
    result = json.loads((work / "result.0.json").read_text())
    assert result["lost"] == 0


def _report(outcomes: list[tuple[Any, int]]) -> None:
    fired = [p for p, rc in outcomes if rc == -9]
    assert len(fired) >= 20, f"only {len(fired)} kill points fired: {outcomes}"
    assert {p[0] for p in fired} == set(tp.PHASES)


def test_kill_points_are_seeded_and_cover_every_phase() -> None:
    points = kill_points(SEED, N_KILLS)
    assert points == kill_points(SEED, N_KILLS) and len(points) >= 20
    assert Counter(p[0] for p in points).keys() == set(tp.PHASES)


@pytest.mark.slow
def test_lightning_crash_replay_is_exactly_once(zygote: tp.Zygote, tmp_path: Path) -> None:
    n = 120
    outcomes = run_chain(zygote, tmp_path, "lightning_job", n, {})
    _report(outcomes)
    check_exactly_once(tmp_path, n)


@pytest.mark.slow
def test_plain_loop_crash_replay_is_exactly_once(zygote: tp.Zygote, tmp_path: Path) -> None:
    n = 120
    outcomes = run_chain(zygote, tmp_path, "plain_job", n, {})
    _report(outcomes)
    check_exactly_once(tmp_path, n)
