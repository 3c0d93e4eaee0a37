"""What the hub and the tunnel add to a call: the same Get, ~200 times each way.

1. direct: the kube-apiserver over one kept-alive HTTPS connection, impersonating the user (what
   the agent does on the user's behalf);
2. agent: the agent's own port (no hub, no tunnel), signed as the hub signs;
3. tunnel: the same signed call to the hub's end of the agent's tunnel (chisel only, no hub);
4. hub: the hub's public API with a Keycloak token, through the chisel tunnel to the agent.

Sequential calls on warm connections; p50 and p99 of each and the differences are reported. The
only assertion is a loose sanity bound: this machine is shared, the numbers are the product.
"""

from __future__ import annotations

import http.client
import time
import urllib.parse

import pytest
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import Identity, derive_identity_key, sign_identity
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import System

from .conftest import Hub, Measurements, percentile

pytestmark = pytest.mark.e2e

CALLS = 200
WARMUP = 20


class _Signer:
    """Client interceptor signing each call as the hub would (for the direct-to-agent series)."""

    def __init__(self, identity: Identity, cluster: str, key: bytes) -> None:
        self.identity, self.cluster, self.key = identity, cluster, key

    async def on_start(self, ctx: object) -> None:
        method = f"/{ctx.method.service_name}/{ctx.method.name}"  # type: ignore[attr-defined]
        headers = sign_identity(self.identity, cluster=self.cluster, method=method, key=self.key)
        for name, value in headers.items():
            ctx.request_headers[name] = value  # type: ignore[attr-defined]

    async def on_end(self, token: object, ctx: object, error: Exception | None) -> None:
        return None


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(samples, 50) * 1000, 2),
        "p99_ms": round(percentile(samples, 99) * 1000, 2),
        "mean_ms": round(sum(samples) / len(samples) * 1000, 2),
    }


async def test_added_latency_of_a_get_through_hub_and_tunnel(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    cluster = "east"
    entry = otterscale_system.clusters[cluster]
    cp = entry.control_plane
    assert cp is not None
    cp.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "latency"}, "data": {"k": "v"}},
    )
    subject = hub.subject("alice")
    request = pb.GetRequest(
        cluster=cluster, version="v1", resource="configmaps", namespace=namespace, name="latency"
    )

    # 1. Direct to the kube-apiserver, as the agent would call it for alice.
    server = urllib.parse.urlsplit(cp.server)
    conn = http.client.HTTPSConnection(server.hostname or "127.0.0.1", server.port, context=cp.ssl_context)
    path = f"/api/v1/namespaces/{namespace}/configmaps/latency"
    headers = {"Accept": "application/json", "Impersonate-User": subject, "Impersonate-Group": "team-a"}
    direct: list[float] = []
    try:
        for i in range(WARMUP + CALLS):
            started = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - started
            assert response.status == 200, body[:200]
            if i >= WARMUP:
                direct.append(elapsed)
    finally:
        conn.close()

    # 2. Direct to the agent (no hub, no tunnel), signed like the hub signs; and 3. the same
    # through the tunnel alone (the hub's end of it, 127.0.0.1:<tunnel_port>), without the hub.
    signer = _Signer(Identity(subject, ("team-a",)), cluster, derive_identity_key(cluster, entry.password))
    series: dict[str, list[float]] = {}
    for label, port in (("agent_direct", entry.api_port), ("agent_via_tunnel", entry.tunnel_port)):
        transport = HTTPTransport(http_version=HTTPVersion.HTTP2)
        agent_client = ResourceServiceClient(
            f"http://127.0.0.1:{port}",
            protocol=ProtocolType.CONNECT,
            codec=google_protobuf_binary_codec(),
            http_client=Client(transport),
            interceptors=[signer],
        )
        samples: list[float] = []
        try:
            for i in range(WARMUP + CALLS):
                started = time.perf_counter()
                got = await agent_client.get(request)
                elapsed = time.perf_counter() - started
                assert got.object["data"] == {"k": "v"}
                if i >= WARMUP:
                    samples.append(elapsed)
        finally:
            await agent_client.close()
            await transport.aclose()
        series[label] = samples

    # 4. Through the hub and the tunnel, with alice's token.
    client = hub.client("connect-h2c")
    auth = hub.auth("alice")
    through: list[float] = []
    for i in range(WARMUP + CALLS):
        started = time.perf_counter()
        got = await client.get(request, headers=auth)
        elapsed = time.perf_counter() - started
        assert got.object["data"] == {"k": "v"}
        if i >= WARMUP:
            through.append(elapsed)

    result = {
        "calls": CALLS,
        "direct_kube_apiserver": summary(direct),
        "agent_direct": summary(series["agent_direct"]),
        "agent_via_tunnel": summary(series["agent_via_tunnel"]),
        "hub_tunnel_agent": summary(through),
    }
    result["added_by_hub_and_tunnel_vs_direct"] = {
        key: round(result["hub_tunnel_agent"][key] - result["direct_kube_apiserver"][key], 2)
        for key in ("p50_ms", "p99_ms")
    }
    result["added_by_hub_and_tunnel_vs_agent"] = {
        key: round(result["hub_tunnel_agent"][key] - result["agent_direct"][key], 2)
        for key in ("p50_ms", "p99_ms")
    }
    measurements.record("get_latency", result)
    # Sanity only (shared 2-core machine): a warm Get through everything stays well under a second.
    assert percentile(through, 50) < 0.5
