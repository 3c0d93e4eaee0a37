"""A CRD created while the agent runs shows up in Discovery within the documented TTL, is usable
by List at once (a cache miss refreshes discovery), and its kind reaches Schema; and Discovery
lists exactly what kube-apiserver's own discovery lists, subresources included."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError

from otterscale.agent import DISCOVERY_TTL
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import AgentProcess, ControlPlane

from .conftest import CLUSTER, CRD_GROUP, ClientFactory, install_crd, start_agent

pytestmark = pytest.mark.integration


def _new_kind() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"sprockets{suffix}", f"Sprocket{suffix}"


def test_documented_ttl() -> None:
    assert DISCOVERY_TTL == 10.0


async def test_new_crd_in_discovery_within_ttl(
    make_client: ClientFactory, agent_server: AgentProcess, control_plane: ControlPlane
) -> None:
    assert not any(arg.startswith("--discovery-ttl") for arg in agent_server.argv)  # the default TTL
    rpc = make_client()
    await rpc.discovery(pb.DiscoveryRequest(cluster=CLUSTER))  # the cache is fresh now
    plural, kind = _new_kind()
    install_crd(control_plane, plural, kind, "Cluster", wait_for_openapi=False)
    established = time.monotonic()
    while True:
        response = await rpc.discovery(pb.DiscoveryRequest(cluster=CLUSTER))
        if plural in {r.resource for r in response.api_resources}:
            break
        assert time.monotonic() - established < DISCOVERY_TTL + 2, "new CRD not in Discovery within the TTL"
        await asyncio.sleep(0.25)
    while True:  # the OpenAPI index follows the same TTL (plus kube-apiserver's own publishing delay)
        try:
            schema = await rpc.schema(
                pb.SchemaRequest(cluster=CLUSTER, group=CRD_GROUP, version="v1", kind=kind)
            )
            break
        except ConnectError:
            assert time.monotonic() - established < DISCOVERY_TTL + 10, "new CRD kind not in Schema in time"
            await asyncio.sleep(0.25)
    assert schema["x-kubernetes-group-version-kind"][0]["kind"] == kind


async def test_new_crd_usable_at_once(make_client: ClientFactory, control_plane: ControlPlane) -> None:
    rpc = make_client()
    await rpc.discovery(pb.DiscoveryRequest(cluster=CLUSTER))
    plural, _ = _new_kind()
    install_crd(control_plane, plural, "Sprocket" + plural[-8:], "Namespaced", wait_for_openapi=False)
    listed = await rpc.list(pb.ListRequest(cluster=CLUSTER, group=CRD_GROUP, version="v1", resource=plural))
    assert list(listed.items) == []


# --- Discovery against kube-apiserver's own discovery, entry by entry ---------------------------------

AGGREGATED = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
Entry = tuple[str, str, str, str, bool, tuple[str, ...], tuple[str, ...]]


def _aggregated_entries(cp: ControlPlane) -> list[Entry]:
    """kube-apiserver's aggregated discovery, flattened the way client-go's
    ``ServerGroupsAndResources`` does for the original service (``discovery.convertAPIGroup``):
    each resource with a GVK, then ``<resource>/<subresource>`` entries with their own kind and
    verbs, the parent's scope and no short names."""
    entries: list[Entry] = []
    for path in ("/api", "/apis"):
        doc = cp.request("GET", path, headers={"Accept": AGGREGATED})
        assert doc["kind"] == "APIGroupDiscoveryList", path
        for group in doc["items"]:
            name = group.get("metadata", {}).get("name", "")
            for version in group["versions"]:
                assert version.get("freshness", "Current") == "Current", (name, version["version"])
                for res in version.get("resources", ()):
                    namespaced = res["scope"] == "Namespaced"
                    if res.get("responseKind"):
                        entries.append(
                            (
                                name,
                                version["version"],
                                res["resource"],
                                res["responseKind"]["kind"],
                                namespaced,
                                tuple(res.get("verbs", ())),
                                tuple(res.get("shortNames", ())),
                            )
                        )
                    for sub in res.get("subresources", ()):
                        if sub.get("responseKind"):
                            entries.append(
                                (
                                    name,
                                    version["version"],
                                    f"{res['resource']}/{sub['subresource']}",
                                    sub["responseKind"]["kind"],
                                    namespaced,
                                    tuple(sub.get("verbs", ())),
                                    (),
                                )
                            )
    return entries


