"""A user works with two clusters through the hub: list, create, apply, get, watch, delete.

Real Keycloak tokens, the real hub, real chisel tunnels, real agents, real kube-apiservers; each
call runs in the target cluster as the calling user (alice may edit in east, bob in west).
"""

from __future__ import annotations

import asyncio

import pytest
import yaml
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import KubeAPIError, System

from .conftest import TRANSPORTS, Hub, unique

pytestmark = pytest.mark.e2e

EDITORS = {"east": "alice", "west": "bob"}


def configmap_manifest(name: str, namespace: str, **data: str) -> bytes:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": data,
        }
    ).encode()


@pytest.mark.parametrize("cluster", ["east", "west"])
async def test_create_apply_get_list_watch_delete(
    hub: Hub, otterscale_system: System, namespace: str, cluster: str
) -> None:
    user = EDITORS[cluster]
    auth = hub.auth(user)
    client = hub.client("connect-h2c")
    name = unique("cm")
    ref = {"cluster": cluster, "version": "v1", "resource": "configmaps", "namespace": namespace}

    events: list[pb.WatchEvent] = []
    watching = asyncio.Event()

    async def watch() -> None:
        start = await client.list(pb.ListRequest(**ref), headers=auth)
        watching.set()
        request = pb.WatchRequest(**ref, resource_version=start.resource_version)
        async for event in client.watch(request, headers=auth, timeout_ms=None):
            events.append(event)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(watching.wait(), 20)
        created = await client.create(
            pb.CreateRequest(**ref, manifest=configmap_manifest(name, namespace, step="created")),
            headers=auth,
        )
        assert created.object["metadata"]["name"] == name
        assert created.object["data"] == {"step": "created"}

        applied = await client.apply(
            pb.ApplyRequest(
                **ref,
                name=name,
                manifest=configmap_manifest(name, namespace, step="applied", by=user),
                force=True,
                field_manager="otterscale-e2e",
            ),
            headers=auth,
        )
        assert applied.object["data"] == {"step": "applied", "by": user}

        got = await client.get(pb.GetRequest(**ref, name=name), headers=auth)
        assert got.object["data"] == {"step": "applied", "by": user}

        listed = await client.list(pb.ListRequest(**ref), headers=auth)
        assert [item.object["metadata"]["name"] for item in listed.items].count(name) == 1
        assert listed.resource_version
        # List items come without managedFields (the contract; Get keeps the whole object).
        assert all("managedFields" not in item.object["metadata"] for item in listed.items)

        # The object was made in this cluster only, as this user (server-side apply recorded it).
        cp = otterscale_system.clusters[cluster].control_plane
        other = otterscale_system.clusters["west" if cluster == "east" else "east"].control_plane
        assert cp is not None
        assert other is not None
        raw = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        assert {m["manager"] for m in raw["metadata"]["managedFields"]} >= {"otterscale-e2e"}
        with pytest.raises(KubeAPIError) as absent:
            other.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        assert absent.value.status == 404

        await client.delete(pb.DeleteRequest(**ref, name=name, grace_period_seconds=0), headers=auth)
        with pytest.raises(ConnectError) as gone:
            await client.get(pb.GetRequest(**ref, name=name), headers=auth)
        assert gone.value.code is Code.NOT_FOUND

        def seen() -> list[tuple[int, str]]:
            return [
                (e.type, e.resource.object["metadata"]["name"])
                for e in events
                if e.type != pb.WatchEvent.TYPE_BOOKMARK
            ]

        expected = [
            (pb.WatchEvent.TYPE_ADDED, name),
            (pb.WatchEvent.TYPE_MODIFIED, name),
            (pb.WatchEvent.TYPE_DELETED, name),
        ]
        for _ in range(200):
            if seen() == expected or watcher.done():
                break
            await asyncio.sleep(0.05)
        assert seen() == expected
        assert all(e.resource_version for e in events)
        assert not watcher.done(), "the watch ended while the agent is alive"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


@pytest.mark.parametrize("json_codec", [False, True], ids=["proto", "json"])
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_every_protocol_reaches_both_clusters(hub: Hub, transport: str, json_codec: bool) -> None:
    """Connect, gRPC and gRPC-Web over HTTP/1.1 and h2c, binary and JSON, through the tunnels."""
    client = hub.client(transport, json=json_codec)
    for cluster, user in EDITORS.items():
        listed = await client.list(
            pb.ListRequest(cluster=cluster, version="v1", resource="namespaces"), headers=hub.auth(user)
        )
        names = {item.object["metadata"]["name"] for item in listed.items}
        assert {"default", "kube-system"} <= names


