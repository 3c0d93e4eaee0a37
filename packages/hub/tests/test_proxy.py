"""The ResourceService proxy end to end: client -> hub process -> real chisel tunnel -> fake agent.

The hub is an ``otterscale server`` process; the agent side is the test-only Connect server of
conftest.py (a fake ResourceService behind a real ``chisel client``), which records what reached
it; the real agent is exercised by ``test_limits.py`` and the end-to-end tests in tests/e2e.
Tests that leave the hub as they found it share one hub per module (``shared_hub_env``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
from connectrpc.client import ResponseMetadata
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.common import SUBJECT_HEADER, verify_identity
from otterscale.resource.v1 import resource_pb2 as pb

from .conftest import TRANSPORTS, HubEnv, RawH2, end_of_connect_stream, envelope, eventually, wait_for

pytestmark = pytest.mark.integration


def get(name: str = "demo", cluster: str = "alpha") -> pb.GetRequest:
    return pb.GetRequest(cluster=cluster, version="v1", resource="configmaps", namespace="default", name=name)


#: "At once" for a loaded 2-core CI box: far above any round trip there, far below the 10 s the
#: fake agent takes to answer "slow" (what a deadline that did not reach the agent would wait).
AT_ONCE = 5.0


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("json", [False, True], ids=["binary", "json"])
async def test_get_through_every_protocol_and_codec(
    shared_hub_env: HubEnv, transport: str, json: bool
) -> None:
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client(transport, json=json)
    got = await client.get(get("demo"), headers=hub_env.auth())
    assert got.object["metadata"]["name"] == "demo"
    assert got.object["metadata"]["labels"]["cluster"] == "alpha"
    seen = agent.resources.records[-1]
    assert seen.method == "/otterscale.resource.v1.ResourceService/Get"
    assert seen.subject == "alice"
    # The codec the client chose is what the agent got (the hub forwards bytes, not objects),
    # whatever protocol the hub speaks to the agent.
    content_type = seen.headers["content-type"][0]
    assert content_type.endswith("json" if json else "proto")


async def test_routes_by_cluster(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    alpha = await hub_env.agent("alpha")
    beta = await hub_env.agent("beta")
    client = hub_env.client()
    a = await client.get(get("one", "alpha"), headers=hub_env.auth())
    b = await client.get(get("two", "beta"), headers=hub_env.auth())
    assert a.object["metadata"]["labels"]["cluster"] == "alpha"
    assert b.object["metadata"]["labels"]["cluster"] == "beta"
    assert [r.request.name for r in alpha.resources.records] == ["one"]
    assert [r.request.name for r in beta.resources.records] == ["two"]


async def test_unknown_cluster_is_not_found(shared_hub_env: HubEnv) -> None:
    client = shared_hub_env.client()
    with pytest.raises(ConnectError) as caught:
        await client.get(get(cluster="gamma"), headers=shared_hub_env.auth())
    assert caught.value.code is Code.NOT_FOUND
    assert "'gamma' is not configured" in caught.value.message


async def test_empty_cluster_is_invalid_argument(shared_hub_env: HubEnv) -> None:
    client = shared_hub_env.client()
    with pytest.raises(ConnectError) as caught:
        await client.get(get(cluster=""), headers=shared_hub_env.auth())
    assert caught.value.code is Code.INVALID_ARGUMENT
    assert "alpha, beta" in caught.value.message


async def test_disconnected_cluster_is_unavailable_at_once(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    await hub_env.disconnect("beta")
    client = hub_env.client()
    started = time.perf_counter()
    with pytest.raises(ConnectError) as caught:
        await client.get(get(cluster="beta"), headers=hub_env.auth())
    elapsed = time.perf_counter() - started
    assert caught.value.code is Code.UNAVAILABLE
    # This message comes from the hub's own record of the tunnel: no connection was attempted
    # (that would fail differently, after up to the 3 s connect timeout) and nothing waited for
    # the agent to come back. The bound only catches a wait for it.
    assert "agent of cluster 'beta' is not connected" in caught.value.message
    assert elapsed < AT_ONCE, elapsed


async def test_agent_disconnect_and_reconnect(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    client = hub_env.client("connect-h2c")
    await client.get(get("before"), headers=hub_env.auth())
    await hub_env.disconnect("alpha")
    started = time.perf_counter()
    with pytest.raises(ConnectError) as caught:
        await client.get(get("during"), headers=hub_env.auth())
    assert caught.value.code is Code.UNAVAILABLE
    assert "agent of cluster 'alpha' is not connected" in caught.value.message  # the hub's record
    assert time.perf_counter() - started < AT_ONCE
    status = (await hub_env.clusters())["alpha"]
    assert "tunnel closed" in status.last_error
    await hub_env.agent("alpha")  # reconnects the tunnel
    got = await client.get(get("after"), headers=hub_env.auth())
    assert got.object["metadata"]["name"] == "after"


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "missing credentials"),
        ({"authorization": "Basic YWxpY2U6c2VjcmV0"}, "Bearer scheme"),
        ({"authorization": "Bearer not-a-jwt"}, "not a signed JWT"),
    ],
    ids=["no-token", "basic", "garbage"],
)
async def test_bad_credentials_are_unauthenticated(
    shared_hub_env: HubEnv, headers: dict[str, str], fragment: str
) -> None:
    agent = await shared_hub_env.agent("alpha")
    client = shared_hub_env.client()
    with pytest.raises(ConnectError) as caught:
        await client.get(get(), headers=headers)
    assert caught.value.code is Code.UNAUTHENTICATED
    assert fragment in caught.value.message
    assert agent.resources.records == []


async def test_expired_foreign_and_wrong_audience_tokens(shared_hub_env: HubEnv) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client()
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "expired": hub_env.issuer.token(expires_in=-3600),
        "wrong audience": hub_env.issuer.token(audience="someone-else"),
        "foreign signature": hub_env.issuer.token(key=other_key),
    }
    for what, token in cases.items():
        with pytest.raises(ConnectError) as caught:
            await client.get(get(), headers=hub_env.auth(token))
        assert caught.value.code is Code.UNAUTHENTICATED, what
        assert token not in caught.value.message
    assert agent.resources.records == []


async def test_client_identity_headers_never_reach_the_agent(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client()
    forged = {
        "X-Otterscale-Subject": "mallory",
        "x-otterscale-groups": "system:masters",
        "X-OTTERSCALE-TIMESTAMP": "1",
        "X-Otterscale-Signature": "v1=" + "A" * 43,
        "X-Otterscale-Anything": "smuggled",
        "Impersonate-User": "mallory",
    }
    await client.get(get(), headers=hub_env.auth(**forged))
    seen = agent.resources.records[-1]
    assert seen.subject == "alice"
    assert seen.headers[SUBJECT_HEADER.lower()] == ["alice"]
    assert "x-otterscale-anything" not in seen.headers
    assert "impersonate-user" not in seen.headers
    assert "authorization" not in seen.headers
    for name, values in seen.headers.items():
        assert len(values) == 1, name
        assert "mallory" not in values[0]
        assert "system:masters" not in values[0]
    identity = verify_identity(
        {name: values[0] for name, values in seen.headers.items()},
        cluster="alpha",
        method="/otterscale.resource.v1.ResourceService/Get",
        key=hub_env.specs["alpha"].key,
    )
    assert identity.subject == "alice"
    assert identity.groups == ("developers",)


async def test_agent_codes_and_messages_pass_through(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    for transport in ("connect-h1", "grpc-h2c", "grpcweb-h1"):
        client = hub_env.client(transport)
        with pytest.raises(ConnectError) as caught:
            await client.get(get("forbidden"), headers=hub_env.auth())
        assert caught.value.code is Code.PERMISSION_DENIED
        assert caught.value.message == (
            'configmaps "forbidden" is forbidden: User "alice" cannot get resource "configmaps"'
        )
        with pytest.raises(ConnectError) as caught:
            await client.get(get("missing"), headers=hub_env.auth())
        assert caught.value.code is Code.NOT_FOUND
        assert caught.value.message == 'configmaps "missing" not found'
        with pytest.raises(ConnectError) as caught:
            await client.schema(
                pb.SchemaRequest(cluster="alpha", version="v1", kind="Nope"), headers=hub_env.auth()
            )
        assert caught.value.code is Code.NOT_FOUND
        assert caught.value.message == 'kind "Nope" not found in /v1'


async def test_deadline_propagates_to_the_agent(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client(timeout_ms=400)
    started = time.perf_counter()
    with pytest.raises(ConnectError) as caught:
        await client.get(get("slow"), headers=hub_env.auth())
    elapsed = time.perf_counter() - started
    assert caught.value.code is Code.DEADLINE_EXCEEDED
    assert elapsed < AT_ONCE  # ended by the 400 ms deadline, not by the agent's 10 s answer
    forwarded = int(agent.resources.records[-1].headers["connect-timeout-ms"][0])
    assert 0 < forwarded <= 400


async def test_a_deadline_that_passes_in_the_hub_is_deadline_exceeded(shared_hub_env: HubEnv) -> None:
    # With a few milliseconds the hub's own timer fires while it waits for the agent: the
    # cancelled agent call must not come back as "canceled" (the fuzzer saw that).
    # A raw request: a connectrpc client would give up on its own timer and never show the answer.
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    http = hub_env.http()
    url = hub_env.hub.url + "/otterscale.resource.v1.ResourceService/Get"
    body = b'{"cluster": "alpha", "version": "v1", "resource": "configmaps", "name": "slow"}'
    for timeout_ms in (1, 3, 5, 10, 20, 50, 100):
        headers = hub_env.auth(**{"content-type": "application/json", "connect-timeout-ms": f"{timeout_ms}"})
        response = await http.post(url, headers=headers, content=body)
        answer = response.json()
        assert answer["code"] == "deadline_exceeded", (timeout_ms, answer)


async def test_request_id_is_returned_and_forwarded(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client()
    with ResponseMetadata() as meta:
        await client.get(get(), headers=hub_env.auth(**{"x-request-id": "trace-123"}))
    assert meta.headers.get("x-request-id") == "trace-123"
    assert agent.resources.records[-1].headers["x-request-id"] == ["trace-123"]
    with ResponseMetadata() as meta:
        await client.get(get(), headers=hub_env.auth(**{"x-request-id": "bad id with spaces"}))
    generated = meta.headers.get("x-request-id") or ""
    assert len(generated) == 32
    assert agent.resources.records[-1].headers["x-request-id"] == [generated]


async def test_every_rpc_is_forwarded(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client("connect-h2c")
    auth = hub_env.auth()
    await client.discovery(pb.DiscoveryRequest(cluster="alpha"), headers=auth)
    await client.list(
        pb.ListRequest(cluster="alpha", version="v1", resource="configmaps", limit=3), headers=auth
    )
    await client.get(get(), headers=auth)
    described = await client.describe(
        pb.DescribeRequest(cluster="alpha", version="v1", resource="configmaps", name="d", events_limit=5),
        headers=auth,
    )
    assert (described.resource.object["metadata"]["name"], described.events_error) == ("d", "partial")
    await client.create(pb.CreateRequest(cluster="alpha", manifest=b"kind: ConfigMap"), headers=auth)
    await client.apply(pb.ApplyRequest(cluster="alpha", name="x", manifest=b"{}", force=True), headers=auth)
    await client.delete(pb.DeleteRequest(cluster="alpha", name="x", grace_period_seconds=0), headers=auth)
    methods = [r.method.rsplit("/", 1)[1] for r in agent.resources.records]
    assert methods == ["Discovery", "List", "Get", "Describe", "Create", "Apply", "Delete"]
    assert agent.resources.records[3].request.events_limit == 5
    delete = agent.resources.records[-1].request
    assert delete.HasField("grace_period_seconds")
    assert delete.grace_period_seconds == 0


async def test_big_list_passes_through(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    client = hub_env.client("connect-h2c")
    listed = await client.list(
        pb.ListRequest(cluster="alpha", version="v1", resource="configmaps", limit=5000),
        headers=hub_env.auth(),
    )
    assert len(listed.items) == 5000
    assert listed.ByteSize() > 4 * 1024 * 1024  # above connectrpc's default 4 MiB read limit
    assert listed.items[-1].object["metadata"]["name"] == "cm-4999"


async def test_connections_to_the_agent_stay_warm(shared_hub_env: HubEnv) -> None:
    """Calls reuse the hub's connections to the agent instead of opening one each.

    Counted where they arrive: the fake agent sees one peer per connection the hub opened through
    the tunnel (one chisel channel each). How many the hub keeps (one today) is its business; what
    matters is that 80 calls in two protocols need only a handful, and that calls made once the
    connections are up open no new one.
    """
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    for transport in ("connect-h1", "grpc-h2c"):
        client = hub_env.client(transport)
        await asyncio.gather(*(client.get(get(f"n{i}"), headers=hub_env.auth()) for i in range(20)))
        warm = set(agent.peers)
        before = len(agent.calls)
        for i in range(20):
            await client.get(get(f"s{i}"), headers=hub_env.auth())
        assert {call.peer for call in agent.calls[before:]} <= warm
    assert len(agent.resources.records) == 80
    assert len(agent.peers) <= 4, agent.peers


async def test_watches_never_block_unary_calls(hub_env: HubEnv) -> None:
    """Watches use their own HTTP/2 connections, spread by load; unary calls keep theirs.

    The agent here allows only 2 concurrent streams per connection (the real one: 1000): 8
    Watches need at least 4 connections, and a unary call still goes through while they are all
    open (on a connection full of Watches it would wait for one to end: forever).
    """
    watches_wanted = 8
    agent = await hub_env.agent("alpha", max_streams=2)
    client = hub_env.client("connect-h2c")
    request = pb.WatchRequest(cluster="alpha", version="v1", resource="configmaps", resource_version="1")
    first_events: list[str] = []

    async def consume() -> None:
        async for event in client.watch(request, headers=hub_env.auth()):
            first_events.append(event.resource_version)

    watches = [asyncio.create_task(consume()) for _ in range(watches_wanted)]
    try:
        await wait_for(lambda: len(first_events) == watches_wanted, 30, "every watch started")
        assert len(set(agent.stream_peers)) >= watches_wanted // 2
        got = await asyncio.wait_for(
            client.get(get("while-watching"), headers=hub_env.auth()), 30
        )  # generous for a loaded box; without a free connection it would never come
        assert got.object["metadata"]["name"] == "while-watching"
        assert len(first_events) == watches_wanted  # every Watch still open meanwhile
        assert all(not watch.done() for watch in watches)
    finally:
        for watch in watches:
            watch.cancel()
        await asyncio.gather(*watches, return_exceptions=True)


async def test_watch_streams_events(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    for transport, json_codec in (
        ("connect-h1", False),
        ("connect-h1", True),
        ("grpc-h2c", False),
        ("grpcweb-h1", False),
    ):
        client = hub_env.client(transport, json=json_codec)
        request = pb.WatchRequest(
            cluster="alpha", version="v1", resource="configmaps", resource_version="3", field_selector="ok"
        )
        events = [event async for event in client.watch(request, headers=hub_env.auth())]
        assert [e.resource_version for e in events] == ["100", "101", "102"]
        assert events[0].type == pb.WatchEvent.TYPE_ADDED


async def test_watch_end_with_error_passes_through(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    await hub_env.agent("alpha")
    client = hub_env.client("grpc-h2c")
    request = pb.WatchRequest(
        cluster="alpha", version="v1", resource="configmaps", resource_version="2", field_selector="end"
    )
    received: list[str] = []

    async def consume() -> None:
        async for event in client.watch(request, headers=hub_env.auth()):
            received.append(event.resource_version)

    with pytest.raises(ConnectError) as caught:
        await consume()
    assert received == ["100", "101"]
    assert caught.value.code is Code.UNAVAILABLE
    assert caught.value.message == "the upstream watch closed; resume from 199"


WATCHES = "otterscale_hub_watch_streams_active"


@pytest.mark.parametrize("transport", ["connect-h1", "connect-h2c", "grpc-h2c"])
async def test_client_cancel_closes_the_agent_watch(shared_hub_env: HubEnv, transport: str) -> None:
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client(transport)
    request = pb.WatchRequest(cluster="alpha", version="v1", resource="configmaps", resource_version="1")
    await wait_for(lambda: agent.resources.open_watches == 0, 10, "earlier tests' watches closed")

    async def counted(value: float) -> bool:
        return (await hub_env.metrics()).get(WATCHES, cluster="alpha") == value

    await eventually(lambda: counted(0), 10, "no watch counted")

    async def consume() -> None:
        async for _ in client.watch(request, headers=hub_env.auth()):
            pass

    task = asyncio.create_task(consume())
    await wait_for(agent.resources.watch_open.is_set, 10, "the agent's watch open")
    await eventually(lambda: counted(1), 10, "watch counted")
    task.cancel()
    # connectrpc's client reports its own cancellation as ConnectError(canceled).
    with pytest.raises((asyncio.CancelledError, ConnectError)):
        await task
    await wait_for(lambda: agent.resources.open_watches == 0, 10, "the agent's watch closed")
    await eventually(lambda: counted(0), 10, "watch uncounted")


async def test_agent_death_ends_the_watch_with_unavailable(shared_hub_env: HubEnv) -> None:
    hub_env = shared_hub_env
    agent = await hub_env.agent("alpha")
    client = hub_env.client("connect-h2c")
    request = pb.WatchRequest(cluster="alpha", version="v1", resource="configmaps", resource_version="1")
    received: list[str] = []

    async def consume() -> None:
        async for event in client.watch(request, headers=hub_env.auth()):
            received.append(event.resource_version)

    task = asyncio.create_task(consume())
    await wait_for(lambda: received == ["100"], 10, "first event")
    await agent.disconnect()  # the tunnel goes away under the open stream
    with pytest.raises(ConnectError) as caught:
        await asyncio.wait_for(task, 30)
    assert caught.value.code is Code.UNAVAILABLE
    assert received == ["100"]


async def test_unary_and_watch_while_identity_provider_is_down(hub_env: HubEnv) -> None:
    """A fresh hub has fetched no keys yet (it never contacts the identity provider at start-up);
    with the issuer stopped, a call cannot be verified: unavailable, never a leaked token."""
    await hub_env.agent("alpha")
    token = hub_env.issuer.token()
    hub_env.issuer.stop()
    client = hub_env.client()
    with pytest.raises(ConnectError) as caught:
        await client.get(get(), headers=hub_env.auth(token))
    assert caught.value.code is Code.UNAVAILABLE
    assert token not in caught.value.message
    request = pb.WatchRequest(cluster="alpha", version="v1", resource="configmaps", resource_version="1")
    with pytest.raises(ConnectError) as caught:
        async for _ in hub_env.client("connect-h2c").watch(request, headers=hub_env.auth(token)):
            pass
    assert caught.value.code is Code.UNAVAILABLE
    assert token not in caught.value.message
    assert hub_env.agents["alpha"].resources.records == []


async def test_a_draining_hub_refuses_new_watches(hub_env: HubEnv) -> None:
    """After SIGTERM the hub drains: a Watch that reaches it now is refused at once with
    unavailable, telling the client to resume from its last resourceVersion, and never reaches
    the agent (it would stream until the server stops, and then end without that advice).

    The Watch's headers go out before the SIGTERM (a PING's answer shows the hub has them: HTTP/2
    handles a connection's frames in order), its message after the hub has said it drains: a
    gRPC health Watch on the same connection turns NOT_SERVING first thing on shutdown.
    """
    from otterscale.hub._health import HealthCheckRequest, HealthCheckResponse

    agent = await hub_env.agent("alpha")
    hub = hub_env.hub

    def statuses(body: bytes) -> list[int]:
        found = []
        while len(body) >= 5:
            size = int.from_bytes(body[1:5], "big")
            found.append(HealthCheckResponse.FromString(body[5 : 5 + size]).status)
            body = body[5 + size :]
        return found

    async with RawH2(hub.port, hub_env.issuer.token) as conn:
        health = conn.request("/grpc.health.v1.Health/Watch", "application/grpc", te="trailers")
        await conn.send_data(health, envelope(HealthCheckRequest().SerializeToString()), end=True)
        await conn.wait(lambda: statuses(conn.streams[health].body) == [1], 30)  # SERVING
        watch = conn.request("/otterscale.resource.v1.ResourceService/Watch", "application/connect+json")
        await conn.ping()
        os.kill(hub.pid, signal.SIGTERM)  # as Kubernetes does: to the hub alone
        await conn.wait(lambda: 2 in statuses(conn.streams[health].body), 30)  # NOT_SERVING
        request = {"cluster": "alpha", "version": "v1", "resource": "configmaps", "resourceVersion": "1"}
        await conn.send_data(watch, envelope(json.dumps(request).encode()), end=True)
        await conn.wait(lambda: conn.streams[watch].ended, 30)
        answer = conn.streams[watch]
    assert answer.status == 200
    assert not answer.reset
    assert answer.body[:1] == b"\x02", bytes(answer.body[:200])  # the end of the stream first: no event
    error = end_of_connect_stream(bytes(answer.body))["error"]
    assert error["code"] == "unavailable"
    assert error["message"] == "the hub is shutting down; retry the Watch from the last resourceVersion"
    assert not any(r.method.endswith("/Watch") for r in agent.resources.records)
    assert await hub.exited() == 0
