"""Shared pieces of the benchmark scenarios: settings, timing, samples, targets, machine."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Settings",
    "eagle3_sample",
    "forkserver_pid",
    "machine",
    "median_s",
    "medians_of",
    "memcpy_s",
    "mp_context",
    "ratio_entry",
    "sample_nbytes",
    "stop_forkserver",
    "table_head",
    "target",
]


@dataclass(frozen=True)
class Settings:
    """What every scenario is told: the CI-sized setting or the full one, and repeats.

    ``repeats`` overrides each scenario's default number of repeats (medians
    are taken over them); ``None`` keeps the defaults.
    """

    quick: bool = False
    repeats: int | None = None

    def reps(self, full: int, quick: int) -> int:
        if self.repeats is not None:
            return max(1, self.repeats)
        return quick if self.quick else full


def mp_context() -> Any:
    """Start helper processes from a fork server that has torch and the scenarios imported.

    Each new process is then a fork of a clean, single-threaded server (about
    10 ms) instead of a fresh interpreter importing torch (2-3 s on this class
    of machine), and never a fork of this process, which may hold the threads
    of a Mooncake or Redis client.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch_dataflow.bench.e2e", "torch_dataflow.bench.scaling"])
    return ctx


def forkserver_pid() -> int | None:
    """The running fork server's pid (``None`` if none runs)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def stop_forkserver(started_by_us: bool) -> None:
    """Stop the fork server if this run started it (a harness leaves no child process behind)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if started_by_us and stop is not None and forkserver_pid() is not None:
        stop()


def eagle3_sample(s: int, h: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One EAGLE3 feature sample as SpecForge writes it (notes/EAGLE3.md)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 32000, (s,), generator=g),
        "loss_mask": torch.randint(0, 2, (s,), generator=g),
        "hidden_state": torch.randn(1, s, h, generator=g).bfloat16(),
        "aux_hidden_state": torch.randn(1, s, 3 * h, generator=g).bfloat16(),
    }


def sample_nbytes(sample: dict[str, torch.Tensor]) -> int:
    """Tensor payload bytes of a sample (what a trainer receives)."""
    return sum(t.numel() * t.element_size() for t in sample.values())


def median_s(
    fn: Callable[[int], Any], reps: int, cleanup: Callable[[int], Any] | None = None, warmup: int = 1
) -> float:
    """Median seconds of ``fn(i)`` over ``reps`` calls, after ``warmup`` untimed calls.

    ``cleanup(i)`` runs after each call, untimed (deleting is not part of a round trip).
    """
    for w in range(warmup):
        fn(-1 - w)  # first-touch page faults, lazy attach, allocator growth
        if cleanup:
            cleanup(-1 - w)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        if cleanup:
            cleanup(i)
    return statistics.median(times)


def medians_of(n: int, what: str = "run", *, capital: bool = False) -> str:
    """How a table's figures were taken, singular when they were: ``"median of 1 run"``, ``"medians of 3 runs"``.

    Example:
        >>> medians_of(1), medians_of(3, "epoch", capital=True)
        ('median of 1 run', 'Medians of 3 epochs')
    """
    text = f"median of 1 {what}" if n == 1 else f"medians of {n} {what}s"
    return text[0].upper() + text[1:] if capital else text


def memcpy_s(nbytes: int, reps: int) -> float:
    """Median seconds of one copy of ``nbytes`` between two preallocated tensors."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    return median_s(lambda i: dst.copy_(src), reps, warmup=2)


def table_head(heading: str, columns: list[str]) -> list[str]:
    """The first lines of a scenario's markdown table: heading, blank line, header row, separator.

    Example:
        >>> table_head("### Store", ["S", "MB"])
        ['### Store', '', '| S | MB |', '|---|---|']
    """
    return [heading, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def ratio_entry(label: str, value: float, target: float | None = None) -> dict[str, Any]:
    """One bar of the plot: a ratio to a same-run baseline (1 = parity)."""
    return {"label": label, "value": float(value), "target": target}


def target(what: str, value: float, goal: float, unit: str = "x", *, quick: bool = False) -> dict[str, Any]:
    """A target check; ``met`` is False for a miss (reported as MISSED, never asserted)."""
    ok = bool(math.isfinite(value) and value >= goal)
    return {"what": what, "value": float(value), "goal": float(goal), "unit": unit, "met": ok, "quick": quick}


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine as the docs describe it (cores and memory from /proc)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    mem = _meminfo_gib()
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_gib": round(mem, 1) if mem is not None else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(load[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
