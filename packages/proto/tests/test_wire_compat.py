"""Wire compatibility of the generated code with the frozen contract in shared/design/api.md.

Existing clients of the original Go service (the web dashboard among them) speak this API, so the
"compatible core" of api.md is transcribed here by hand, independently of the .proto file:

* bytes are encoded from that table with a tiny protobuf wire encoder (``_wire``, no protobuf
  library involved) and decoded with the generated classes, field by field;
* every field's name, number, type, cardinality, presence and JSON name is checked through the
  descriptors, and every RPC's request/response types;
* proto3 JSON (what Connect's JSON codec speaks) uses api.md's lowerCamelCase names.

The original service later grew ``ResourceService.Describe`` (design/runtime.md section 2); its
messages are transcribed the same way (:data:`ORIGINAL_LATER`), so a dashboard written against it
works here. The additions (new field numbers, never reused core numbers) are tested the same way.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from otterscale.resource.v1 import resource_pb2 as pb

from ._wire import Row, check_rows, enc_struct, f_bytes, f_str, f_varint, populated

# --- The compatible core, transcribed from api.md -------------------------------------------------

S, B, I32T, I64T, BY, MSG, ENUM = "string", "bool", "int32", "int64", "bytes", "message", "enum"
PKG = "otterscale.resource.v1"
STRUCT, EMPTY = "google.protobuf.Struct", "google.protobuf.Empty"


def _strings(*names: str) -> list[Row]:
    json_names = {
        "label_selector": "labelSelector",
        "field_selector": "fieldSelector",
        "resource_version": "resourceVersion",
    }
    return [(n, i, S, False, None, json_names.get(n, n)) for i, n in enumerate(names, start=1)]


CORE: dict[str, list[Row]] = {
    "APIResource": [
        ("group", 1, S, False, None, "group"),
        ("version", 2, S, False, None, "version"),
        ("resource", 3, S, False, None, "resource"),
        ("kind", 4, S, False, None, "kind"),
        ("namespaced", 5, B, False, None, "namespaced"),
        ("verbs", 6, S, True, None, "verbs"),
        ("short_names", 7, S, True, None, "shortNames"),
    ],
    "DiscoveryRequest": [("cluster", 1, S, False, None, "cluster")],
    "DiscoveryResponse": [("api_resources", 1, MSG, True, f"{PKG}.APIResource", "apiResources")],
    "SchemaRequest": _strings("cluster", "group", "version", "kind"),
    "Resource": [("object", 1, MSG, False, STRUCT, "object")],
    "ListRequest": [
        *_strings("cluster", "group", "version", "resource", "namespace", "label_selector", "field_selector"),
        ("limit", 8, I64T, False, None, "limit"),
        ("continue", 9, S, False, None, "continue"),
    ],
    "ListResponse": [
        ("resource_version", 1, S, False, None, "resourceVersion"),
        ("continue", 2, S, False, None, "continue"),
        ("remaining_item_count", 3, I64T, False, None, "remainingItemCount"),
        ("items", 4, MSG, True, f"{PKG}.Resource", "items"),
    ],
    "GetRequest": _strings("cluster", "group", "version", "resource", "namespace", "name"),
    "CreateRequest": [
        *_strings("cluster", "group", "version", "resource", "namespace"),
        ("manifest", 6, BY, False, None, "manifest"),
    ],
    "ApplyRequest": [
        *_strings("cluster", "group", "version", "resource", "namespace", "name"),
        ("manifest", 7, BY, False, None, "manifest"),
        ("force", 8, B, False, None, "force"),
        ("field_manager", 9, S, False, None, "fieldManager"),
    ],
    "DeleteRequest": [
        *_strings("cluster", "group", "version", "resource", "namespace", "name"),
        ("grace_period_seconds", 7, I64T, False, None, "gracePeriodSeconds"),
    ],
    "WatchRequest": _strings(
        "cluster",
        "group",
        "version",
        "resource",
        "namespace",
        "label_selector",
        "field_selector",
        "resource_version",
    ),
    "WatchEvent": [
        ("type", 1, ENUM, False, f"{PKG}.WatchEvent.Type", "type"),
        ("resource", 2, MSG, False, f"{PKG}.Resource", "resource"),
        ("resource_version", 3, S, False, None, "resourceVersion"),
    ],
}

# The original's Describe (runtime.md section 2: "cluster 1, group 2, version 3, resource 4,
# namespace 5, name 6 (all string)"; "resource Resource 1; events repeated Resource 2").
ORIGINAL_LATER: dict[str, list[Row]] = {
    "DescribeRequest": _strings("cluster", "group", "version", "resource", "namespace", "name"),
    "DescribeResponse": [
        ("resource", 1, MSG, False, f"{PKG}.Resource", "resource"),
        ("events", 2, MSG, True, f"{PKG}.Resource", "events"),
    ],
}
#: Every message whose original fields are frozen.
FROZEN = {**CORE, **ORIGINAL_LATER}

ADDITIONS: dict[str, list[Row]] = {
    "CreateRequest": [("dry_run", 7, B, False, None, "dryRun")],
    "ApplyRequest": [("dry_run", 10, B, False, None, "dryRun")],
    "DeleteRequest": [
        ("dry_run", 8, B, False, None, "dryRun"),
        ("propagation_policy", 9, ENUM, False, f"{PKG}.PropagationPolicy", "propagationPolicy"),
    ],
    "WatchRequest": [("send_initial_events", 9, B, False, None, "sendInitialEvents")],
    "WatchEvent": [("status", 4, MSG, False, STRUCT, "status")],
    "DescribeRequest": [("events_limit", 7, I32T, False, None, "eventsLimit")],
    "DescribeResponse": [("events_error", 3, S, False, None, "eventsError")],
}

# RPC -> (request, response, server streaming)
RPCS = {
    "Discovery": (f"{PKG}.DiscoveryRequest", f"{PKG}.DiscoveryResponse", False),
    "Schema": (f"{PKG}.SchemaRequest", STRUCT, False),
    "List": (f"{PKG}.ListRequest", f"{PKG}.ListResponse", False),
    "Get": (f"{PKG}.GetRequest", f"{PKG}.Resource", False),
    "Describe": (f"{PKG}.DescribeRequest", f"{PKG}.DescribeResponse", False),
    "Create": (f"{PKG}.CreateRequest", f"{PKG}.Resource", False),
    "Apply": (f"{PKG}.ApplyRequest", f"{PKG}.Resource", False),
    "Delete": (f"{PKG}.DeleteRequest", EMPTY, False),
    "Watch": (f"{PKG}.WatchRequest", f"{PKG}.WatchEvent", True),
}

WATCH_EVENT_TYPES = {
    "TYPE_UNSPECIFIED": 0,
    "TYPE_ADDED": 1,
    "TYPE_MODIFIED": 2,
    "TYPE_DELETED": 3,
    "TYPE_BOOKMARK": 4,
    "TYPE_ERROR": 5,
}


def message_class(name: str) -> type[Message]:
    cls: type[Message] = getattr(pb, name)
    return cls


# --- Descriptors ----------------------------------------------------------------------------------


def _check_rows(name: str, rows: list[Row]) -> None:
    check_rows(message_class(name), PKG, rows)


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_core_fields_match_api_md(name: str) -> None:
    _check_rows(name, FROZEN[name])


@pytest.mark.parametrize("name", sorted(ADDITIONS))
def test_addition_fields(name: str) -> None:
    _check_rows(name, ADDITIONS[name])


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_no_untested_fields(name: str) -> None:
    """Every field is either core or a listed addition, and no number is used twice."""
    expected = {row[0]: row[1] for row in FROZEN[name] + ADDITIONS.get(name, [])}
    desc = message_class(name).DESCRIPTOR
    assert {f.name: f.number for f in desc.fields} == expected
    assert len(set(expected.values())) == len(expected)


def test_presence() -> None:
    """Only grace_period_seconds (core), events_limit (addition) and the message-typed fields have
    explicit presence."""
    for name in FROZEN:
        for field in message_class(name).DESCRIPTOR.fields:
            explicit = field.name in {"grace_period_seconds", "events_limit"} or (
                field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
            )
            assert field.has_presence == explicit, f"{name}.{field.name}"


def test_service_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["ResourceService"]
    assert service.full_name == f"{PKG}.ResourceService"
    got = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming) for m in service.methods
    }
    assert got == RPCS
    assert not any(m.client_streaming for m in service.methods)


def test_watch_event_type_enum() -> None:
    enum = pb.WatchEvent.DESCRIPTOR.enum_types_by_name["Type"]
    assert enum.full_name == f"{PKG}.WatchEvent.Type"
    assert {v.name: v.number for v in enum.values} == WATCH_EVENT_TYPES


def test_propagation_policy_enum() -> None:
    enum = pb.DESCRIPTOR.enum_types_by_name["PropagationPolicy"]
    assert {v.name: v.number for v in enum.values} == {
        "PROPAGATION_POLICY_UNSPECIFIED": 0,
        "PROPAGATION_POLICY_ORPHAN": 1,
        "PROPAGATION_POLICY_BACKGROUND": 2,
        "PROPAGATION_POLICY_FOREGROUND": 3,
    }


# --- Hand-encoded bytes decode with the generated classes -----------------------------------------

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}, "generation": 3},
    "spec": {"replicas": 2, "paused": False, "selector": None, "ports": [80, "http", {"x": True}]},
}
SELECTORS = ("app=web", "status.phase=Running")


def _strings_bytes(*values: str) -> bytes:
    """Fields 1..n as strings; an empty string is left out, as proto3 encoders do (no presence)."""
    return b"".join(f_str(i, v) for i, v in enumerate(values, start=1) if v)


def _decode(cls: type[Message], data: bytes) -> Any:
    msg = cls()
    msg.ParseFromString(data)
    return msg


def _struct_dict(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(msg)
    return out


def _numbers_as_floats(obj: Any) -> Any:
    """Struct numbers are doubles: compare against the same object with ints as floats."""
    if isinstance(obj, dict):
        return {k: _numbers_as_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers_as_floats(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    return obj


def test_api_resource_and_discovery() -> None:
    deploy = (
        _strings_bytes("apps", "v1", "deployments", "Deployment")
        + f_varint(5, 1)
        + b"".join(f_str(6, v) for v in ("get", "list", "watch"))
        + f_str(7, "deploy")
    )
    pods = _strings_bytes("", "v1", "pods", "Pod") + f_varint(5, 1) + f_str(6, "get") + f_str(7, "po")
    nodes = _strings_bytes("", "v1", "nodes", "Node")  # namespaced false: omitted on the wire
    data = f_bytes(1, deploy) + f_bytes(1, pods) + f_bytes(1, nodes)
    msg = _decode(pb.DiscoveryResponse, data)
    assert len(msg.api_resources) == 3
    first = msg.api_resources[0]
    assert (first.group, first.version, first.resource, first.kind) == (
        "apps",
        "v1",
        "deployments",
        "Deployment",
    )
    assert first.namespaced is True
    assert list(first.verbs) == ["get", "list", "watch"]
    assert list(first.short_names) == ["deploy"]
    assert msg.api_resources[1].group == ""
    assert list(msg.api_resources[1].short_names) == ["po"]
    assert msg.api_resources[2].namespaced is False
    assert msg.SerializeToString(deterministic=True) == data

    req = _decode(pb.DiscoveryRequest, f_str(1, "prod"))
    assert req.cluster == "prod"


def test_schema_request() -> None:
    data = _strings_bytes("prod", "apps", "v1", "Deployment")
    msg = _decode(pb.SchemaRequest, data)
    assert (msg.cluster, msg.group, msg.version, msg.kind) == ("prod", "apps", "v1", "Deployment")
    assert msg.SerializeToString() == data


def test_resource_struct() -> None:
    msg = _decode(pb.Resource, f_bytes(1, enc_struct(DEPLOYMENT)))
    assert msg.HasField("object")
    assert _struct_dict(msg.object) == _numbers_as_floats(DEPLOYMENT)
    assert msg.object["metadata"]["labels"]["app"] == "web"


def test_list_request() -> None:
    data = (
        _strings_bytes("prod", "apps", "v1", "deployments", "default", *SELECTORS)
        + f_varint(8, 500)
        + f_str(9, "token-1")
    )
    msg = _decode(pb.ListRequest, data)
    assert (msg.cluster, msg.group, msg.version, msg.resource, msg.namespace) == (
        "prod",
        "apps",
        "v1",
        "deployments",
        "default",
    )
    assert (msg.label_selector, msg.field_selector) == SELECTORS
    assert msg.limit == 500
    assert getattr(msg, "continue") == "token-1"
    assert msg.SerializeToString() == data


def test_list_response() -> None:
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}}
    data = (
        f_str(1, "12345")
        + f_str(2, "next")
        + f_varint(3, 7)
        + f_bytes(4, f_bytes(1, enc_struct(DEPLOYMENT)))
        + f_bytes(4, f_bytes(1, enc_struct(other)))
    )
    msg = _decode(pb.ListResponse, data)
    assert msg.resource_version == "12345"
    assert getattr(msg, "continue") == "next"
    assert msg.remaining_item_count == 7
    assert [_struct_dict(item.object) for item in msg.items] == [_numbers_as_floats(DEPLOYMENT), other]


def test_large_and_negative_int64() -> None:
    big = 2**62 + 1
    assert _decode(pb.ListResponse, f_varint(3, big)).remaining_item_count == big
    assert _decode(pb.ListRequest, f_varint(8, -1)).limit == -1


def test_get_request() -> None:
    data = _strings_bytes("prod", "", "v1", "pods", "kube-system", "coredns")
    msg = _decode(pb.GetRequest, data)
    assert (msg.cluster, msg.group, msg.version, msg.resource, msg.namespace, msg.name) == (
        "prod",
        "",
        "v1",
        "pods",
        "kube-system",
        "coredns",
    )
    assert msg.SerializeToString() == data


def test_describe_request_and_response() -> None:
    """The original's Describe bytes (fields 1-6; 1-2), hand-encoded, decode field by field."""
    data = _strings_bytes("prod", "apps", "v1", "deployments", "default", "web")
    req = _decode(pb.DescribeRequest, data)
    assert (req.cluster, req.group, req.version, req.resource, req.namespace, req.name) == (
        "prod",
        "apps",
        "v1",
        "deployments",
        "default",
        "web",
    )
    assert not req.HasField("events_limit")  # an original client never sends it: default 100
    assert req.SerializeToString() == data

    event = {"apiVersion": "v1", "kind": "Event", "reason": "ScalingReplicaSet", "count": 2}
    data = (
        f_bytes(1, f_bytes(1, enc_struct(DEPLOYMENT)))
        + f_bytes(2, f_bytes(1, enc_struct(event)))
        + f_bytes(2, f_bytes(1, enc_struct({"kind": "Event"})))
    )
    resp = _decode(pb.DescribeResponse, data)
    assert _struct_dict(resp.resource.object) == _numbers_as_floats(DEPLOYMENT)
    assert [_struct_dict(e.object) for e in resp.events] == [_numbers_as_floats(event), {"kind": "Event"}]
    assert resp.events_error == ""


MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: caf\xc3\xa9\n"


def test_create_request() -> None:
    data = _strings_bytes("prod", "", "v1", "configmaps", "default") + f_bytes(6, MANIFEST)
    msg = _decode(pb.CreateRequest, data)
    assert (msg.cluster, msg.group, msg.version, msg.resource, msg.namespace) == (
        "prod",
        "",
        "v1",
        "configmaps",
        "default",
    )
    assert msg.manifest == MANIFEST
    assert msg.SerializeToString() == data


def test_apply_request() -> None:
    data = (
        _strings_bytes("prod", "", "v1", "configmaps", "default", "cm")
        + f_bytes(7, MANIFEST)
        + f_varint(8, 1)
        + f_str(9, "otterscale-web-ui")
    )
    msg = _decode(pb.ApplyRequest, data)
    assert (msg.namespace, msg.name) == ("default", "cm")
    assert msg.manifest == MANIFEST
    assert msg.force is True
    assert msg.field_manager == "otterscale-web-ui"
    assert msg.SerializeToString() == data


def test_delete_request_grace_period_presence() -> None:
    base = _strings_bytes("prod", "apps", "v1", "deployments", "default", "web")
    absent = _decode(pb.DeleteRequest, base)
    zero = _decode(pb.DeleteRequest, base + f_varint(7, 0))
    thirty = _decode(pb.DeleteRequest, base + f_varint(7, 30))
    assert (absent.cluster, absent.resource, absent.name) == ("prod", "deployments", "web")
    assert not absent.HasField("grace_period_seconds")
    assert zero.HasField("grace_period_seconds")
    assert zero.grace_period_seconds == 0
    assert thirty.HasField("grace_period_seconds")
    assert thirty.grace_period_seconds == 30
    # Presence survives re-encoding: an explicit 0 is written, an absent value is not.
    assert zero.SerializeToString() == base + f_varint(7, 0)
    assert absent.SerializeToString() == base


