"""The examples in ``examples/`` run, in a small setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torch_dataflow.ledger import open_ledger

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def python(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out


def test_offline_specforge(tmp_path: Path) -> None:
    out = finish(python("offline_specforge.py", "--workdir", str(tmp_path), "--samples", "24", "--epochs", "2"))
    assert "imported 24 samples" in out
    assert "epoch 0: 24 samples trained" in out and "epoch 1: 24 samples trained" in out
    assert "in place: final loss" in out and "imported: final loss" in out


def test_online_producer_and_trainer_run_concurrently(tmp_path: Path) -> None:
    common = [
        "--store",
        f"file://{tmp_path / 'store'}",
        "--ledger",
        f"sqlite://{tmp_path / 'ledger.db'}",
        "--seq-len",
        "32",
    ]
    trainer = python(
        "online_trainer.py",
        *common,
        "--checkpoint",
        str(tmp_path / "draft.pt"),
        "--checkpoint-every",
        "4",
        "--idle-timeout",
        "120",
    )
    producer = python("online_producer.py", *common, "--samples", "64")
    assert "committed 64 samples" in finish(producer)
    assert "done at step 8: 64 samples durable, 0 pending, 0 leased" in finish(trainer)
    led = open_ledger(f"sqlite://{tmp_path / 'ledger.db'}")
    assert sorted(led.trained_steps()) == [f"p{i:06d}" for i in range(64)]
    led.close()
