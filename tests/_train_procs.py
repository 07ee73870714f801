"""Training process bodies for the Lightning / plain-loop / crash tests, and a
"zygote" that forks them so each run does not pay for importing lightning.

Run as a script, the zygote reads one JSON request per line on stdin
(``{"jobs": [{"fn": name, "cfg": {...}, "env": {...}}]}``), forks every job into
its own session (so a kill point can SIGKILL the whole job, DataLoader workers
included, as a crashed node would lose them), waits, kills any straggler in
each job's process group, and answers ``{"rcs": [...]}`` (``-9`` = killed).
"""

from __future__ import annotations

import contextlib
import glob
import io
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
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # the tests and the repository, also when run as a script

from _procs import sample  # noqa: E402

# ---------------------------------------------------------------- kill points
PHASES = ("mid_batch", "after_step", "after_ack", "ckpt_write", "after_write")
_kill: tuple[str, int] | None = None
_counts: dict[str, int] = {}


def set_kill(kill: list[Any] | None) -> None:
    global _kill
    _kill = (str(kill[0]), int(kill[1])) if kill else None
    _counts.clear()


def hit(phase: str) -> bool:
    """Count an event of ``phase``; True when it is the chosen kill point."""
    _counts[phase] = _counts.get(phase, 0) + 1
    return _kill is not None and _kill == (phase, _counts[phase])


def die() -> None:
    os.killpg(0, signal.SIGKILL)  # the job's session: main process and its DataLoader workers


def maybe_die(phase: str) -> None:
    if hit(phase):
        die()


