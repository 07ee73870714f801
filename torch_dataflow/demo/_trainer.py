"""The demo's trainer process: Lightning trains an EAGLE3 draft from the feature store."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ._config import DemoConfig

__all__ = ["train"]

_QUIET = (
    ".*does not have many workers.*",
    ".*`IterableDataset` has `__len__`.*",
    ".*which may slow down training.*",
    ".*You're resuming from a checkpoint that ended before the epoch ended.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    # torch >= 2.13 deprecates the LeafSpec that Lightning 2.6 still builds (a FutureWarning).
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class _Events:
    """The trainer's own log: one flushed JSON line per event (read by the audit)."""

    def __init__(self, path: Path, attempt: int) -> None:
        self.attempt = attempt
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, ev: str, **fields: Any) -> None:
        self._f.write(json.dumps({"ev": ev, "attempt": self.attempt, "time": time.time(), **fields}) + "\n")
        self._f.flush()  # survives a SIGKILL of this process

    def close(self) -> None:
        self._f.close()


def _monitor(cfg: DemoConfig, events: _Events, heldout: dict[str, Any]) -> Any:
    import lightning

    class Monitor(lightning.Callback):
        """Logs the samples of every optimizer step, evaluates the held-out loss,
        and (``--crash-at-step``) kills this process once, on purpose."""

        def _evaluate(self, trainer: Any, module: Any) -> None:
            with torch.no_grad():
                out = module.draft(heldout)
            events.write("eval", step=trainer.global_step, heldout=float(out.loss), acc0=out.step_accuracies[0])

        def on_train_start(self, trainer: Any, module: Any) -> None:
            events.write("train_start", step=trainer.global_step)
            self._evaluate(trainer, module)

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            step = trainer.global_step
            events.write("batch", step=step, ids=list(batch["__sample_id__"]), loss=float(loss))
            if step % cfg.eval_every == 0:
                self._evaluate(trainer, module)
            if cfg.crash_at_step is not None and events.attempt == 0 and step >= cfg.crash_at_step:
                events.write("crash", step=step)
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self._evaluate(trainer, module)

    return Monitor()


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the producer did not publish {path} within {timeout:.0f}s")
        time.sleep(0.1)


def train(config: dict[str, Any], attempt: int) -> None:
    """Process body: train the draft on the stream until the producer closes it.

    Attempt 0 starts fresh; a later attempt resumes from the last checkpoint
    (the callback reconciles the ledger: samples trained after that checkpoint
    are delivered again, the others never).

    Args:
        config: ``DemoConfig.to_dict()``.
        attempt: 0 for the first start, then 1, 2, ... after each restart.
    """
    for pattern in _QUIET:  # before Lightning is imported: some warn at import time
        warnings.filterwarnings("ignore", message=pattern)
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..dataset import FeatureStoreDataset
    from ..eagle3 import Eagle3Collator
    from ..eagle3.lightning_module import Eagle3DraftModule
    from ..lightning import FeatureAckCallback
    from ..loader import FeatureLoader

    cfg = DemoConfig(**config)
    torch.set_num_threads(cfg.threads)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    events = _Events(cfg.events_file, attempt)
    try:
        _wait_for(cfg.target_file, cfg.idle_timeout)
        target = torch.load(cfg.target_file, weights_only=True)
        vocab, hidden = target["lm_head"].shape
        collate = Eagle3Collator(max_len=cfg.seq_len)
        torch.manual_seed(cfg.seed)
        module = Eagle3DraftModule(
            hidden_size=int(hidden),
            vocab_size=int(vocab),
            lm_head_weight=target["lm_head"],
            embed_weight=target["embed"],
            lr=cfg.lr,
            ttt_steps=cfg.ttt_steps,
        )
        ds = FeatureStoreDataset(
            cfg.store_uri,
            cfg.ledger_uri,
            batch_size=cfg.batch_size,
            lease_ttl=cfg.lease_ttl,
            idle_timeout=cfg.idle_timeout,
            seed=cfg.seed,
        )
        loader = FeatureLoader(ds, batch_size=cfg.batch_size, collate_fn=collate)
        last = cfg.checkpoint_dir / "last.ckpt"
        resume = str(last) if attempt > 0 and last.exists() else None
        events.write("start", resume=resume)
        checkpoints = ModelCheckpoint(
            dirpath=cfg.checkpoint_dir, every_n_train_steps=cfg.checkpoint_every, save_last=True, save_top_k=1
        )
        trainer = lightning.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=cfg.root, log_every_n_steps=cfg.eval_every,
            callbacks=[FeatureAckCallback(ds), checkpoints, _monitor(cfg, events, collate(target["heldout"]))],
        )  # fmt: skip
        trainer.fit(module, loader, ckpt_path=resume)
        # A closing checkpoint covers the last steps, so every trained sample ends durable.
        trainer.save_checkpoint(cfg.checkpoint_dir / "final.ckpt")
        events.write("end", step=trainer.global_step, quarantined=list(ds.quarantined))
    finally:
        events.close()
