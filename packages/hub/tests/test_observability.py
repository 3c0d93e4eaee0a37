"""Metrics, gRPC health and reflection (checked with the real grpcurl binary), ListClusters, logs.

All against the ``otterscale server`` process: ``/metrics`` scraped, the access log read from
its JSON log, the chisel server found among its children.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from prometheus_client.parser import text_string_to_metric_families

from otterscale.cluster.v1 import cluster_pb2
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import tool_path

from .conftest import HubEnv, eventually, wait_for

pytestmark = pytest.mark.integration


async def grpcurl(hub_env: HubEnv, *args: str, check: bool = True) -> tuple[int, str, str]:
    """Run grpcurl: flags (``-d``, ``-H``) first, then ``--``, then the verb/method and symbol."""
    address = hub_env.hub.url.removeprefix("http://")
    split = args.index("--") if "--" in args else 0
    flags, rest = args[:split], args[split + 1 :] if "--" in args else args
    proc = await asyncio.create_subprocess_exec(
        str(tool_path("grpcurl")),
        "-plaintext",
        "-max-time",
        "10",
        *flags,
        address,
        *rest,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "")},
    )
    out, err = await proc.communicate()
    code = proc.returncode
    assert code is not None
    if check and code != 0:
        raise AssertionError(f"grpcurl {args} failed ({code}): {err.decode()}")
    return code, out.decode(), err.decode()


async def management_health(hub_env: HubEnv, service: str) -> str:
    """gRPC health ``Check`` of ``service`` at the management address (Connect JSON: it serves no
    reflection for grpcurl)."""
    response = await hub_env.http().post(
        hub_env.hub.management_url + "/grpc.health.v1.Health/Check",
        headers={"content-type": "application/json"},
        content=json.dumps({"service": service}).encode(),
    )
    assert response.status == 200, response.text()
    return str(json.loads(response.text())["status"])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def metrics(hub_env: HubEnv) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await hub_env.http().get(hub_env.hub.management_url + "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text())


async def test_metrics(hub_env: HubEnv) -> None:
    """A fresh hub: every counter below starts at 0."""
    await hub_env.agent("alpha")
    client = hub_env.client()
    await client.get(pb.GetRequest(cluster="alpha", name="x"), headers=hub_env.auth())
    with pytest.raises(ConnectError):
        await client.get(pb.GetRequest(cluster="alpha", name="forbidden"), headers=hub_env.auth())
    with pytest.raises(ConnectError):
        await client.get(pb.GetRequest(cluster="beta", name="x"), headers=hub_env.auth())
    found = await metrics(hub_env)
    rpc = "otterscale_hub_rpc_handled_total"
    service = ("service", "otterscale.resource.v1.ResourceService")
    assert found[(rpc, (("code", "ok"), ("method", "Get"), service))] == 1
    assert found[(rpc, (("code", "permission_denied"), ("method", "Get"), service))] == 1
    assert found[(rpc, (("code", "unavailable"), ("method", "Get"), service))] == 1
    histogram = "otterscale_hub_rpc_duration_seconds_count"
    assert found[(histogram, (("code", "ok"), ("method", "Get"), service))] == 1
    assert found[("otterscale_hub_tunnel_up", (("cluster", "alpha"),))] == 1
    assert found[("otterscale_hub_tunnel_up", (("cluster", "beta"),))] == 0
    assert found[("otterscale_hub_tunnel_last_seen_timestamp_seconds", (("cluster", "alpha"),))] > 0
    assert found[("otterscale_hub_watch_streams_active", (("cluster", "alpha"),))] == 0
    assert found[("otterscale_hub_chisel_up", ())] == 1
    assert found[("otterscale_hub_chisel_restarts_total", ())] == 0
    roundtrip = "otterscale_hub_agent_roundtrip_seconds_count"
    assert found[(roundtrip, (("cluster", "alpha"), ("method", "Get")))] == 2
    # The prober pings every agent (at once when its tunnel opens, then every 5 s).
    await wait_for(lambda: hub_env.agents["alpha"].pings > 0, 15, "a probe")
    found = await metrics(hub_env)
    assert found[(roundtrip, (("cluster", "alpha"), ("method", "ping")))] >= 1
    assert any(name == "otterscale_hub_info" for name, _ in found)


async def test_health_and_readiness_endpoints(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    http = hub_env.http()
    assert (await http.get(hub_env.hub.url + "/healthz")).status == 200
    assert (await http.get(hub_env.hub.url + "/readyz")).status == 200
    assert (await http.get(hub_env.hub.url + "/nope")).status == 404
    # /metrics is on the management address only (it names every cluster).
    assert (await http.get(hub_env.hub.url + "/metrics")).status == 404
    assert (await http.post(hub_env.hub.management_url + "/metrics", content=b"x")).status == 405


async def test_grpc_health_with_grpcurl(hub_env: HubEnv) -> None:
    _, out, _ = await grpcurl(hub_env, "grpc.health.v1.Health/Check")
    assert json.loads(out) == {"status": "SERVING"}
    _, out, _ = await grpcurl(
        hub_env,
        "-d",
        '{"service": "otterscale.resource.v1.ResourceService"}',
        "--",
        "grpc.health.v1.Health/Check",
    )
    assert json.loads(out) == {"status": "SERVING"}
    # Per cluster (the management address only): beta has no agent.
    code, _, err = await grpcurl(
        hub_env,
        "-d",
        '{"service": "otterscale.cluster.v1.Cluster/beta"}',
        "--",
        "grpc.health.v1.Health/Check",
        check=False,
    )
    assert code != 0  # the API address does not tell which clusters exist
    assert "NotFound" in err
    assert await management_health(hub_env, "otterscale.cluster.v1.Cluster/beta") == "NOT_SERVING"
    await hub_env.agent("alpha")
    assert await management_health(hub_env, "otterscale.cluster.v1.Cluster/alpha") == "SERVING"
    code, _, err = await grpcurl(
        hub_env, "-d", '{"service": "no.such.Service"}', "--", "grpc.health.v1.Health/Check", check=False
    )
    assert code != 0
    assert "NotFound" in err


async def test_grpc_health_reflects_the_tunnel_server(hub_env: HubEnv) -> None:
    chisel = hub_env.hub.chisel_pid()
    assert chisel is not None
    # Stop chisel from coming back quickly: SIGSTOP would hang it; instead watch the status flip
    # while it restarts.
    seen: list[str] = []

    async def watch() -> None:
        proc = await asyncio.create_subprocess_exec(
            str(tool_path("grpcurl")),
            "-plaintext",
            "-max-time",
            "20",
            hub_env.hub.url.removeprefix("http://"),
            "grpc.health.v1.Health/Watch",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        buffer = ""
        try:
            while len(seen) < 3:
                line = await proc.stdout.readline()
                if not line:
                    break
                buffer += line.decode()
                if line.strip() == b"}":
                    seen.append(json.loads(buffer)["status"])
                    buffer = ""
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    task = asyncio.create_task(watch())
    await wait_for(lambda: seen == ["SERVING"], 10, "first status")
    os.kill(chisel, signal.SIGKILL)
    await asyncio.wait_for(task, 20)
    assert seen == ["SERVING", "NOT_SERVING", "SERVING"]


async def test_grpc_reflection_with_grpcurl(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    _, out, _ = await grpcurl(hub_env, "list")
    services = set(out.split())
    assert {
        "otterscale.resource.v1.ResourceService",
        "otterscale.cluster.v1.ClusterService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    } <= services
    _, out, _ = await grpcurl(hub_env, "describe", "otterscale.resource.v1.ResourceService")
    for rpc in ("Discovery", "Schema", "List", "Get", "Create", "Apply", "Delete", "Watch"):
        assert f"rpc {rpc} (" in out
    _, out, _ = await grpcurl(hub_env, "describe", "otterscale.resource.v1.DeleteRequest")
    assert "optional int64 grace_period_seconds = 7" in out


async def test_grpcurl_calls_through_the_hub_with_reflection(hub_env: HubEnv) -> None:
    await hub_env.agent("alpha")
    token = hub_env.issuer.token()
    _, out, _ = await grpcurl(
        hub_env,
        "-H",
        f"authorization: Bearer {token}",
        "--",
        "otterscale.cluster.v1.ClusterService/ListClusters",
    )
    clusters = {c["name"]: c for c in json.loads(out)["clusters"]}
    assert clusters["alpha"]["connected"] is True
    assert "connected" not in clusters["beta"]  # false is the default, omitted in JSON
    request = json.dumps(
        {"cluster": "alpha", "version": "v1", "resource": "configmaps", "name": "via-grpcurl"}
    )
    _, out, _ = await grpcurl(
        hub_env,
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        request,
        "--",
        "otterscale.resource.v1.ResourceService/Get",
    )
    assert json.loads(out)["object"]["metadata"]["name"] == "via-grpcurl"
    code, _, err = await grpcurl(
        hub_env, "-d", request, "--", "otterscale.resource.v1.ResourceService/Get", check=False
    )
    assert code != 0
    assert "Unauthenticated" in err


async def test_list_clusters(hub_env: HubEnv) -> None:
    await hub_env.agent("alpha")

    async def agent_info() -> bool:
        return (await hub_env.clusters())["alpha"].agent_version != ""

    await eventually(agent_info, 15, "agent info")  # asked for as soon as the tunnel opens
    client = hub_env.cluster_client()
    response = await client.list_clusters(cluster_pb2.ListClustersRequest(), headers=hub_env.auth())
    assert [c.name for c in response.clusters] == ["alpha", "beta"]
    alpha, beta = response.clusters
    assert alpha.connected
    assert alpha.tunnel_port == hub_env.specs["alpha"].tunnel_port
    assert alpha.agent_version == "9.9.9-fake"
    assert alpha.kubernetes_version == "v1.36.3-fake"
    assert alpha.agent_address.startswith("127.0.0.1:")
    assert alpha.HasField("since")
    assert alpha.HasField("last_seen")
    assert not beta.connected
    assert beta.tunnel_port == hub_env.specs["beta"].tunnel_port
    assert beta.agent_version == ""
    assert not beta.HasField("last_seen")
    # Disconnect alpha: since moves, the last error says why.
    before = alpha.since.ToNanoseconds()
    await hub_env.disconnect("alpha")
    response = await client.list_clusters(cluster_pb2.ListClustersRequest(), headers=hub_env.auth())
    alpha = response.clusters[0]
    assert not alpha.connected
    assert alpha.since.ToNanoseconds() > before
    assert "tunnel closed" in alpha.last_error
    assert alpha.HasField("last_error_time")
    assert alpha.agent_address == ""


async def test_list_clusters_needs_a_token(shared_hub_env: HubEnv) -> None:
    client = shared_hub_env.cluster_client()
    with pytest.raises(ConnectError) as caught:
        await client.list_clusters(cluster_pb2.ListClustersRequest())
    assert caught.value.code is Code.UNAUTHENTICATED


async def test_access_log_fields_and_no_token(shared_hub_env: HubEnv) -> None:
    """The hub's access log (its JSON log lines of logger ``otterscale.hub.access``): one line per
    call with its fields, and the caller's token nowhere in the whole log."""
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    client = hub_env.client()
    token = hub_env.issuer.token("bob")
    await client.get(
        pb.GetRequest(cluster="alpha", name="x"), headers=hub_env.auth(token, **{"x-request-id": "req-1"})
    )
    with pytest.raises(ConnectError):
        await client.get(
            pb.GetRequest(cluster="alpha", name="x"),
            headers={"authorization": f"Bearer {token}x", "x-request-id": "req-2"},
        )

    def access() -> list[dict[str, Any]]:
        return [r for r in hub_env.hub.log_records() if r.get("logger") == "otterscale.hub.access"]

    await wait_for(lambda: any(r.get("request_id") == "req-2" for r in access()), 10, "both calls logged")
    records = access()
    ok = next(r for r in records if r.get("request_id") == "req-1")
    assert ok["method"] == "/otterscale.resource.v1.ResourceService/Get"
    assert ok["cluster"] == "alpha"
    assert ok["subject"] == "bob"
    assert ok["code"] == "ok"
    assert ok["duration_ms"] > 0
    failed = next(r for r in records if r.get("request_id") == "req-2")
    assert failed["code"] == "unauthenticated"
    log = hub_env.hub.log()
    assert token not in log
    assert token[:40] not in log


