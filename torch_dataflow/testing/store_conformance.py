"""The contract every :class:`~torch_dataflow.stores.FeatureStore` backend passes.

Subclass :class:`StoreConformance` in a pytest module and implement two hooks;
every ``test_*`` method then runs against your backend. Test names follow the
invariants of the design (``inv4`` = no use-after-free, ``inv5`` = auth,
``inv6`` = no code execution from data, ``inv7`` = integrity).

Example:
    .. code-block:: python

        from torch_dataflow.stores.shared_dir import SharedDirStore
        from torch_dataflow.testing import StoreConformance

        class TestSharedDir(StoreConformance):
            def make_store(self, **kw):
                return SharedDirStore(self.tmp_path / "store", **kw)

            def attach_store(self, store, **kw):
                return SharedDirStore(store.root, **kw)
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from .. import codec
from ..errors import AuthError, ConfigError, CorruptSample, SampleUnavailable
from ..refs import SampleRef
from ..stores.base import FeatureStore

__all__ = ["StoreConformance", "assert_same_tensors", "format1_blob", "sample_tensors"]


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small EAGLE3-like sample with mixed dtypes, a 0-d and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 32000, (7,), generator=g),
        "loss_mask": torch.randint(0, 2, (7,), generator=g).bool(),
        "hidden_state": torch.randn(1, 7, 8, generator=g).bfloat16(),
        "scale": torch.tensor(0.5 + seed),
        "empty": torch.empty(0, 3),
    }


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    # flatten() of a 1-element view may keep an odd stride that view(uint8) refuses
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
        return t.flatten().clone().as_strided((t.numel(),), (1,)).view(torch.uint8)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes (bitwise, so NaNs and float8 compare too)."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        if w.numel():
            assert torch.equal(_bytes_of(g), _bytes_of(w)), k


def format1_blob(tensors: dict[str, torch.Tensor]) -> tuple[bytes, tuple[Any, ...], str]:
    """``(blob, specs, checksum)`` of ``tensors`` in codec format 1 (one checksum over the
    zeroed header and the data, no per-tensor sums): what stores held before field
    selection, rebuilt from the format's definition to test that it is still read."""
    import struct

    import xxhash

    enc = codec.encode(tensors)
    doc = json.loads(enc.header[8:])
    doc["__metadata__"] = {"td.checksum": "0" * 16, "td.format": "1"}
    raw = json.dumps({"__metadata__": doc.pop("__metadata__"), **doc}, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 16)
    head = struct.pack("<Q", len(raw)) + raw
    data = b"".join(bytes(b) for b in enc.buffers)
    h = xxhash.xxh3_64(head)
    h.update(data)
    digest = h.hexdigest()
    return head.replace(b"0" * 16, digest.encode(), 1) + data, enc.specs, digest


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


class _Evil:
    """Unpickling this runs code that creates a file: proof that pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _child_main() -> None:
    """Runs in a fresh interpreter: unpickle the store, read the parent's sample, write one back."""
    store, ref_json, shares = pickle.loads(sys.stdin.buffer.read())
    ref = SampleRef.from_json(ref_json)
    if not shares:
        # A process-local store must refuse loudly, never look empty (which would
        # make every committed sample seem lost to a spawned DataLoader worker).
        try:
            store.get(ref)
        except ConfigError as e:
            sys.stdout.write(json.dumps({"refused": str(e)}))
            return
        raise SystemExit("a process-local store served a request from another process")
    seen = store.get(ref)["input_ids"].tolist()
    child_ref = store.put("from-child", 1, {"v": torch.arange(4) * 3})
    own = store.get(child_ref)["v"].tolist()
    sys.stdout.write(json.dumps({"seen": seen, "own": own, "ref": child_ref.to_json()}))


