"""The committed api/openapi.yaml describes every RPC and matches the generated messages.

Cheap checks of the generator's output; whether the file is stale is `nox -s openapi -- --check`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.runtime.v1 import runtime_pb2 as runtime_pb

OPENAPI = Path(__file__).resolve().parents[3] / "api" / "openapi.yaml"
SERVICE = pb.DESCRIPTOR.services_by_name["ResourceService"]
RPCS = ["Discovery", "Schema", "List", "Get", "Describe", "Create", "Apply", "Delete", "Watch"]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    return loaded


def _schema_ref(full_name: str) -> str:
    return f"#/components/schemas/{full_name}"


def test_openapi_version(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"]
    assert doc["info"]["version"]


def test_one_path_per_rpc(doc: dict[str, Any]) -> None:
    assert [m.name for m in SERVICE.methods] == RPCS
    resource_paths = {
        path for path in doc["paths"] if path.startswith("/otterscale.resource.v1.ResourceService/")
    }
    assert resource_paths == {f"/otterscale.resource.v1.ResourceService/{name}" for name in RPCS}
    # Additions (otterscale.cluster.v1, the fan-out service) are documented too.
    assert "/otterscale.cluster.v1.ClusterService/ListClusters" in doc["paths"]
    assert {
        path for path in doc["paths"] if path.startswith("/otterscale.resource.v1.MultiClusterService/")
    } == {
        "/otterscale.resource.v1.MultiClusterService/MultiList",
        "/otterscale.resource.v1.MultiClusterService/MultiWatch",
    }


def test_runtime_service_paths(doc: dict[str, Any]) -> None:
    service = runtime_pb.DESCRIPTOR.services_by_name["RuntimeService"]
    runtime_paths = {path for path in doc["paths"] if path.startswith("/otterscale.runtime.v1.")}
    # The request streams (Exec, PortForwardStream) need HTTP/2: named in the tag, not described.
    described = [m for m in service.methods if not m.client_streaming]
    assert runtime_paths == {f"/{service.full_name}/{m.name}" for m in described}
    tag = next(t for t in doc["tags"] if t["name"] == service.full_name)
    assert "Exec, PortForwardStream." in tag["description"]
    for method in described:
        op = doc["paths"][f"/{service.full_name}/{method.name}"]["post"]
        content_type = "application/connect+json" if method.server_streaming else "application/json"
        request = op["requestBody"]["content"][content_type]["schema"]
        assert request == {"$ref": _schema_ref(method.input_type.full_name)}, method.name


@pytest.mark.parametrize("name", RPCS)
def test_request_and_response_schemas(doc: dict[str, Any], name: str) -> None:
    method = SERVICE.methods_by_name[name]
    op = doc["paths"][f"/{SERVICE.full_name}/{name}"]["post"]
    assert op["description"]
    content_type = "application/connect+json" if method.server_streaming else "application/json"
    assert op["requestBody"]["required"] is True
    request = op["requestBody"]["content"][content_type]["schema"]
    assert request == {"$ref": _schema_ref(method.input_type.full_name)}
    response = op["responses"]["200"]["content"][content_type]["schema"]
    if method.server_streaming:
        assert {"$ref": _schema_ref(method.output_type.full_name)} in response["anyOf"]
        assert "envelope" in op["description"]
    else:
        assert response == {"$ref": _schema_ref(method.output_type.full_name)}
        error = op["responses"]["default"]["content"]["application/json"]["schema"]
        assert error == {"$ref": _schema_ref("connect.Error")}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    for ref in _refs(doc):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def test_connect_error_codes(doc: dict[str, Any]) -> None:
    codes = doc["components"]["schemas"]["connect.Error"]["properties"]["code"]["enum"]
    assert "not_found" in codes
    assert "unauthenticated" in codes
    assert len(codes) == 16


def _messages() -> list[type[Message]]:
    return [getattr(pb, name) for name in sorted(pb.DESCRIPTOR.message_types_by_name)]


def _populated(cls: type[Message]) -> Message:
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                getattr(msg, field.name).add()
            elif field.message_type.full_name == "google.protobuf.Struct":
                getattr(msg, field.name).update({"kind": "Pod", "spec": {"replicas": 1}})
            else:
                getattr(msg, field.name).SetInParent()
        elif field.is_repeated:
            getattr(msg, field.name).append("x")
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(msg, field.name, 1)
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(msg, field.name, True)
        elif field.type == FieldDescriptor.TYPE_INT64:
            setattr(msg, field.name, -42)
        elif field.type == FieldDescriptor.TYPE_INT32:
            setattr(msg, field.name, -7)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(msg, field.name, b"\xff\x00")
        else:
            setattr(msg, field.name, "x")
    return msg


@pytest.mark.parametrize("cls", _messages(), ids=lambda cls: cls.DESCRIPTOR.name)
def test_proto3_json_matches_schema(doc: dict[str, Any], cls: type[Message]) -> None:
    """What the Connect JSON codec sends validates against the component schema, names and all."""
    schema = doc["components"]["schemas"][cls.DESCRIPTOR.full_name]
    assert set(schema["properties"]) == {f.json_name for f in cls.DESCRIPTOR.fields}
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"urn:openapi{_schema_ref(cls.DESCRIPTOR.full_name)}"}, registry=registry
    )
    for msg in (cls(), _populated(cls)):
        validator.validate(json.loads(json_format.MessageToJson(msg)))
