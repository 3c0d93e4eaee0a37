"""Faults on a cluster of the module's own: a broken aggregated API does not break Discovery; and
kube-apiserver going away ends an open Watch with unavailable (so the client resumes), after which
the agent serves again. The restart test comes last: it restarts that cluster's kube-apiserver."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import AgentProcess, ControlPlane

from .conftest import ADMIN, CLUSTER, ClientFactory, _ensure_admin_binding, start_agent

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def fault_cluster(control_plane_factory: object) -> ControlPlane:
    cp: ControlPlane = control_plane_factory("agent-faults")  # type: ignore[operator]
    _ensure_admin_binding(cp)
    return cp


@pytest.fixture(scope="module")
def fault_agent(
    fault_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    with start_agent(fault_cluster, tmp_path_factory.mktemp("fault-agent")) as server:
        yield server


async def test_broken_apiservice_does_not_fail_discovery(
    make_client: ClientFactory, fault_agent: AgentProcess, fault_cluster: ControlPlane
) -> None:
    """An aggregated API whose backend does not exist: Discovery leaves it out, the rest works."""
    fault_cluster.apply(
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": "v1.broken.otterscale.test"},
            "spec": {
                "group": "broken.otterscale.test",
                "version": "v1",
                "service": {"namespace": "default", "name": "no-such-service", "port": 443},
                "insecureSkipTLSVerify": True,
                "groupPriorityMinimum": 1000,
                "versionPriority": 15,
            },
        }
    )
    rpc = make_client(ADMIN, url=fault_agent.url)
    await asyncio.sleep(0)
    response = await rpc.discovery(pb.DiscoveryRequest(cluster=CLUSTER))
    groups = {r.group for r in response.api_resources}
    assert "broken.otterscale.test" not in groups
    assert {"", "apps", "apiregistration.k8s.io"} <= groups
    with pytest.raises(ConnectError) as info:
        await rpc.list(
            pb.ListRequest(cluster=CLUSTER, group="broken.otterscale.test", version="v1", resource="things")
        )
    assert info.value.code in (Code.NOT_FOUND, Code.UNAVAILABLE)


async def test_upstream_close_is_unavailable_then_resume(
    make_client: ClientFactory, fault_agent: AgentProcess, fault_cluster: ControlPlane
) -> None:
    rpc = make_client(ADMIN, url=fault_agent.url, transport="grpc-h2c")
    base = "/api/v1/namespaces/default/configmaps"
    listed = await rpc.list(
        pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace="default")
    )
    last_rv = listed.resource_version
    names: list[str] = []

    async def consume() -> None:
        nonlocal last_rv
        async for event in rpc.watch(
            pb.WatchRequest(
                cluster=CLUSTER,
                version="v1",
                resource="configmaps",
                namespace="default",
                resource_version=last_rv,
            )
        ):
            last_rv = event.resource_version or last_rv
            if event.type == pb.WatchEvent.TYPE_ADDED:
                names.append(event.resource.object["metadata"]["name"])

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    fault_cluster.request(
        "POST", base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "before"}}
    )
    for _ in range(100):
        if names:
            break
        await asyncio.sleep(0.05)
    assert names == ["before"]

    await asyncio.to_thread(fault_cluster.restart_apiserver)
    with pytest.raises(ConnectError) as info:
        await asyncio.wait_for(task, 60)
    assert info.value.code is Code.UNAVAILABLE
    assert "resume" in info.value.message or "connection" in info.value.message

    # kube-apiserver is back. Resuming from the last version either replays what happened since,
    # or (its watch cache restarted newer than that version) says 410: then the client re-lists.
    fault_cluster.request(
        "POST", base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after"}}
    )
    first: pb.WatchEvent | None = None
    async for event in rpc.watch(
        pb.WatchRequest(
            cluster=CLUSTER,
            version="v1",
            resource="configmaps",
            namespace="default",
            resource_version=last_rv,
        )
    ):
        if event.type != pb.WatchEvent.TYPE_BOOKMARK:
            first = event
            break
    assert first is not None
    if first.type == pb.WatchEvent.TYPE_ERROR:
        assert first.status["code"] == 410
        relisted = await rpc.list(
            pb.ListRequest(cluster=CLUSTER, version="v1", resource="configmaps", namespace="default")
        )
        assert "after" in [item.object["metadata"]["name"] for item in relisted.items]
    else:
        assert (first.type, first.resource.object["metadata"]["name"]) == (pb.WatchEvent.TYPE_ADDED, "after")
