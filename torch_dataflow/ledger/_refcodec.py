"""Ref JSON on the ledger's hot paths: the same text as :meth:`SampleRef.to_json`, cheaper.

:meth:`SampleRef.to_json` builds a dict and sorts its keys; :func:`ref_json`
writes the same bytes directly (keys already in sorted order, strings escaped by
the json module's own C escaper), falling back to ``to_json`` for refs with
metadata. :func:`ref_from_json` parses through a bounded cache: refs are frozen,
so the ref a trainer leased is the same object its durable mark later frees,
parsed once. Text in exactly the form :func:`ref_json` writes (no metadata, no
escaped characters) is split by one regular expression instead of the json
module, its :class:`FeatureSpec` records interned (a dataset repeats a few
shapes); anything else goes through :meth:`SampleRef.from_json`. Either way the
result is built by the :class:`SampleRef` constructor, with all its validation:
nothing read from a ledger is trusted more than before.
"""

from __future__ import annotations

import functools
import re
from json.encoder import encode_basestring_ascii as _sa  # the C escaper of json.dumps (ensure_ascii)

from ..refs import FeatureSpec, SampleRef

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


_NAT = r"(?:0|[1-9][0-9]*)"  # a JSON natural number
_STR = r'"([^"\\\x00-\x1f]*)"'  # a JSON string without escapes (ref_json escapes anything else)
_SPEC_TEXT = rf'\{{"dtype":{_STR},"name":{_STR},"nbytes":({_NAT}),"shape":\[((?:{_NAT}(?:,{_NAT})*)?)\]\}}'
_SPEC = re.compile(_SPEC_TEXT)
_SPEC_NC = re.sub(r"\((?!\?)", "(?:", _SPEC_TEXT)  # the same, without groups
_CANONICAL = re.compile(
    rf'\{{"checksum":{_STR},"generation":({_NAT}),"metadata":\{{\}},"nbytes":({_NAT}),"sample_id":{_STR},'
    rf'"specs":\[((?:{_SPEC_NC}(?:,{_SPEC_NC})*)?)\],"store":{_STR}\}}')


@functools.lru_cache(maxsize=4096)
def _spec(dtype: str, name: str, nbytes: str, shape: str) -> FeatureSpec:
    return FeatureSpec(name, dtype, tuple(map(int, shape.split(","))) if shape else (), int(nbytes))


@functools.lru_cache(maxsize=16384)
def ref_from_json(text: str) -> SampleRef:
    """``SampleRef.from_json(text)``, cached (refs are frozen; equal text, equal ref).

    Example:
        >>> from torch_dataflow.refs import FeatureSpec
        >>> r = SampleRef("s1", 2, "memory://", (FeatureSpec("x", "int64", (4,), 32),), 32, "ab")
        >>> ref_from_json(ref_json(r)) == r == ref_from_json(r.to_json())
        True
    """
    m = _CANONICAL.fullmatch(text) if type(text) is str else None
    if m is None:
        return SampleRef.from_json(text)  # anything unusual: the json module and the general path
    checksum, gen, nbytes, sample_id, specs, store = m.groups()
    return SampleRef(sample_id, int(gen), store, tuple([_spec(*g) for g in _SPEC.findall(specs)]) if specs else (),
                     int(nbytes), checksum)

