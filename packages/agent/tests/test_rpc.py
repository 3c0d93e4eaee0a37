"""Every RPC through the agent's real HTTP server with a real Connect client, against a real
kube-apiserver, on built-in resources and on CRDs (namespaced and cluster-scoped), over Connect
and gRPC-Web on HTTP/1.1 and Connect and gRPC on h2c."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from otterscale.common import sign_identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import AgentProcess, ControlPlane

from .conftest import ADMIN, CLUSTER, CRD_GROUP, IDENTITY_KEY, ClientFactory, unique

pytestmark = pytest.mark.integration


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def _cm(name: str, namespace: str, **data: str) -> bytes:
    lines = [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {namespace}",
        "  labels:",
        "    suite: rpc",
        "data:",
    ]
    lines += [f"  {k}: {v!r}" for k, v in data.items()] or ["  {}"]
    return "\n".join(lines).encode()


async def test_discovery(make_client: ClientFactory, transport: str, crds: dict[str, str]) -> None:
    rpc = make_client(transport=transport)
    response = await rpc.discovery(pb.DiscoveryRequest(cluster=CLUSTER))
    found = {(r.group, r.version, r.resource): r for r in response.api_resources}
    cm = found[("", "v1", "configmaps")]
    assert (cm.kind, cm.namespaced, "cm" in cm.short_names, "list" in cm.verbs) == (
        "ConfigMap",
        True,
        True,
        True,
    )
    assert found[("apps", "v1", "deployments")].short_names == ["deploy"]
    assert found[("", "v1", "nodes")].namespaced is False
    # every version, not only the preferred one
    assert ("autoscaling", "v1", "horizontalpodautoscalers") in found
    assert ("autoscaling", "v2", "horizontalpodautoscalers") in found
    widget = found[(CRD_GROUP, "v1", "widgets")]
    gadget = found[(CRD_GROUP, "v1", "gadgets")]
    assert (widget.kind, widget.namespaced, gadget.kind, gadget.namespaced) == (
        "Widget",
        True,
        "Gadget",
        False,
    )
    # subresources are listed as the original listed them (test_discovery.py compares them all)
    log, scale = found[("", "v1", "pods/log")], found[("apps", "v1", "deployments/scale")]
    assert (log.kind, log.namespaced, list(log.verbs), list(log.short_names)) == ("Pod", True, ["get"], [])
    assert (scale.kind, scale.namespaced, sorted(scale.verbs)) == ("Scale", True, ["get", "patch", "update"])


async def test_configmap_lifecycle(make_client: ClientFactory, transport: str, namespace: str) -> None:
    rpc = make_client(transport=transport)
    name = unique("cm")
    created = await rpc.create(
        pb.CreateRequest(
            cluster=CLUSTER,
            version="v1",
            resource="configmaps",
            namespace=namespace,
            manifest=_cm(name, namespace, a="1"),
        )
    )
    obj = as_dict(created.object)
    assert obj["metadata"]["name"] == name
    assert obj["data"] == {"a": "1"}
    assert obj["metadata"]["uid"]

    got = await rpc.get(
        pb.GetRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace, name=name)
    )
    assert as_dict(got.object)["metadata"]["uid"] == obj["metadata"]["uid"]
    assert as_dict(got.object)["kind"] == "ConfigMap"

    applied = await rpc.apply(
        pb.ApplyRequest(
            cluster=CLUSTER,
            version="v1",
            resource="configmaps",
            namespace=namespace,
            name=name,
            manifest=_cm(name, namespace, a="1", b="2"),
            force=True,
            field_manager="otterscale-web-ui",
        )
    )
    assert as_dict(applied.object)["data"] == {"a": "1", "b": "2"}

    listed = await rpc.list(
        pb.ListRequest(
            cluster=CLUSTER,
            version="v1",
            resource="configmaps",
            namespace=namespace,
            label_selector="suite=rpc",
        )
    )
    assert listed.resource_version
    items = [as_dict(i.object) for i in listed.items]
    assert [i["metadata"]["name"] for i in items] == [name]
    assert (items[0]["kind"], items[0]["apiVersion"]) == ("ConfigMap", "v1")
    assert "managedFields" not in items[0]["metadata"]

    await rpc.delete(
        pb.DeleteRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace, name=name)
    )
    with pytest.raises(ConnectError) as info:
        await rpc.get(
            pb.GetRequest(
                cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace, name=name
            )
        )
    assert info.value.code is Code.NOT_FOUND
    assert name in info.value.message


async def test_list_pagination_and_all_namespaces(
    make_client: ClientFactory, transport: str, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client(transport=transport)
    for i in range(3):
        control_plane.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/configmaps",
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"page-{i}", "labels": {"page": namespace}},
            },
        )
    first = await rpc.list(
        pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace, limit=2)
    )
    assert len(first.items) == 2
    token = getattr(first, "continue")
    assert token
    assert first.remaining_item_count == 1
    second = await rpc.list(
        pb.ListRequest(
            cluster=CLUSTER,
            version="v1",
            resource="configmaps",
            namespace=namespace,
            limit=2,
            **{"continue": token},
        )
    )
    names = [as_dict(i.object)["metadata"]["name"] for i in (*first.items, *second.items)]
    assert names == ["page-0", "page-1", "page-2"]
    assert getattr(second, "continue") == ""
    # empty namespace = all namespaces
    everywhere = await rpc.list(
        pb.ListRequest(
            cluster=CLUSTER, version="v1", resource="configmaps", label_selector=f"page={namespace}"
        )
    )
    assert len(everywhere.items) == 3
    assert {as_dict(i.object)["metadata"]["namespace"] for i in everywhere.items} == {namespace}


async def test_namespaced_crd_lifecycle(
    make_client: ClientFactory, transport: str, namespace: str, crds: dict[str, str]
) -> None:
    rpc = make_client(transport=transport)
    name = unique("w")
    manifest = f"""