# ---------------------------------------------------------------- history log
class History:
    """Per-sample log written by the training step: ``"<sample id> <step>"`` lines.
    Its valid length is the position at the last optimizer step, which the
    checkpoint stores; on resume the log is cut back to that length, exactly as
    the model's state goes back to the checkpoint."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the run
        self.valid = self.f.tell()

    def write(self, ids: list[str], step: int) -> None:
        self.f.write("".join(f"{sid} {step}\n" for sid in ids).encode())

    def stepped(self) -> None:
        self.valid = self.f.tell()

    @staticmethod
    def cut(path: str, length: int) -> None:
        with open(path, "ab") as f:
            f.truncate(length)

    @staticmethod
    def read(path: str) -> list[tuple[str, int]]:
        with open(path) as f:
            return [(a, int(b)) for a, b in (line.split() for line in f if line.strip())]


def newest_checkpoint(ckpt_dir: str) -> tuple[str | None, dict[str, Any] | None]:
    """The newest checkpoint that loads; incomplete ones (killed mid-write) are deleted."""
    best: tuple[int, float, str, dict[str, Any]] | None = None
    for p in glob.glob(os.path.join(ckpt_dir, "*.ckpt")):
        try:
            ck = torch.load(p, map_location="cpu", weights_only=False)
        except Exception:
            os.unlink(p)
            continue
        key = (int(ck.get("global_step", ck.get("step", 0))), os.path.getmtime(p))
        if best is None or key > best[:2]:
            best = (*key, p, ck)
    return (best[2], best[3]) if best else (None, None)


def _loader(cfg: dict[str, Any]) -> tuple[Any, Any]:
    from torch.utils.data import DataLoader

    from torch_dataflow import FeatureStoreDataset

    ds = FeatureStoreDataset(cfg["store"], cfg["ledger"], batch_size=cfg.get("bs", 2), lease_ttl=120,
                             idle_timeout=60, mode=cfg.get("mode", "online"))
    nw = cfg.get("nw", 0)
    return ds, DataLoader(ds, batch_size=cfg.get("bs", 2), num_workers=nw,
                          multiprocessing_context=cfg.get("mp_context") if nw else None)


def fill(store: str, ledger: str, n: int) -> None:
    from torch_dataflow import FeatureWriter

    with FeatureWriter(store, ledger) as w:
        for i in range(n):
            w.put(f"s{i:05d}", sample(i, 8))


# ---------------------------------------------------------------- Lightning
def _lightning_parts() -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class Tiny(L.LightningModule):
        """A linear model whose buffer ``seen`` counts, per sample, the optimizer
        steps that included it: the model's own history."""

        def __init__(self, n: int, log_path: str, manual: bool = False, step_every: int = 1) -> None:
            super().__init__()
            self.net = nn.Linear(8, 1)
            self.register_buffer("seen", torch.zeros(n))
            self.pending = torch.zeros(n)
            self.history = History(log_path)
            self.automatic_optimization = not manual
            self.step_every = step_every
            self.batch_steps: list[tuple[list[str], int]] = []  # (ids, global_step after the batch)

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
            self.pending.index_add_(0, batch["i"], torch.ones(len(batch["i"])))
            # Automatic optimisation: this batch goes into the next optimizer step.
            self.history.write(batch["__sample_id__"], self.trainer.global_step + 1)
            maybe_die("mid_batch")
            loss = self.net(batch["x"]).pow(2).mean()
            if self.automatic_optimization:
                return loss
            opts = self.optimizers()
            opts = opts if isinstance(opts, list) else [opts]
            self.manual_backward(loss)
            if (batch_idx + 1) % self.step_every == 0:
                for opt in opts:
                    opt.step()
                    opt.zero_grad()
                self._stepped()
            return None

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.batch_steps.append((list(batch["__sample_id__"]), self.trainer.global_step))

        def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            super().optimizer_step(*args, **kwargs)
            self._stepped()

        def _stepped(self) -> None:
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(self.pending)
            self.seen += self.pending
            self.pending.zero_()
            self.history.stepped()
            maybe_die("after_step")

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["log_len"] = self.history.valid

        def configure_optimizers(self) -> Any:
            if self.automatic_optimization:
                return torch.optim.SGD(self.parameters(), lr=0.01)
            return [torch.optim.SGD([self.net.weight], lr=0.01), torch.optim.SGD([self.net.bias], lr=0.01)]

    class KillAfterAck(L.Callback):
        def __init__(self) -> None:
            self.last = 0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.last = trainer.global_step

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step > self.last:
                self.last = trainer.global_step
                maybe_die("after_ack")

    class KillingIO(TorchCheckpointIO):
        """Lightning's writer, which can die half way through a write or just after a complete one.

        Lightning writes atomically (temporary file, then rename), so a crash
        never damages a checkpoint that already exists: a half-written file is
        left beside it. A *new* file is left half-written at its final name,
        as a non-atomic writer would, to check that resume skips it."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if hit("ckpt_write"):
                buf = io.BytesIO()
                torch.save(checkpoint, buf)
                with open(f"{path}.partial" if os.path.exists(path) else path, "wb") as f:
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                die()
            super().save_checkpoint(checkpoint, path, storage_options)
            maybe_die("after_write")

    class Spy(L.Callback):
        """Ledger counts after every batch (runs after the ack callback, before checkpoints)."""

        def __init__(self, ledger: Any) -> None:
            self.ledger = ledger
            self.rows: list[tuple[int, int, int, int]] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            c = self.ledger.counts()
            self.rows.append((batch_idx, trainer.global_step, c.trained + c.durable, c.durable))

    return {"L": L, "Tiny": Tiny, "KillAfterAck": KillAfterAck, "KillingIO": KillingIO, "Spy": Spy}


def lightning_job(cfg: dict[str, Any]) -> None:
    """One (possibly resumed) Lightning run; writes ``result[.rank].json`` when it finishes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from torch_dataflow.lightning import FeatureAckCallback

    parts = _lightning_parts()
    L = parts["L"]
    set_kill(cfg.get("kill"))
    torch.manual_seed(0)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    work = Path(cfg["dir"])
    ckpt_dir = str(work / "ckpts")
    log_path = str(work / f"history.{rank}.log")
    ckpt_path, ckpt = newest_checkpoint(ckpt_dir)
    if rank == 0:
        History.cut(log_path, ckpt["log_len"] if ckpt else 0)
    ds, loader = _loader(cfg)
    model = parts["Tiny"](cfg["n"], log_path, manual=cfg.get("manual", False), step_every=cfg.get("step_every", 1))
    ack = FeatureAckCallback(ds, free=cfg.get("free", "checkpoint"))
    spy = parts["Spy"](ds.ledger)
    callbacks = [ack, parts["KillAfterAck"](), spy]
    if cfg.get("ckpt_every"):
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=cfg["ckpt_every"],
                                         save_top_k=-1, save_on_train_epoch_end=False))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=1,
        max_steps=cfg.get("max_steps", -1),
        accumulate_grad_batches=1 if cfg.get("manual") else cfg.get("accumulate", 1), callbacks=callbacks,
        plugins=[parts["KillingIO"]()], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, enable_checkpointing=bool(cfg.get("ckpt_every")),
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    if cfg.get("final", True):
        trainer.save_checkpoint(str(work / "final.ckpt"))
    result = {"spy": spy.rows, "attempt": ds.ledger.attempt(),
        "rank": rank, "global_step": trainer.global_step, "seen": model.seen.tolist(), "acked": ack.acker.acked,
        "batch_steps": model.batch_steps, "written": ack.written, "lost": ack.acker.lost,
    }
    (work / f"result.{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- plain PyTorch
def plain_job(cfg: dict[str, Any]) -> None:
    """A hand-written loop with :class:`~torch_dataflow.acking.StepAcker`,
    atomic checkpoints (temporary file + rename) every ``ckpt_every`` steps."""
    from torch_dataflow.acking import StepAcker

    set_kill(cfg.get("kill"))
    torch.manual_seed(0)
    work = Path(cfg["dir"])
    ckpt_dir = work / "ckpts"
    ckpt_dir.mkdir(exist_ok=True)
    log_path = str(work / "history.0.log")
    _, ckpt = newest_checkpoint(str(ckpt_dir))
    History.cut(log_path, ckpt["log_len"] if ckpt else 0)
    history = History(log_path)
    n, accumulate, every = cfg["n"], cfg.get("accumulate", 2), cfg.get("ckpt_every", 2)
    model = nn.Linear(8, 1)
    seen, pending = torch.zeros(n), torch.zeros(n)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ds, loader = _loader(cfg)
    acker = StepAcker(ds)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        seen = ckpt["seen"]
    acker.resume(from_state=ckpt["acker"] if ckpt else None)

    def save(step: int, path: Path) -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "seen": seen.clone(), "step": step,
                 "acker": acker.state_dict(), "log_len": history.valid}
        tmp = path.with_suffix(".tmp")
        buf = io.BytesIO()
        torch.save(state, buf)
        with open(tmp, "wb") as f:
            if hit("ckpt_write"):
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                die()
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        maybe_die("after_write")
        acker.checkpoint_written(step)

    def step() -> None:
        nonlocal seen
        with acker.stepping():
            opt.step()
            opt.zero_grad()
            seen += pending
            pending.zero_()
            history.stepped()
            maybe_die("after_step")
        maybe_die("after_ack")
        if acker.step % every == 0:
            save(acker.step, ckpt_dir / f"step={acker.step}.ckpt")

    for k, batch in enumerate(loader, 1):
        acker.add(batch)
        pending.index_add_(0, batch["i"], torch.ones(len(batch["i"])))
        history.write(batch["__sample_id__"], acker.step + 1)
        maybe_die("mid_batch")
        model(batch["x"]).pow(2).mean().backward()
        if k % accumulate == 0:
            step()
    if acker.pending():
        step()
    save(acker.step, work / "final.ckpt")
    if cfg.get("finish"):
        acker.finish()  # the documented end of a loop: free the bytes kept for a resume, end the session
    (work / "result.0.json").write_text(json.dumps({"global_step": acker.step, "seen": seen.tolist(),
                                                    "acked": acker.acked, "lost": acker.lost}))


