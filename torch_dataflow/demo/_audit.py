"""The demo's closing summary and its exactly-once audit.

Two independent witnesses must agree:

* the **ledger** (``trained_steps()``, ``counts()``): which samples were acked
  at which optimizer step, and that nothing is left pending or leased;
* the **trainer's own log** (one line per batch: attempt, step, sample ids).
  A trainer that crashed after its last checkpoint trained some samples whose
  effect died with it; the restarted attempt resumed at step ``r`` (logged at
  its start), so the crashed attempt's batches after ``r`` are *replayed*, not
  counted. Every other logged batch is in the final model.

The check: every committed sample is in the ledger as trained, appears
exactly once among the counted batches of the log, at the step the ledger
recorded; nothing else was trained.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..ledger import Ledger

__all__ = ["audit", "format_summary", "read_events"]


def read_events(path: Path) -> list[dict[str, Any]]:
    """The trainer's events, in order (a torn last line from a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _resume_steps(events: list[dict[str, Any]]) -> dict[int, int]:
    """attempt -> the step the *next* attempt resumed from (its effect boundary)."""
    starts = {e["attempt"]: e["step"] for e in events if e["ev"] == "train_start"}
    return {a - 1: step for a, step in starts.items() if a > 0}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def audit(events: list[dict[str, Any]], ledger: Ledger, produced: int) -> dict[str, Any]:
    """Cross-check the trainer's log against the ledger (see the module docs).

    Args:
        events: :func:`read_events` of the trainer's log.
        ledger: the run's ledger.
        produced: how many samples the producer committed.

    Returns:
        Counts, losses and ``exactly_once = {"ok": bool, "problems": [...]}``.
    """
    cutoff = _resume_steps(events)
    counted: Counter[str] = Counter()
    logged_step: dict[str, int] = {}
    replayed = 0
    batches = [e for e in events if e["ev"] == "batch"]
    for e in batches:
        if e["step"] > cutoff.get(e["attempt"], math.inf):
            replayed += len(e["ids"])
            continue
        for sid in e["ids"]:
            counted[sid] += 1
            logged_step[sid] = e["step"]
    counts = ledger.counts()
    trained = ledger.trained_steps()
    quarantined = {ref.sample_id for ref, _ in ledger.quarantined() if ref is not None}
    problems: list[str] = []
    if counts.committed != produced:
        problems.append(f"ledger has {counts.committed} committed samples, the producer wrote {produced}")
    if counts.pending or counts.leased:
        problems.append(f"ledger still has {counts.pending} pending and {counts.leased} leased samples")
    if not counts.closed:
        problems.append("the producer never closed the stream")
    if len(trained) + len(quarantined) != counts.committed:
        problems.append(f"{counts.committed} committed but {len(trained)} trained + {len(quarantined)} quarantined")
    twice = sorted(s for s, n in counted.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} samples trained more than once (first: {twice[0]})")
    missing = sorted(set(trained) - set(counted))
    if missing:
        problems.append(
            f"{len(missing)} samples acked in the ledger but not in the trainer's log (first: {missing[0]})"
        )
    extra = sorted(set(counted) - set(trained))
    if extra:
        problems.append(f"{len(extra)} samples in the trainer's log but not acked in the ledger (first: {extra[0]})")
    moved = sorted(s for s in set(trained) & set(logged_step) if trained[s] != logged_step[s])
    if moved:
        s = moved[0]
        problems.append(
            f"{len(moved)} samples acked at another step than trained ({s}: {trained[s]} vs {logged_step[s]})"
        )
    evals = [e for e in events if e["ev"] == "eval"]
    losses = [e["loss"] for e in batches]
    k = max(1, min(10, len(losses) // 4))
    trained_bytes = 0
    for sid in counted:
        ref = ledger.get_ref(sid)
        trained_bytes += ref.nbytes if ref is not None else 0
    return {
        "committed": counts.committed,
        "trained": sum(counted.values()),
        "acked": len(trained),
        "durable": counts.durable,
        "replayed": replayed,
        "quarantined": len(quarantined),
        "restarts": len(cutoff),
        "steps": max((e["step"] for e in batches), default=0),
        "trained_bytes": trained_bytes,
        "loss": {
            "heldout_start": evals[0]["heldout"] if evals else None,
            "heldout_end": evals[-1]["heldout"] if evals else None,
            "heldout_acc_start": evals[0]["acc0"] if evals else None,
            "heldout_acc_end": evals[-1]["acc0"] if evals else None,
            "heldout_curve": [(e["step"], round(e["heldout"], 4)) for e in evals],
            "train_first": _mean(losses[:k]),
            "train_last": _mean(losses[-k:]),
        },
        "exactly_once": {"ok": not problems, "problems": problems},
    }


def _rate(n: float, seconds: float | None) -> float | None:
    return n / seconds if seconds else None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_summary(s: dict[str, Any]) -> str:
    """The closing summary as text (what ``torch-dataflow demo`` prints)."""
    t, loss, eo = s["throughput"], s["loss"], s["exactly_once"]
    lines = [
        "torch-dataflow demo: summary",
        f"  store / ledger     {s['store']}  /  {s['ledger']}",
        f"  target             {s['target']}",
        f"  produced           {s['committed']} samples  ({_fmt(t['produce_samples_s'], '.1f')} samples/s, "
        f"{_fmt(t['produce_mb_s'], '.2f')} MB/s)",
        f"  trained            {s['trained']} samples in {s['steps']} optimizer steps  "
        f"({_fmt(t['train_samples_s'], '.1f')} samples/s, {_fmt(t['train_mb_s'], '.2f')} MB/s)",
        f"  acked (ledger)     {s['acked']}   durable {s['durable']}   quarantined {s['quarantined']}",
        f"  replayed           {s['replayed']}   (trainer restarts: {s['restarts']})",
        "  store resident     "
        + (
            "n/a (Mooncake cannot list another process's keys)"
            if s["store_resident_bytes"] is None
            else f"{s['store_resident_bytes']} bytes"
        )
        + " at the end",
        f"  held-out loss      {_fmt(loss['heldout_start'])} -> {_fmt(loss['heldout_end'])}   "
        f"(train loss, first/last batches: {_fmt(loss['train_first'])} -> {_fmt(loss['train_last'])})",
        f"  held-out top-1     {_pct(loss['heldout_acc_start'])} -> {_pct(loss['heldout_acc_end'])} "
        "agreement of the draft's first prediction with the target",
        f"  wall time          {s['wall_seconds']:.1f} s",
    ]
    if eo["ok"]:
        lines.append(
            f"  exactly once       OK: all {s['committed']} committed samples trained exactly once "
            "(ledger and trainer log agree)"
        )
    else:
        lines.append("  exactly once       FAILED")
        lines += [f"    - {p}" for p in eo["problems"]]
    return "\n".join(lines)
