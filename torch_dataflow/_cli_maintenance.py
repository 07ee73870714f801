"""The ``torch-dataflow`` subcommands that tend a ledger beside or after a run:
``close-stream``, ``requeue``, ``gc`` and ``finish``. :mod:`torch_dataflow.cli`
registers them (:data:`MAINTENANCE`) and documents the command as a whole."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataflowError

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["LEDGER_HELP", "MAINTENANCE"]

LEDGER_HELP = "ledger URI: sqlite:///path/ledger.db, redis://host:port/db"
_STORE_HELP = "store URI: file:///path, mooncake://host:port"
_JSON_HELP = "print the report as JSON"


def _store_and_ledger(p: argparse.ArgumentParser) -> None:
    """The ``STORE LEDGER`` positionals of the commands that need both."""
    p.add_argument("store", metavar="STORE", help=_STORE_HELP)
    p.add_argument("ledger", metavar="LEDGER", help=LEDGER_HELP)


@contextlib.contextmanager
def _existing_ledger(uri: str) -> Iterator[Ledger]:
    """The ledger at ``uri``, refused if none exists there (never created), closed on exit."""
    from .binding import existing_ledger

    ledger = existing_ledger(uri)
    try:
        yield ledger
    finally:
        ledger.close()


def _add_close_stream(sub: Any) -> None:
    p = sub.add_parser(
        "close-stream",
        help="mark a dead producer done so online consumers finish (see 'torch-dataflow status')",
        description="Mark producer NAME (default: every open producer) done, as its FeatureWriter.close() "
        "would have: consumers stop waiting once every producer is done.",
    )
    p.add_argument("ledger", metavar="LEDGER", help=LEDGER_HELP)
    p.add_argument("--producer", metavar="NAME", action="append", help="producer to close (repeatable)")
    p.set_defaults(func=_close_stream)


def _close_stream(args: argparse.Namespace) -> int:
    with _existing_ledger(args.ledger) as ledger:
        known = {p["name"]: p for p in ledger.producers()}
        names = args.producer or [n for n, p in known.items() if not p["done"]]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataflowError(f"no producer {', '.join(unknown)} in {ledger.uri} (known: {', '.join(known) or '-'})")
        for name in names:
            ledger.producer_done(name)
            print(f"closed producer {name}")
        print(f"stream {'closed' if ledger.is_closed() else 'still open'}")
    return 0


def _add_requeue(sub: Any) -> None:
    p = sub.add_parser(
        "requeue",
        help="undo quarantines: deliver quarantined samples again",
        description="Put QUARANTINED samples (default: all of them) back in delivery: LIVE again, pending "
        "in the current epoch and in every begun epoch that lacks them. 'torch-dataflow status' lists the quarantined.",
    )
    p.add_argument("ledger", metavar="LEDGER", help=LEDGER_HELP)
    p.add_argument("--ids", metavar="SAMPLE_ID", nargs="+", help="only these sample ids")
    p.set_defaults(func=_requeue)


def _requeue(args: argparse.Namespace) -> int:
    from .ledger.base import SampleStatus

    with _existing_ledger(args.ledger) as ledger:
        if args.ids:
            known = ledger.sample_statuses(args.ids)
            unknown = [i for i in args.ids if i not in known]
            if unknown:
                raise DataflowError(f"no sample {', '.join(unknown)} in {ledger.uri}: nothing requeued (check the "
                                    f"ids; `torch-dataflow status {ledger.uri}` lists the quarantined ones)")
            other = [f"{i} ({known[i].name.lower()})" for i in args.ids if known[i] != SampleStatus.QUARANTINED]
            if other:
                print(f"not quarantined, left as they are: {', '.join(other)}")
        n = ledger.requeue_quarantined(args.ids)
        print(f"requeued {n} quarantined samples in {ledger.uri}")
    return 0


def _add_gc(sub: Any) -> None:
    p = sub.add_parser(
        "gc",
        help="delete the bytes no ledger entry needs (the delete queue, then orphans)",
        description="Finish the deletes the ledger queued (freed, aborted and superseded samples), then "
        "remove stored generations the ledger does not need (written but never committed, superseded, "
        "left by refused puts) once they are older than --grace seconds. Refuses a store that is not "
        "the ledger's. Example: torch-dataflow gc file:///data/features sqlite:///data/ledger.db --dry-run",
    )
    _store_and_ledger(p)
    p.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                   help="keep unneeded generations younger than this (a put in flight); default 3600")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(func=_gc)


def _gc(args: argparse.Namespace) -> int:
    from .gc import collect

    if args.grace < 0:
        raise ConfigError(f"--grace must be >= 0, got {args.grace}")
    with _existing_ledger(args.ledger) as ledger:
        rep = collect(args.store, ledger, grace_s=args.grace, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({**rep.as_dict(), "removed": rep.removed}))
        return 0
    verb = "would remove" if rep.dry_run else "removed"
    queued = f"{rep.queued_left} queued deletes pending" if rep.dry_run else \
        f"{rep.queued_deleted} queued deletes done, {rep.queued_left} still queued"
    print(f"{queued}; {verb} {rep.orphans} orphaned generations ({rep.orphan_bytes} bytes) and "
          f"{rep.temp_files} temporary files of killed writers; {rep.young} younger than --grace {args.grace:g}s kept")
    for sid, gen in rep.removed:
        print(f"  {sid} generation {gen}")
    return 0


def _add_finish(sub: Any) -> None:
    p = sub.add_parser(
        "finish",
        help="the run is over and its final state is saved: free what was kept for a replay",
        description="Samples trained after a run's newest checkpoint keep their bytes, so a resume from that "
        "checkpoint trains them again. Once the run is over and its final state is saved, nothing will: this "
        "makes them DURABLE at the newest trained step and (online) deletes their bytes. After it, no older "
        "checkpoint of the run is a resume point. Refused while a trainer session is live. "
        "Example: torch-dataflow finish file:///data/features sqlite:///data/ledger.db",
    )
    _store_and_ledger(p)
    p.add_argument("--mode", choices=("online", "offline"),
                   help="how the run consumed the ledger (default: what its consumer recorded); offline keeps bytes")
    p.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(func=_finish)


def _finish(args: argparse.Namespace) -> int:
    from .finish import finish_training

    with _existing_ledger(args.ledger) as ledger:
        rep = finish_training(args.store, ledger, mode=args.mode, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(rep.as_dict()))
    elif rep.step is None:
        print(f"nothing was trained from {args.ledger}: nothing to finish")
    elif not rep.made_durable:
        print(f"every trained sample of {args.ledger} is already durable (newest step {rep.step}): nothing to finish")
    elif args.dry_run:
        print(f"would make {rep.made_durable} trained samples durable at step {rep.step} ({rep.mode})")
    else:
        kept = "; bytes kept (offline: read again next epoch)" if rep.mode == "offline" else \
            f"; freed {rep.freed} samples' bytes" + (f", {rep.queued_left} deletes still queued (run gc)"
                                                   if rep.queued_left else "")
        print(f"{rep.made_durable} trained samples made durable at step {rep.step}{kept}")
    return 0


#: The parsers' registrars, in the order ``--help`` lists the commands.
MAINTENANCE: tuple[Callable[[Any], None], ...] = (_add_close_stream, _add_requeue, _add_gc, _add_finish)
