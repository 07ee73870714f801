"""Quiet and clean by default: no Mooncake log lines, progress bars that end once, help texts
without markup, a ``py.typed`` marker, public docstrings that ``help()`` shows."""

from __future__ import annotations

import inspect
import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torch_dataflow

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
COMMANDS = ["", "demo", "status", "close-stream", "requeue", "gc", "import", "mooncake-master", "bench"]
# glog's line prefix: severity letter, MMDD, time, thread id, file:line]
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.M)


def _python(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# ---------------------------------------------------------------- Mooncake's glog
_PUT_GET = """
import sys, torch
from torch_dataflow.stores import open_store
store = open_store(sys.argv[1] + "?segment_size=64MiB")
ref = store.put("quiet", 1, {"x": torch.ones(256)})
assert torch.equal(store.get(ref)["x"], torch.ones(256))
store.close()
print("ok")
"""


@pytest.fixture(scope="module")
def master():
    try:
        import mooncake.store  # noqa: F401

        from torch_dataflow.stores.mooncake_master import MooncakeMaster, find_master_binary

        find_master_binary()
    except Exception as e:
        from torch_dataflow.stores.mooncake_master import INSTALL_HINT

        if IN_CI:
            pytest.fail(f"Mooncake tests must run in CI: {INSTALL_HINT} ({e})")
        pytest.skip(f"{INSTALL_HINT} ({type(e).__name__}: {e})")
    with MooncakeMaster() as m:
        yield m


@pytest.mark.mooncake
def test_mooncake_client_writes_no_info_lines_by_default(master) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MC_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "-c", _PUT_GET, master.uri], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    info = [line for line in _GLOG.findall(r.stderr) if line[0] in "IW"]
    assert info == [], r.stderr
    assert len(r.stderr.splitlines()) <= 2, r.stderr  # what Mooncake prints below its ERROR level: nothing


@pytest.mark.mooncake
def test_mooncake_logs_come_back_when_asked(master) -> None:
    r = _python("-c", _PUT_GET, master.uri, env={"MC_LOG_LEVEL": "INFO"})
    assert r.returncode == 0, r.stderr
    assert len([line for line in _GLOG.findall(r.stderr) if line[0] == "I"]) >= 5, r.stderr


# ---------------------------------------------------------------- the demo's bars
def test_demo_bars_end_once_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    r = _python("-m", "torch_dataflow.cli", "demo", "--quick", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    finals = {bar: [line for line in re.split(r"[\r\n]", err) if line.startswith(bar) and "100%|" in line]
              for bar in ("produced:", "trained :")}
    # Piped (not a terminal), tqdm writes each refresh on its own line: a full bar shows up exactly once.
    assert {bar: len(lines) for bar, lines in finals.items()} == {"produced:": 1, "trained :": 1}, err[-3000:]
    assert "Warning" not in err and "deprecated" not in err, err[-3000:]
    assert "exactly once       OK" in r.stdout


# ---------------------------------------------------------------- --help
@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_markup(command: str) -> None:
    r = _python("-m", "torch_dataflow.cli", *([command] if command else []), "--help", timeout=120)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "usage: torch-dataflow" in text
    for mark in ("`", "**", "](", ":mod:", ":class:"):
        assert mark not in text, f"{mark!r} in --help of {command or 'torch-dataflow'}:\n{text}"


# ---------------------------------------------------------------- typing marker
def test_py_typed_marker_ships() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    assert (ROOT / "torch_dataflow" / "py.typed").is_file()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in cfg["tool"]["setuptools"]["package-data"]["torch_dataflow"]


# ---------------------------------------------------------------- help()
def _public_members():
    for name in torch_dataflow.__all__:
        obj = getattr(torch_dataflow, name)
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") and attr not in ("__iter__", "__len__", "__getitem__", "__call__", "__next__"):
                continue
            fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if inspect.isfunction(fn):
                yield f"{name}.{attr}", fn


def test_public_methods_have_docstrings_not_comments() -> None:
    # help() falls back to the comment above a function without a docstring (a section ruler).
    shown = {qual: inspect.getcomments(fn) for qual, fn in _public_members()
             if not fn.__doc__ and inspect.getcomments(fn)}
    assert shown == {}


def test_help_of_the_dataset_shows_no_section_rulers() -> None:
    text = pydoc.render_doc(torch_dataflow.FeatureStoreDataset, renderer=pydoc.plaintext)
    assert "# ----" not in text
    assert "Lease and yield this rank's" in text