apiVersion: {CRD_GROUP}/v1
kind: Widget
metadata:
  name: {name}
spec:
  size: 3
  color: red
""".encode()
    common = {
        "cluster": CLUSTER,
        "group": CRD_GROUP,
        "version": "v1",
        "resource": "widgets",
        "namespace": namespace,
    }
    created = await rpc.create(pb.CreateRequest(manifest=manifest, **common))
    assert as_dict(created.object)["metadata"]["namespace"] == namespace
    applied = await rpc.apply(
        pb.ApplyRequest(
            name=name,
            manifest=manifest.replace(b"size: 3", b"size: 5"),
            field_manager="otterscale-web-ui",
            force=True,
            **common,
        )
    )
    assert as_dict(applied.object)["spec"]["size"] == 5
    got = await rpc.get(pb.GetRequest(name=name, **common))
    assert as_dict(got.object)["spec"] == {"size": 5, "color": "red"}
    listed = await rpc.list(pb.ListRequest(**common))
    assert [as_dict(i.object)["metadata"]["name"] for i in listed.items] == [name]
    assert as_dict(listed.items[0].object)["kind"] == "Widget"
    await rpc.delete(pb.DeleteRequest(name=name, **common))
    with pytest.raises(ConnectError) as info:
        await rpc.get(pb.GetRequest(name=name, **common))
    assert info.value.code is Code.NOT_FOUND


async def test_cluster_scoped_crd_lifecycle(
    make_client: ClientFactory, transport: str, crds: dict[str, str]
) -> None:
    rpc = make_client(transport=transport)
    name = unique("g")
    manifest = json.dumps(
        {"apiVersion": f"{CRD_GROUP}/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": {"size": 1}}
    )
    common = {"cluster": CLUSTER, "group": CRD_GROUP, "version": "v1", "resource": "gadgets"}
    created = await rpc.create(pb.CreateRequest(manifest=manifest.encode(), **common))
    assert "namespace" not in as_dict(created.object)["metadata"]
    applied = await rpc.apply(
        pb.ApplyRequest(
            name=name, manifest=manifest.replace('"size": 1', '"size": 2').encode(), force=True, **common
        )
    )
    assert as_dict(applied.object)["spec"]["size"] == 2
    got = await rpc.get(pb.GetRequest(name=name, **common))
    assert as_dict(got.object)["metadata"]["name"] == name
    listed = await rpc.list(pb.ListRequest(**common))
    assert name in [as_dict(i.object)["metadata"]["name"] for i in listed.items]
    await rpc.delete(pb.DeleteRequest(name=name, **common))
    with pytest.raises(ConnectError) as info:
        await rpc.get(pb.GetRequest(name=name, **common))
    assert info.value.code is Code.NOT_FOUND


async def test_watch_events(
    make_client: ClientFactory, transport: str, namespace: str, control_plane: ControlPlane
) -> None:
    rpc = make_client(transport=transport)
    listed = await rpc.list(
        pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace)
    )
    events: list[pb.WatchEvent] = []

    async def consume() -> None:
        async for event in rpc.watch(
            pb.WatchRequest(
                cluster=CLUSTER,
                version="v1",
                resource="configmaps",
                namespace=namespace,
                resource_version=listed.resource_version,
            )
        ):
            if event.type == pb.WatchEvent.TYPE_BOOKMARK:
                continue
            events.append(event)
            if event.type == pb.WatchEvent.TYPE_DELETED:
                return

    task = asyncio.create_task(consume())
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    control_plane.request("POST", path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w"}})
    control_plane.request(
        "PATCH", f"{path}/w", {"data": {"x": "1"}}, content_type="application/merge-patch+json"
    )
    control_plane.request("DELETE", f"{path}/w")
    await asyncio.wait_for(task, 30)
    assert [e.type for e in events] == [
        pb.WatchEvent.TYPE_ADDED,
        pb.WatchEvent.TYPE_MODIFIED,
        pb.WatchEvent.TYPE_DELETED,
    ]
    versions = [int(e.resource_version) for e in events]
    assert versions == sorted(versions)
    assert len(set(versions)) == 3
    for event in events:
        obj = as_dict(event.resource.object)
        assert obj["metadata"]["resourceVersion"] == event.resource_version
        assert obj["kind"] == "ConfigMap"
        assert "managedFields" not in obj["metadata"]


async def test_schema_builtin_and_crd(
    make_client: ClientFactory, transport: str, crds: dict[str, str]
) -> None:
    rpc = make_client(transport=transport)
    deployment = as_dict(
        await rpc.schema(pb.SchemaRequest(cluster=CLUSTER, group="apps", version="v1", kind="Deployment"))
    )
    assert deployment["x-kubernetes-group-version-kind"] == [
        {"group": "apps", "kind": "Deployment", "version": "v1"}
    ]
    containers = deployment["properties"]["spec"]["allOf"][0]["properties"]["template"]["allOf"][0][
        "properties"
    ]["spec"]
    assert "containers" in containers["allOf"][0]["properties"]
    widget = as_dict(
        await rpc.schema(pb.SchemaRequest(cluster=CLUSTER, group=CRD_GROUP, version="v1", kind="Widget"))
    )
    assert widget["properties"]["spec"]["properties"]["size"]["type"] == "integer"
    assert "$ref" not in str(widget)


async def test_json_codec(make_client: ClientFactory, namespace: str) -> None:
    """The web dashboard speaks Connect with the JSON codec."""
    rpc = make_client(json=True)
    name = unique("json")
    created = await rpc.create(
        pb.CreateRequest(
            cluster=CLUSTER,
            version="v1",
            resource="configmaps",
            namespace=namespace,
            manifest=_cm(name, namespace, k="v"),
        )
    )
    assert as_dict(created.object)["data"] == {"k": "v"}
    listed = await rpc.list(
        pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace)
    )
    assert name in [as_dict(i.object)["metadata"]["name"] for i in listed.items]


@pytest.mark.parametrize("version", ["http1", "h2c"])
async def test_a_unary_answer_declares_its_length(
    agent_server: AgentProcess, namespace: str, version: str
) -> None:
    """The hub checks an agent's answer against its size limit from Content-Length before
    reading it, and then reads it natively."""
    from pyqwest import Client, HTTPTransport, HTTPVersion

    # As the hub's: no compression (a client that inflates an answer drops its Content-Length).
    transport = HTTPTransport(
        http_version=HTTPVersion.HTTP1 if version == "http1" else HTTPVersion.HTTP2,
        enable_gzip=False,
        enable_brotli=False,
        enable_zstd=False,
    )
    try:
        method = "/otterscale.resource.v1.ResourceService/List"
        headers = {
            "content-type": "application/proto",
            "connect-protocol-version": "1",
            **sign_identity(ADMIN, cluster=CLUSTER, method=method, key=IDENTITY_KEY),
        }
        body = pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace)
        response = await Client(transport).post(
            agent_server.url + method, headers=headers, content=body.SerializeToString()
        )
        content = bytes(response.content)
        assert response.status == 200, content
        assert response.headers.get("content-length") == str(len(content))
        assert pb.ListResponse.FromString(content).resource_version
    finally:
        await transport.aclose()
