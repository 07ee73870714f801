"""Registering a SpecForge directory into a ledger, in place: :func:`register_directory`
(re-exported by :mod:`torch_dataflow.specforge.store`, whose docs describe the file
identity it commits). The store knows bytes only; this module knows the ledger."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, CorruptSample
from ..refs import FeatureSpec, SampleRef
from .directory import SpecForgeDirectory, _load

if TYPE_CHECKING:
    from .store import SpecForgeDirStore

_RETRIES = 20


def _scan(store: SpecForgeDirStore, sid: str, rel: str, header: bool) -> tuple[tuple[FeatureSpec, ...], int, str]:
    """``(specs, size, identity)`` of one file (a ref's fields); specs only with ``header`` (mmap load)."""
    from .store import _specs_of

    path = store.path_of(sid)
    ident = store.identity(sid)
    specs: tuple[FeatureSpec, ...] = ()
    if header:
        try:
            specs = _specs_of(_load(Path(path)))
        except (ConfigError, CorruptSample) as e:
            raise CorruptSample(f"{e} (move the file out of the directory to register the rest)") from e
        if store.identity(sid) != ident:
            raise CorruptSample(f"{rel} changed while being registered; re-run register_directory")
    return specs, int(ident.split(":")[1]), ident


def register_directory(
    path: str | os.PathLike[str] | SpecForgeDirectory,
    ledger: Any,
    *,
    progress: bool = True,
    name: str | None = None,
    batch: int = 256,
) -> int:
    """Commit every file of a SpecForge directory to ``ledger``, in place (no copy).

    One ref per file, committed in SpecForge's file order (an unshuffled pool
    then matches ``DistributedSampler`` over ``SpecForgeDirectory``), on store
    ``specforge:///<path>``: ``checksum`` is the file identity (module docs),
    ``nbytes`` the file size, ``specs`` the tensors' names, dtypes and shapes
    for ``.ckpt`` (from an mmap load: no tensor data is read) and empty for
    ``.ckpt.gz`` (that would take a full decompression).

    Idempotent: an id already committed with the same identity is skipped (its
    deliveries, trained or not, are untouched); a changed file is committed as
    a new generation. Concurrent calls (e.g. every DDP rank) are safe: a commit
    that loses a race is retried. On success the ledger's stream is closed (a
    producer registered and marked done), so online consumers end too.

    Args:
        path: the directory, or an open ``SpecForgeDirectory`` (its root and order).
        ledger: a ledger URI or instance.
        progress: show a tqdm progress bar.
        name: producer name recorded in the ledger (default ``specforge-register:<real SRC path>``, the same
            for every run, so a re-run after a kill ends the stream the killed run left open).
        batch: files per reserve/commit round trip.

    Returns:
        How many files were committed by this call (0 when nothing changed).

    Raises:
        ConfigError: no feature files, a path with ``~`` or leaving the root, a
            trimmed ``SpecForgeDirectory``, an id the ledger holds from another store.
        CorruptSample: a ``.ckpt`` file that does not load under ``weights_only``.

    Example:
        >>> register_directory("/data/hs", "sqlite:///data/ledger.db")  # doctest: +SKIP
        120000
    """
    from tqdm.auto import tqdm

    from ..ledger import open_ledger
    from .store import _SEP, SpecForgeDirStore

    ds = path if isinstance(path, SpecForgeDirectory) else SpecForgeDirectory(path)
    if ds.trim_padding:
        raise ConfigError("register_directory serves files as they are; trim_padding needs an import (a copy)")
    store = SpecForgeDirStore(os.path.abspath(ds.root))
    led = open_ledger(ledger)
    items = []
    for i in range(len(ds)):
        rel, sid = ds.relative_path(i), ds.sample_id(i)
        if _SEP in rel or store.path_of(sid) != os.path.realpath(ds.paths[i]):
            raise ConfigError(f"{ds.paths[i]}: a '~' in its relative path would make its id ambiguous; rename it")
        items.append((sid, rel))
    from ..binding import bind_store

    bind_store(store, led)  # consumers then refuse a mistyped directory before leasing
    # One name per directory, the same for every run: a re-run after a kill closes the stream the dead run
    # left open (with a name per process, that run's producer stayed open and online consumers waited on it).
    producer = name or f"specforge-register:{os.path.realpath(ds.root)}"
    led.register_producer(producer)
    committed, batch = 0, max(1, batch)
    with tqdm(total=len(items), desc="register SpecForge files", unit="file", disable=not progress) as bar:
        for start in range(0, len(items), batch):
            committed += _register_chunk(store, led, items[start : start + batch])
            bar.update(len(items[start : start + batch]))
    led.producer_done(producer)
    return committed


def _register_chunk(store: SpecForgeDirStore, led: Any, chunk: list[tuple[str, str]]) -> int:
    scanned: dict[str, tuple[tuple[FeatureSpec, ...], int, str]] = {}  # sid -> (specs, nbytes, checksum)
    last: Exception | None = None
    for _ in range(_RETRIES):
        todo = []
        for sid, rel in chunk:
            ident = store.identity(sid)
            old = led.get_ref(sid)
            if old is not None and old.store != store.uri:
                raise ConfigError(f"{led.uri} holds {sid!r} from {old.store}: use a separate ledger in place")
            if old is not None and old.checksum == ident:
                continue
            if sid not in scanned or scanned[sid][2] != ident:
                scanned[sid] = _scan(store, sid, rel, header=not sid.endswith(".gz"))
            todo.append((sid, rel))
        if not todo:
            return 0
        gens = led.reserve([sid for sid, _ in todo])
        meta = {"format": "specforge-offline"}
        refs = [
            SampleRef(sid, gen, store.uri, *scanned[sid], {**meta, "source": rel})
            for (sid, rel), gen in zip(todo, gens, strict=True)
        ]
        try:
            led.commit(refs)
            return len(refs)
        except ConfigError as e:  # stale: a concurrent registration reserved a newer generation
            last = e
    raise ConfigError(f"could not register {chunk[0][0]!r}..: concurrent registrations kept superseding it ({last})")
