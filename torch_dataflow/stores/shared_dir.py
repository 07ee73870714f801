"""``file:///abs/path``: a store in a directory shared by processes on one host
(or on a shared mount).

Layout::

    <root>/.torch_dataflow.json           marker: format version, auth verifier, store id
    <root>/<ff>/<sample_id>@<generation>.tdf   one codec blob per sample generation
    <root>/.staging/<host>+<pid>+<token>.tmp   a write in progress (never read as a sample)

``<ff>`` is two hex digits of xxh3(sample id), so no directory grows past
1/256 of the samples; a delete that empties one removes it (a put recreates
it), so a store whose samples are all freed holds only the marker and
``.staging/``. A blob is written to a temporary file in its final
staging directory (named by host and pid: a restarted writer removes the ones
its killed predecessors on this host left, see :meth:`SharedDirStore.sweep_dead_writers`)
and published with :func:`os.link` into its final directory (then the
temporary name is removed), which is atomic: a reader sees the whole blob or no blob, and unlike
a rename it never replaces a file: a put of a generation the store already
holds (another ledger's) is refused. Published files are never modified (a
re-put is a new file under a new generation), so a zero-copy ``mmap`` stays
valid even after the sample is deleted.

``fsync=True`` also syncs each file and its directory before a put returns.
It protects against a *host* crash (power loss, kernel panic) only: after a
process crash the page cache still holds every completed rename. It is off by
default because it costs a device flush per put: measured 3.2 ms instead of
0.44 ms for a 1 MB put on the development VM's local disk (far more on network
file systems).

Security: files are created 0600 and directories 0700 whatever the umask; the
shared secret (if any) guards against mis-wiring jobs, but anyone who can read
the directory can read the bytes.

Cost of :meth:`SharedDirStore.health`: a ``scandir`` plus one ``stat`` per file
(nothing is cached in-process, because other processes write the directory);
measured at 22 ms for 10,000 samples on local disk (benchmarks/bench_store.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import secrets
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import torch
import xxhash

from .. import codec
from ..auth import SecretGuard, make_verifier
from ..errors import ConfigError
from ..refs import SampleRef, validate_sample_id
from ..uri import parse_size, parse_uri
from ._file_io import _IOV_MAX as _IOV_MAX  # re-exported: imported from here by tests
from ._file_io import _mkdir_private, _preadv_into, _private_buffer, _write_all, _write_hashed
from .base import Buffer, FeatureStore, StoreHealth

__all__ = ["SharedDirStore"]

MARKER = ".torch_dataflow.json"
_KIND = "torch_dataflow.shared_dir"
_VERSION = 1
_SUFFIX = ".tdf"
_PUBLISH_TRIES = 64  # link attempts when deletes keep removing the emptied fan-out dir under a put
_STAGING = ".staging"  # temporary files of writes in progress: <host>+<pid>+<token>.tmp
_HOST = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())
_QUERY = {"fsync": bool, "secret": str, "max_bytes": "size", "create": bool}
_HEX = frozenset("0123456789abcdef")


def _entries(path: str) -> list[os.DirEntry[str]]:
    """The entries of directory ``path``; none if it is gone (a delete removed an emptied fan-out
    directory since it was listed)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


