"""Ref JSON on the ledger's hot paths: the same text as :meth:`SampleRef.to_json`, cheaper.

:meth:`SampleRef.to_json` builds a dict and sorts its keys; :func:`ref_json`
writes the same bytes directly (keys already in sorted order, strings escaped by
the json module's own C escaper), falling back to ``to_json`` for refs with
metadata. :func:`ref_from_json` parses through a bounded cache: refs are frozen,
so the ref a trainer leased is the same object its durable mark later frees,
parsed once. Parsing still goes through :meth:`SampleRef.from_json`, with its
validation: nothing read from a ledger is trusted more than before.
"""

from __future__ import annotations

import functools
from json.encoder import encode_basestring_ascii as _sa  # the C escaper of json.dumps (ensure_ascii)

from ..refs import SampleRef

__all__ = ["ref_from_json", "ref_json"]


def ref_json(ref: SampleRef) -> str:
    """``ref.to_json()``, the same text, without the intermediate dict.

    Example:
        >>> from torch_dataflow.refs import FeatureSpec
        >>> r = SampleRef("s1", 2, "memory://", (FeatureSpec("x", "int64", (4,), 32),), 32, "ab")
        >>> ref_json(r) == r.to_json()
        True
    """
    if ref.metadata or type(ref.nbytes) is not int or type(ref.checksum) is not str or type(ref.store) is not str:
        return ref.to_json()  # the general encoder for anything unusual
    specs = ",".join(
        f'{{"dtype":{_sa(s.dtype)},"name":{_sa(s.name)},"nbytes":{s.nbytes},"shape":[{",".join(map(str, s.shape))}]}}'
        for s in ref.specs)
    return (f'{{"checksum":{_sa(ref.checksum)},"generation":{ref.generation},"metadata":{{}},"nbytes":{ref.nbytes},'
            f'"sample_id":{_sa(ref.sample_id)},"specs":[{specs}],"store":{_sa(ref.store)}}}')


@functools.lru_cache(maxsize=16384)
def ref_from_json(text: str) -> SampleRef:
    """``SampleRef.from_json(text)``, cached (refs are frozen; equal text, equal ref)."""
    return SampleRef.from_json(text)

