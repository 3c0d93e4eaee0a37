"""AgentService/GetAgentInfo: what the hub shows in ListClusters, only for calls the hub signed."""

from __future__ import annotations

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport

from otterscale.agent._info import agent_version
from otterscale.cluster.v1 import cluster_pb2
from otterscale.cluster.v1.cluster_connect import AgentServiceClient
from otterscale.common import Identity
from otterscale.testing import AgentProcess, ControlPlane
from otterscale.testing.tools import KUBERNETES_VERSION

from .conftest import CLUSTER, HubSigner

pytestmark = pytest.mark.integration

HUB = Identity("otterscale-hub")


async def _call(url: str, signer: HubSigner | None) -> cluster_pb2.GetAgentInfoResponse:
    transport = HTTPTransport()
    client = AgentServiceClient(url, http_client=Client(transport), interceptors=[signer] if signer else [])
    try:
        return await client.get_agent_info(cluster_pb2.GetAgentInfoRequest())
    finally:
        await client.close()
        await transport.aclose()


async def test_reports_versions_and_cluster(agent_server: AgentProcess, control_plane: ControlPlane) -> None:
    info = await _call(agent_server.url, HubSigner(HUB))
    assert info.cluster == CLUSTER
    assert info.agent_version == agent_version() != ""
    assert (
        info.kubernetes_version
        == control_plane.request("GET", "/version")["gitVersion"]
        == KUBERNETES_VERSION
    )


async def test_unsigned_call_is_rejected(agent_server: AgentProcess) -> None:
    with pytest.raises(ConnectError) as err:
        await _call(agent_server.url, None)
    assert err.value.code == Code.UNAUTHENTICATED


async def test_signature_for_another_method_is_rejected(agent_server: AgentProcess) -> None:
    signer = HubSigner(HUB, method_override="/otterscale.resource.v1.ResourceService/Get")
    with pytest.raises(ConnectError) as err:
        await _call(agent_server.url, signer)
    assert err.value.code == Code.UNAUTHENTICATED
