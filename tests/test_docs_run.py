"""Every Python block of README.md and docs/*.md runs as written.

Conventions for writers (the whole page is the test):

* The Python blocks (```python) of one page run top to bottom in one fresh
  interpreter, sharing one namespace, in a fresh temporary working directory:
  a later block may use what an earlier one defined, as a reader would.
  Define tiny real stand-ins in the text itself (a temporary directory, a
  two-layer model, 16 samples) instead of placeholders; keep a page under a
  few seconds.
* ``<!-- no-run: REASON -->`` on the line before a block skips it (a fragment,
  a multi-host command). The reason is required.
* ``<!-- needs: redis -->`` before a block starts a real ``redis-server`` on a
  free loopback port for the page and rewrites ``127.0.0.1:6379`` in the
  page's blocks to it.
* ```diff blocks need ``<!-- diff: BEFORE AFTER -->`` (repository paths):
  every removed line must be in BEFORE, every added or context line in AFTER;
  or ``<!-- no-run: REASON -->``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*(no-run|needs|diff)\s*:\s*(.*?)\s*-->\s*$")

_RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
ns = {"__name__": "__main__"}
for b in blocks:
    try:
        exec(compile(b["body"], f"{b['page']}:{b['line']}", "exec"), ns)
    except BaseException:
        print(f"block at {b['page']}:{b['line']} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def blocks(page: str) -> list[dict]:
    text = (ROOT / page).read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        d = _DIRECTIVE.search(before[-1]) if before else None
        out.append({"page": page, "line": text[: m.start()].count("\n") + 2, "lang": m.group("lang"),
                    "body": m.group("body"), "directive": (d.group(1), d.group(2)) if d else None})
    return out


def _check_diff(block: dict) -> None:
    kind, arg = block["directive"] or ("", "")
    if kind == "no-run":
        return
    assert kind == "diff", f"{block['page']}:{block['line']}: a diff block needs <!-- diff: BEFORE AFTER -->"
    before_path, after_path = arg.split()
    before, after = (ROOT / before_path).read_text(), (ROOT / after_path).read_text()
    for line in block["body"].splitlines():
        code = line[1:].split("  # ", 1)[0].strip()  # a comment may differ from the file's
        if not code or code == "...":
            continue
        where = before if line[0] == "-" else after
        name = before_path if line[0] == "-" else after_path
        assert code in where, f"{block['page']}:{block['line']}: {code!r} is not in {name}"


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, tmp_path):
    page_blocks = blocks(page)
    for b in page_blocks:
        if b["directive"] and b["directive"][0] == "no-run":
            assert b["directive"][1], f"{page}:{b['line']}: <!-- no-run: --> needs a reason"
        if b["lang"] == "diff":
            _check_diff(b)
    runnable = [b for b in page_blocks if b["lang"] in ("python", "py")
                and not (b["directive"] and b["directive"][0] == "no-run")]
    if not runnable:
        return
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    servers = []
    try:
        if any(b["directive"] == ("needs", "redis") for b in runnable):
            from torch_dataflow.ledger.redis_server import RedisServer

            srv = RedisServer()
            servers.append(srv)
            srv.__enter__()
            addr = srv.uri.split("://", 1)[1].split("/", 1)[0]
            for b in runnable:
                b["body"] = b["body"].replace("127.0.0.1:6379", addr)
        proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(runnable), text=True,
                              capture_output=True, cwd=tmp_path, env=env, timeout=240)
    finally:
        for srv in servers:
            srv.__exit__(None, None, None)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_directives_are_recognised():
    page = blocks("README.md")
    assert page and all(b["line"] > 1 for b in page)
    assert _DIRECTIVE.search("<!-- no-run: a fragment -->").groups() == ("no-run", "a fragment")
