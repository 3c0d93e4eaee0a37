"""A CRD created while the agent runs shows up in Discovery within the documented TTL, is usable
by List at once (a cache miss refreshes discovery), and its kind reaches Schema."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from connectrpc.errors import ConnectError

from otterscale.agent import DISCOVERY_TTL
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane

from .conftest import CLUSTER, CRD_GROUP, AgentThread, ClientFactory, install_crd

pytestmark = pytest.mark.integration


def _new_kind() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"sprockets{suffix}", f"Sprocket{suffix}"


def test_documented_ttl() -> None:
    assert DISCOVERY_TTL == 10.0


async def test_new_crd_in_discovery_within_ttl(
    make_client: ClientFactory, agent_server: AgentThread, control_plane: ControlPlane
) -> None:
    assert agent_server.settings.discovery_ttl == DISCOVERY_TTL
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
