"""The ``torch-dataflow`` command.

Subcommands:

* ``demo`` — the main job: a target model produces EAGLE3 features while a
  Lightning trainer trains a draft on them, exactly once (:mod:`torch_dataflow.demo`);
* ``status URI`` — a ledger's state as a table or JSON (:mod:`torch_dataflow.status`);
* ``mooncake-master`` — run a Mooncake master on loopback;
* ``requeue LEDGER [--ids ...]`` — deliver quarantined samples again;
* ``gc STORE LEDGER [--dry-run] [--grace S]`` — delete what no ledger entry needs;
* ``import SRC`` — copy a SpecForge offline feature directory into a store;
* ``bench`` — the benchmarks (``torch_dataflow.bench``).

Errors of the library (bad URI, unreachable server, ...) print one line on
stderr and exit with status 2.

Example:
    >>> main(["status", "memory://cli-doc"])  # doctest: +ELLIPSIS
    ledger   memory://cli-doc
    ...
    0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._cli_maintenance import LEDGER_HELP, MAINTENANCE
from .errors import ConfigError, DataflowError

__all__ = ["main"]

PROG = "torch-dataflow"

_DEMO_EPILOG = """\
servers (the default needs none: a shared directory and SQLite under --workdir):
  Mooncake store   torch-dataflow mooncake-master --port 50051     (in another shell; needs
                   pip install 'torch-dataflow[mooncake-cpu]', see docs/mooncake.md)
                   torch-dataflow demo --store mooncake://127.0.0.1:50051
  Redis ledger     redis-server --port 6379 --bind 127.0.0.1        (in another shell; needs
                   apt-get install redis-server and pip install 'torch-dataflow[redis]', docs/redis.md)
                   torch-dataflow demo --ledger redis://127.0.0.1:6379/0
  both             torch-dataflow demo --store mooncake://127.0.0.1:50051 --ledger redis://127.0.0.1:6379/0
A --store or --ledger given by URI must be empty (the demo wipes only what it keeps under --workdir).

