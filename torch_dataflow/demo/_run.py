"""The demo's orchestrator: start the producer and trainer, draw progress, audit."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import sys
import time
from typing import Any

from ..errors import ConfigError, DataflowError
from ..ledger import open_ledger
from ..stores import open_store
from ._audit import audit, read_events
from ._config import DemoConfig
from ._producer import produce
from ._trainer import train

__all__ = ["run_demo"]

_POLL = 0.2


def _prepare(cfg: DemoConfig) -> None:
    """Start from a clean slate: delete what an earlier run left in the work
    directory; refuse a user-given store or ledger that already holds samples."""
    made = not cfg.root.exists()
    cfg.root.mkdir(parents=True, exist_ok=True)
    for path in cfg.owned_paths():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    ledger = open_ledger(cfg.ledger_uri)
    try:
        held = ledger.counts().committed
    except BaseException:
        if made and not any(cfg.root.iterdir()):
            cfg.root.rmdir()  # an unreachable ledger: leave no empty work directory behind
        raise
    finally:
        ledger.close()
    if held:
        raise ConfigError(
            f"ledger {cfg.ledger_uri} already holds {held} samples: give the demo an empty one "
            "(another Redis db number or `?namespace=NAME`, or FLUSHDB)"
        )
    store = open_store(cfg.store_uri)
    try:
        resident = store.health().count
    finally:
        store.close()
    if resident:
        raise ConfigError(f"store {cfg.store_uri} already holds {resident} samples: give the demo an empty one")


class _Progress:
    """Two bars driven by the ledger (any process's view), plus the trainer's losses."""

    def __init__(self, cfg: DemoConfig) -> None:
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.produced = tqdm(
            total=cfg.samples, desc="produced", unit="sample", position=0, disable=not cfg.progress, dynamic_ncols=True
        )
        self.trained = tqdm(
            total=cfg.samples, desc="trained ", unit="sample", position=1, disable=not cfg.progress, dynamic_ncols=True
        )
        self._offset = 0
        self._post: dict[str, str] = {}
        self._dirty = False
        self.ema: float | None = None
        self.heldout: float | None = None
        self.crashed_at: int | None = None

    def _tail(self) -> None:
        path = self.cfg.events_file
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            e = json.loads(line)
            if e["ev"] == "batch":
                self.ema = e["loss"] if self.ema is None else 0.9 * self.ema + 0.1 * e["loss"]
            elif e["ev"] == "eval":
                self.heldout = e["heldout"]
            elif e["ev"] == "crash":
                self.crashed_at = e["step"]

    def update(self, ledger: Any, *, final: bool = False) -> None:
        """Move the bars to the ledger's counts; ``final``: no trainer restart can follow,
        so a full bar is done and ends now (its last line keeps the rate it finished at)."""
        c = ledger.counts()
        self._tail()
        post = {}
        if self.ema is not None:
            post["loss(ema)"] = f"{self.ema:.3f}"
        if self.heldout is not None:
            post["held-out"] = f"{self.heldout:.3f}"
        if post and post != self._post and not self._done(self.trained):
            self._post = post
            self.trained.set_postfix(post, refresh=False)
            self._dirty = True
        for bar, n, ends in ((self.produced, c.committed, True), (self.trained, c.trained + c.durable, final)):
            if self._done(bar):
                continue
            if ends and n >= self.cfg.samples:
                bar.n = n
                bar.close()  # draws the final line once; nothing refreshes it after, so its rate stays
            elif bar.n != n or (bar is self.trained and self._dirty):
                bar.n = n  # may go back: a restart replays what its checkpoint did not keep
                bar.refresh()
        self._dirty = False

    @staticmethod
    def _done(bar: Any) -> bool:
        return bool(bar.disable)  # tqdm sets it on close (and it is set for --no-progress)

    def write(self, msg: str) -> None:
        (self.trained.write if self.cfg.progress else print)(msg, file=sys.stderr)

    def close(self) -> None:
        self.produced.close()
        self.trained.close()


def _stop(*procs: Any) -> None:
    for p in procs:
        if p is not None and p.is_alive():
            p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end and return its summary (also saved as ``summary.json``).

    Raises:
        ConfigError: bad settings, or a store/ledger that is not empty.
        DataflowError: the producer or trainer failed (their own error is on stderr).
    """
    _prepare(cfg)
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")  # fork after torch threads start is unsafe
    stop = ctx.Event()
    producer = ctx.Process(target=produce, args=(cfg.to_dict(), stop), name="td-demo-producer")
    trainer: Any = None
    ledger = open_ledger(cfg.ledger_uri)
    progress = _Progress(cfg)
    attempt = 0
    try:
        producer.start()
        trainer = ctx.Process(target=train, args=(cfg.to_dict(), attempt), name="td-demo-trainer")
        trainer.start()
        while True:
            time.sleep(_POLL)
            # Only a --crash-at-step run can restart the trainer (and move its bar back), once.
            progress.update(ledger, final=cfg.crash_at_step is None or attempt > 0)
            if producer.exitcode not in (None, 0):
                raise DataflowError(f"the producer process failed (exit code {producer.exitcode}); see its error above")
            if trainer.exitcode is None:
                continue
            if trainer.exitcode == 0:
                break
            if trainer.exitcode == -signal.SIGKILL and progress.crashed_at is not None and attempt == 0:
                progress.write(
                    f"trainer killed at step {progress.crashed_at} (--crash-at-step); "
                    "restarting it from its last checkpoint"
                )
                attempt += 1
                trainer = ctx.Process(target=train, args=(cfg.to_dict(), attempt), name="td-demo-trainer")
                trainer.start()
                continue
            raise DataflowError(f"the trainer process failed (exit code {trainer.exitcode}); see its error above")
        progress.update(ledger, final=True)
        stop.set()
        producer.join(60)
    finally:
        progress.close()
        stop.set()
        _stop(trainer, producer)
    wall = time.monotonic() - started
    try:
        stats = json.loads(cfg.producer_file.read_text())
    except FileNotFoundError as e:
        raise DataflowError("the producer ended without writing its statistics") from e
    events = read_events(cfg.events_file)
    result = audit(events, ledger, stats["written"])
    ledger.close()
    resident: int | None = None
    if not cfg.store_uri.startswith("mooncake:"):  # Mooncake lists only the keys this process wrote
        store = open_store(cfg.store_uri)
        try:
            resident = store.health().resident_bytes
        finally:
            store.close()
    train_times = [e["time"] for e in events if e["ev"] in ("train_start", "end")]
    train_s = (max(train_times) - min(train_times)) if len(train_times) > 1 else None
    summary = {
        "store": cfg.store_uri,
        "ledger": cfg.ledger_uri,
        "target": stats["target"],
        **result,
        "producer": stats,
        "throughput": {
            "produce_samples_s": stats["written"] / stats["seconds"] if stats["seconds"] else None,
            "produce_mb_s": stats["bytes"] / 1e6 / stats["seconds"] if stats["seconds"] else None,
            "train_samples_s": result["trained"] / train_s if train_s else None,
            "train_mb_s": result["trained_bytes"] / 1e6 / train_s if train_s else None,
        },
        "store_resident_bytes": resident,
        "wall_seconds": wall,
        "config": cfg.to_dict(),
    }
    cfg.summary_file.write_text(json.dumps(summary, indent=2))
    return summary
