"""JSON -> Struct conversion equals protobuf's own ParseDict, for any JSON (property-based)."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from otterscale.agent._structs import field_bytes, struct_bytes, to_struct

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=40,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=8)


def _reference(obj: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(obj, struct_pb2.Struct(), max_recursion_depth=10_000)


@settings(max_examples=300, deadline=None)
@given(json_objects)
def test_equals_parse_dict(obj: dict[str, Any]) -> None:
    assert to_struct(obj) == _reference(obj)


def test_kubernetes_object_round_trip() -> None:
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"app": "web"}, "generation": 3},
        "spec": {
            "replicas": 2,
            "paused": False,
            "template": {"spec": {"containers": [{"name": "c", "ports": []}]}},
        },
        "status": None,
        "big": "x" * 20000,  # a length above the varint table
    }
    assert json_format.MessageToDict(to_struct(obj)) == json.loads(json.dumps(obj))


def test_deep_objects_parse() -> None:
    # 60 JSON levels = 180 protobuf levels: beyond upb's default limit of 100.
    obj: dict[str, Any] = {}
    cur = obj
    for _ in range(60):
        cur["a"] = {}
        cur = cur["a"]
    assert to_struct(obj) == _reference(obj)


def test_lone_surrogate_is_replaced_not_fatal() -> None:
    struct = to_struct({"k": "a\ud800b"})
    assert struct["k"] == "a?b"


def test_field_bytes_builds_repeated_fields() -> None:
    from otterscale.resource.v1 import resource_pb2 as pb

    items = [{"a": 1}, {"b": [True, None]}]
    resource_bytes = [field_bytes(1, [struct_bytes(item)]) for item in items]
    response = pb.ListResponse(resource_version="7")
    response.MergeFromString(field_bytes(4, resource_bytes))
    assert [json_format.MessageToDict(r.object) for r in response.items] == items
    assert response.resource_version == "7"


# --- kube-apiserver JSON bytes -> Struct wire bytes: orjson decoding (otterscale.agent._kube.loads)
# must give byte-for-byte the Struct the standard library's json.loads gave before.

wide_scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # small and 64-bit
    | st.integers(min_value=-(2**200), max_value=2**200)  # beyond 64 bits: a float either way
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**53 + 1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()  # any code point, lone surrogates included
    | st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF, exclude_categories=["Cs"]))
)
wide_values = st.recursive(
    wide_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=40,
)


def _decode_both(raw: bytes) -> tuple[Any, Any]:
    from otterscale.agent._kube import loads

    try:
        expected: Any = json.loads(raw)
    except ValueError as exc:
        expected = type(exc)
    try:
        got: Any = loads(raw)
    except ValueError as exc:
        got = type(exc)
    return got, expected


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), wide_values, max_size=8), st.booleans(), st.booleans())
def test_orjson_decoding_gives_the_same_struct_bytes(
    obj: dict[str, Any], ascii_only: bool, indent: bool
) -> None:
    text = json.dumps(obj, ensure_ascii=ascii_only, indent=2 if indent else None)
    raw = text.encode("utf-8", "surrogatepass")  # non-ASCII lone surrogates: invalid UTF-8 for both
    got, expected = _decode_both(raw)
    if isinstance(expected, type):
        assert isinstance(got, type)  # both refuse (a ValueError either way)
        return
    assert struct_bytes(got) == struct_bytes(expected)
    assert to_struct(got) == _reference(expected)


def test_orjson_fallbacks_keep_the_standard_answers() -> None:
    cases = [
        b'{"n": 123456789012345678901234567890}',
        b'{"n": -9223372036854775809, "m": 18446744073709551615}',
        b'{"s": "\\ud800"}',  # lone surrogate: orjson refuses, json keeps it
        b'{"x": NaN}',
        b'{"x": 1e400}',
        b"\xef\xbb\xbf{}",  # byte-order mark
        '{"u": "\u00e9\U0001f600"}'.encode("utf-16"),
        b'{"a": 1, "a": 2}',
        b'{"f": 0.1, "g": -0.0, "h": 1e-320, "e": 5e-324}',
    ]
    for raw in cases:
        got, expected = _decode_both(raw)
        if isinstance(expected, dict):
            assert struct_bytes(got) == struct_bytes(expected), raw
        else:
            assert got == expected, raw
    for bad in (b'{"a": }', b"\xff", b"", b'{"a": 1} x'):
        got, expected = _decode_both(bad)  # both refuse, with a ValueError
        assert isinstance(got, type), bad
        assert isinstance(expected, type), bad
