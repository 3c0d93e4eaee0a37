"""Properties of manifest parsing (hypothesis): JSON-able objects survive YAML and JSON, arbitrary
bytes give either an object or a ManifestError (nothing else), and the limits hold."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from otterscale.agent._errors import ManifestError
from otterscale.agent._manifest import MAX_MANIFEST_BYTES, parse_manifest


def examples(count: int) -> settings:
    return settings(
        max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
    )


# Text as JSON and YAML can carry it: any code point but lone surrogates.
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=40,
)
_objects = st.builds(
    lambda api_version, kind, rest: {**rest, "apiVersion": api_version, "kind": kind},
    _text.filter(bool),
    _text.filter(bool),
    st.dictionaries(_text, _values, max_size=6),
)


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The object, or the ManifestError's message; any other exception propagates (and fails)."""
    try:
        return parse_manifest(raw), None
    except ManifestError as exc:
        return None, str(exc)


def _same(a: Any, b: Any) -> bool:
    """Equality that treats 1 and 1.0 alike only where YAML/JSON could not tell them apart."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _check_result(obj: Any) -> None:
    """What parse_manifest returns is always a plain, sendable JSON object with apiVersion and kind."""
    assert isinstance(obj, dict)
    assert isinstance(obj["apiVersion"], str)
    assert obj["apiVersion"]
    assert isinstance(obj["kind"], str)
    assert obj["kind"]
    assert obj.get("metadata") is None or isinstance(obj["metadata"], dict)
    text = json.dumps(obj, allow_nan=False)  # finite numbers only
    text.encode("utf-8")  # no lone surrogates anywhere


@examples(300)
@given(obj=_objects)
def test_json_roundtrip(obj: dict[str, Any]) -> None:
    parsed = parse_manifest(json.dumps(obj, ensure_ascii=False).encode())
    assert _same(parsed, obj)
    assert _same(parse_manifest(json.dumps(obj).encode()), obj)  # \\u escapes too
    _check_result(parsed)


@examples(300)
@given(obj=_objects, flow=st.booleans(), unicode=st.booleans())
def test_yaml_roundtrip(obj: dict[str, Any], flow: bool, unicode: bool) -> None:
    if unicode:
        # PyYAML's emitter writes NEL and the Unicode line separators raw into quoted scalars,
        # where every YAML parser (ours and Kubernetes') reads them as line breaks.
        assume(not any(char in json.dumps(obj, ensure_ascii=False) for char in "\x85\u2028\u2029"))
    text = yaml.safe_dump(obj, default_flow_style=flow, allow_unicode=unicode, width=10**6)
    parsed = parse_manifest(text.encode())
    assert _same(parsed, obj), text
    _check_result(parsed)


# Fragments that exercise the YAML and JSON parsers' corners when glued together at random.
_TOKENS = [
    b"{", b"}", b"[", b"]", b":", b": ", b",", b"- ", b"? ", b"\n", b"  ", b"\t", b"---\n", b"...\n",
    b'"', b"'", b"\\", b"\\u", b"\\ud800", b"#", b"&a ", b"*a", b"&b ", b"*b", b"<<: *a\n", b"!!",
    b"!!binary ", b"!!set ", b"!!python/object:os.system ", b"!!int ", b"!!float ", b"!!timestamp ",
    b"!custom ", b"%YAML 1.1\n", b"%TAG ! tag:x:\n", b"apiVersion: v1\n", b"kind: X\n",
    b'{"apiVersion": "v1", "kind": "X"', b'"apiVersion"', b'"kind"', b"metadata: ", b"name: n",
    b"null", b"~", b"true", b"yes", b"on", b".nan", b".inf", b"-.inf", b"NaN", b"Infinity", b"1e999",
    b"0x1F", b"0o17", b"1_000", b"190:20:30", b"2024-01-01", b"2024-01-01T00:00:00Z", b"9" * 500,
    b"\xff", b"\xfe\xff", b"\xef\xbb\xbf", b"\x00", b"\xc0\xaf", b"\xed\xa0\x80", b"\x85", b"\xe2\x80\xa8",
    b"|\n", b">-\n", b"    ",
]  # fmt: skip
_garbage = st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=4), max_size=40).map(b"".join)


@examples(1000)
@given(raw=st.binary(max_size=300) | _garbage | _text.map(str.encode))
def test_arbitrary_bytes_give_an_object_or_a_manifest_error(raw: bytes) -> None:
    parsed, error = _parse(raw)
    if error is not None:
        assert error.startswith("manifest ")
        assert "Traceback" not in error
        return
    _check_result(parsed)


@examples(300)
@given(obj=_objects, data=st.data())
def test_mutated_documents_give_an_object_or_a_manifest_error(
    obj: dict[str, Any], data: st.DataObject
) -> None:
    raw = bytearray(json.dumps(obj).encode() if data.draw(st.booleans()) else yaml.safe_dump(obj).encode())
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        index = data.draw(st.integers(0, len(raw)), label="index")
        insert = data.draw(st.sampled_from(_TOKENS) | st.binary(min_size=1, max_size=2), label="insert")
        if data.draw(st.booleans(), label="replace") and index < len(raw):
            raw[index : index + 1] = insert
        else:
            raw[index:index] = insert
    parsed, error = _parse(bytes(raw))
    if error is None:
        _check_result(parsed)


# --------------------------------------------------------------------------------------------------
# Limits


def _nested(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@examples(60)
@given(depth=st.integers(1, 250), as_yaml=st.booleans())
def test_depth_limit(depth: int, as_yaml: bool) -> None:
    obj = {"apiVersion": "v1", "kind": "X", "x": _nested(depth)}
    raw = (yaml.safe_dump(obj, default_flow_style=True) if as_yaml else json.dumps(obj)).encode()
    if depth < 100:  # "x" is one level below the top; 100 levels are allowed in all
        assert _same(parse_manifest(raw), obj)
    else:
        with pytest.raises(ManifestError, match="nest"):
            parse_manifest(raw)


@examples(20)
@given(extra=st.integers(1, 1000), as_json=st.booleans())
def test_size_limit(extra: int, as_json: bool) -> None:
    head = b'{"apiVersion":"v1","kind":"X","x":"' if as_json else b"apiVersion: v1\nkind: X\nx: "
    tail = b'"}' if as_json else b"\n"
    fits = head + b"a" * (MAX_MANIFEST_BYTES - len(head) - len(tail)) + tail
    assert len(fits) == MAX_MANIFEST_BYTES
    assert parse_manifest(fits)["x"] == "a" * (MAX_MANIFEST_BYTES - len(head) - len(tail))
    with pytest.raises(ManifestError, match=f"the limit is {MAX_MANIFEST_BYTES}"):
        parse_manifest(fits + b" " * extra)


@examples(40)
@given(width=st.integers(2, 12), levels=st.integers(1, 9), scalar=st.sampled_from(["lol", "x" * 2000]))
def test_aliases_expand_or_are_refused_as_too_large(width: int, levels: int, scalar: str) -> None:
    """An alias tree expands exactly (when small) or is refused as too large; never anything else."""
    lines = ["apiVersion: v1", "kind: X", f"a0: &a0 {json.dumps(scalar)}"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    expanded_scalars = width**levels
    parsed, error = _parse("\n".join(lines).encode())
    if error is not None:
        assert "too large after expanding YAML aliases" in error
        assert expanded_scalars * (len(scalar) + 1) > 100_000  # nothing small is refused
        return
    assert parsed is not None
    assert math.prod([width] * levels) == expanded_scalars
    top: Any = parsed[f"a{levels}"]
    for _ in range(levels):
        assert len(top) == width
        top = top[0]
    assert top == scalar


@examples(30)
@given(kind=st.sampled_from(["[*r]", "{x: *r}", "[1, [2, *r]]", "{a: [{b: *r}]}"]))
def test_recursive_aliases_are_refused(kind: str) -> None:
    with pytest.raises(ManifestError, match="nests deeper"):
        parse_manifest(f"apiVersion: v1\nkind: X\nx: &r {kind}\n".encode())
