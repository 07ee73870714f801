"""``specforge:///abs/path``: a SpecForge offline feature directory served in place.

A read-only :class:`~torch_dataflow.stores.FeatureStore` over the files that
SpecForge's ``prepare_hidden_states.py`` wrote (``rows_*/data_*.ckpt[.gz]``).
Nothing is copied: :func:`register_directory` commits one ref per file to a
ledger and ``get(ref)`` loads that file as
:class:`~torch_dataflow.eagle3.SpecForgeDirectory` does (same keys, shapes,
dtypes: :func:`~torch_dataflow.eagle3.eagle3_collate` works unchanged), with
``torch.load(weights_only=True)`` only.

**Sample ids** are ``SpecForgeDirectory.sample_id`` (relative path, ``/`` ->
``~``: ``rows_0-2000~data_7.ckpt``). Only ``.ckpt[.gz]`` files are opened; an
id with an empty, ``.`` or ``..`` part, or whose real path (symlinks resolved)
leaves the root's, raises :class:`~torch_dataflow.errors.ConfigError` at
registration and at every read; so does a relative path that holds a ``~``.

**Integrity.** SpecForge files have no checksum, so a ref's ``checksum`` is
the file's identity at registration, ``sf1:<size>:<mtime_ns>:<xxh3>``, the
hash covering the first and last 4 KiB (a ``torch.save`` zip's tensor table
and directory; all of a file up to 8 KiB). ``get`` re-takes it before loading
and re-stats after: a truncated, extended, rewritten or replaced file, or one
changed while read, raises :class:`~torch_dataflow.errors.CorruptSample`
(the dataset quarantines it); a vanished one raises
:class:`~torch_dataflow.errors.SampleUnavailable`. Loaded tensors are checked
against the ref's specs when registration recorded them. It **cannot** detect
an edit that keeps size and mtime (``touch -d``, ``rsync --inplace --times``,
bit rot) and spares both ends of the file. An intended rewrite (say a ``cp``
without ``-p``) looks corrupt: re-run :func:`register_directory`, which
commits the new identity as a new generation.

**Read-only.** ``put`` raises :class:`ConfigError`; ``delete`` is a no-op
returning ``False`` (the files are their owner's, never the ledger's to free),
so ``mark_durable(free=True)`` is safe. ``keys()`` lists each file once as
generation 1 (a directory has no generations): build pools with
``FeaturePool.from_specforge`` or ``sample_ids``, not store discovery.
**Auth.** No secret (a ``secret`` raises :class:`ConfigError`): the store
writes nothing, so has nowhere to keep a verifier, and whoever can read the
files can read the samples. Protect the directory with file permissions.
**Memory.** ``.ckpt`` tensors are copy-on-write file mappings (``mmap=True``;
``zero_copy`` changes nothing): writes to them never reach the file and they
survive its deletion, but an in-place rewrite during training may show
through pages not yet read. ``.ckpt.gz`` files are decompressed per read.

Example:
    >>> import tempfile
    >>> from torch_dataflow import FeatureStoreDataset
    >>> from torch_dataflow.eagle3 import eagle3_collate
    >>> from torch_dataflow.specforge import write_specforge_directory
    >>> d = tempfile.mkdtemp()
    >>> _ = write_specforge_directory(f"{d}/hs", n=3, seq_lens=[4, 6], hidden=8)
    >>> register_directory(f"{d}/hs", f"sqlite://{d}/ledger.db", progress=False)
    3
    >>> register_directory(f"{d}/hs", f"sqlite://{d}/ledger.db", progress=False)  # idempotent
    0
    >>> ds = FeatureStoreDataset(f"specforge://{d}/hs", f"sqlite://{d}/ledger.db", mode="offline")
    >>> eagle3_collate(list(ds))["hidden_state"].shape
    torch.Size([3, 6, 24])
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
import xxhash

from ..auth import SecretGuard
from ..errors import ConfigError, CorruptSample, SampleUnavailable
from ..refs import FeatureSpec, SampleRef, validate_sample_id
from ..stores.base import Buffer, FeatureStore, StoreHealth
from ..uri import parse_uri
from .directory import SUFFIXES, SpecForgeDirectory, _list_feature_files, _load

__all__ = ["CHECKSUM_PREFIX", "SpecForgeDirStore", "register_directory"]

CHECKSUM_PREFIX = "sf1"
"""Version tag of the file identity kept in ``SampleRef.checksum``."""

_SEP = "~"  # SpecForgeDirectory.sample_id's separator
_EDGE = 4096  # bytes hashed at each end of a file
_QUERY = {"secret": str}
_RETRIES = 20
_STAT = ("st_ino", "st_dev", "st_size", "st_mtime_ns")


def _identity(fd: int) -> tuple[str, os.stat_result]:
    """``sf1:<size>:<mtime_ns>:<xxh3 of the first and last 4 KiB>`` of an open file."""
    st = os.fstat(fd)
    h = xxhash.xxh3_64()
    h.update(os.pread(fd, min(st.st_size, _EDGE), 0))
    if st.st_size > _EDGE:
        start = max(_EDGE, st.st_size - _EDGE)
        h.update(os.pread(fd, st.st_size - start, start))
    return f"{CHECKSUM_PREFIX}:{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}", st


class SpecForgeDirStore(FeatureStore):
    """A SpecForge offline feature directory as a read-only feature store.

    Args:
        path: absolute path of the directory (SpecForge's ``--output-path``).
        secret: refused with :class:`ConfigError` (see the module docs).

    Example:
        >>> import tempfile
        >>> from torch_dataflow.specforge import write_specforge_directory
        >>> d = tempfile.mkdtemp()
        >>> _ = write_specforge_directory(d, n=2, seq_lens=5, hidden=4)
        >>> store = SpecForgeDirStore(d)
        >>> store.keys()
        [('rows_0-2000~data_0.ckpt', 1), ('rows_0-2000~data_1.ckpt', 1)]
        >>> store.identity("rows_0-2000~data_0.ckpt").startswith("sf1:")
        True
    """

    codec_blobs = False  # torch.save files: field selection loads the file and keeps the chosen tensors

    def __init__(self, path: str | os.PathLike[str], *, secret: str | None = None) -> None:
        root = os.fspath(path)
        if not isinstance(root, str) or not os.path.isabs(root):
            raise ConfigError(f"specforge store path must be absolute, got {root!r}")
        if secret is not None:
            raise ConfigError("specforge:// stores are read-only and take no secret: use file permissions")
        self.root = os.path.normpath(root)
        self.uri = "specforge://" + quote(self.root)
        self._real_root: str | None = None

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> SpecForgeDirStore:
        """Build from ``specforge:///abs/path`` (no query keys apply)."""
        parsed = parse_uri(uri, _QUERY)
        if parsed.scheme != "specforge":
            raise ConfigError(f"not a specforge:// URI: {uri!r}")
        if parsed.host not in (None, "", "localhost") or parsed.password is not None or not parsed.path:
            raise ConfigError(f"specforge:// takes a local path, no host or secret (specforge:///abs/path): {uri!r}")
        return cls(parsed.path, **{**parsed.query, **overrides})

    # --------------------------------------------------------------- attach
    def _attach(self) -> None:
        if not os.path.isdir(self.root):
            raise ConfigError(f"SpecForge feature directory not found: {self.root}")
        self._real_root = os.path.realpath(self.root)
        self._guard = SecretGuard.attach(None, None, f"store {self.uri}")  # no secret, ever (module docs)

    def _real(self) -> str:
        if self._real_root is None:
            self._attach()
        return str(self._real_root)

    # ---------------------------------------------------------------- paths
    def path_of(self, sample_id: str) -> str:
        """The file that holds ``sample_id``, symlinks resolved, inside the root.

        Raises:
            ConfigError: not a SpecForge sample id of this store, or a path that
                leaves the root (``..``, an absolute part, a symlink out).
        """
        validate_sample_id(sample_id)
        parts = sample_id.split(_SEP)
        if any(p in ("", ".", "..") for p in parts) or not sample_id.endswith(SUFFIXES):
            raise ConfigError(f"{sample_id!r} is not a SpecForge sample id (rows_X-Y~data_N.ckpt[.gz])")
        real = os.path.realpath(os.path.join(root := self._real(), *parts))
        if os.path.commonpath([root, real]) != root or real == root:
            raise ConfigError(f"sample {sample_id!r} resolves to {real}, outside {self.root}: refused")
        return real

    def identity(self, sample_id: str) -> str:
        """The file identity of ``sample_id`` now (what a ref's ``checksum`` holds).

        Raises: SampleUnavailable (no file), CorruptSample (cannot open), ConfigError (:meth:`path_of`).
        """
        self._check_auth()
        fd = self._open(sample_id, self.path_of(sample_id))
        try:
            return _identity(fd)[0]
        finally:
            os.close(fd)

    def _open(self, sample_id: str, path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise SampleUnavailable(f"sample {sample_id!r}: {path} is gone from {self.uri}") from None
        except OSError as e:  # permissions, a directory, a symlink swapped in after path_of
            raise CorruptSample(f"sample {sample_id!r}: {path} cannot be opened: {e}") from e

    # ------------------------------------------------------ byte primitives
    def _write(self, sample_id: str, generation: int, parts: Sequence[Buffer], nbytes: int) -> None:
        raise ConfigError(f"{self.uri} is a read-only store (a SpecForge directory served in place)")

    def _read(self, sample_id: str, generation: int) -> Buffer:
        raise ConfigError(f"{self.uri} serves tensors only (get); it has no encoded blobs to read")

    def _delete(self, sample_id: str, generation: int) -> bool:
        return False  # the files are the directory owner's, never the ledger's to free

    def settle(self, ref: SampleRef, *, force: bool = False) -> bool:
        """Nothing to delete here (the files are the directory owner's): always settled."""
        self._check_auth()
        return True

    def _exists(self, sample_id: str, generation: int) -> bool:
        return os.path.isfile(self.path_of(sample_id))

    def _keys(self) -> Iterator[tuple[str, int]]:
        root = self._real()
        for p in _list_feature_files(Path(root)):
            sid = p.relative_to(root).as_posix().replace("/", _SEP)
            try:
                yield validate_sample_id(sid), 1
            except ConfigError:
                continue  # a path that cannot be an id is not servable (register_directory says why)

    def store_id(self) -> str:
        """``specforge:<real path>``: the directory is the store (nothing is written into it)."""
        return "specforge:" + self._real()

    # ----------------------------------------------------------- public API
    def put(self, sample_id: str, generation: int, tensors: Any, metadata: Any = None) -> SampleRef:
        """Refused with :class:`ConfigError`: read-only (see :func:`register_directory`)."""
        raise ConfigError(f"{self.uri} is a read-only store; register files with register_directory()")

    def get(self, ref: SampleRef, *, zero_copy: bool = False) -> dict[str, torch.Tensor]:
        """Load ``ref``'s file after checking it is the file that was registered.

        Raises:
            SampleUnavailable: the file is gone.
            CorruptSample: changed since registration, truncated, unreadable,
                refused by ``weights_only=True``, or not the ref's specs.
            ConfigError: an id that leaves the root.
        """
        self._check_auth()
        what = self._what(ref)
        if not ref.checksum.startswith(CHECKSUM_PREFIX + ":"):
            raise CorruptSample(f"{what}: the ref's checksum {ref.checksum!r} is not a {self.uri} file identity")
        path = self.path_of(ref.sample_id)
        fd = self._open(ref.sample_id, path)
        try:
            found, before = _identity(fd)
        finally:
            os.close(fd)
        if found != ref.checksum:
            msg = f"{path} changed since it was registered ({found}, was {ref.checksum})"
            raise CorruptSample(f"{what}: {msg}; if that was intended, re-run register_directory")
        try:
            data = _load(Path(path))
            after = os.stat(path, follow_symlinks=False)
        except (CorruptSample, ConfigError, OSError) as e:
            if not os.path.lexists(path):
                raise SampleUnavailable(f"{what}: {path} vanished while being read") from None
            raise CorruptSample(f"{what}: {e}") from e
        if [getattr(after, a) for a in _STAT] != [getattr(before, a) for a in _STAT]:
            raise CorruptSample(f"{what}: {path} changed while being read")
        if ref.specs:
            _check_specs(data, ref, what)
        return data

    def exists(self, ref: SampleRef) -> bool:
        """Whether ``ref``'s file is present with the registered size and mtime."""
        self._check_auth()
        try:
            st = os.stat(self.path_of(ref.sample_id), follow_symlinks=False)
        except OSError:
            return False
        return ref.checksum.startswith(f"{CHECKSUM_PREFIX}:{st.st_size}:{st.st_mtime_ns}:")

    def health(self) -> StoreHealth:
        """Bytes and count of the directory's feature files (a tree walk)."""
        self._check_auth()
        count = size = 0
        for p in _list_feature_files(Path(self._real())):
            with contextlib.suppress(OSError):
                size, count = size + p.stat().st_size, count + 1
        return StoreHealth(resident_bytes=size, count=count)

    def _config_state(self) -> dict[str, Any]:
        return {"path": self.root}


def _specs_of(data: dict[str, torch.Tensor]) -> tuple[FeatureSpec, ...]:
    return tuple(
        FeatureSpec(k, str(v.dtype).removeprefix("torch."), tuple(v.shape), v.numel() * v.element_size())
        for k, v in data.items()
    )


def _check_specs(data: dict[str, torch.Tensor], ref: SampleRef, what: str) -> None:
    got = [(s.name, s.dtype, s.shape) for s in _specs_of(data)]
    want = [(s.name, s.dtype, s.shape) for s in ref.specs]
    if got != want:
        raise CorruptSample(f"{what}: the file holds {got}, registered as {want}")


def _scan(store: SpecForgeDirStore, sid: str, rel: str, header: bool) -> tuple[tuple[FeatureSpec, ...], int, str]:
    """``(specs, size, identity)`` of one file (a ref's fields); specs only with ``header`` (mmap load)."""
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
        name: producer name recorded in the ledger (default ``specforge-register:host:pid``).
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
    producer = name or f"specforge-register:{socket.gethostname()}:{os.getpid()}"
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