def test_watch_request() -> None:
    data = _strings_bytes("prod", "apps", "v1", "deployments", "default", *SELECTORS, "999")
    msg = _decode(pb.WatchRequest, data)
    assert (msg.label_selector, msg.field_selector) == SELECTORS
    assert msg.resource_version == "999"
    assert msg.SerializeToString() == data


@pytest.mark.parametrize(("name", "number"), sorted(WATCH_EVENT_TYPES.items(), key=lambda kv: kv[1]))
def test_watch_event(name: str, number: int) -> None:
    data = f_varint(1, number) + f_bytes(2, f_bytes(1, enc_struct(DEPLOYMENT))) + f_str(3, "1001")
    msg = _decode(pb.WatchEvent, data)
    assert msg.type == number
    assert msg.type == getattr(pb.WatchEvent, name)
    assert pb.WatchEvent.Type.Name(msg.type) == name
    assert pb.WatchEvent.Type.Value(name) == number
    assert _struct_dict(msg.resource.object) == _numbers_as_floats(DEPLOYMENT)
    assert msg.resource_version == "1001"


def test_empty_and_struct_responses() -> None:
    """Delete answers google.protobuf.Empty (no bytes); Schema a bare Struct (not wrapped)."""
    from google.protobuf import empty_pb2, struct_pb2

    assert empty_pb2.Empty().SerializeToString() == b""
    schema = {"type": "object", "x-kubernetes-group-version-kind": [{"kind": "Deployment"}]}
    msg = _decode(struct_pb2.Struct, enc_struct(schema))
    assert _struct_dict(msg) == schema


