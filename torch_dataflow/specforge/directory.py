"""Read (and write) SpecForge offline EAGLE3 feature directories.

SpecForge's ``scripts/prepare_hidden_states.py`` writes one ``torch.save``'d
dict per sample to ``<out>/rows_{g}-{g+G}/data_{idx}.ckpt`` (``.ckpt.gz`` when
compressed); ``OfflineEagle3Dataset`` finds them by walking the tree and
sorting the full paths lexicographically (so ``data_10`` comes before
``data_2``). :class:`SpecForgeDirectory` serves such a directory in the same
order, without copying it, and :func:`import_directory` converts it into a
feature store + ledger when the faster format is preferred.

Safety: files are only ever read with ``torch.load(weights_only=True)``
(SpecForge itself uses ``weights_only=False``); a file that needs anything
beyond tensors and plain containers raises :class:`~torch_dataflow.errors.CorruptSample`.

Example:
    >>> import tempfile
    >>> from torch_dataflow.eagle3 import Eagle3Collator
    >>> d = tempfile.mkdtemp()
    >>> _ = write_specforge_directory(d, n=3, seq_lens=[4, 6], hidden=8)
    >>> ds = SpecForgeDirectory(d)
    >>> len(ds), ds.sample_id(0)
    (3, 'rows_0-2000~data_0.ckpt')
    >>> Eagle3Collator()([ds[0], ds[1]])["hidden_state"].shape
    torch.Size([2, 6, 24])
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, CorruptSample
from ..refs import validate_sample_id

__all__ = ["SUFFIXES", "SpecForgeDirectory", "import_directory", "write_specforge_directory"]

SUFFIXES = (".ckpt", ".ckpt.gz")
"""File suffixes SpecForge's offline dataset picks up."""

_SEP = "~"


