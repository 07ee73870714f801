"""The ledger's ref text codec: the fast decoder gives exactly what ``SampleRef.from_json`` gives.

:func:`torch_dataflow.ledger._refcodec.ref_from_json` splits ledger-written ref
text with one regular expression instead of the json module. Any text it takes
must decode to the same ref (or the same refusal) as the general path, for every
ref, every odd id and every mangled text.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_dataflow.errors import ConfigError
from torch_dataflow.ledger._refcodec import _CANONICAL, ref_from_json, ref_json
from torch_dataflow.refs import FeatureSpec, SampleRef

decode = ref_from_json.__wrapped__  # without the cache: every example parses

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_specs = st.lists(st.builds(FeatureSpec, _text, st.sampled_from(["bfloat16", "int64", 'q"x', "\\"]),
                            st.lists(st.integers(0, 5000), max_size=3).map(tuple), st.integers(0, 1 << 40)),
                  max_size=4).map(tuple)
_ids = st.one_of(st.from_regex(r"[A-Za-z0-9_\-]{1,20}", fullmatch=True), st.text(min_size=1, max_size=30))


def _ref_or_none(sid: str, gen: int, store: str, specs: tuple, nbytes: int, ck: str, meta: dict) -> SampleRef | None:
    try:
        return SampleRef(sid, gen, store, specs, nbytes, ck, meta)
    except ConfigError:
        return None


_refs = st.builds(_ref_or_none, _ids, st.integers(1, 1 << 62), st.sampled_from(["memory://", "file:///m f", "é"]),
                  _specs, st.integers(0, 1 << 50), st.text(max_size=16),
                  st.one_of(st.just({}), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)))


def _outcome(fn, text: str) -> object:
    try:
        return fn(text)
    except ConfigError:
        return "refused"


@settings(max_examples=400, deadline=None)
@given(_refs)
def test_fast_decoder_equals_json_path(ref: SampleRef | None) -> None:
    if ref is None:
        return
    for text in (ref_json(ref), ref.to_json()):
        assert ref_json(ref) == ref.to_json()
        got = decode(text)
        assert got == ref == SampleRef.from_json(text)
        assert got.specs == ref.specs and dict(got.metadata) == dict(ref.metadata)


def test_plain_refs_take_the_fast_path() -> None:
    ref = SampleRef("s-1", 3, "file:///x", (FeatureSpec("h", "bfloat16", (1, 16, 8), 256),
                                             FeatureSpec("ids", "int64", (), 8)), 264, "00ff")
    assert _CANONICAL.fullmatch(ref_json(ref))  # the case worth making fast is the one taken
    assert decode(ref_json(ref)) == ref


@settings(max_examples=600, deadline=None)
@given(_refs, st.integers(0, 400), st.sampled_from(['"', "\\", "0", "-", ",", "}", "]", ".", "1e3", "\x00", "a", "/"]))
def test_mangled_text_same_outcome(ref: SampleRef | None, at: int, insert: str) -> None:
    if ref is None:
        return
    text = ref_json(ref)
    at %= len(text) + 1
    for bad in (text[:at] + insert + text[at:], text[:at] + text[at + 1:]):
        want = _outcome(SampleRef.from_json, bad)
        got = _outcome(decode, bad)
        if want == "refused":
            assert got == "refused", bad
        else:
            assert got == want, bad


@pytest.mark.parametrize("text", [
    '{"checksum":"00","generation":1,"metadata":{},"nbytes":0,"sample_id":"../x","specs":[],"store":"m"}',
    '{"checksum":"00","generation":0,"metadata":{},"nbytes":0,"sample_id":"x","specs":[],"store":"m"}',
    '{"checksum":"00","generation":01,"metadata":{},"nbytes":0,"sample_id":"x","specs":[],"store":"m"}',
    '{"checksum":"00","generation":1,"metadata":{},"nbytes":0,"sample_id":"a/b","specs":[],"store":"m"}',
    '{"checksum":"00","generation":1,"metadata":{},"nbytes":0,"sample_id":"","specs":[],"store":"m"}',
    '{"checksum":"00","generation":1,"metadata":{},"nbytes":0,"sample_id":".hidden","specs":[],"store":"m"}',
    "not json",
])
def test_unsafe_or_malformed_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        decode(text)
    with pytest.raises(ConfigError):
        SampleRef.from_json(text)


def test_escaped_strings_decode_like_json() -> None:
    ref = SampleRef("id é\u2603", 2, 'store"\\q', (FeatureSpec('n"a', "int64", (2,), 16),), 16, "ck")
    text = ref_json(ref)
    assert _CANONICAL.fullmatch(text) is None  # escapes go to the json module
    assert decode(text) == ref == SampleRef.from_json(text)
    assert json.loads(text)["sample_id"] == "id é\u2603"