# ---------------------------------------------------------------- zygote
class Zygote:
    """Client side: start the zygote (a child of the test process), run jobs, close it."""

    def __init__(self, err_path: str) -> None:
        import subprocess

        self._err = open(err_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True)

    def run(self, *jobs: dict[str, Any]) -> list[int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"jobs": list(jobs)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"zygote died (exit {self.proc.wait()}); see {self._err.name}")
        return list(json.loads(line)["rcs"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._err.close()


def _job_fn(name: str) -> Any:
    """A job body of this module, or ``"module:function"`` from another test helper module."""
    if ":" in name:
        import importlib

        module, _, fn = name.partition(":")
        return getattr(importlib.import_module(module), fn)
    return globals()[name]


def _run_child(job: dict[str, Any]) -> None:
    os.setsid()
    os.dup2(2, 1)  # stdout is the zygote's reply channel
    os.environ.update(job.get("env", {}))
    code = 0
    try:
        _job_fn(job["fn"])(job["cfg"])
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def zygote() -> None:
    import lightning  # noqa: F401 - imported once here, inherited by every fork

    import torch_dataflow.lightning  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        pids = []
        for job in req["jobs"]:
            pid = os.fork()
            if pid == 0:
                _run_child(job)
            pids.append(pid)
        rcs = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            rcs.append(os.waitstatus_to_exitcode(status))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # stragglers of the job (DataLoader workers)
        sys.stdout.write(json.dumps({"rcs": rcs}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    zygote()
