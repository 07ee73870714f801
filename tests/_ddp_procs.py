"""Lightning jobs for tests/test_ddp_resume.py, and a zygote that forks them.

A *job* is one training run of ``world`` ranks (``world > 1``: DDP on gloo,
started the way torchrun starts ranks, through ``LOCAL_RANK`` and friends),
all in one process session: a kill point SIGKILLs the session, i.e. the whole
job — every rank and every DataLoader worker — as a lost node or a cancelled
cluster job would. The source is a ``FeaturePool`` + ``ReshardingSampler``
(``kind="pool"``) or an offline ``FeatureStoreDataset`` (``kind="dataset"``);
the Trainer keeps Lightning's defaults (``use_distributed_sampler`` untouched).

The model's own state says what it trained: the buffer ``seen`` counts, per
sample, the optimizer steps that included it (padded repeats, whose lease is
``""``, are not counted). It is all-reduced at each optimizer step and saved in
every checkpoint, so a resume brings it back exactly as the model was.

Run as a script, the zygote imports Lightning once and reads one JSON request
per line on stdin (``{"fn": name, "cfg": {...}}``); it forks the job into its
own session, waits, kills any straggler of that session and answers
``{"rc": code}`` (``-9`` = killed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]


def sample(i: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((8,), float(i)), "i": torch.tensor(i)}


def fill(store: str, ledger: str, n: int) -> None:
    from torch_dataflow import FeatureWriter

    with FeatureWriter(store, ledger, name="fill") as w:
        w.put_many([(f"s{i:05d}", sample(i)) for i in range(n)])


def _parts() -> dict[str, Any]:
    import lightning as L

    class Counter(L.LightningModule):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.net = nn.Linear(8, 1)
            self.register_buffer("seen", torch.zeros(n))
            self.pending = torch.zeros(n)
            self.batches: dict[int, int] = {}

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
            real = torch.tensor([bool(lid) for lid in batch["__lease__"]])
            self.pending.index_add_(0, batch["i"][real], torch.ones(int(real.sum())))
            epoch = self.trainer.current_epoch
            self.batches[epoch] = self.batches.get(epoch, 0) + 1
            return self.net(batch["x"]).pow(2).mean()

        def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            super().optimizer_step(*args, **kwargs)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(self.pending)
            self.seen += self.pending
            self.pending.zero_()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Killer(L.Callback):
        """On rank 0, SIGKILL the whole job once optimizer step ``step`` of ``epoch`` is acked."""

        def __init__(self, kill: list[int] | None) -> None:
            self.kill = tuple(kill) if kill else None

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_rank == 0 and (trainer.current_epoch, trainer.global_step) == self.kill:
                os.killpg(0, signal.SIGKILL)

    return {"L": L, "Counter": Counter, "Killer": Killer}


def _loader(cfg: dict[str, Any]) -> tuple[Any, Any]:
    from torch.utils.data import DataLoader

    from torch_dataflow import FeatureLoader, FeatureStoreDataset
    from torch_dataflow.pool import FeaturePool
    from torch_dataflow.sampler import ReshardingSampler

    bs, nw = cfg.get("bs", 2), cfg.get("nw", 0)
    if cfg["kind"] == "pool":
        pool = FeaturePool(cfg["store"], cfg["ledger"])
        # Built before trainer.fit, as scripts do: rank and world are read later, from the process group.
        sampler = ReshardingSampler(pool, shuffle=True, seed=3, lease_ttl=120, drop_last=cfg.get("drop_last", True))
        loader = DataLoader(pool, batch_size=bs, sampler=sampler, num_workers=nw,
                            multiprocessing_context="fork" if nw else None)
        return pool, loader
    ds = FeatureStoreDataset(cfg["store"], cfg["ledger"], mode="offline", batch_size=bs, lease_ttl=120,
                             idle_timeout=60)
    return ds, FeatureLoader(ds, batch_size=bs, num_workers=nw, multiprocessing_context="fork" if nw else None)


def rank_main(cfg: dict[str, Any]) -> None:
    """One rank of a (possibly resumed) job; writes ``result.<rank>.json`` when fit returns."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from torch_dataflow.lightning import FeatureAckCallback

    parts = _parts()
    L = parts["L"]
    torch.manual_seed(0)
    work = Path(cfg["dir"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    src, loader = _loader(cfg)
    model = parts["Counter"](cfg["n"])
    ckpt = ModelCheckpoint(dirpath=str(work / "ck"), every_n_train_steps=cfg.get("ckpt_every", 2), save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=cfg.get("epochs", 1),
        callbacks=[FeatureAckCallback(src), parts["Killer"](cfg.get("kill")), ckpt], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, loader, ckpt_path="last" if cfg.get("resume") else None)
    result = {"rank": trainer.global_rank, "world": world, "global_step": trainer.global_step,
              "seen": model.seen.tolist(), "batches": model.batches, "len": len(loader) if cfg["kind"] == "pool" else None}
    (work / f"result.{trainer.global_rank}.json").write_text(json.dumps(result))


def job(cfg: dict[str, Any]) -> None:
    """Fork ``cfg["world"]`` ranks (DDP when > 1) in this process's session and wait for them."""
    world = int(cfg.get("world", 1))
    if world == 1:
        rank_main(cfg)
        return
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(cfg["port"]), "WORLD_SIZE": str(world),
                               "NODE_RANK": "0", "LOCAL_RANK": str(rank)})
            _exit_after(rank_main, cfg)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    if any(codes):
        raise SystemExit(f"rank exit codes {codes}")


def _exit_after(fn: Any, cfg: dict[str, Any]) -> None:
    code = 0
    try:
        fn(cfg)
    except SystemExit as e:
        print(e, file=sys.stderr)
        code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------- zygote
class Zygote:
    """Client side: start the zygote (a child of the test process), run jobs, close it."""

    def __init__(self, err_path: str) -> None:
        import subprocess

        self.err_path = err_path
        self._err = open(err_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True)

    def run(self, fn: str, cfg: dict[str, Any]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"fn": fn, "cfg": cfg}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"zygote died (exit {self.proc.wait()}); see {self.err_path}")
        return int(json.loads(line)["rc"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._err.close()


def zygote() -> None:
    import lightning  # noqa: F401 - imported once here, inherited by every fork

    import torch_dataflow.lightning  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os.dup2(2, 1)  # stdout is the reply channel
            _exit_after(globals()[req["fn"]], req["cfg"])
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # stragglers of the job (ranks, DataLoader workers)
        sys.stdout.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    zygote()
