"""Manifest parsing: one YAML/JSON object, plain JSON values, precise invalid_argument errors."""

from __future__ import annotations

import pytest
from connectrpc.code import Code

from otterscale.agent._errors import ManifestError
from otterscale.agent._manifest import MAX_MANIFEST_BYTES, parse_manifest


def test_yaml_object() -> None:
    obj = parse_manifest(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: '1'\n")
    assert obj == {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}}


def test_json_object() -> None:
    obj = parse_manifest(b'{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}')
    assert obj["metadata"]["name"] == "x"


def test_leading_document_marker_and_comments() -> None:
    obj = parse_manifest(b"# a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n---\n")
    assert obj["kind"] == "Namespace"


def test_timestamps_stay_strings() -> None:
    obj = parse_manifest(
        b"apiVersion: v1\nkind: ConfigMap\ndata:\n  when: 2024-01-02\n  at: 2024-01-02T03:04:05Z\n"
    )
    assert obj["data"] == {"when": "2024-01-02", "at": "2024-01-02T03:04:05Z"}


def test_scalar_keys_become_strings() -> None:
    obj = parse_manifest(
        b"apiVersion: v1\nkind: ConfigMap\ndata:\n  7: seven\n  2.5: x\n  true: yes\n  null: n\n"
    )
    assert obj["data"] == {"7": "seven", "2.5": "x", "true": True, "null": "n"}


def test_error_is_invalid_argument() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(b"kind: [")
    assert info.value.code is Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"---\n---\n", "empty"),
        (b"kind: [unclosed", "not valid YAML or JSON"),
        (b"apiVersion: v1\nkind: ConfigMap\n  bad indent: x\n", "not valid YAML or JSON"),
        (b"- a\n- b\n", "single object, not a list"),
        (b"just a string", "single object, not a string"),
        (b"kind: ConfigMap\nmetadata: {name: x}\n", "no apiVersion"),
        (b"apiVersion: v1\nmetadata: {name: x}\n", "no kind"),
        (b'{"apiVersion": "v1", "kind": ""}', "no kind"),
        (b"apiVersion: v1\nkind: A\n---\napiVersion: v1\nkind: B\n", "found 2 documents"),
        (b"apiVersion: v1\nkind: A\nmetadata: [1]\n", "metadata must be an object"),
        (b'{"apiVersion": "v1", "kind": "A", "x": NaN}', "NaN"),
        (b"apiVersion: v1\nkind: A\nx: .nan\n", "non-finite"),
        (b"apiVersion: v1\nkind: A\nx: !!binary aGVsbG8=\n", "bytes"),
        (b"apiVersion: v1\nkind: A\nx: !!python/object:os.system {}\n", "not valid YAML or JSON"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_invalid_manifests(raw: bytes, fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment.replace("(", r"\(")):
        parse_manifest(raw)


def test_size_cap() -> None:
    raw = b"apiVersion: v1\nkind: ConfigMap\ndata:\n  a: '" + b"x" * MAX_MANIFEST_BYTES + b"'\n"
    with pytest.raises(ManifestError, match="limit"):
        parse_manifest(raw)


def test_alias_bomb_is_refused() -> None:
    lines = ["apiVersion: v1", "kind: ConfigMap", 'a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(ManifestError, match="too large"):
        parse_manifest("\n".join(lines).encode())


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(ManifestError):
        parse_manifest(b"apiVersion: v1\nkind: A\nx: &r [*r]\n")


def test_deep_nesting_is_refused() -> None:
    raw = b'{"apiVersion": "v1", "kind": "A", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(ManifestError, match="deeper"):
        parse_manifest(raw)