# --- Additions on the wire ------------------------------------------------------------------------


def test_additions_decode() -> None:
    create = _decode(pb.CreateRequest, f_str(1, "prod") + f_varint(7, 1))
    assert create.dry_run is True
    apply = _decode(pb.ApplyRequest, f_str(9, "m") + f_varint(10, 1))
    assert (apply.field_manager, apply.dry_run) == ("m", True)
    delete = _decode(pb.DeleteRequest, f_varint(7, 5) + f_varint(8, 1) + f_varint(9, 3))
    assert delete.grace_period_seconds == 5
    assert delete.dry_run is True
    assert delete.propagation_policy == pb.PROPAGATION_POLICY_FOREGROUND
    watch = _decode(pb.WatchRequest, f_str(8, "10") + f_varint(9, 1))
    assert (watch.resource_version, watch.send_initial_events) == ("10", True)
    status = {"kind": "Status", "apiVersion": "v1", "code": 410, "reason": "Expired", "message": "too old"}
    event = _decode(pb.WatchEvent, f_varint(1, 5) + f_bytes(4, enc_struct(status)))
    assert event.type == pb.WatchEvent.TYPE_ERROR
    assert event.HasField("status")
    assert not event.HasField("resource")
    assert _struct_dict(event.status) == _numbers_as_floats(status)
    describe = _decode(pb.DescribeRequest, f_str(6, "web") + f_varint(7, 250))
    assert (describe.name, describe.HasField("events_limit"), describe.events_limit) == ("web", True, 250)
    described = _decode(pb.DescribeResponse, f_str(3, "forbidden: cannot list events"))
    assert described.events_error == "forbidden: cannot list events"
    assert not described.HasField("resource")


