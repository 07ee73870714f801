"""The benchmark harness in its CI setting: every scenario runs, every number is sane.

Timings are not asserted (a shared CI machine makes them meaningless); the
shape of the report is: each scenario present, finite positive figures and
ratios, targets reported as met or missed, a PNG plot, docs that keep the
sections a run did not cover.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from torch_dataflow.bench import SCENARIOS, main
from torch_dataflow.bench.report import write_docs

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--quick", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")])
    return rc, json.loads((out / "bench.json").read_text()), out


def _numbers(obj: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, (int, float)):
        return [(path, float(obj))]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _numbers(v, f"{path}[{i}]")]
    raise AssertionError(f"unexpected {type(obj).__name__} at {path}")


def _skipped(res: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in res.get("skipped", {}).items() if v}


def test_quick_run_covers_every_scenario(quick: tuple[int, dict[str, Any], Path]) -> None:
    rc, res, _ = quick
    assert rc == 0, res["errors"]
    assert res["errors"] == {}
    assert list(res["scenarios"]) == list(SCENARIOS)
    assert res["quick"] is True
    assert res["machine"]["cores"] >= 1 and res["machine"]["mem_gib"] > 0
    for name, sc in res["scenarios"].items():
        skipped = _skipped(sc)
        if IN_CI:
            assert not skipped, f"{name}: real servers must run in CI: {skipped}"
        if name == "mooncake" and skipped:
            continue  # a machine without the Mooncake wheel: the reason is recorded
        assert sc["rows"], name
        assert sc["ratios"], name


def test_every_figure_and_ratio_is_finite_and_positive(quick: tuple[int, dict[str, Any], Path]) -> None:
    _, res, _ = quick
    for name, sc in res["scenarios"].items():
        for where, v in _numbers(sc["rows"], name):
            assert math.isfinite(v) and v >= 0, f"{where} = {v}"
        figures = [v for w, v in _numbers(sc["rows"], name) if w.endswith(("samples_per_s", "gbps", "GB/s"))]
        assert all(v > 0 for v in figures), name
        for r in sc["ratios"]:
            assert math.isfinite(r["value"]) and r["value"] > 0, (name, r)
        assert sc["seconds"] > 0


def test_targets_are_reported_met_or_missed(quick: tuple[int, dict[str, Any], Path]) -> None:
    _, res, _ = quick
    targets = {name: sc["targets"] for name, sc in res["scenarios"].items()}
    assert len(targets["store"]) == 2  # vs torch.save and vs raw file I/O
    assert {t["what"].split()[0] for t in targets["ledger"]} >= {"memory", "sqlite"}
    assert targets["scaling"], "the pool-size flatness check is missing"
    for ts in targets.values():
        for t in ts:
            assert isinstance(t["met"], bool) and math.isfinite(t["value"]) and t["quick"] is True


def test_end_to_end_reports_rate_bound_and_wait(quick: tuple[int, dict[str, Any], Path]) -> None:
    _, res, _ = quick
    rows = res["scenarios"]["e2e"]["rows"]
    assert sorted(r["workers"] for r in rows if r["mode"] == "concurrent") == [0, 1, 2]
    assert any(r["mode"] == "prefilled" for r in rows)
    for r in rows:
        assert 0 < r["wait_fraction"] <= 1
        assert r["vs_memcpy"] == pytest.approx(r["gbps"] / r["memcpy_gbps"])
    scaling = res["scenarios"]["scaling"]["rows"]
    assert {r["processes"] for r in scaling["consumers"]} >= {1, 2}
    assert len({r["pool"] for r in scaling["pool_sizes"]}) >= 2


def test_length_reports_padding_balance_and_ordering_cost(quick: tuple[int, dict[str, Any], Path]) -> None:
    _, res, _ = quick
    rows = res["scenarios"]["length"]["rows"]
    for world in {r["world"] for r in rows["delivery"]}:
        rnd, lng = (next(r for r in rows["delivery"] if r["world"] == world and r["mode"] == m)
                    for m in ("random", "by_length"))
        assert 0 <= lng["padding"] < rnd["padding"] < 1  # deterministic given the seed, not a timing
        for r in (rnd, lng):
            assert r["delivered_tokens_per_s"] >= r["trained_tokens_per_s"] > 0
            assert r["worst_max_min"] >= r["median_max_min"] >= 1
    assert {r["ledger"] for r in rows["ordering"]} >= {"(plan_order alone)", "sqlite"}
    assert all(r["ms"] > 0 for r in rows["ordering"])

def test_plot_is_a_png(quick: tuple[int, dict[str, Any], Path]) -> None:
    _, _, out = quick
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_docs_are_regenerated_whole_and_keep_uncovered_sections(
    quick: tuple[int, dict[str, Any], Path], tmp_path: Path
) -> None:
    _, res, _ = quick
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# old\n\n<!-- bench:store -->\nstale store\n<!-- /bench:store -->\n\n"
        "<!-- bench:other -->\nkept as is\n<!-- /bench:other -->\n"
    )
    res = {**res, "command": "torch-dataflow bench --quick"}
    write_docs(res, doc, tmp_path / "benchmarks.png", {"store": "fresh store table"})
    text = doc.read_text()
    assert "stale store" not in text and "fresh store table" in text
    assert "<!-- bench:other -->\nkept as is\n<!-- /bench:other -->" in text
    assert "torch-dataflow bench --quick" in text and "benchmarks.png" in text
    assert f"{res['machine']['cores']} cores" in text and "GiB memory" in text
    missed = [t for sc in res["scenarios"].values() for t in sc["targets"] if not t["met"]]
    assert ("MISSED" in text) == bool(missed)


def test_unknown_scenario_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown scenario"):
        main(["--scenarios", "store,nope"])


def test_producer_rows_compare_put_with_raw_writev(tmp_path: Path) -> None:
    # The producer scenario alone (cheap): every method measured, raw as the baseline
    # of every ratio, an fsync row whose raw baseline syncs too, one target per row
    # at the target lengths (quick: its largest S stands in). Timings are not asserted.
    out = tmp_path / "p.json"
    assert main(["--quick", "--scenarios", "producer", "--json", str(out)]) == 0
    sc = json.loads(out.read_text())["scenarios"]["producer"]
    from torch_dataflow.bench.producer import METHODS

    assert [r["fsync"] for r in sc["rows"]] == [False, False, True]
    for r in sc["rows"]:
        assert all(r[m] > 0 for m in METHODS)
        assert r["ratios"]["writer_put"] == pytest.approx(r["raw"] / r["writer_put"])
        assert r["nbytes"] > sum(r["S"] * r["H"] * 2 * k for k in (1, 3))  # hidden + aux states, bf16
    assert len(sc["targets"]) == 1 and "FeatureWriter.put" in sc["targets"][0]["what"]


def test_fields_scenario_counts_the_bytes_a_field_read_asks_for(tmp_path: Path) -> None:
    # The fields scenario alone (cheap): bytes read come from the kernel's rchar, so they are
    # exact up to the few hundred bytes of reading /proc/self/io itself. Timings are not asserted.
    out = tmp_path / "f.json"
    assert main(["--quick", "--scenarios", "fields", "--json", str(out)]) == 0
    sc = json.loads(out.read_text())["scenarios"]["fields"]
    full, train, ids = sc["rows"]["reads"]
    s, h = full["S"], full["H"]
    assert full["read_bytes"] == pytest.approx(full["blob_bytes"], abs=256)
    header = full["blob_bytes"] - s * (8 + 8) - s * h * 2 * 4  # ids, mask int64; hidden + aux (3H) bf16
    assert train["payload_bytes"] == s * (8 + 8) + s * h * 2
    assert train["read_bytes"] == pytest.approx(header + train["payload_bytes"], abs=256)
    assert ids["read_bytes"] == pytest.approx(header + s * 16, abs=256)
    assert all(r["samples_per_s"] > 0 and r["raw_samples_per_s"] > 0 for r in sc["rows"]["reads"])
    assert [r["mode"] for r in sc["rows"]["loader"]] == ["all fields", "input_ids, loss_mask, hidden_state"]
    assert {c["what"] for c in sc["rows"]["checksum"]} >= {"hash: one stream (format 1)",
                                                           "hash: per tensor + header (format 2)"}


def _exit_silently(code: int) -> None:
    os._exit(code)


@pytest.mark.allow_leaks  # multiprocessing's forkserver lives on, as it does for users
def test_peers_reports_a_loader_process_that_died_instead_of_waiting() -> None:
    """A loader child that dies without a result is an error row at once, not a 900 s wait."""
    import time

    from torch_dataflow.bench._util import mp_context
    from torch_dataflow.bench.peers import _result

    ctx = mp_context()
    q = ctx.Queue()
    p = ctx.Process(target=_exit_silently, args=(3,))
    p.start()
    t0 = time.monotonic()
    res = _result(q, p, timeout=120)
    p.join()
    assert time.monotonic() - t0 < 30
    assert res == {"error": "the loader's process exited with code 3 before reporting"}