async def test_one_connection_serves_more_than_1000_calls(shared_hub_env: HubEnv) -> None:
    """No GOAWAY or close after 1000 requests (hypercorn's default did that): 1100 calls on one
    connection, over HTTP/2 and over HTTP/1.1 keep-alive.

    Over HTTP/1.1 the test owns the socket, so a close or ``Connection: close`` would show. Over
    HTTP/2 the client would silently open another connection after a GOAWAY, so the hub's access
    log tells: every one of these calls came from the same peer address.
    """
    from pyqwest import HTTPVersion

    from otterscale.hub._health import HealthCheckRequest, HealthCheckResponse

    hub_env = shared_hub_env
    body = HealthCheckRequest().SerializeToString()
    path = "/grpc.health.v1.Health/Check"
    marker = "h2-1100"

    # HTTP/2 (h2c prior knowledge): pyqwest multiplexes everything on one connection.
    http = hub_env.http(HTTPVersion.HTTP2)
    for _ in range(1100):
        response = await http.post(
            hub_env.hub.url + path,
            headers={"content-type": "application/proto", "x-request-id": marker},
            content=body,
        )
        assert response.status == 200
    assert HealthCheckResponse.FromString(response.content).status == 1

    def peers() -> list[Any]:
        return [
            r.get("peer")
            for r in hub_env.hub.log_records()
            if r.get("logger") == "otterscale.hub.access" and r.get("request_id") == marker
        ]

    await wait_for(lambda: len(peers()) == 1100, 30, "every call in the access log")
    assert len(set(peers())) == 1, set(peers())

    # HTTP/1.1 keep-alive on one socket, request after request.
    host, port = hub_env.hub.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/proto\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        for i in range(1100):
            writer.write(request)
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), (i, status)
            length, chunked = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                if name.lower() == "transfer-encoding":
                    chunked = "chunked" in value.lower()
                assert not (name.lower() == "connection" and "close" in value.lower()), i
            if not chunked:
                await reader.readexactly(length)
                continue
            while (size := int((await reader.readline()).strip(), 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("version", ["http1", "h2c"])
async def test_a_unary_answer_declares_its_length(shared_hub_env: HubEnv, version: str) -> None:
    """A one-message answer carries ``Content-Length`` (clients, and the hub reading an agent's
    answer, know its size before reading it), over HTTP/1.1 and h2c alike."""
    from pyqwest import Client, HTTPTransport, HTTPVersion

    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    # A client that takes the answer as it comes (no transparent decompression, which drops the
    # length of what was on the wire).
    transport = HTTPTransport(
        http_version=HTTPVersion.HTTP1 if version == "http1" else HTTPVersion.HTTP2,
        enable_gzip=False,
        enable_brotli=False,
        enable_zstd=False,
    )
    hub_env._transports.append(transport)  # closed with the test's other clients
    http = Client(transport)
    response = await http.post(
        hub_env.hub.url + "/otterscale.resource.v1.ResourceService/Get",
        headers=hub_env.auth(**{"content-type": "application/json"}),
        content=b'{"cluster": "alpha", "version": "v1", "resource": "configmaps", "name": "sized"}',
    )
    assert response.status == 200
    body = bytes(response.content)
    assert json.loads(body)["object"]["metadata"]["name"] == "sized"
    assert response.headers.get("content-length") == str(len(body))