def _legacy_entries(cp: ControlPlane) -> list[Entry]:
    """The legacy per-group-version documents (``/api/v1``, ``/apis/<group>/<version>``)."""
    group_versions = [("", v) for v in cp.request("GET", "/api")["versions"]]
    for group in cp.request("GET", "/apis")["groups"]:
        group_versions += [(group["name"], v["version"]) for v in group["versions"]]
    entries: list[Entry] = []
    for group, version in group_versions:
        doc = cp.request("GET", f"/apis/{group}/{version}" if group else f"/api/{version}")
        entries += [
            (
                group,
                version,
                r["name"],
                r["kind"],
                r["namespaced"],
                tuple(r.get("verbs", ())),
                tuple(r.get("shortNames", ())),
            )
            for r in doc["resources"]
        ]
    return entries


async def test_discovery_matches_kube_apiserver_entry_by_entry(
    make_client: ClientFactory, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Every entry of kube-apiserver's discovery, resources and subresources (``pods/log``,
    ``pods/exec``, ``deployments/scale``, a CRD's ``/status`` and ``/scale``), in its order, with
    its kind, scope, verbs and short names: what the original service listed on the same
    cluster. The legacy documents must list the same set."""
    install_crd(
        control_plane,
        "gizmos",
        "Gizmo",
        "Namespaced",
        ["gzm"],
        wait_for_openapi=False,
        subresources={
            "status": {},
            "scale": {"specReplicasPath": ".spec.size", "statusReplicasPath": ".status.size"},
        },
    )
    # A fresh agent (its own discovery), and the cluster's discovery read before and after its
    # answer: equal reads mean nothing changed in between (an earlier test's CRD going away).
    deadline = time.monotonic() + 60
    while True:
        before = _aggregated_entries(control_plane)
        with start_agent(control_plane, tmp_path) as agent:
            response = await make_client(url=agent.url).discovery(pb.DiscoveryRequest(cluster=CLUSTER))
        if _aggregated_entries(control_plane) == before:
            break
        assert time.monotonic() < deadline, "the cluster's discovery did not settle within 60 s"
    ours = [
        (r.group, r.version, r.resource, r.kind, r.namespaced, tuple(r.verbs), tuple(r.short_names))
        for r in response.api_resources
    ]
    for expected, got in zip(before, ours, strict=False):
        assert got == expected
    assert len(ours) == len(before)
    assert set(ours) == set(_legacy_entries(control_plane))

    by_name = {(g, v, r): (kind, namespaced, verbs) for g, v, r, kind, namespaced, verbs, _ in ours}
    assert by_name[("", "v1", "pods/log")] == ("Pod", True, ("get",))
    assert by_name[("", "v1", "pods/exec")][:2] == ("PodExecOptions", True)
    assert by_name[("apps", "v1", "deployments/scale")] == ("Scale", True, ("get", "patch", "update"))
    assert by_name[(CRD_GROUP, "v1", "gizmos/status")][:2] == ("Gizmo", True)
    assert by_name[(CRD_GROUP, "v1", "gizmos/scale")][:2] == ("Scale", True)
    resources = [e for e in ours if "/" not in e[2]]
    print(
        f"\n[discovery] entries: ours {len(ours)} (resources {len(resources)}, "
        f"subresources {len(ours) - len(resources)}); kube-apiserver aggregated {len(before)}"
    )
