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
from ._register import register_directory
from .directory import SUFFIXES, _list_feature_files, _load

__all__ = ["CHECKSUM_PREFIX", "SpecForgeDirStore", "register_directory"]

CHECKSUM_PREFIX = "sf1"
"""Version tag of the file identity kept in ``SampleRef.checksum``."""

_SEP = "~"  # SpecForgeDirectory.sample_id's separator
_EDGE = 4096  # bytes hashed at each end of a file
_QUERY = {"secret": str}
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

    registers_in_place = True  # its files exist before a ledger registers them (binding.bind_store)

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