def test_old_client_bytes_leave_additions_at_defaults() -> None:
    """A request from a client that knows only the core decodes with every addition unset."""
    delete = _decode(pb.DeleteRequest, _strings_bytes("prod", "", "v1", "pods", "ns", "p"))
    assert delete.dry_run is False
    assert delete.propagation_policy == pb.PROPAGATION_POLICY_UNSPECIFIED
    watch = _decode(pb.WatchRequest, _strings_bytes("prod", "", "v1", "pods"))
    assert watch.send_initial_events is False
    describe = _decode(pb.DescribeRequest, _strings_bytes("prod", "", "v1", "pods", "ns", "p"))
    assert not describe.HasField("events_limit")


# --- proto3 JSON (the Connect JSON codec) ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_json_names(name: str) -> None:
    cls = message_class(name)
    got = json.loads(json_format.MessageToJson(populated(cls)))
    expected = {row[5] for row in FROZEN[name] + ADDITIONS.get(name, [])}
    assert set(got) == expected


def test_json_scalars_and_dashboard_apply() -> None:
    """int64 as strings, bytes as base64, enums by name; the dashboard's Apply body parses."""
    listed = json.loads(json_format.MessageToJson(pb.ListResponse(remaining_item_count=7)))
    assert listed == {"remainingItemCount": "7"}
    event = json.loads(json_format.MessageToJson(pb.WatchEvent(type=pb.WatchEvent.TYPE_BOOKMARK)))
    assert event == {"type": "TYPE_BOOKMARK"}

    body = {
        "cluster": "prod",
        "group": "apps",
        "version": "v1",
        "resource": "deployments",
        "namespace": "default",
        "name": "web",
        "manifest": base64.b64encode(MANIFEST).decode(),
        "force": True,
        "fieldManager": "otterscale-web-ui",
    }
    apply = json_format.Parse(json.dumps(body), pb.ApplyRequest())
    assert apply.manifest == MANIFEST
    assert apply.force is True
    assert apply.field_manager == "otterscale-web-ui"
    assert json.loads(json_format.MessageToJson(apply)) == body

    page = json_format.Parse('{"limit": "10", "continue": "tok", "labelSelector": "a=b"}', pb.ListRequest())
    assert (page.limit, getattr(page, "continue"), page.label_selector) == (10, "tok", "a=b")


@pytest.mark.parametrize(
    ("text", "present", "value"), [("{}", False, 0), ('{"gracePeriodSeconds": "0"}', True, 0)]
)
def test_json_grace_period_presence(text: str, present: bool, value: int) -> None:
    msg = json_format.Parse(text, pb.DeleteRequest())
    assert msg.HasField("grace_period_seconds") is present
    assert msg.grace_period_seconds == value
    if present:
        assert json.loads(json_format.MessageToJson(msg)) == {"gracePeriodSeconds": "0"}