class SharedDirStore(FeatureStore):
    """Sample bytes as files in a directory that many processes share.

    Args:
        path: absolute path of the store's root directory.
        fsync: sync files and directories on put (host-crash durability).
        secret: shared secret; the first client to create the store records
            its verifier in the marker file.
        max_bytes: byte budget the producer respects (informative here).
        create: create the directory if it is missing.

    Example:
        >>> import tempfile, torch
        >>> store = SharedDirStore(tempfile.mkdtemp() + "/features")
        >>> ref = store.put("s1", 1, {"x": torch.arange(3)})
        >>> store.get(ref)["x"].tolist()
        [0, 1, 2]
    """

    direct_reads = True  # read_blob_into: preadv straight into the caller's rows

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        secret: str | None = None,
        max_bytes: int | str | None = None,
        create: bool = True,
    ) -> None:
        root = os.fspath(path)
        if not isinstance(root, str) or not os.path.isabs(root):
            raise ConfigError(f"shared-dir store path must be absolute, got {root!r}")
        self.root = os.path.normpath(root)
        self.fsync = bool(fsync)
        self.secret = secret
        self.max_bytes = None if max_bytes is None else parse_size(max_bytes)
        self.create = bool(create)
        self.uri = "file://" + quote(self.root)

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> SharedDirStore:
        """Build from ``file:///abs/path?fsync=1&secret=...&max_bytes=8GiB&create=0``."""
        parsed = parse_uri(uri, _QUERY)
        if parsed.scheme != "file":
            raise ConfigError(f"not a file:// URI: {uri!r}")
        if parsed.host not in (None, "", "localhost"):
            raise ConfigError(f"file:// URIs name a local path (file:///abs/path), got host {parsed.host!r}")
        if not parsed.path:
            raise ConfigError(f"file:// URI has no path: {uri!r}")
        kwargs: dict[str, Any] = {**parsed.query, **overrides}
        return cls(parsed.path, **kwargs)

    # --------------------------------------------------------------- attach
    def _read_marker(self) -> dict[str, Any] | None:
        path = os.path.join(self.root, MARKER)
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is unreadable or not JSON ({e}): not a torch_dataflow store") from e
        if not isinstance(doc, dict) or doc.get("kind") != _KIND:
            raise ConfigError(f"{path} is not a torch_dataflow shared-dir marker; refusing to use {self.root}")
        if not isinstance(doc.get("version"), int) or doc["version"] > _VERSION:
            raise ConfigError(f"{self.root} has store format {doc.get('version')!r}; this version reads {_VERSION}")
        return doc

    def _attach(self) -> None:
        if not os.path.isdir(self.root):
            if not self.create:
                raise ConfigError(f"store directory {self.root} does not exist (create=False)")
            os.makedirs(os.path.dirname(self.root), exist_ok=True)
            _mkdir_private(self.root)
        marker = self._read_marker()
        if marker is None:
            # Adopting a directory full of someone else's files would mix them with
            # samples (and sweep_temp would delete their dot-files): refuse.
            foreign = [n for n in os.listdir(self.root) if not n.startswith(".")]
            # Sample dirs appear only after the marker: re-read it after listing, so a
            # client that raced with the creator (other thread or process) finds it.
            marker = self._read_marker()
            if foreign and marker is None:
                raise ConfigError(f"{self.root} is not empty and has no {MARKER}: not a torch_dataflow store")
        if marker is None and not self.create:
            raise ConfigError(f"{self.root} has no {MARKER}: not a torch_dataflow store (create=False)")
        if marker is None:
            doc = {"kind": _KIND, "version": _VERSION, "verifier": make_verifier(self.secret) if self.secret else None,
                   "store_id": uuid.uuid4().hex}
            tmp = os.path.join(self.root, f"{MARKER}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            self._write_file(tmp, [json.dumps(doc).encode()])
            try:
                os.link(tmp, os.path.join(self.root, MARKER))  # atomic create-if-absent: first creator wins
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            marker = self._read_marker()
            assert marker is not None
        guard = SecretGuard.attach(self.secret, marker.get("verifier"), f"store {self.uri}")
        if not isinstance(marker.get("store_id"), str):
            marker = self._add_store_id()
        self._id = "file:" + str(marker["store_id"])
        self._guard = guard

    def _add_store_id(self) -> dict[str, Any]:
        """Give a marker written before store ids existed one (under a directory
        lock, published by rename: every client ends up reading the same id)."""
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            marker = self._read_marker()
            assert marker is not None
            if not isinstance(marker.get("store_id"), str):
                marker = {**marker, "store_id": uuid.uuid4().hex}
                tmp = os.path.join(self.root, f"{MARKER}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
                self._write_file(tmp, [json.dumps(marker).encode()])
                os.rename(tmp, os.path.join(self.root, MARKER))
            return marker
        finally:
            os.close(dfd)  # releases the lock

    def store_id(self) -> str:
        """``file:<uuid>``, kept in the marker file: the same for every path that
        reaches this directory (see :meth:`FeatureStore.store_id`)."""
        self._check_auth()
        return self._id

    # ---------------------------------------------------------------- paths
    def _dir(self, sample_id: str) -> str:
        return os.path.join(self.root, xxhash.xxh3_64_hexdigest(sample_id.encode("utf-8"))[:2])

    def path_of(self, sample_id: str, generation: int) -> str:
        """The file that holds ``(sample_id, generation)`` (for tools and tests)."""
        validate_sample_id(sample_id)  # the id becomes a file name: never trust it here either
        return os.path.join(self._dir(sample_id), f"{sample_id}@{int(generation)}{_SUFFIX}")

    def _sample_dirs(self) -> Iterator[os.DirEntry[str]]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for d in entries:
            if len(d.name) == 2 and set(d.name) <= _HEX and d.is_dir(follow_symlinks=False):
                yield d

    def _sample_files(self) -> Iterator[tuple[str, int, os.DirEntry[str]]]:
        for d in self._sample_dirs():
            for e in _entries(d.path):
                if e.name.startswith(".") or not e.name.endswith(_SUFFIX):
                    continue
                sid, _, gen = e.name[: -len(_SUFFIX)].rpartition("@")
                if sid and gen.isdigit():
                    yield sid, int(gen), e

    # ------------------------------------------------------ byte primitives
    # A put hashes each tensor piece by piece right before that piece is written, while it is
    # in the CPU cache: one pass over its memory, not two (_file_io._write_hashed).
    _codec = staticmethod(codec.layout)

    @staticmethod
    def _payload(enc: Any) -> Any:
        return enc

    def _write_file(self, path: str, parts: Sequence[Buffer] | codec.Layout) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the open() mode is filtered by the umask
            n = _write_hashed(fd, parts) if isinstance(parts, codec.Layout) else _write_all(fd, parts)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return n

    def _write(self, sample_id: str, generation: int, parts: Sequence[Buffer] | codec.Layout, nbytes: int) -> None:
        final = self.path_of(sample_id, generation)
        d = os.path.dirname(final)
        staging = os.path.join(self.root, _STAGING)
        # In a dot-directory and not ending in .tdf: never listed or read as a sample.
        tmp = os.path.join(staging, f"{_HOST}+{os.getpid()}+{secrets.token_hex(6)}.tmp")
        try:
            try:
                written = self._write_file(tmp, parts)
            except FileNotFoundError:  # the store's first put (no mkdir syscall per put)
                _mkdir_private(staging)
                written = self._write_file(tmp, parts)
            if written != nbytes:
                raise ConfigError(f"wrote {written} bytes for {sample_id!r}, expected {nbytes}")
            try:
                for attempt in range(_PUBLISH_TRIES):
                    try:
                        os.link(tmp, final)  # atomic publish that never replaces a file (rename would)
                        break
                    except FileNotFoundError:  # no fan-out dir: first sample in it, or a delete emptied it
                        if attempt == _PUBLISH_TRIES - 1 or not os.path.exists(tmp):
                            raise
                    # Another process's delete may rmdir it again at any moment (even between the
                    # mkdir and its chmod): then the link above fails once more and this runs again.
                    with contextlib.suppress(FileNotFoundError):
                        _mkdir_private(d)
            except FileExistsError:
                raise ConfigError(
                    f"store {self.uri} already holds generation {generation} of {sample_id!r}; a put never "
                    "replaces a blob. Its ledger reserves every generation once, so another ledger wrote it: "
                    "is this writer's ledger the one this store's samples were committed to?") from None
            os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self.fsync:
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)  # make the rename itself durable
            finally:
                os.close(dfd)

    def _open(self, sample_id: str, generation: int) -> int:
        """A read-only descriptor of the sample's file; missing: :class:`SampleUnavailable`."""
        try:
            return os.open(self.path_of(sample_id, generation), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._missing(sample_id, generation, self.uri) from None

    def _read(self, sample_id: str, generation: int) -> Buffer:
        fd = self._open(sample_id, generation)
        try:
            size = os.fstat(fd).st_size
            view = memoryview(_private_buffer(size))
            pos = 0
            while pos < size:
                n = os.readv(fd, [view[pos:]])
                if n == 0:
                    break  # shorter than fstat said: the codec reports it as truncated
                pos += n
        finally:
            os.close(fd)
        return view[:pos]

    def read_blob_into(self, ref: SampleRef, views: Sequence[memoryview], feed: Any = None) -> int:
        """Land the blob's leading bytes in ``views`` with ``preadv`` (one copy, page
        cache to the caller's memory); return the file's length (see
        :meth:`FeatureStore.read_blob_into`). With ``feed``, the read goes in chunks
        of ``_CHUNK`` bytes and each is fed while it is still in the CPU cache."""
        self._check_auth()
        fd = self._open(ref.sample_id, ref.generation)
        try:
            size = os.fstat(fd).st_size
            _preadv_into(fd, views, 0, size, feed)  # a short file: check_landed reports it as truncated
        finally:
            os.close(fd)
        return size

    def _read_ranges(self, sample_id: str, generation: int, ranges: Sequence[tuple[int, Sequence[memoryview]]],
                     feed: Any = None) -> int:
        """One ``preadv`` per range (per ``_CHUNK`` with ``feed``, hashed while in cache);
        see :meth:`FeatureStore._read_ranges`. Returns the file's length."""
        fd = self._open(sample_id, generation)
        try:
            size = os.fstat(fd).st_size
            for offset, views in ranges:
                _preadv_into(fd, views, offset, size, feed)  # a short file: check_fields reports it as truncated
        finally:
            os.close(fd)
        return size

    def _map(self, sample_id: str, generation: int) -> Buffer:
        fd = self._open(sample_id, generation)
        try:
            if os.fstat(fd).st_size == 0:
                return b""
            # ACCESS_COPY (MAP_PRIVATE): a caller writing to a view gets private pages
            # instead of a segfault (ACCESS_READ) or a modified sample (ACCESS_WRITE).
            # (No MAP_POPULATE here: on a writable private map it pre-faults for
            # write, i.e. copies every page: 67 MB went from 4 ms to 22 ms.)
            return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)  # the mapping outlives the descriptor

    def _delete(self, sample_id: str, generation: int) -> bool:
        path = self.path_of(sample_id, generation)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        # The last file of its fan-out dir: remove the dir too, so a store whose samples are all freed
        # holds no empty directories. Fails (harmlessly) while the dir holds anything; a put racing this
        # recreates it (see _write).
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
        return True

    def _exists(self, sample_id: str, generation: int) -> bool:
        return os.path.isfile(self.path_of(sample_id, generation))

    def _keys(self) -> Iterator[tuple[str, int]]:
        return ((sid, gen) for sid, gen, _ in self._sample_files())

    # ----------------------------------------------------------- public API
    def get(self, ref: SampleRef, *, zero_copy: bool = False) -> dict[str, torch.Tensor]:
        """Read and verify one sample generation (see :meth:`FeatureStore.get`).

        The default path reads the file into a fresh private buffer and returns
        views of it: already independent of the store, so no second copy.
        ``zero_copy=True`` maps the file copy-on-write instead; the views stay
        valid after the sample is deleted.
        """
        self._check_auth()
        blob = self._map(ref.sample_id, ref.generation) if zero_copy else self._read(ref.sample_id, ref.generation)
        return codec.decode(blob, copy=False, expected_checksum=ref.checksum, what=self._what(ref))

    def health(self) -> StoreHealth:
        """Bytes and count of published samples (a directory scan; see module docs for cost)."""
        self._check_auth()
        count = size = 0
        for _, _, e in self._sample_files():
            try:
                size += e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # deleted by another process mid-scan
            count += 1
        return StoreHealth(resident_bytes=size, count=count)

    def sweep_temp(self, older_than_s: float = 3600.0, *, dry_run: bool = False) -> int:
        """Delete temporary files left by crashed writers; return how many
        (with ``dry_run``: how many would go, deleting nothing).

        Only files older than ``older_than_s`` go, so a write in progress in
        another process is never removed from under it.
        """
        self._check_auth()
        cutoff = time.time() - older_than_s
        removed = 0
        staging = os.path.join(self.root, _STAGING)
        dirs = [self.root, *([staging] if os.path.isdir(staging) else []), *(d.path for d in self._sample_dirs())]
        for d in dirs:
            for e in _entries(d):
                temp = e.name.endswith(".tmp") and (d == staging or e.name.startswith("."))  # older layout: .tmp beside the blobs
                if not temp or not e.is_file(follow_symlinks=False):
                    continue
                try:
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        if not dry_run:
                            os.unlink(e.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def sweep_dead_writers(self) -> int:
        """Delete the temporary files of writers on this host whose process is gone (SIGKILLed
        mid-write); return how many. A restarted :class:`~torch_dataflow.FeatureWriter` calls it,
        so a kill leaves no bytes behind once the producer runs again. Files of live processes
        and of other hosts are never touched (those wait for ``torch-dataflow gc``).

        Example:
            >>> import tempfile, torch
            >>> store = SharedDirStore(tempfile.mkdtemp() + "/features")
            >>> _ = store.put("s", 1, {"x": torch.zeros(2)})
            >>> store.sweep_dead_writers()
            0
        """
        from .._procs import pid_gone

        self._check_auth()
        removed = 0
        try:
            it = os.scandir(os.path.join(self.root, _STAGING))
        except FileNotFoundError:
            return 0
        with it:
            for e in it:
                host, _, rest = e.name.partition("+")
                pid = rest.partition("+")[0]
                if host != _HOST or not pid.isdigit() or not e.name.endswith(".tmp"):
                    continue
                if pid_gone(socket.gethostname(), int(pid)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path)
                        removed += 1
        return removed

    def _config_state(self) -> dict[str, Any]:
        return {
            "path": self.root,
            "fsync": self.fsync,
            "secret": self.secret,
            "max_bytes": self.max_bytes,
            "create": self.create,
        }
