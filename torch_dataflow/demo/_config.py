"""The demo's configuration and the files it keeps in its work directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["QUICK", "DemoConfig"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of one demo run (the CLI flags of ``torch-dataflow demo``).

    Attributes:
        workdir: folder for the embedded store and ledger, checkpoints and logs.
        store: store URI (default ``file://<workdir>/store``).
        ledger: ledger URI (default ``sqlite://<workdir>/ledger.db``).
        samples: training samples the producer writes.
        seq_len: longest prompt in tokens (prompts are ``seq_len//2 .. seq_len``).
        batch_size: samples per optimizer step.
        heldout: held-out samples the loss is measured on (never trained on).
        eval_every: optimizer steps between held-out evaluations.
        checkpoint_every: optimizer steps between checkpoints (each one marks
            the samples it covers durable, which frees their bytes).
        lr: AdamW learning rate of the draft.
        ttt_steps: EAGLE3 test-time-training steps of the draft.
        seed: seeds the target, the prompts and the draft.
        model: a local Hugging Face model directory to use as the target
            instead of the random-init tiny Llama.
        gguf_file: a GGUF file name inside ``model``.
        max_pending: producer backpressure: at most this many samples undelivered.
        lease_ttl: seconds a trainer holds a sample before it is redelivered.
        idle_timeout: seconds the trainer waits for a sample before giving up.
        crash_at_step: kill the trainer (SIGKILL) right after this optimizer
            step, once, then resume it from its last checkpoint.
        threads: torch threads per process (the producer and trainer share the cores).
        progress: draw progress bars (on stderr).
    """

    workdir: str = "td-demo"
    store: str | None = None
    ledger: str | None = None
    samples: int = 2048
    seq_len: int = 128
    batch_size: int = 8
    heldout: int = 32
    eval_every: int = 25
    checkpoint_every: int = 50
    lr: float = 3e-3
    ttt_steps: int = 2
    seed: int = 0
    model: str | None = None
    gguf_file: str | None = None
    max_pending: int = 512
    lease_ttl: float = 300.0
    idle_timeout: float = 300.0
    crash_at_step: int | None = None
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        positive = (
            "samples",
            "seq_len",
            "batch_size",
            "heldout",
            "eval_every",
            "checkpoint_every",
            "max_pending",
            "threads",
            "ttt_steps",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 4:
            raise ConfigError(f"--seq-len must be >= 4, got {self.seq_len}")
        if self.lr <= 0 or self.lease_ttl <= 0 or self.idle_timeout <= 0:
            raise ConfigError("--lr, --lease-ttl and --idle-timeout must be > 0")
        if self.crash_at_step is not None and self.crash_at_step < 1:
            raise ConfigError(f"--crash-at-step must be >= 1, got {self.crash_at_step}")
        if self.gguf_file and not self.model:
            raise ConfigError("--gguf-file needs --model DIR")

    # ------------------------------------------------------------ paths
    @property
    def root(self) -> Path:
        return Path(self.workdir).resolve()

    @property
    def store_uri(self) -> str:
        return self.store or f"file://{self.root / 'store'}"

    @property
    def ledger_uri(self) -> str:
        return self.ledger or f"sqlite://{self.root / 'ledger.db'}"

    @property
    def target_file(self) -> Path:
        """Written by the producer: the target's head/embeddings and the held-out features."""
        return self.root / "target.pt"

    @property
    def producer_file(self) -> Path:
        """Written by the producer at the end: its own counts and timings (JSON)."""
        return self.root / "producer.json"

    @property
    def events_file(self) -> Path:
        """Appended by the trainer: one JSON line per batch, evaluation and (re)start."""
        return self.root / "trainer.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    def owned_paths(self) -> list[Path]:
        """Everything a previous run left in the work directory (deleted before a run)."""
        paths = [self.target_file, self.producer_file, self.events_file, self.checkpoint_dir, self.summary_file]
        if self.store is None:
            paths.append(self.root / "store")
        if self.ledger is None:
            paths += [self.root / f"ledger.db{suffix}" for suffix in ("", "-wal", "-shm", "-journal")]
        return paths

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QUICK: dict[str, Any] = {"samples": 256, "seq_len": 64, "eval_every": 8, "checkpoint_every": 10, "heldout": 32}
"""``--quick``: the CI setting (well under a minute on 2 cores)."""