exit status: 0 when every committed sample was trained exactly once, 1 when the check fails,
2 on a usage or configuration error."""

_STATUS_EPILOG = """\
examples:
  torch-dataflow status sqlite:///$PWD/td-demo/ledger.db --store file://$PWD/td-demo/store
  torch-dataflow status redis://127.0.0.1:6379/0 --interval 5 --json"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_demo(sub: Any) -> None:
    from .demo import QUICK, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo", help="run a producer and a trainer together, with progress bars and an exactly-once summary",
        description="A tiny Llama target (random init, no download) writes EAGLE3 features through a\n"
        "feature store while Lightning trains an EAGLE3 draft head on them, concurrently, in\n"
        "separate processes. The closing summary checks, from the ledger and from the trainer's\n"
        "own log, that every committed sample was trained exactly once.",
        epilog=_DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    quick = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
    p.add_argument("--quick", action="store_true", help=f"the CI setting, well under a minute ({quick})")
    p.add_argument(
        "--workdir", default=None, help=f"folder for the store, ledger, checkpoints, logs (default ./{d.workdir})"
    )
    p.add_argument("--store", default=None, help="feature store URI (default file://WORKDIR/store)")
    p.add_argument("--ledger", default=None, help="ledger URI (default sqlite://WORKDIR/ledger.db)")
    g = p.add_argument_group("workload")
    g.add_argument("--samples", type=_positive_int, help=f"training samples to produce (default {d.samples})")
    g.add_argument("--seq-len", type=_positive_int, help=f"longest prompt in tokens (default {d.seq_len})")
    g.add_argument("--batch-size", type=_positive_int, help=f"samples per optimizer step (default {d.batch_size})")
    g.add_argument("--heldout", type=_positive_int, help=f"held-out samples for the loss (default {d.heldout})")
    g.add_argument(
        "--eval-every", type=_positive_int, help=f"steps between held-out evaluations (default {d.eval_every})"
    )
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        help=f"steps between checkpoints; each frees the bytes it covers (default {d.checkpoint_every})",
    )
    g.add_argument("--lr", type=_positive_float, help=f"draft learning rate (default {d.lr})")
    g.add_argument("--ttt-steps", type=_positive_int, help=f"EAGLE3 test-time steps (default {d.ttt_steps})")
    g.add_argument("--seed", type=int, help=f"seed of target, prompts and draft (default {d.seed})")
    g.add_argument("--model", help="a local Hugging Face model directory to use as the target (no download)")
    g.add_argument("--gguf-file", help="a GGUF file inside --model")
    r = p.add_argument_group("runtime")
    r.add_argument(
        "--max-pending",
        type=_positive_int,
        help=f"producer backpressure: undelivered samples at most (default {d.max_pending})",
    )
    r.add_argument(
        "--lease-ttl",
        type=_positive_float,
        help=f"seconds before a held sample is redelivered (default {d.lease_ttl:g})",
    )
    r.add_argument(
        "--idle-timeout", type=_positive_float, help=f"seconds the trainer waits for data (default {d.idle_timeout:g})"
    )
    r.add_argument(
        "--crash-at-step",
        type=_positive_int,
        help="kill the trainer (SIGKILL) after this optimizer step, once, and resume it from its last checkpoint",
    )
    r.add_argument("--threads", type=_positive_int, help=f"torch threads per process (default {d.threads})")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--json", action="store_true", help="print the summary as JSON (bars stay on stderr)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo import QUICK, DemoConfig, format_summary, run_demo

    fields = (
        "workdir",
        "store",
        "ledger",
        "samples",
        "seq_len",
        "batch_size",
        "heldout",
        "eval_every",
        "checkpoint_every",
        "lr",
        "ttt_steps",
        "seed",
        "model",
        "gguf_file",
        "max_pending",
        "lease_ttl",
        "idle_timeout",
        "crash_at_step",
        "threads",
    )
    kwargs: dict[str, Any] = dict(QUICK) if args.quick else {}
    kwargs.update({f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    kwargs["progress"] = not args.no_progress
    summary = run_demo(DemoConfig(**kwargs))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0 if summary["exactly_once"]["ok"] else 1


def _add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="what a ledger holds: pending, leased (by whom), trained, durable, ...",
        description="A ledger's state: deliveries by state, leases by owner and when they expire, "
        "quarantined samples with reasons, the stream, and a store's resident bytes.",
        epilog=_STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ledger", metavar="URI", help=LEDGER_HELP)
    p.add_argument("--store", metavar="URI", help="also report this store's resident bytes")
    p.add_argument(
        "--interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="watch this long and report commit/ack rates and per-owner lease rates",
    )
    p.add_argument("--limit", type=_positive_int, default=20, help="quarantined samples to list (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true",
                   help="a live view (needs rich), refreshed every --interval seconds (default 2); redirected to a file "
                   "or pipe, one time-stamped table per refresh; with --json, one JSON snapshot per line")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from .status import collect_status, format_status

    if args.interval < 0:
        raise DataflowError(f"--interval must be >= 0, got {args.interval}")
    if args.watch:
        from .status_watch import watch

        return watch(args.ledger, args.store, interval=args.interval or 2.0, as_json=args.json)
    snap = collect_status(args.ledger, args.store, interval=args.interval, limit=args.limit)
    print(json.dumps(snap, indent=2) if args.json else format_status(snap))
    return 0


def _add_import(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="copy a SpecForge offline feature directory into a store + ledger (or register it in place)",
        description="Each rows_*/data_*.ckpt[.gz] file becomes one committed sample (read with "
        "weights_only=True). Safe to re-run after a crash. With --in-place nothing is copied: the ledger "
        "points at the files through the read-only specforge:///SRC store.",
    )
    p.add_argument("src", metavar="SRC", help="the SpecForge directory (prepare_hidden_states.py --output-path)")
    p.add_argument("--store", metavar="URI", help="target store, e.g. file:///data/features (not with --in-place)")
    p.add_argument("--in-place", action="store_true",
                   help="register the files where they are (store specforge:///SRC) instead of copying them")
    p.add_argument("--ledger", required=True, metavar="URI", help="target ledger, e.g. sqlite:///data/ledger.db")
    p.add_argument("--trim-padding", action="store_true", help="drop trailing batch padding of each file")
    p.add_argument("--takeover", action="store_true",
                   help="run although an import of SRC looks alive (refused otherwise: two would race); only when "
                   "that one is known to be gone")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> int:
    if args.in_place:
        if args.store or args.trim_padding or args.takeover:
            raise ConfigError("--in-place serves the files as they are: drop --store, --trim-padding and --takeover")
        from .specforge.store import register_directory

        n = register_directory(args.src, args.ledger, progress=not args.no_progress)
        src = os.path.abspath(args.src)
        print(f"registered {n} new samples of {src} in place: store specforge://{src} (ledger {args.ledger})")
        return 0
    if not args.store:
        raise ConfigError("give --store URI to copy into, or --in-place to serve the files where they are")
    from .specforge.directory import SpecForgeDirectory, import_directory

    src = SpecForgeDirectory(args.src, trim_padding=args.trim_padding)
    n = import_directory(src, args.store, args.ledger, progress=not args.no_progress, takeover=args.takeover)
    kept = f" ({len(src) - n} of {len(src)} files were committed before and are skipped)" if n < len(src) else ""
    print(f"imported {n} samples from {args.src} into {args.store} (ledger {args.ledger}){kept}")
    return 0


def _mooncake_master(argv: list[str]) -> int:
    from .stores.mooncake_master import main as master_main

    return master_main(argv)


def _bench(argv: list[str]) -> int:
    if importlib.util.find_spec("torch_dataflow.bench") is None:
        print(
            f"{PROG} bench: the benchmarks are not part of this installation (no torch_dataflow.bench)", file=sys.stderr
        )
        return 2
    bench = importlib.import_module("torch_dataflow.bench")
    return int(bench.main(argv) or 0)


# Subcommands with their own argument parsers get the rest of the command line as is.
_PASSTHROUGH = {"mooncake-master": _mooncake_master, "bench": _bench}


def build_parser() -> argparse.ArgumentParser:
    """The ``torch-dataflow`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Move training features from the processes that make "
        "them to the processes that train on them, exactly once.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_status(sub)
    for add in MAINTENANCE:  # close-stream, requeue, gc, finish
        add(sub)
    _add_import(sub)
    sub.add_parser(
        "mooncake-master",
        add_help=False,
        help="run a Mooncake master on 127.0.0.1 (see 'torch-dataflow mooncake-master --help')",
    )
    sub.add_parser("bench", add_help=False, help="run the benchmarks (see 'torch-dataflow bench --help')")
    return p


def _run(argv: list[str]) -> int:
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torch-dataflow`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["bench", "--help"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except (DataflowError, TimeoutError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        hint = (
            (
                " (an optional dependency: the extras are listed in pyproject.toml, e.g. "
                "`pip install 'torch-dataflow[lightning,eagle3]'`)"
            )
            if isinstance(e, ModuleNotFoundError)
            else ""
        )
        print(f"{PROG}: error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `torch-dataflow status ... | head`: the reader is gone, which is not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