class StoreConformance:
    """Contract tests for a FeatureStore backend. Subclass it as ``Test...``.

    Hooks to implement: :meth:`make_store` and :meth:`attach_store`. Optional:
    :meth:`discard_store`, :meth:`raw_read` / :meth:`raw_write` (defaults use the
    backend's ``_read``/``_write`` primitives), and the class attributes below.
    ``self.tmp_path`` is pytest's per-test temporary directory.
    """

    #: a spawned process that unpickles the store sees the same samples
    shares_across_processes: bool = True
    #: zero-copy views stay valid after the sample is deleted
    zero_copy_survives_delete: bool = False
    #: health().resident_bytes equals the sum of ref.nbytes (else: at least)
    exact_resident_bytes: bool = True

    tmp_path: Any

    # ----------------------------------------------------------------- hooks
    def make_store(self, **kw: Any) -> FeatureStore:
        """A fresh, empty store; ``kw`` may hold ``secret``."""
        raise NotImplementedError

    def attach_store(self, store: FeatureStore, **kw: Any) -> FeatureStore:
        """A second client of the same store as ``store``, configured by ``kw``."""
        raise NotImplementedError

    def discard_store(self, store: FeatureStore) -> None:
        """Release a store made by :meth:`make_store` at the end of a test."""
        store.close()

    def raw_read(self, store: FeatureStore, ref: SampleRef) -> bytes:
        """The stored bytes of ``ref``, bypassing decoding."""
        return bytes(store._read(ref.sample_id, ref.generation))

    def raw_write(self, store: FeatureStore, ref: SampleRef, data: bytes) -> None:
        """Replace the stored bytes of ``ref`` with ``data``, bypassing encoding (a file store's
        file is rewritten in place: its puts never replace a file)."""
        path_of = getattr(store, "path_of", None)
        if path_of is None:
            store._write(ref.sample_id, ref.generation, [data], len(data))
            return
        path = path_of(ref.sample_id, ref.generation)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def corrupt(self, store: FeatureStore, ref: SampleRef, how: bytes | Callable[[bytes], bytes]) -> None:
        """Tamper with ``ref``'s bytes: replace them, or map them through ``how``."""
        data = how if isinstance(how, bytes) else how(self.raw_read(store, ref))
        self.raw_write(store, ref, data)

    # ------------------------------------------------------------- plumbing
    @pytest.fixture(autouse=True)
    def _conformance_env(self, tmp_path: Any) -> Any:
        self.tmp_path = tmp_path
        self._made: list[FeatureStore] = []
        yield
        for s in self._made:
            self.discard_store(s)

    def store(self, **kw: Any) -> FeatureStore:
        s = self.make_store(**kw)
        self._made.append(s)
        return s

    def _put(self, store: FeatureStore, sid: str = "s1", gen: int = 1, seed: int = 0) -> tuple[SampleRef, dict]:
        tensors = sample_tensors(seed)
        return store.put(sid, gen, tensors), tensors

    # ----------------------------------------------------------- round trips
    def test_round_trip_sample(self) -> None:
        s = self.store()
        ref, t = self._put(s)
        assert ref.store == s.uri and ref.key == ("s1", 1)
        assert [sp.name for sp in ref.specs] == [sp.name for sp in codec.encode(t).specs]
        assert s.exists(ref)
        assert_same_tensors(s.get(ref), t)
        assert_same_tensors(s.get(ref, zero_copy=True), t)

    @pytest.mark.parametrize("shape", [(), (0,), (3, 4), (2, 0, 5)])
    def test_round_trip_all_dtypes(self, shape: tuple[int, ...]) -> None:
        s = self.store()
        tensors = {str(dt).removeprefix("torch."): _random_tensor(dt, shape, i) for i, dt in enumerate(codec.DTYPES)}
        ref = s.put("dtypes", 1, tensors)
        assert {sp.name: sp.dtype for sp in ref.specs} == {k: k for k in tensors}
        assert_same_tensors(s.get(ref), tensors)

    def test_round_trip_non_contiguous_and_empty_dict(self) -> None:
        s = self.store()
        base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
        t = {"t": base.t(), "slice": base[::2, 1:7:3], "expand": torch.ones(3, 1).expand(3, 5)}
        ref = s.put("views", 1, t)
        assert ref.nbytes < base.numel() * 4 * 3  # visible elements only, not whole storages
        assert_same_tensors(s.get(ref), {k: v.contiguous() for k, v in t.items()})
        assert s.get(s.put("nothing", 1, {})) == {}

    def test_put_many_get_many(self) -> None:
        s = self.store()
        items = [(f"m{i}", 1, sample_tensors(i), {"i": i}) for i in range(4)]
        refs = s.put_many(items)
        assert [r.metadata["i"] for r in refs] == [0, 1, 2, 3]
        for got, (_, _, want, _) in zip(s.get_many(refs), items, strict=True):
            assert_same_tensors(got, want)
        for got, (_, _, want, _) in zip(s.get_many(refs, zero_copy=True), items, strict=True):
            assert_same_tensors(got, want)

    def test_keys_and_health_counts(self) -> None:
        s = self.store()
        assert s.keys() == [] and s.health().count == 0
        refs = [self._put(s, "a", 1)[0], self._put(s, "a", 2, seed=1)[0], self._put(s, "b", 1, seed=2)[0]]
        assert s.keys() == [("a", 1), ("a", 2), ("b", 1)]
        h = s.health()
        assert h.count == 3
        total = sum(r.nbytes for r in refs)
        assert h.resident_bytes == total if self.exact_resident_bytes else h.resident_bytes >= total
        s.delete(refs[0])
        assert s.keys() == [("a", 2), ("b", 1)] and s.health().count == 2

    def test_concurrent_threads(self) -> None:
        s = self.store()
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for j in range(5):
                    ref, t = self._put(s, f"t{k}-{j}", 1, seed=k * 10 + j)
                    assert_same_tensors(s.get(ref), t)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert s.health().count == 30

    # ------------------------------------------------------ input validation
    @pytest.mark.parametrize("sid", ["../x", "a/b", "x\0", "x" * 300, "", ".hidden", "a\\b"])
    def test_bad_sample_ids(self, sid: str) -> None:
        s = self.store()
        with pytest.raises(ConfigError):
            s.put(sid, 1, {"x": torch.ones(1)})
        assert s.keys() == []

    @pytest.mark.parametrize("gen", [0, -1, True, "1", 1.0])
    def test_bad_generation(self, gen: Any) -> None:
        with pytest.raises(ConfigError):
            self.store().put("s", gen, {"x": torch.ones(1)})

    def test_bad_tensors(self) -> None:
        s = self.store()
        with pytest.raises(ConfigError, match="detach"):
            s.put("s", 1, {"x": torch.ones(2, requires_grad=True)})
        with pytest.raises(TypeError):
            s.put("s", 1, {"x": [1, 2]})  # type: ignore[dict-item]
        with pytest.raises(ConfigError):
            s.put("s", 1, {"__lease__": torch.ones(1)})
        assert s.keys() == []

    # ------------------------------------------------ inv 4: no use-after-free
    def test_inv4_get_after_delete_raises(self) -> None:
        s = self.store()
        ref, _ = self._put(s)
        assert s.delete(ref) is True
        assert not s.exists(ref)
        for zero_copy in (False, True):
            with pytest.raises(SampleUnavailable):
                s.get(ref, zero_copy=zero_copy)
        with pytest.raises(KeyError):  # SampleUnavailable is a KeyError
            s.get(ref)
        assert s.delete(ref) is False  # idempotent

    def test_inv4_stale_generation_never_aliases(self) -> None:
        s = self.store()
        ref1, t1 = self._put(s, "s", 1, seed=1)
        ref2, t2 = self._put(s, "s", 2, seed=2)
        assert_same_tensors(s.get(ref1), t1)
        assert_same_tensors(s.get(ref2), t2)
        s.delete(ref1)
        with pytest.raises(SampleUnavailable):
            s.get(ref1)  # only g+1 exists now
        assert_same_tensors(s.get(ref2), t2)
        # A ref whose checksum is not the stored blob's is never served.
        forged = SampleRef(
            sample_id="s", generation=2, store=s.uri, specs=ref1.specs, nbytes=ref1.nbytes, checksum=ref1.checksum
        )
        with pytest.raises(CorruptSample):
            s.get(forged)

    def test_inv4_stale_delete_cannot_free_new_generation(self) -> None:
        s = self.store()
        ref1, _ = self._put(s, "s", 1, seed=1)
        assert s.delete(ref1)
        ref2, t2 = self._put(s, "s", 2, seed=2)
        assert s.delete(ref1) is False
        assert s.exists(ref2)
        assert_same_tensors(s.get(ref2), t2)

    def test_inv4_returned_tensors_independent(self) -> None:
        s = self.store()
        src = sample_tensors(3)
        keep = {k: v.clone() for k, v in src.items()}
        ref = s.put("s", 1, src)
        src["input_ids"].fill_(-1)  # the store must not alias the producer's tensors
        a = s.get(ref)
        a["input_ids"].fill_(-2)  # nor hand out its own memory
        a["hidden_state"].zero_()
        assert_same_tensors(s.get(ref), keep)
        s.delete(ref)
        assert a["input_ids"].eq(-2).all()  # and the copy outlives the sample

    def test_inv4_zero_copy_views(self) -> None:
        s = self.store()
        ref, t = self._put(s)
        views = s.get(ref, zero_copy=True)
        assert_same_tensors(views, t)
        if self.zero_copy_survives_delete:
            s.delete(ref)
            assert_same_tensors(views, t)

    # ------------------------------------------------------------ inv 5: auth
    def test_inv5_wrong_secret_at_attach(self) -> None:
        s = self.store(secret="right")
        ref, t = self._put(s)
        with pytest.raises(AuthError):
            self.attach_store(s, secret="wrong").get(ref)
        with pytest.raises(PermissionError):  # AuthError is a PermissionError
            self.attach_store(s, secret="wrong").put("x", 1, t)
        assert_same_tensors(self.attach_store(s, secret="right").get(ref), t)
        # a secret presented to a store that has none is a deployment error too
        open_store = self.store()
        ref2, _ = self._put(open_store)
        with pytest.raises(AuthError):
            self.attach_store(open_store, secret="surprise").get(ref2)

    def test_inv5_missing_secret_on_data_path(self) -> None:
        s = self.store(secret="right")
        ref, t = self._put(s)
        anon = self.attach_store(s)
        calls: dict[str, Callable[[], Any]] = {
            "put": lambda: anon.put("x", 1, t),
            "get": lambda: anon.get(ref),
            "get zero-copy": lambda: anon.get(ref, zero_copy=True),
            "delete": lambda: anon.delete(ref),
            "exists": lambda: anon.exists(ref),
            "keys": lambda: anon.keys(),
            "health": lambda: anon.health(),
            "get_many": lambda: anon.get_many([ref]),
        }
        for name, call in calls.items():
            with pytest.raises(AuthError):
                call()
                pytest.fail(f"{name} without a secret did not raise")
        assert s.keys() == [("s1", 1)]  # nothing was written or freed
        assert_same_tensors(s.get(ref), t)

    # ---------------------------------------------- inv 6: no code from data
    def test_inv6_no_pickle(self) -> None:
        s = self.store()
        ref, _ = self._put(s)
        marker = str(self.tmp_path / "pickle-ran")
        saved = self.tmp_path / "evil.pt"
        torch.save({"x": _Evil(marker)}, saved)
        payloads = [pickle.dumps(_Evil(marker), protocol=p) for p in (0, 2, 5)] + [saved.read_bytes()]
        for payload in payloads:
            self.corrupt(s, ref, payload)
            for zero_copy in (False, True):
                with pytest.raises(CorruptSample):
                    s.get(ref, zero_copy=zero_copy)
            assert not os.path.exists(marker), "reading a stored blob executed a pickle"

    # --------------------------------------------------- inv 7: integrity
    def test_inv7_truncated_raises_corrupt(self) -> None:
        s = self.store()
        ref, _ = self._put(s)
        good = self.raw_read(s, ref)
        for n in sorted({0, 1, 7, 8, 9, 40, len(good) // 2, len(good) - 8, len(good) - 1}):
            self.corrupt(s, ref, good[:n])
            for zero_copy in (False, True):
                with pytest.raises(CorruptSample, match="s1"):
                    s.get(ref, zero_copy=zero_copy)
        self.corrupt(s, ref, good + b"\0" * 8)  # extended is corrupt too
        with pytest.raises(CorruptSample):
            s.get(ref)

    def test_inv7_flipped_byte_raises_corrupt(self) -> None:
        s = self.store()
        ref, _ = self._put(s)
        good = self.raw_read(s, ref)
        _, _, data_offset = codec.read_header(good)
        checksum_at = good.index(ref.checksum.encode())
        positions = {0, 3, 7, 8, 9, 20, checksum_at, checksum_at + 15, data_offset - 1, data_offset}
        positions |= {data_offset + 1, (data_offset + len(good)) // 2, len(good) - 1}
        for pos in sorted(positions):
            for mask in (0x01, 0x80):
                bad = bytearray(good)
                bad[pos] ^= mask
                self.corrupt(s, ref, bytes(bad))
                for zero_copy in (False, True):
                    with pytest.raises(CorruptSample):
                        s.get(ref, zero_copy=zero_copy)
        self.corrupt(s, ref, good)
        s.get(ref)  # restored bytes read again: the errors were about the bytes

    # ------------------------------------------------ field selection (ranged reads)
    def test_fields_identical_to_full_read(self) -> None:
        s = self.store()
        ref, _ = self._put(s)
        full = s.get(ref)
        names = [sp.name for sp in ref.specs]
        subsets = [[n] for n in names] + [names[:2], [names[0], names[-1]], names[1:], names[::2], names]
        for subset in subsets:
            got = s.get_fields(ref, subset)
            assert list(got) == [n for n in names if n in subset]  # blob order, like get
            assert_same_tensors(got, {n: full[n] for n in subset})
        assert_same_tensors(s.get_fields(ref, None), full)

    def test_fields_unknown_name_lists_available(self) -> None:
        s = self.store()
        ref, t = self._put(s)
        with pytest.raises(ConfigError, match="not_there") as info:
            s.get_fields(ref, ["input_ids", "not_there"])
        for name in t:
            assert repr(name) in str(info.value)

    def test_inv7_fields_flip_in_selected_tensor_or_header_raises_corrupt(self) -> None:
        s = self.store()
        ref, _ = self._put(s)
        good = self.raw_read(s, ref)
        _, _, data_offset = codec.read_header(good)
        pos, where = data_offset, {}
        for sp in ref.specs:
            if sp.nbytes:
                where[sp.name] = pos + sp.nbytes // 2
            pos += sp.nbytes
        for name, at in where.items():
            bad = bytearray(good)
            bad[at] ^= 0x10
            self.corrupt(s, ref, bytes(bad))
            with pytest.raises(CorruptSample, match=name):
                s.get_fields(ref, [name])
            other = next(n for n in where if n != name)
            s.get_fields(ref, [other])  # not selected, not read: documented as not detected by this read
            with pytest.raises(CorruptSample):
                s.get(ref)  # a full read still covers every byte
        checksum_at = good.index(ref.checksum.encode())
        for at in sorted({0, 8, 9, 20, checksum_at, checksum_at + 15, data_offset // 2, data_offset - 1}):
            bad = bytearray(good)
            bad[at] ^= 0x01
            self.corrupt(s, ref, bytes(bad))
            with pytest.raises(CorruptSample):
                s.get_fields(ref, [next(iter(where))])
        # Flips the JSON still parses and the ref still matches: only the header checksum sees them.
        first, last = next(iter(where)), list(where)[-1]
        sums_at = good.index(b'"td.sums":"') + len(b'"td.sums":"')  # the sum of the first tensor in data order
        quiet = [(sums_at, b"1" if good[sums_at : sums_at + 1] != b"1" else b"2")]
        if good[data_offset - 1 : data_offset] == b" ":
            quiet.append((data_offset - 1, b"\n"))  # padding: still JSON whitespace
        for at, new in quiet:
            bad = bytearray(good)
            bad[at : at + 1] = new
            self.corrupt(s, ref, bytes(bad))
            with pytest.raises(CorruptSample, match="header checksum"):
                s.get_fields(ref, [last])
        self.corrupt(s, ref, good[: len(good) - 1])  # truncated
        with pytest.raises(CorruptSample):
            s.get_fields(ref, [first])
        self.corrupt(s, ref, good)
        s.get_fields(ref, list(where))

    def test_fields_of_a_format1_blob_read_and_verify_the_whole_blob(self) -> None:
        s = self.store()
        self._put(s)  # attached (a store may create its layout at the first put)
        tensors = sample_tensors(3)
        blob, specs, checksum = format1_blob(tensors)
        ref = SampleRef(sample_id="old", generation=1, store=s.uri, specs=specs, nbytes=len(blob), checksum=checksum)
        self.raw_write(s, ref, blob)
        assert_same_tensors(s.get(ref), tensors)
        assert_same_tensors(s.get_fields(ref, ["hidden_state", "input_ids"]),
                            {k: tensors[k] for k in ("hidden_state", "input_ids")})
        _, _, data_offset = codec.read_header(blob)
        bad = bytearray(blob)
        bad[data_offset] ^= 0x01  # inside input_ids (largest item size: first), which is not selected
        self.corrupt(s, ref, bytes(bad))
        with pytest.raises(CorruptSample):
            s.get_fields(ref, ["hidden_state"])  # format 1: the whole blob is verified

    # ------------------------------------------------ pickling / processes
    def test_pickle_by_config(self) -> None:
        s = self.store()
        ref, t = self._put(s)
        clone = pickle.loads(pickle.dumps(s))
        assert type(clone) is type(s) and clone.uri == s.uri
        assert_same_tensors(clone.get(ref), t)

    @pytest.mark.slow
    def test_spawned_subprocess(self) -> None:
        # A fresh interpreter fed the pickled store: what a spawn-started DataLoader
        # worker gets, without multiprocessing's process-wide resource tracker.
        s = self.store(secret="sp")
        ref, t = self._put(s)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        code = "from torch_dataflow.testing.store_conformance import _child_main; _child_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code],
            input=pickle.dumps((s, ref.to_json(), self.shares_across_processes)),
            capture_output=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        out = json.loads(proc.stdout)
        if not self.shares_across_processes:
            assert "cannot be used from process" in out["refused"]
            return
        assert out["own"] == [0, 3, 6, 9]
        assert out["seen"] == t["input_ids"].tolist()
        assert s.get(SampleRef.from_json(out["ref"]))["v"].tolist() == [0, 3, 6, 9]

    # ------------------------------------------- with a writer and a dataset
    def _ledger_uri(self) -> str:
        import secrets

        return f"memory://store-conformance-{secrets.token_hex(4)}"

    def test_inv1_writer_to_dataset_delivers_each_once_then_frees(self) -> None:
        from ..dataset import FeatureStoreDataset
        from ..producer import FeatureWriter

        store, ledger = self.store(), self._ledger_uri()
        with FeatureWriter(store, ledger) as w:
            for i in range(12):
                w.put(f"w{i:03d}", {"x": torch.full((8,), float(i))})
        ds = FeatureStoreDataset(store, ledger, batch_size=4, idle_timeout=60)
        seen = []
        for step, s in enumerate(ds, 1):
            assert torch.all(s["x"] == float(s["__sample_id__"][1:]))
            assert ds.ack(s, step) == []
            seen.append(s["__sample_id__"])
        assert sorted(seen) == [f"w{i:03d}" for i in range(12)]
        assert ds.mark_durable(12, final=True) == 12  # the end of the run: nothing kept for a resume
        assert store.health().count == 0 and not [k for k in store.keys() if k[0].startswith("w")]  # noqa: SIM118

    def test_inv8_writer_waits_for_room_then_raises(self) -> None:
        from ..errors import StoreFull
        from ..producer import FeatureWriter

        store, ledger = self.store(), self._ledger_uri()
        one = {"x": torch.zeros(4096)}
        w = FeatureWriter(store, ledger, max_resident_bytes=3 * 16384 + 4096, put_timeout=0.3)
        for i in range(3):
            w.put(f"b{i}", one)
        with pytest.raises(StoreFull):
            w.put("b3", one)
        assert w.ledger.counts().committed == 3 and store.health().count == 3  # nothing dropped or grown
        w.abort(["b0"])  # room again (through the ledger, which Mooncake backpressure counts): the next put proceeds
        w.put("b3", one)
        assert store.health().count == 3

    # ----------------------------------------------- identity and put validation (issue 15)
    def test_store_id_stable_and_distinct(self) -> None:
        a = self.store()
        sid = a.store_id()
        assert isinstance(sid, str) and sid
        assert a.store_id() == sid and self.attach_store(a).store_id() == sid
        assert pickle.loads(pickle.dumps(a)).store_id() == sid
        assert self.store().store_id() != sid

    def test_put_validates_metadata_before_writing(self) -> None:
        store = self.store()
        with pytest.raises(TypeError, match="never tensors"):
            store.put("m1", 1, {"x": torch.ones(4)}, {"t": torch.ones(2)})
        with pytest.raises(TypeError, match="never tensors"):
            store.put_many([("m2", 1, {"x": torch.ones(4)}, None),
                            ("m3", 1, {"x": torch.ones(4)}, {"t": torch.ones(2)})])
        assert store.keys() == [] and store.health().count == 0  # not one byte was written
