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
