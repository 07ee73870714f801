"""The ``torch-dataflow`` command: demo end to end, status, import, bad arguments."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_dataflow import FeatureWriter
from torch_dataflow.cli import main
from torch_dataflow.ledger import open_ledger

pytest.importorskip("lightning")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
QUICK_SAMPLES = 256


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "torch_dataflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def check_ledger(workdir: Path, n: int) -> None:
    """The exactly-once facts, read from the ledger directly (not from the demo's summary)."""
    led = open_ledger(f"sqlite://{workdir / 'ledger.db'}")
    c = led.counts()
    assert (c.committed, c.pending, c.leased, c.durable, c.quarantined) == (n, 0, 0, n, 0)
    assert c.closed
    assert sorted(led.trained_steps()) == [f"s{i:06d}" for i in range(n)]
    led.close()


# ---------------------------------------------------------------- demo
def test_demo_quick_trains_every_sample_exactly_once(tmp_path: Path) -> None:
    proc = run_cli("demo", "--quick", "--no-progress", "--json", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["exactly_once"] == {"ok": True, "problems": []}
    assert (s["committed"], s["trained"], s["acked"], s["durable"]) == (QUICK_SAMPLES,) * 4
    assert s["replayed"] == 0 and s["restarts"] == 0 and s["quarantined"] == 0
    assert s["steps"] == QUICK_SAMPLES // 8
    assert s["store_resident_bytes"] == 0  # every sample durable, so freed
    assert s["throughput"]["train_samples_s"] > 0 and s["throughput"]["produce_mb_s"] > 0
    # The draft learns (seeded run; the held-out loss is a fixed batch, not the noisy per-batch loss).
    loss = s["loss"]
    assert loss["heldout_end"] < loss["heldout_start"] - 0.05, loss
    assert loss["heldout_acc_end"] > loss["heldout_acc_start"], loss
    check_ledger(tmp_path, QUICK_SAMPLES)
    assert json.loads((tmp_path / "summary.json").read_text())["exactly_once"]["ok"]


@pytest.mark.slow
def test_demo_survives_a_killed_trainer(tmp_path: Path) -> None:
    # Checkpoints every 10 steps; SIGKILL after step 15: steps 11..15 replay (5 x 8 samples), nothing else.
    proc = run_cli("demo", "--quick", "--no-progress", "--workdir", str(tmp_path), "--crash-at-step", "15")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "exactly once       OK: all 256 committed samples trained exactly once" in out
    assert "replayed           40   (trainer restarts: 1)" in out
    assert "killed at step 15" in proc.stderr
    check_ledger(tmp_path, QUICK_SAMPLES)


def test_summary_reports_a_failed_check() -> None:
    from torch_dataflow.demo import format_summary

    s = {
        "store": "file:///x",
        "ledger": "sqlite:///x.db",
        "target": "t",
        "committed": 2,
        "trained": 3,
        "acked": 2,
        "durable": 2,
        "replayed": 0,
        "quarantined": 0,
        "restarts": 0,
        "steps": 1,
        "store_resident_bytes": 0,
        "wall_seconds": 1.0,
        "throughput": dict.fromkeys(("produce_samples_s", "produce_mb_s", "train_samples_s", "train_mb_s")),
        "loss": dict.fromkeys(
            ("heldout_start", "heldout_end", "train_first", "train_last", "heldout_acc_start", "heldout_acc_end")
        ),
        "exactly_once": {"ok": False, "problems": ["1 samples trained more than once (first: s0)"]},
    }
    text = format_summary(s)
    assert "exactly once       FAILED" in text and "trained more than once" in text


def test_demo_refuses_a_ledger_that_holds_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = f"sqlite://{tmp_path / 'used.db'}"
    with FeatureWriter(f"file://{tmp_path / 'other'}", ledger) as w:
        w.put("x", {"a": torch.zeros(1)})
    assert main(["demo", "--quick", "--no-progress", "--workdir", str(tmp_path / "d"), "--ledger", ledger]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds 1 samples" in err


def test_demo_help_says_how_to_use_servers() -> None:
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0
    assert "torch-dataflow mooncake-master" in proc.stdout and "--store mooncake://127.0.0.1:50051" in proc.stdout
    assert "redis-server --port 6379" in proc.stdout and "--ledger redis://127.0.0.1:6379/0" in proc.stdout


# ---------------------------------------------------------------- status
@pytest.fixture
def small_ledger(tmp_path: Path) -> tuple[str, str]:
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'ledger.db'}"
    with FeatureWriter(store, ledger, name="p") as w:
        for i in range(6):
            w.put(f"s{i}", {"x": torch.full((256,), float(i))})
        w.abort(["s5"])
    led = open_ledger(ledger)
    first = led.lease("trainer-a/r0/w0", 2, ttl=600)
    led.ack([first[0].lease_id], step=3)
    led.fail([first[1].lease_id], retryable=False, reason="corrupt: checksum mismatch")
    led.lease("trainer-b/r0/w0", 1, ttl=600)
    led.close()
    return store, ledger


def test_status_table(small_ledger: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    store, ledger = small_ledger
    assert main(["status", ledger, "--store", store]) == 0
    out = capsys.readouterr().out
    assert "stream closed" in out
    assert "committed        6" in out and "aborted      1" in out and "quarantined      1" in out
    assert "pending          2" in out and "leased       1" in out and "trained          1" in out
    assert "last acked optimizer step: 3" in out
    assert re.search(r"trainer-b/r0/w0 +1 +1\.[12] KiB +0 +in (9m5\ds|10m00s)", out), out  # a 600 s lease
    assert "s1 (generation 1): corrupt: checksum mismatch" in out
    assert "store    file://" in out and "5 samples" in out  # the aborted one is freed, the quarantined kept
    assert "rates    not measured" in out


def test_status_json_and_rates(small_ledger: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    store, ledger = small_ledger
    assert main(["status", ledger, "--json", "--store", store, "--interval", "0.3"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["deliveries"] == {"pending": 2, "leased": 1, "trained": 1, "durable": 0}
    assert snap["samples"] == {"committed": 6, "aborted": 1, "quarantined": 1, "freed": 0}
    assert [o["owner"] for o in snap["owners"]] == ["trainer-b/r0/w0"]
    assert snap["owners"][0]["leases"] == 1 and snap["owners"][0]["expires_in_s"] > 500
    assert snap["quarantined"] == [{"sample_id": "s1", "generation": 1, "reason": "corrupt: checksum mismatch"}]
    assert snap["store"]["count"] == 5 and snap["store"]["resident_bytes"] > 5 * 1024
    assert snap["rates"]["committed_per_s"] == 0 and snap["rates"]["interval_s"] >= 0.3
    assert snap["stream"] == "closed" and snap["last_acked_step"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "sqlite:///nonexistent/ledger.db"], "no ledger at /nonexistent/ledger.db"),
        (["status", "nosuch://x"], "nosuch"),
        (["status", "memory://x", "--interval", "-1"], "--interval must be >= 0"),
        (["demo", "--gguf-file", "m.gguf"], "--gguf-file needs --model"),
        (["import", "/nonexistent/dir", "--store", "memory://i", "--ledger", "memory://i"], "not found"),
    ],
)
def test_library_errors_are_one_clean_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("torch-dataflow: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv", [[], ["nosuch"], ["demo", "--samples", "0"], ["demo", "--lr", "-1"], ["import", "src"], ["status"]]
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: torch-dataflow" in capsys.readouterr().err


# ---------------------------------------------------------------- import / passthrough
def test_import_specforge_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch_dataflow.eagle3 import write_specforge_directory

    write_specforge_directory(tmp_path / "sf", n=5, seq_lens=[4, 7], hidden=8)
    ledger = f"sqlite://{tmp_path / 'ledger.db'}"
    argv = ["import", str(tmp_path / "sf"), "--store", f"file://{tmp_path / 'store'}", "--ledger", ledger]
    assert main([*argv, "--no-progress"]) == 0
    assert "imported 5 samples" in capsys.readouterr().out
    led = open_ledger(ledger)
    assert led.counts().committed == 5 and led.counts().closed
    assert led.get_ref("rows_0-2000~data_3.ckpt") is not None
    gens = {r.sample_id: r.generation for r in led.committed_refs([f"rows_0-2000~data_{i}.ckpt" for i in range(5)]).values()}
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*") if p.is_file())
    led.close()
    # started again by mistake: nothing is read, written or committed again
    assert main([*argv, "--no-progress"]) == 0
    assert "imported 0 samples" in (out := capsys.readouterr().out) and "5 of 5 files were committed before" in out
    led = open_ledger(ledger)
    again = led.committed_refs(list(gens))
    assert {s: r.generation for s, r in again.items()} == gens == dict.fromkeys(gens, 1)
    assert led.counts().committed == 5 and led.counts().pending == 5 and led.counts().closed
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*") if p.is_file()) == files
    led.close()


def test_import_killed_then_rerun_imports_the_rest_and_closes_the_stream(tmp_path: Path, capsys) -> None:
    """SIGKILL an import after some files are committed; the re-run imports only the rest, each file
    once, and ends the stream (the killed run's producer is the re-run's: one name per
    source), so an online trainer ends instead of waiting for the dead run."""
    import signal
    import time

    from torch_dataflow.eagle3 import SpecForgeDirectory, write_specforge_directory

    write_specforge_directory(tmp_path / "sf", n=300, seq_lens=[64, 96], hidden=64)
    src = SpecForgeDirectory(tmp_path / "sf")
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'l.db'}"
    argv = ["import", str(tmp_path / "sf"), "--store", store, "--ledger", ledger, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "torch_dataflow.cli", *argv], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp_path / "l.db").exists():
            with contextlib.suppress(Exception):
                led = open_ledger(ledger)
                done = led.counts().committed
                led.close()
        if done >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the import finished before it could be killed"
    led = open_ledger(ledger)
    killed_at = led.counts().committed
    assert 0 < killed_at < 300 and not led.counts().closed
    led.close()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"imported {300 - killed_at} samples" in out and f"{killed_at} of 300 files were committed before" in out
    led = open_ledger(ledger)
    refs = led.committed_refs([src.sample_id(i) for i in range(300)])
    # once each: generation 1, or 2 for the file the kill caught between its reserve and its commit
    assert len(refs) == 300 and sum(r.generation != 1 for r in refs.values()) <= 1
    assert {r.generation for r in refs.values()} <= {1, 2}
    assert led.counts().pending == 300 and led.counts().closed  # nobody waits for the killed run
    from torch_dataflow.stores import open_store

    store_ = open_store(store)
    assert all(os.path.isfile(store_.path_of(r.sample_id, r.generation)) for r in refs.values())
    assert [p["name"] for p in led.producers()] == [f"import:{os.path.realpath(tmp_path / 'sf')}"]
    led.close()
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.suffix == ".tdf"]
    assert len(files) == 300 and not list((tmp_path / "store" / ".staging").iterdir())


def test_a_second_import_of_one_source_while_the_first_runs_is_refused(tmp_path: Path) -> None:
    """Started twice by mistake: the second import of a source, while the first one's process runs,
    stops at once naming it (both would write every file), and commits nothing."""
    from torch_dataflow import FeatureWriter
    from torch_dataflow.eagle3 import write_specforge_directory

    write_specforge_directory(tmp_path / "sf", n=4, seq_lens=[4], hidden=8)
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'l.db'}"
    running = FeatureWriter(store, ledger, name=f"import:{os.path.realpath(tmp_path / 'sf')}")  # alive: this process
    running.put("other", {"x": torch.zeros(1)})
    out = subprocess.run([sys.executable, "-m", "torch_dataflow.cli", "import", str(tmp_path / "sf"), "--store",
                          store, "--ledger", ledger, "--no-progress"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "already running" in out.stderr, out.stderr
    assert sorted(running.ledger.committed_refs(["other", "rows_0-2000~data_0.ckpt"])) == ["other"]
    assert "--takeover" in out.stderr
    # the other one is known to be gone: --takeover imports
    assert main(["import", str(tmp_path / "sf"), "--store", store, "--ledger", ledger, "--no-progress",
                 "--takeover"]) == 0
    assert len(running.ledger.committed_refs([f"rows_0-2000~data_{i}.ckpt" for i in range(4)])) == 4
    running.close()


def test_passthrough_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    import torch_dataflow.stores.mooncake_master as mm

    seen: list[list[str]] = []
    monkeypatch.setattr(mm, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["mooncake-master", "--port", "0", "--help"]) == 0
    assert seen == [["--port", "0", "--help"]]

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch_dataflow.bench" else real(name, *a)
    )
    assert main(["bench", "--help"]) == 2
    assert "benchmarks are not part of this installation" in capsys.readouterr().err


def test_status_takes_the_ledgers_own_query_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = f"sqlite://{tmp_path / 'secret.db'}"
    open_ledger(ledger, secret="s3").reserve(["a"])
    assert main(["status", f"{ledger}?secret=s3&timeout=5"]) == 0
    assert "committed" in capsys.readouterr().out
    assert main(["status", ledger]) == 2  # no secret: one clean error line
    assert "secret" in capsys.readouterr().err


def test_status_never_creates_a_store(small_ledger: tuple[str, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, ledger = small_ledger
    typo = tmp_path / "no-such-store"
    assert main(["status", ledger, "--store", f"file://{typo}"]) == 2
    assert "does not exist" in capsys.readouterr().err and not typo.exists()
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert main(["status", ledger, "--store", f"file://{empty}"]) == 2
    assert list(empty.iterdir()) == []


def test_import_of_another_directory_into_the_same_ledger_is_refused(tmp_path: Path, capsys) -> None:
    """Two SpecForge directories have the same relative paths (rows_0-2000/data_0.ckpt, ...) for other
    files: the second import into the first's ledger must not skip them as 'committed before'."""
    from torch_dataflow.eagle3 import write_specforge_directory

    write_specforge_directory(tmp_path / "a", n=6, seq_lens=[4], hidden=8, seed=1)
    write_specforge_directory(tmp_path / "b", n=8, seq_lens=[5], hidden=8, seed=2)
    store, ledger = f"file://{tmp_path / 'store'}", f"sqlite://{tmp_path / 'l.db'}"
    assert main(["import", str(tmp_path / "a"), "--store", store, "--ledger", ledger, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["import", str(tmp_path / "b"), "--store", store, "--ledger", ledger, "--no-progress"]) != 0
    assert re.search(r"6 samples of the same names imported from \S*/a, not from \S*/b", capsys.readouterr().err)
    led = open_ledger(ledger)
    assert led.counts().committed == 6  # nothing of b was written
    led.close()
    os.symlink(tmp_path / "a", tmp_path / "link")  # the same directory by another path: a re-run, skipped
    assert main(["import", str(tmp_path / "link"), "--store", store, "--ledger", ledger, "--no-progress"]) == 0
    assert "imported 0 samples" in capsys.readouterr().out