async def test_discovery_and_schema_through_the_hub(hub: Hub) -> None:
    client = hub.client()
    discovery = await client.discovery(pb.DiscoveryRequest(cluster="west"), headers=hub.auth("bob"))
    resources = {(r.group, r.version, r.resource) for r in discovery.api_resources}
    assert ("", "v1", "configmaps") in resources
    assert ("rbac.authorization.k8s.io", "v1", "clusterrolebindings") in resources
    # subresources too, as the original listed them (a dashboard reads the actions they offer)
    assert {("", "v1", "pods/log"), ("", "v1", "pods/exec"), ("apps", "v1", "deployments/scale")} <= resources
    schema = await client.schema(
        pb.SchemaRequest(cluster="east", version="v1", kind="ConfigMap"), headers=hub.auth("alice")
    )
    described = json_format.MessageToDict(schema)
    assert "data" in described["properties"]


async def test_a_group_binding_applies_through_the_hub(hub: Hub, namespace: str) -> None:
    """carol is in group ``ops``, which may read configmaps in both clusters but not write."""
    client = hub.client()
    for cluster in ("east", "west"):
        listed = await client.list(
            pb.ListRequest(cluster=cluster, version="v1", resource="configmaps", namespace=namespace),
            headers=hub.auth("carol"),
        )
        assert listed.resource_version
        with pytest.raises(ConnectError) as denied:
            await client.create(
                pb.CreateRequest(
                    cluster=cluster,
                    version="v1",
                    resource="configmaps",
                    namespace=namespace,
                    manifest=configmap_manifest(unique("cm"), namespace),
                ),
                headers=hub.auth("carol"),
            )
        assert denied.value.code is Code.PERMISSION_DENIED
        assert hub.subject("carol") in denied.value.message


@pytest.mark.parametrize("transport", ["connect-h1", "grpc-h2c", "grpcweb-h1"])
async def test_describe_through_the_hub(
    hub: Hub, otterscale_system: System, namespace: str, transport: str
) -> None:
    """bob may ``view`` this namespace of east (a RoleBinding of the aggregated ClusterRole):
    he gets the object and its events. carol's group may read configmaps but not events: she gets
    the object and the reason in events_error, not a silently empty list."""
    cp = otterscale_system.clusters["east"].control_plane
    assert cp is not None
    cp.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "bob-views"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": hub.subject("bob")}
            ],
        },
    )
    cm = cp.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "described"}, "data": {"a": "1"}},
    )
    for name, when in (("later", "2020-01-01T00:00:02Z"), ("earlier", "2020-01-01T00:00:01Z")):
        cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name},
                "involvedObject": {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "namespace": namespace,
                    "name": "described",
                    "uid": cm["metadata"]["uid"],
                },
                "reason": "E2E",
                "message": name,
                "lastTimestamp": when,
            },
        )
    cp.wait_for(  # RBAC caches, and kube-controller-manager filling the aggregated role
        lambda: cp.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/events",
            headers={"Impersonate-User": hub.subject("bob")},
        ),
        what="bob may view",
    )
    request = pb.DescribeRequest(
        cluster="east", version="v1", resource="configmaps", namespace=namespace, name="described"
    )
    client = hub.client(transport, json=transport == "connect-h1")

    viewed = await client.describe(request, headers=hub.auth("bob"))
    assert viewed.resource.object["metadata"]["uid"] == cm["metadata"]["uid"]
    assert "managedFields" not in viewed.resource.object["metadata"]
    assert [e.object["metadata"]["name"] for e in viewed.events] == ["earlier", "later"]
    assert viewed.events_error == ""

    request.events_limit = 1
    limited = await client.describe(request, headers=hub.auth("bob"))
    assert [e.object["metadata"]["name"] for e in limited.events] == ["later"]

    partial = await client.describe(request, headers=hub.auth("carol"))
    assert partial.resource.object["metadata"]["name"] == "described"
    assert list(partial.events) == []
    assert partial.events_error == f'forbidden: cannot list events in namespace "{namespace}"'

    request.cluster = "west"  # alice has no rights there: the call itself is refused
    with pytest.raises(ConnectError) as denied:
        await client.describe(request, headers=hub.auth("alice"))
    assert denied.value.code is Code.PERMISSION_DENIED
