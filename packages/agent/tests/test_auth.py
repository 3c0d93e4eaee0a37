"""Only calls the hub signed for this cluster and this RPC, recently, get through; nothing else
reaches Kubernetes. Checked on every transport, including that a rejected call does not break
an HTTP/2 connection shared with other calls."""

from __future__ import annotations

import time

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import Identity, derive_identity_key
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import ControlPlane, KubeAPIError

from .conftest import ADMIN, AGENT_PASSWORD, CLUSTER, ClientFactory, HubSigner, unique

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _bad_signers() -> dict[str, HubSigner | None]:
    return {
        "unsigned": None,
        "wrong-key": HubSigner(ADMIN, key=derive_identity_key(CLUSTER, "not-the-agent-password-123")),
        "other-cluster-key": HubSigner(
            ADMIN, key=derive_identity_key("other", AGENT_PASSWORD), cluster="other"
        ),
        "expired": HubSigner(ADMIN, clock=lambda: time.time() - 120),
        "future": HubSigner(ADMIN, clock=lambda: time.time() + 120),
        "other-method": HubSigner(ADMIN, method_override="/otterscale.resource.v1.ResourceService/Get"),
    }


@pytest.mark.parametrize("case", list(_bad_signers()))
async def test_rejected_and_nothing_created(
    make_client: ClientFactory, transport: str, namespace: str, control_plane: ControlPlane, case: str
) -> None:
    signer = _bad_signers()[case]
    rpc = make_client(None, transport=transport, signer=signer)
    name = unique("forged")
    with pytest.raises(ConnectError) as info:
        await rpc.create(
            pb.CreateRequest(
                cluster=CLUSTER,
                version="v1",
                resource="configmaps",
                namespace=namespace,
                manifest=f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n".encode(),
            )
        )
    assert info.value.code is Code.UNAUTHENTICATED
    with pytest.raises(KubeAPIError) as missing:
        control_plane.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
    assert missing.value.status == 404


async def test_old_style_subject_header_alone_is_rejected(make_client: ClientFactory, transport: str) -> None:
    rpc = make_client(None, transport=transport)
    with pytest.raises(ConnectError) as info:
        await rpc.list(
            pb.ListRequest(cluster=CLUSTER, version="v1", resource="namespaces"),
            headers={"X-Otterscale-Subject": "otterscale-test-admin"},
        )
    assert info.value.code is Code.UNAUTHENTICATED


async def test_watch_requires_signature(make_client: ClientFactory, transport: str) -> None:
    rpc = make_client(None, transport=transport)
    with pytest.raises(ConnectError) as info:
        async for _ in rpc.watch(pb.WatchRequest(cluster=CLUSTER, version="v1", resource="configmaps")):
            pass
    assert info.value.code is Code.UNAUTHENTICATED


async def test_rejection_leaves_shared_connection_usable(
    make_client: ClientFactory, agent_server: object
) -> None:
    """gRPC over h2c: rejected and accepted calls multiplexed on one connection."""
    import asyncio

    from connectrpc.compat import google_protobuf_binary_codec
    from connectrpc.protocol import ProtocolType
    from pyqwest import Client, HTTPTransport, HTTPVersion

    from otterscale.resource.v1.resource_connect import ResourceServiceClient

    transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
    http = Client(transport)
    url = agent_server.url  # type: ignore[attr-defined]
    good = ResourceServiceClient(
        url,
        protocol=ProtocolType.GRPC,
        http_client=http,
        interceptors=[HubSigner(ADMIN)],
        codec=google_protobuf_binary_codec(),
    )
    bad = ResourceServiceClient(
        url, protocol=ProtocolType.GRPC, http_client=http, codec=google_protobuf_binary_codec()
    )
    request = pb.ListRequest(cluster=CLUSTER, version="v1", resource="namespaces")
    try:
        results = await asyncio.gather(
            *[(good if i % 2 else bad).list(request) for i in range(40)], return_exceptions=True
        )
        for i, result in enumerate(results):
            if i % 2:
                assert isinstance(result, pb.ListResponse), result
            else:
                assert isinstance(result, ConnectError), result
                assert result.code is Code.UNAUTHENTICATED, result
    finally:
        await good.close()
        await bad.close()
        await transport.aclose()


def test_identity_cannot_claim_reserved_names() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Identity("system:admin")
    with pytest.raises(ValueError, match="reserved"):
        Identity("mallory", ("system:masters",))
