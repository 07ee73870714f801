"""Process bodies for the seeded SIGKILL campaign (tests/test_kill_campaign.py).

Runs inside the zygote of :mod:`_train_procs` (``"_campaign_procs:trainer"``,
``"_campaign_procs:producer_chain"``), which forks each job into its own session.
Kill points are test code, never library code: the job wraps a store or ledger
method *of its own process* so that it SIGKILLs itself at the k-th call.

Trainer kill phases: the five of :data:`_train_procs.PHASES` (mid-batch, between
step and ack, between ack and checkpoint, half way through a checkpoint write,
between a complete write and the durable mark) plus ``before_delete``: between
the durable mark (bytes freed in the ledger) and the store deletes, at the k-th
``settle`` of the delete queue.

Producer kill phases (one producer attempt, killed alone; the chain restarts it
under the same ``name`` with ``resume=True``): ``after_reserve`` (generation
reserved, no byte written), ``mid_write`` (file://: a temporary file half
written), ``after_put`` (bytes published, commit not sent), ``mid_stream``
(after the k-th committed put).

Run as a script (``python _campaign_procs.py hold STORE LEDGER N``) it is a
Mooncake *holder*: it puts ``N`` samples into its own segment, closes the
stream, prints ``ready`` and keeps the objects alive until stdin closes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _train_procs as tp  # noqa: E402
from _procs import sample  # noqa: E402

TRAINER_PHASES = (*tp.PHASES, "before_delete")
PRODUCER_PHASES = ("after_reserve", "mid_write", "after_put", "mid_stream")
PRODUCER_NAME = "producer-0"
FEATURE_SIZE = 8  # the Tiny model of _train_procs is nn.Linear(8, 1)


def sample_id(i: int) -> str:
    return f"s{i:05d}"


# ---------------------------------------------------------------- trainer
def _kill_before_deletes(store_uri: str) -> None:
    """SIGKILL this job at the k-th ``settle`` (``before_delete``): the ledger already
    records the frees, the store still holds the bytes."""
    from torch_dataflow.uri import STORE_SCHEMES, resolve_backend

    cls = resolve_backend(store_uri, STORE_SCHEMES, "store")
    inner = cls.settle

    def settle(self: Any, ref: Any, **kw: Any) -> bool:
        tp.maybe_die("before_delete")
        return bool(inner(self, ref, **kw))

    cls.settle = settle


def trainer(cfg: dict[str, Any]) -> None:
    """One (possibly killed) run of the plain loop or the Lightning job of
    :mod:`_train_procs`, with the ``before_delete`` kill point added."""
    work = Path(cfg["dir"])
    try:
        _kill_before_deletes(cfg["store"])
        if cfg.get("wait_for"):  # the producer chain's last attempt has put everything, or the chain ended
            deadline = time.monotonic() + 120
            while not (work / cfg["wait_for"]).exists():
                if (work / "producer.exit").exists() or time.monotonic() > deadline:
                    raise RuntimeError(f"the producer chain ended without {cfg['wait_for']!r}: see its traceback")
                time.sleep(0.05)
        (tp.lightning_job if cfg["loop"] == "lightning" else tp.plain_job)(cfg)
    finally:
        (work / "trainer.exit").touch()


def _wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- producer
def _die_alone() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # the attempt only: its supervisor restarts it


def _install_producer_kills(writer: Any) -> None:
    """Wrap this attempt's own store and ledger instances (the library is untouched)."""
    store, ledger = writer.store, writer.ledger
    put, commit = store.put, ledger.commit

    def killing_put(*args: Any, **kwargs: Any) -> Any:
        if tp.hit("after_reserve"):  # reserved, not one byte written
            _die_alone()
        return put(*args, **kwargs)

    def killing_commit(refs: Any, *args: Any, **kwargs: Any) -> Any:
        if tp.hit("after_put"):  # bytes published, commit never sent
            _die_alone()
        return commit(refs, *args, **kwargs)

    store.put = killing_put
    ledger.commit = killing_commit
    write_file = getattr(store, "_write_file", None)
    if write_file is not None:  # file://: a temporary file in a sample directory, half written
        root = os.path.realpath(store.root)

        def killing_write(path: str, parts: Any) -> int:
            if os.path.realpath(os.path.dirname(path)) != root and tp.hit("mid_write"):
                first = bytes(memoryview(parts.buffers[0] if hasattr(parts, "buffers") else parts[0]).cast("B"))
                with open(path, "wb") as f:
                    f.write(first[: max(1, len(first) // 2)])
                _die_alone()
            return int(write_file(path, parts))

        store._write_file = killing_write


def produce_attempt(cfg: dict[str, Any], kill: list[Any] | None) -> None:
    """Put every id not yet committed under :data:`PRODUCER_NAME`, then close the stream."""
    from torch_dataflow import FeatureWriter

    tp.set_kill(kill)
    w = FeatureWriter(cfg["store"], cfg["ledger"], name=PRODUCER_NAME, resume=True)
    _install_producer_kills(w)
    for i in range(cfg["n"]):
        w.put(sample_id(i), sample(i, FEATURE_SIZE), if_absent=True)
        if tp.hit("mid_stream"):
            _die_alone()
        if cfg.get("delay"):
            time.sleep(cfg["delay"])
    w.close()


def producer_chain(cfg: dict[str, Any]) -> None:
    """Run producer attempts one after the other, each killed at its planned point,
    then one clean attempt; writes ``producer.json`` (``{"rcs": [...]}``). With
    ``hold``, the last attempt keeps its process (its Mooncake segment) alive
    until the test writes ``release``."""
    work = Path(cfg["dir"])
    try:
        _producer_chain(cfg, work)
    finally:
        (work / "producer.exit").touch()


def _producer_chain(cfg: dict[str, Any], work: Path) -> None:
    rcs = []
    kills = [*cfg["kills"], None]
    for k, kill in enumerate(kills):
        last = k == len(kills) - 1
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                produce_attempt(cfg, kill)
                if last:
                    (work / "produced").touch()
                    if cfg.get("hold"):
                        _wait_file(work / "release", 240)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        rcs.append(os.waitstatus_to_exitcode(status))
        (work / "producer.json").write_text(json.dumps({"rcs": rcs}))
        if rcs[-1] not in (0, -9):
            break


# ---------------------------------------------------------------- Mooncake holder
def hold(store: str, ledger: str, n: int) -> None:
    """Fill a store from this process (objects in its own segment) and keep them alive."""
    from torch_dataflow import FeatureWriter

    with FeatureWriter(store, ledger, name="filler") as w:
        for i in range(n):
            w.put(sample_id(i), sample(i, FEATURE_SIZE))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the test closes our stdin


if __name__ == "__main__":
    if sys.argv[1:2] == ["hold"]:
        hold(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"usage: {sys.argv[0]} hold STORE LEDGER N")