class SpecForgeDirectory(Dataset):
    """A SpecForge offline feature directory as a map-style dataset.

    Item ``i`` is the ``i``-th file in SpecForge's order, loaded as the raw
    feature dict it holds (``input_ids``, ``loss_mask``, ``hidden_state``,
    ``aux_hidden_state``; shapes ``[1, S, .]`` or ``[S, .]`` are both
    accepted downstream by :class:`~torch_dataflow.eagle3.Eagle3Collator`).
    ``.ckpt`` files are memory-mapped (copy-on-write: writing to a returned
    tensor never changes the file); ``.ckpt.gz`` files are decompressed one
    at a time, when their item is read.

    Batch-padded files: current SpecForge writes each sample with the padding
    of the batch it was captured in (trailing ``input_ids == 0``,
    ``loss_mask == 0``, hidden states computed over the pad tokens).
    SpecForge trains on them as they are (attention mask all ones, loss
    masked), so by default so do we, which keeps batches identical to
    SpecForge's. ``trim_padding=True`` drops the trailing run of positions
    whose ``input_ids == pad_token_id`` and ``loss_mask == 0`` instead (a
    heuristic: a genuine trailing pad-id token without loss is dropped too).
    A file holding several samples (leading dim > 1) is not a SpecForge
    sample file and raises :class:`ConfigError` when read.

    Args:
        path: the directory (SpecForge's ``--output-path``).
        trim_padding: drop trailing batch padding (see above).
        pad_token_id: the id SpecForge's collator padded ``input_ids`` with.
        include_sample_id: add ``"__sample_id__"`` (:meth:`sample_id`) to each item.

    Raises:
        ConfigError: ``path`` is not a directory or holds no feature files.

    Example:
        >>> ds = SpecForgeDirectory("/data/llama3-8b-hidden-states")  # doctest: +SKIP
        >>> ds[0]["aux_hidden_state"].shape  # doctest: +SKIP
        torch.Size([1, 1873, 12288])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        trim_padding: bool = False,
        pad_token_id: int = 0,
        include_sample_id: bool = False,
    ) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise ConfigError(f"SpecForge feature directory not found: {self.root}")
        self.trim_padding = bool(trim_padding)
        self.pad_token_id = int(pad_token_id)
        self.include_sample_id = bool(include_sample_id)
        self.paths = _list_feature_files(self.root)
        if not self.paths:
            raise ConfigError(f"no {' or '.join(SUFFIXES)} files under {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def relative_path(self, i: int) -> str:
        """The ``i``-th file's path relative to the root, with ``/`` separators."""
        return self.paths[i].relative_to(self.root).as_posix()

    def sample_id(self, i: int) -> str:
        """A stable store id for item ``i``: its relative path, ``/`` -> ``~``.

        Example: ``rows_0-2000/data_7.ckpt`` -> ``rows_0-2000~data_7.ckpt``.

        Raises:
            ConfigError: the path cannot be a sample id (too long, odd characters).
        """
        return validate_sample_id(self.relative_path(i).replace("/", _SEP))

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Load item ``i`` (negative indices count from the end).

        Raises:
            IndexError: ``i`` is out of range.
            CorruptSample: the file is truncated, not a ``torch.save`` file,
                or needs unpickling beyond ``weights_only``.
            ConfigError: the file is not a dict of tensors, or holds a batch.
        """
        i = range(len(self.paths))[i]
        data = _load(self.paths[i])
        if self.trim_padding:
            data = _trim(data, self.pad_token_id, str(self.paths[i]))
        if self.include_sample_id:
            data["__sample_id__"] = self.sample_id(i)
        return data

    def __repr__(self) -> str:
        return f"SpecForgeDirectory({str(self.root)!r}, n={len(self)})"


def _list_feature_files(root: Path) -> list[Path]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(SUFFIXES):
                found.append(os.path.join(dirpath, name))
    found.sort()  # full-path string order, as SpecForge's list_local_files
    return [Path(p) for p in found]


def _load(path: Path) -> dict[str, Any]:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
        else:
            data = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CorruptSample(f"{path}: refused or unreadable under weights_only=True: {e}") from e
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, ValueError) as e:
        raise CorruptSample(f"{path}: cannot be read as a torch.save file: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:  # older writers store e.g. aux_hidden_state=None when not captured
            continue
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        batched = value.dim() == 3 or (key in ("input_ids", "loss_mask") and value.dim() == 2)
        if batched and value.shape[0] != 1:
            raise ConfigError(f"{path}: {key!r} has shape {list(value.shape)}: a batch, not one sample")
        out[key] = value
    return out


def _trim(data: dict[str, Any], pad_token_id: int, where: str) -> dict[str, Any]:
    ids, mask = data.get("input_ids"), data.get("loss_mask")
    if ids is None or mask is None:
        raise ConfigError(f"{where}: trim_padding needs input_ids and loss_mask")
    flat_ids, flat_mask = ids.reshape(-1), mask.reshape(-1)
    pad = (flat_ids == pad_token_id) & (flat_mask == 0)
    keep = int(pad.numel())
    while keep > 1 and bool(pad[keep - 1]):
        keep -= 1
    out = {}
    for key, value in data.items():
        if key in ("input_ids", "loss_mask"):
            out[key] = value[..., :keep]
        elif value.dim() == 3:
            out[key] = value[:, :keep]
        elif value.dim() == 2:
            out[key] = value[:keep]
        else:
            out[key] = value
    return out


def write_specforge_directory(
    path: str | os.PathLike[str],
    n: int,
    seq_lens: int | Sequence[int],
    hidden: int = 64,
    seed: int = 0,
    compress: bool = False,
    group: int = 2000,
    *,
    vocab: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    batch_dim: bool = True,
    pad_to: int | None = None,
) -> list[Path]:
    """Write ``n`` random samples in SpecForge's offline format (tests, examples, demos).

    Layout and per-file dict are those of ``prepare_hidden_states.py``:
    ``rows_{g}-{g+group}/data_{idx}.ckpt[.gz]`` holding ``input_ids`` and
    ``loss_mask`` int64 [S], ``hidden_state`` [1, S, H] and
    ``aux_hidden_state`` [1, S, 3H] in ``dtype``.

    Args:
        path: output directory (created).
        n: number of samples.
        seq_lens: one length for all, or lengths cycled over the samples.
        hidden: H.
        seed: random seed (same arguments, same bytes of tensors).
        compress: write ``.ckpt.gz`` (gzip of the ``torch.save`` bytes).
        group: files per ``rows_*`` folder (SpecForge: 2000; 5000 in v0.1.0).
        vocab: token ids are drawn from ``[1, vocab)``.
        dtype: hidden-state dtype.
        batch_dim: ``False`` writes hidden states as [S, .] instead of [1, S, .].
        pad_to: write batch-padded files: right-pad every sample to this
            length (``input_ids`` 0, ``loss_mask`` 0, hidden states random, as
            SpecForge computes them over the pad tokens).

    Returns:
        The written file paths, in sample order.

    Example:
        >>> import tempfile
        >>> [p.name for p in write_specforge_directory(tempfile.mkdtemp(), 2, 5, hidden=4, compress=True)]
        ['data_0.ckpt.gz', 'data_1.ckpt.gz']
    """
    if n < 0 or group < 1:
        raise ConfigError(f"need n >= 0 and group >= 1, got n={n}, group={group}")
    lens = [int(seq_lens)] if isinstance(seq_lens, int) else [int(s) for s in seq_lens]
    if not lens or min(lens) < 1:
        raise ConfigError(f"seq_lens must be >= 1, got {seq_lens!r}")
    root = Path(path)
    gen = torch.Generator().manual_seed(seed)
    written = []
    for idx in range(n):
        s = lens[idx % len(lens)]
        total = max(s, pad_to or 0)
        input_ids = torch.randint(1, vocab, (total,), generator=gen)
        loss_mask = (torch.rand(total, generator=gen) < 0.8).long()
        input_ids[s:] = 0
        loss_mask[s:] = 0
        final = torch.randn(1, total, hidden, generator=gen).to(dtype)
        aux = torch.randn(1, total, 3 * hidden, generator=gen).to(dtype)
        record = {
            "input_ids": input_ids,
            "loss_mask": loss_mask,
            "hidden_state": final if batch_dim else final[0],
            "aux_hidden_state": aux if batch_dim else aux[0],
        }
        g = (idx // group) * group
        out = root / f"rows_{g}-{g + group}" / f"data_{idx}.ckpt{'.gz' if compress else ''}"
        out.parent.mkdir(parents=True, exist_ok=True)
        if compress:
            with gzip.open(out, "wb") as f:
                torch.save(record, cast(IO[bytes], f))
        else:
            torch.save(record, out)
        written.append(out)
    return written


def import_directory(
    src: str | os.PathLike[str] | SpecForgeDirectory,
    store_uri: Any,
    ledger_uri: Any,
    *,
    progress: bool = True,
    trim_padding: bool = False,
    name: str | None = None,
    takeover: bool = False,
) -> int:
    """Copy a SpecForge offline directory into a feature store + ledger.

    Each file becomes one committed sample whose id is
    :meth:`SpecForgeDirectory.sample_id` and whose tensors are the file's,
    unchanged (collate them with :class:`~torch_dataflow.eagle3.Eagle3Collator`
    as usual). Metadata records the source path and format. Re-running the
    import (after a crash, or by mistake) skips the files already committed:
    it neither reads nor writes them, so nothing is imported twice and a
    trainer already reading the pool sees no new generations. To import
    changed files under the same names, use a new ledger.

    Args:
        src: the directory, or an open :class:`SpecForgeDirectory`.
        store_uri: a store URI (``file:///data/feat``) or store instance.
        ledger_uri: a ledger URI (``sqlite:///data/ledger.db``) or ledger instance.
        progress: show a tqdm progress bar.
        trim_padding: see :class:`SpecForgeDirectory`.
        name: the producer name registered in the ledger (default:
            ``import:<real SRC path>`` (symlinks resolved), the same for every run, so a re-run
            after a kill takes the dead run's place and closes the stream it
            left open, and a second import of SRC while one runs is refused
            with :class:`~torch_dataflow.errors.SessionConflict`).
        takeover: import even though an import of this name looks alive (on
            another host its heartbeat is younger than 60 s; on this one its
            process runs): only when that one is known to be gone.

    Returns:
        The number of samples this call imported (0 when a re-run finds every
        file committed). The ledger's stream is closed on success only; after
        a failure, re-run the import to finish it.

    Example:
        >>> import_directory("/data/hs", "file:///data/feat", "sqlite:///data/ledger.db")  # doctest: +SKIP
        120000
    """
    from tqdm.auto import tqdm

    from ..producer import FeatureWriter

    ds = src if isinstance(src, SpecForgeDirectory) else SpecForgeDirectory(src, trim_padding=trim_padding)
    # On an exception the writer is left open (FeatureWriter.__exit__): consumers
    # must not take a failed import for a complete pool. resume: a re-run skips what is committed.
    root = os.path.realpath(ds.root)  # one name and one record per directory, whatever path reached it
    name = name or f"import:{root}"
    with FeatureWriter(store=store_uri, ledger=ledger_uri, name=name, resume=True, takeover=takeover) as writer:
        ids = [ds.sample_id(i) for i in range(len(ds))]
        todo = set(writer.missing(ids))
        _refuse_other_root(writer.ledger, [s for s in ids if s not in todo], root)
        for i in tqdm([i for i, sid in enumerate(ids) if sid in todo], desc="import SpecForge features",
                      unit="sample", disable=not progress or not todo):
            tensors = {k: v for k, v in ds[i].items() if not k.startswith("__")}
            meta = {"source": ds.relative_path(i), "root": root, "format": "specforge-offline"}
            writer.put(ids[i], tensors, meta)
    return writer.written  # not the puts answered with a ref another writer committed first


def _refuse_other_root(ledger: Any, done: list[str], root: str) -> None:
    """A sample id is the file's path relative to its directory: another directory's import into the
    same ledger has the same ids for other files. Skipping them (a re-run skips what is committed)
    would lose this directory's files without a word, so refuse, naming both directories."""
    if not done:
        return
    refs = ledger.committed_refs(done)
    other = next((r for r in refs.values() if r.metadata.get("root") not in (None, root)), None)
    if other is None:
        return
    clash = sum(r.metadata.get("root") not in (None, root) for r in refs.values())
    raise ConfigError(
        f"ledger {ledger.uri} already holds {clash} samples of the same names imported from "
        f"{other.metadata['root']}, not from {root} (first: {other.sample_id!r}): sample ids are paths relative "
        "to the directory, so two directories cannot share a ledger. Import this one into its own store and "
        "ledger (or merge the directories into one before importing)")
