"""Generic routing: a service the hub has no code for, forwarded from its descriptor alone.

The service is the test-only EchoService (``packages/testing/proto``): unary ``Say``,
server-streaming ``Count``, client-streaming ``Collect`` and bidirectional ``Chat`` (both routed by
their first message's ``start.cluster``), and ``Write``, routed by a self-routing session id. The
hub is an ``otterscale server`` process told only its descriptor (``otterscale.testing``'s
launcher: ``HubProcess(routed_services=[ECHO_ROUTE])``); each cluster's agent is an
:class:`~otterscale.testing.EchoAgent` (connectrpc's generated application, checking the hub's
signed identity) behind a real chisel tunnel to the hub's real chisel server. Clients are
connectrpc's own (pyqwest), in every protocol. A hub and its agents serve a whole module (each
test starts with empty records); a test that stops its hub gets its own.

Full duplex is shown by a bidirectional call whose client sends each message only after it has
received the answer to the previous one: that can only finish if every hop (client -> hub ->
chisel -> agent and back) passes messages on while the request stream is still open.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import ChiselBinary
from otterscale.testing import ECHO_ROUTE, ControlPlane, EchoAgent, HubProcess, Metrics, free_port
from otterscale.testing.echo.v1 import echo_pb2 as pb
from otterscale.testing.echo.v1.echo_connect import EchoServiceClient

from .conftest import (
    ClusterSpec,
    Issuer,
    Replicas,
    eventually,
    make_specs,
    start_world,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

#: Every protocol a client may speak; bidirectional streams need HTTP/2 (see BIDI_TRANSPORTS).
TRANSPORTS: dict[str, tuple[ProtocolType, Any]] = {
    "connect-h1": (ProtocolType.CONNECT, HTTPVersion.HTTP1),
    "connect-h2c": (ProtocolType.CONNECT, HTTPVersion.HTTP2),
    "grpc-h2c": (ProtocolType.GRPC, HTTPVersion.HTTP2),
    "grpcweb-h1": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP1),
    "grpcweb-h2c": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP2),
}
BIDI_TRANSPORTS = sorted(name for name, (_, version) in TRANSPORTS.items() if version is HTTPVersion.HTTP2)
#: How long a full-duplex client waits for each answer before it gives up: generous, because the
#: CI machine is a loaded 2-core box; a half-duplex hop would make it wait forever.
ANSWER_WAIT = 30.0
#: The echo hubs' request limit: small, so a test can send a stream larger than it in total.
MAX_REQUEST = 64 * 1024
MAX_STREAMS = 3
LIMITS = {"max_request_bytes": MAX_REQUEST, "max_watches_per_subject": MAX_STREAMS}
SESSION_TAIL = "A" * 22
STREAMS = "otterscale_hub_watch_streams_active"
#: The request id of the calls that wait for a follower to forward (an audit trail may show them).
FORWARDING_PROBE = "forwarding-probe"


@dataclass
class EchoSystem:
    """Hub processes that know EchoService only by its descriptor, and an echo agent per cluster."""

    issuer: Issuer
    specs: dict[str, ClusterSpec]
    hubs: dict[str, HubProcess]
    agents: dict[str, EchoAgent]
    transports: list[HTTPTransport] = field(default_factory=list)
    start: dict[str, Metrics] = field(default_factory=dict)

    def client(
        self,
        hub: str = "a",
        transport: str = "connect-h2c",
        *,
        json: bool = False,
        timeout_ms: int | None = None,
    ) -> EchoServiceClient:
        protocol, version = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        self.transports.append(http)
        return EchoServiceClient(
            self.hubs[hub].url,
            protocol=protocol,
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            http_client=Client(http),
            timeout_ms=timeout_ms,
        )

    def http(self, version: Any = HTTPVersion.HTTP1) -> Client:
        transport = HTTPTransport(http_version=version)
        self.transports.append(transport)
        return Client(transport)

    def auth(self, subject: str = "alice") -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(subject)}"}

    async def mark(self) -> None:
        """Counters from now on; the agents' records start empty."""
        self.start = {name: await hub.ametrics() for name, hub in self.hubs.items()}
        for agent in self.agents.values():
            agent.service.events.clear()

    async def forwarded(self, hub: str, method: str) -> float:
        """``method`` calls ``hub`` forwarded to the leader (ok) since :meth:`mark`."""
        labels = {"service": "otterscale.testing.echo.v1.EchoService", "method": method, "code": "ok"}
        name = "otterscale_hub_forwarded_rpcs_total"
        return (await self.hubs[hub].ametrics()).get(name, **labels) - self.start[hub].get(name, **labels)

    async def open_streams(self, hub: str = "a") -> float:
        """Streams ``hub`` holds open to the agents right now (its gauge, every cluster)."""
        return (await self.hubs[hub].ametrics()).total(STREAMS)

    async def close(self) -> None:
        for transport in self.transports:
            await transport.aclose()
        self.transports.clear()


def start_echo_hub(
    directory: Path, issuer: Issuer, binary: ChiselBinary, *, audit: dict[str, Any] | None = None
) -> tuple[Any, dict[str, EchoAgent]]:
    """A hub alone that forwards EchoService, and echo agents of alpha and beta (blocking);
    ``audit``: the configuration's audit section."""
    world = start_world(directory, issuer, binary, limits=LIMITS, audit=audit, routed_services=(ECHO_ROUTE,))
    agents: dict[str, EchoAgent] = {}
    try:
        for cluster in ("alpha", "beta"):
            spec = world.specs[cluster]
            agent = agents[cluster] = EchoAgent(cluster, key=spec.key, chisel=binary)
            agent.serve()
            agent.dial(
                f"http://127.0.0.1:{world.tunnel_port}",
                world.hub.fingerprint,
                user=spec.user,
                password=spec.password,
                tunnel_port=spec.tunnel_port,
            )
            world.hub.wait_until(lambda cluster=cluster: world.hub.connected(cluster), 30, f"{cluster} up")  # type: ignore[misc]
    except BaseException:
        for agent in agents.values():
            agent.shutdown()
        world.hub.stop()
        raise
    return world, agents


def stop_echo_hub(world: Any, agents: dict[str, EchoAgent]) -> None:
    for agent in agents.values():
        agent.shutdown()
    world.hub.stop()


@pytest.fixture(scope="module")
def echo_hub(
    tmp_path_factory: pytest.TempPathFactory, module_issuer: Issuer, chisel_binary: ChiselBinary
) -> Iterator[tuple[Any, dict[str, EchoAgent]]]:
    world, agents = start_echo_hub(tmp_path_factory.mktemp("echo"), module_issuer, chisel_binary)
    try:
        yield world, agents
    finally:
        stop_echo_hub(world, agents)


@pytest_asyncio.fixture
async def echo(echo_hub: tuple[Any, dict[str, EchoAgent]]) -> AsyncIterator[EchoSystem]:
    """The module's hub alone (``a``) that forwards EchoService; echo agents of alpha and beta."""
    world, agents = echo_hub
    system = EchoSystem(world.issuer, world.specs, {"a": world.hub}, agents)
    await system.mark()
    try:
        yield system
    finally:
        await system.close()


@pytest_asyncio.fixture
async def own_echo(tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary) -> AsyncIterator[EchoSystem]:
    """Like ``echo``, with a hub for this test alone."""
    world, agents = start_echo_hub(tmp_path, issuer, chisel_binary)
    system = EchoSystem(world.issuer, world.specs, {"a": world.hub}, agents)
    await system.mark()
    try:
        yield system
    finally:
        await system.close()
        await asyncio.to_thread(stop_echo_hub, world, agents)


def start_echo_replicas(
    cp: ControlPlane,
    issuer: Issuer,
    binary: ChiselBinary,
    directory: Path,
    *,
    audit: dict[str, Any] | None = None,
) -> Replicas:
    """Hub ``a`` leads (tunnels, agents), hub ``b`` follows (forwards every call to ``a``)."""
    replicas = Replicas(
        cp, issuer, binary, directory, limits=LIMITS, audit=audit, routed_services=(ECHO_ROUTE,)
    )
    agents = [EchoAgent(name, key=spec.key, chisel=binary) for name, spec in replicas.specs.items()]
    return replicas.start_leader_and_follower(*agents)


async def replicas_system(replicas: Replicas) -> EchoSystem:
    agents = {name: agent for name, agent in replicas.agents.items() if isinstance(agent, EchoAgent)}
    system = EchoSystem(replicas.issuer, replicas.specs, replicas.hubs, agents)
    for cluster in agents:
        await replicas.leader_sees(cluster)

    async def forwarding() -> bool:
        try:
            await system.client("b").say(
                pb.SayRequest(cluster="alpha", text="up?"),
                headers={**system.auth(), "x-request-id": FORWARDING_PROBE},
            )
        except ConnectError:
            return False
        return True

    await eventually(forwarding, 60, "b forwarding to a")
    await system.mark()
    return system


@pytest.fixture(scope="module")
def shared_echo_replicas(
    control_plane: ControlPlane,
    module_issuer: Issuer,
    chisel_binary: ChiselBinary,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replicas]:
    replicas = start_echo_replicas(
        control_plane, module_issuer, chisel_binary, tmp_path_factory.mktemp("echo-replicas")
    )
    try:
        yield replicas
    finally:
        replicas.stop_blocking()


@pytest_asyncio.fixture
async def echo_replicas(shared_echo_replicas: Replicas) -> AsyncIterator[EchoSystem]:
    """Hub ``a`` leads (tunnels, agents), hub ``b`` follows (forwards every call to ``a``)."""
    shared_echo_replicas.follow("a")
    system = await replicas_system(shared_echo_replicas)
    try:
        yield system
    finally:
        await system.close()


def start(cluster: str = "alpha") -> pb.ChatRequest:
    return pb.ChatRequest(start=pb.Start(cluster=cluster))


async def texts(*items: str, cluster: str = "alpha") -> AsyncIterator[pb.CollectRequest]:
    yield pb.CollectRequest(start=pb.Start(cluster=cluster))
    for item in items:
        yield pb.CollectRequest(text=item)


async def full_duplex_chat(
    client: EchoServiceClient, headers: dict[str, str], rounds: int = 4, cluster: str = "alpha"
) -> list[str]:
    """A Chat whose client sends each message only after the answer to the previous one arrived.

    Returns the answers. Through any hop that holds the request stream back until it ends (half
    duplex), the first wait for an answer times out and the call fails.
    """
    answers: asyncio.Queue[str] = asyncio.Queue()
    stalled: list[int] = []

    async def requests() -> AsyncIterator[pb.ChatRequest]:
        yield start(cluster)
        for index in range(rounds + 1):
            try:
                previous = await asyncio.wait_for(answers.get(), ANSWER_WAIT)
            except TimeoutError:
                stalled.append(index)
                raise
            if index < rounds:
                yield pb.ChatRequest(text=f"{index + 1} after {previous}")
        # The last answer arrived: half-close, and the agent ends the call.

    got: list[str] = []
    try:
        async for answer in client.chat(requests(), headers=headers):
            got.append(answer.text)
            answers.put_nowait(answer.text)
    except ConnectError:
        if stalled:
            raise AssertionError(
                f"no answer to message {stalled[0]} within {ANSWER_WAIT:g}s while the request stream "
                f"was open (answers so far: {got}): a hop is not full duplex"
            ) from None
        raise
    return got


EXPECTED_CHAT = ["started", "1 after started", "2 after 1 after started"]


# --------------------------------------------------------------------------------------------------
# The four call shapes, every protocol and codec


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("json_codec", [False, True], ids=["binary", "json"])
async def test_unary_server_and_client_streams_in_every_protocol(
    echo: EchoSystem, transport: str, json_codec: bool
) -> None:
    client = echo.client(transport=transport, json=json_codec)
    said = await client.say(pb.SayRequest(cluster="beta", text="hello"), headers=echo.auth())
    assert (said.text, said.origin.cluster, said.origin.subject) == ("hello", "beta", "alice")

    counted = [m async for m in client.count(pb.CountRequest(cluster="alpha", count=3), headers=echo.auth())]
    assert [(m.index, m.origin.cluster) for m in counted] == [(0, "alpha"), (1, "alpha"), (2, "alpha")]

    collected = await client.collect(texts("a", "b", "c", cluster="beta"), headers=echo.auth("bob"))
    assert (list(collected.texts), collected.origin.cluster, collected.origin.subject) == (
        ["a", "b", "c"],
        "beta",
        "bob",
    )
    # Each call reached the agent it named, signed for that agent and that procedure, in the codec
    # the client chose (the hub passes message bytes on, it does not re-encode them).
    for cluster, method in (("beta", "Say"), ("alpha", "Count"), ("beta", "Collect")):
        [call] = echo.agents[cluster].service.calls(method)
        assert call.headers["content-type"][0].endswith("json" if json_codec else "proto"), call.headers
        assert "authorization" not in call.headers
    assert not echo.agents["alpha"].service.calls("Say")


@pytest.mark.parametrize("transport", BIDI_TRANSPORTS)
@pytest.mark.parametrize("json_codec", [False, True], ids=["binary", "json"])
async def test_bidi_is_full_duplex_end_to_end(echo: EchoSystem, transport: str, json_codec: bool) -> None:
    """client <-> hub <-> chisel <-> agent over HTTP/2: an answer arrives while the client still
    holds its next message (the verdict that lets RuntimeService ship Exec/PortForwardStream)."""
    got = await full_duplex_chat(echo.client(transport=transport, json=json_codec), echo.auth(), rounds=2)
    assert got == EXPECTED_CHAT
    service = echo.agents["alpha"].service
    chat = [(e.kind, e.text) for e in service.events if e.method == "Chat" and e.kind != "call"]
    # The agent answered each message before the next one reached it.
    assert chat == [(kind, text) for text in EXPECTED_CHAT for kind in ("received", "sent")]
    assert not echo.agents["beta"].service.calls("Chat")


async def test_bidi_over_http1_is_half_duplex_but_works(echo: EchoSystem) -> None:
    """HTTP/1.1 cannot interleave: the request goes first, whole, then every answer."""

    async def requests() -> AsyncIterator[pb.ChatRequest]:
        yield start("beta")
        yield pb.ChatRequest(text="one")
        yield pb.ChatRequest(text="two")

    client = echo.client(transport="connect-h1")
    got = [answer.text async for answer in client.chat(requests(), headers=echo.auth())]
    assert got == ["started", "one", "two"]


# --------------------------------------------------------------------------------------------------
# Routing errors


async def test_a_request_stream_is_routed_by_its_first_message(echo: EchoSystem) -> None:
    client = echo.client()

    async def no_start() -> AsyncIterator[pb.ChatRequest]:
        yield pb.ChatRequest(text="hello")

    with pytest.raises(ConnectError) as caught:
        [m async for m in client.chat(no_start(), headers=echo.auth())]
    assert caught.value.code is Code.INVALID_ARGUMENT
    assert caught.value.message == (
        "the request's start.cluster field is empty; configured clusters: alpha, beta"
    )

    with pytest.raises(ConnectError) as caught:
        [m async for m in client.chat(iter_of(start("gamma")), headers=echo.auth())]
    assert caught.value.code is Code.NOT_FOUND
    assert "'gamma' is not configured" in caught.value.message

    with pytest.raises(ConnectError) as caught:
        await client.collect(iter_of(), headers=echo.auth())
    assert caught.value.code is Code.INVALID_ARGUMENT
    assert "ended before its first message" in caught.value.message

    assert not any(agent.service.calls("Chat") for agent in echo.agents.values())


async def test_streams_are_authenticated_before_anything_is_read_or_forwarded(echo: EchoSystem) -> None:
    client = echo.client()
    for headers in ({}, {"authorization": "Bearer not-a-jwt"}):
        with pytest.raises(ConnectError) as caught:
            [m async for m in client.chat(iter_of(start()), headers=headers)]
        assert caught.value.code is Code.UNAUTHENTICATED
        with pytest.raises(ConnectError) as caught:
            await client.collect(texts("x"), headers=headers)
        assert caught.value.code is Code.UNAUTHENTICATED
    assert not any(event.kind == "call" for agent in echo.agents.values() for event in agent.service.events)


async def test_agent_errors_and_deadlines_pass_through(echo: EchoSystem) -> None:
    client = echo.client(transport="grpc-h2c")
    with pytest.raises(ConnectError) as caught:
        await client.say(pb.SayRequest(cluster="alpha", text="fail:permission_denied"), headers=echo.auth())
    assert caught.value.code is Code.PERMISSION_DENIED
    assert caught.value.message == "asked to fail with permission_denied"
    with pytest.raises(ConnectError) as caught:
        await client.say(pb.SayRequest(cluster="alpha", text="sleep:10"), headers=echo.auth(), timeout_ms=300)
    assert caught.value.code is Code.DEADLINE_EXCEEDED


# --------------------------------------------------------------------------------------------------
# Self-routing session ids


@pytest.mark.parametrize("json_codec", [False, True], ids=["binary", "json"])
async def test_write_follows_its_session_id_to_the_agent_that_made_it(
    echo: EchoSystem, json_codec: bool
) -> None:
    client = echo.client(transport="connect-h1", json=json_codec)
    sessions = {}
    for cluster in ("alpha", "beta"):
        said = await client.say(pb.SayRequest(cluster=cluster, text="open"), headers=echo.auth())
        assert said.session_id.startswith(f"{cluster}.")
        assert len(said.session_id) == len(cluster) + 23
        sessions[cluster] = said.session_id
    for cluster, session in sessions.items():
        wrote = await client.write(pb.WriteRequest(session_id=session, text="hi"), headers=echo.auth())
        assert (wrote.text, wrote.origin.cluster) == ("hi", cluster)
    # A session id names its cluster; the agent there decides whether the session is the caller's.
    with pytest.raises(ConnectError) as caught:
        await client.write(pb.WriteRequest(session_id=sessions["alpha"]), headers=echo.auth("mallory"))
    assert caught.value.code is Code.NOT_FOUND
    assert [len(echo.agents[c].service.calls("Write")) for c in ("alpha", "beta")] == [2, 1]


@pytest.mark.parametrize(
    "session_id",
    [
        "alpha",
        "alpha.",
        ".AAAAAAAAAAAAAAAAAAAAAA",
        "alpha.short",
        "alpha.AAAAAAAAAAAAAAAAAAAAAAA",  # 23 characters
        "alpha.AAAAAAAAAAAAAAAAAAAA+/",  # not base64url
        "Alpha.AAAAAAAAAAAAAAAAAAAAAA",  # not a DNS label
        "al.pha.AAAAAAAAAAAAAAAAAAAAAA",
        "-alpha.AAAAAAAAAAAAAAAAAAAAAA",
    ],
)
@pytest.mark.parametrize("json_codec", [False, True], ids=["binary", "json"])
async def test_malformed_session_ids_are_invalid_argument_and_never_echoed(
    echo: EchoSystem, session_id: str, json_codec: bool
) -> None:
    client = echo.client(json=json_codec)
    with pytest.raises(ConnectError) as caught:
        await client.write(pb.WriteRequest(session_id=session_id), headers=echo.auth())
    assert caught.value.code is Code.INVALID_ARGUMENT
    assert caught.value.message == (
        "the request's session_id is not a session id (<cluster>.<22 base64url characters>)"
    )
    assert not any(agent.service.calls("Write") for agent in echo.agents.values())


async def test_empty_and_unknown_session_ids(echo: EchoSystem) -> None:
    client = echo.client()
    with pytest.raises(ConnectError) as caught:
        await client.write(pb.WriteRequest(text="no session"), headers=echo.auth())
    assert (caught.value.code, caught.value.message) == (
        Code.INVALID_ARGUMENT,
        "the request's session_id is empty",
    )
    with pytest.raises(ConnectError) as caught:
        await client.write(pb.WriteRequest(session_id=f"gamma.{SESSION_TAIL}"), headers=echo.auth())
    assert caught.value.code is Code.NOT_FOUND
    assert caught.value.message == "cluster 'gamma' is not configured in this hub"
    assert SESSION_TAIL not in caught.value.message


async def test_session_id_in_json_by_either_name_but_not_both(echo: EchoSystem) -> None:
    said = await echo.client().say(pb.SayRequest(cluster="beta", text="open"), headers=echo.auth())
    http = echo.http()
    url = f"{echo.hubs['a'].url}/otterscale.testing.echo.v1.EchoService/Write"
    headers = {**echo.auth(), "content-type": "application/json"}
    for body in ({"sessionId": said.session_id}, {"session_id": said.session_id}):
        response = await http.post(url, headers=headers, content=json.dumps(body).encode())
        assert response.status == 200, response.content
        assert json.loads(response.content)["origin"]["cluster"] == "beta"
    both = {"sessionId": said.session_id, "session_id": said.session_id}
    response = await http.post(url, headers=headers, content=json.dumps(both).encode())
    assert response.status == 400
    assert json.loads(response.content) == {
        "code": "invalid_argument",
        "message": "the request sets sessionId and session_id; set one",
    }


# --------------------------------------------------------------------------------------------------
# Limits, shutdown


async def test_request_streams_are_bounded_per_message_not_in_total(echo: EchoSystem) -> None:
    client = echo.client()
    # Twelve 8 KiB messages: 96 KiB in all, over the 64 KiB limit, each message far under it.
    chunks = [f"{i:02d}" + "x" * (8 * 1024) for i in range(12)]
    collected = await client.collect(texts(*chunks), headers=echo.auth())
    assert list(collected.texts) == chunks
    # One message over the limit ends the call, whatever came before it.
    with pytest.raises(ConnectError) as caught:
        await client.collect(texts("small", "y" * (MAX_REQUEST + 1)), headers=echo.auth())
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert "limits.max_request_bytes" in caught.value.message


async def test_every_kind_of_stream_takes_a_slot(echo: EchoSystem) -> None:
    client = echo.client()
    answers: asyncio.Queue[str] = asyncio.Queue()
    release = asyncio.Event()

    async def open_chat() -> None:
        async def requests() -> AsyncIterator[pb.ChatRequest]:
            yield start()
            await release.wait()

        async for answer in client.chat(requests(), headers=echo.auth()):
            answers.put_nowait(answer.text)

    async def open_count() -> None:
        async for answer in client.count(
            pb.CountRequest(cluster="beta", count=1, hold=True), headers=echo.auth()
        ):
            answers.put_nowait(str(answer.index))

    tasks = [
        asyncio.create_task(open_chat()),
        asyncio.create_task(open_chat()),
        asyncio.create_task(open_count()),
    ]
    try:
        for _ in range(MAX_STREAMS):
            await asyncio.wait_for(answers.get(), ANSWER_WAIT)
        with pytest.raises(ConnectError) as caught:
            [m async for m in client.chat(iter_of(start()), headers=echo.auth())]
        assert caught.value.code is Code.RESOURCE_EXHAUSTED
        assert caught.value.message == (
            f"too many concurrent Chat streams for this caller: the hub's limit is {MAX_STREAMS} per "
            "subject (limits.max_watches_per_subject in otterscale.yaml); close one first"
        )
        # Another subject has slots of its own.
        collected = await client.collect(texts("x"), headers=echo.auth("bob"))
        assert list(collected.texts) == ["x"]
    finally:
        release.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def closed() -> bool:
        return await echo.open_streams() == 0

    await eventually(closed, 30, "the streams closed")
    # Their slots were freed: the caller holds as many streams again.
    again = asyncio.Event()
    answered = 0

    async def hold_chat() -> None:
        nonlocal answered

        async def requests() -> AsyncIterator[pb.ChatRequest]:
            yield start()
            await again.wait()

        async for _answer in client.chat(requests(), headers=echo.auth()):
            answered += 1

    tasks = [asyncio.create_task(hold_chat()) for _ in range(MAX_STREAMS)]
    try:
        await wait_for(lambda: answered == MAX_STREAMS, ANSWER_WAIT, "every slot free again")
    finally:
        again.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await eventually(closed, 30, "the streams closed again")


async def test_open_streams_end_with_unavailable_when_the_hub_stops(own_echo: EchoSystem) -> None:
    echo = own_echo
    client = echo.client(transport="grpc-h2c")
    answered = asyncio.Event()
    release = asyncio.Event()

    async def requests() -> AsyncIterator[pb.ChatRequest]:
        yield start()
        await release.wait()

    async def chat() -> None:
        async for _answer in client.chat(requests(), headers=echo.auth()):
            answered.set()

    task = asyncio.create_task(chat())
    try:
        await asyncio.wait_for(answered.wait(), ANSWER_WAIT)
        os.kill(echo.hubs["a"].pid, signal.SIGTERM)
        with pytest.raises(ConnectError) as caught:
            await asyncio.wait_for(task, ANSWER_WAIT)
        assert await echo.hubs["a"].exited() == 0
    finally:
        release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert caught.value.code is Code.UNAVAILABLE
    assert caught.value.message == "the hub is shutting down; resume the Chat call"
    service = echo.agents["alpha"].service
    await wait_for(lambda: service.open_streams == 0, 10, "the agent's Chat ended")


# --------------------------------------------------------------------------------------------------
# Through a follower


@pytest.mark.ha
@pytest.mark.parametrize("transport", ["connect-h2c", "grpc-h2c"])
async def test_a_follower_forwards_every_call_shape(echo_replicas: EchoSystem, transport: str) -> None:
    client = echo_replicas.client("b", transport)
    auth = echo_replicas.auth
    said = await client.say(pb.SayRequest(cluster="alpha", text="via b"), headers=auth())
    assert (said.text, said.origin.cluster, said.origin.subject) == ("via b", "alpha", "alice")
    counted = [m.index async for m in client.count(pb.CountRequest(cluster="beta", count=2), headers=auth())]
    assert counted == [0, 1]
    collected = await client.collect(texts("p", "q", cluster="beta"), headers=auth())
    assert list(collected.texts) == ["p", "q"]
    wrote = await client.write(pb.WriteRequest(session_id=said.session_id, text="w"), headers=auth())
    assert wrote.origin.cluster == "alpha"
    assert await full_duplex_chat(client, auth(), rounds=2) == EXPECTED_CHAT
    # The follower forwarded each call, the leader routed it.
    for method in ("Say", "Count", "Collect", "Write", "Chat"):
        assert await echo_replicas.forwarded("b", method) == 1, method


@pytest.mark.ha
async def test_a_follower_passes_routing_errors_from_the_leader(echo_replicas: EchoSystem) -> None:
    client = echo_replicas.client("b")
    with pytest.raises(ConnectError) as caught:
        await client.write(pb.WriteRequest(session_id="alpha.nope"), headers=echo_replicas.auth())
    assert caught.value.code is Code.INVALID_ARGUMENT
    with pytest.raises(ConnectError) as caught:
        [m async for m in client.chat(iter_of(start("gamma")), headers=echo_replicas.auth())]
    assert caught.value.code is Code.NOT_FOUND
    with pytest.raises(ConnectError) as caught:
        await client.collect(texts("y" * (MAX_REQUEST + 1)), headers=echo_replicas.auth())
    assert caught.value.code is Code.RESOURCE_EXHAUSTED


@pytest.mark.ha
async def test_streams_end_with_unavailable_when_the_leader_stops_leading(
    control_plane: ControlPlane, issuer: Issuer, chisel_binary: ChiselBinary, tmp_path: Path
) -> None:
    """a loses its Lease (another replica, z, is given it): the streams it serves end with
    unavailable, directly and through b (whose own Lease still names a)."""
    replicas = start_echo_replicas(control_plane, issuer, chisel_binary, tmp_path)
    echo_replicas = await replicas_system(replicas)
    answered = {"a": asyncio.Event(), "b": asyncio.Event()}
    release = asyncio.Event()

    async def chat(hub: str) -> None:
        async def requests() -> AsyncIterator[pb.ChatRequest]:
            yield start()
            await release.wait()

        async for _answer in echo_replicas.client(hub).chat(requests(), headers=echo_replicas.auth()):
            answered[hub].set()

    tasks = {hub: asyncio.create_task(chat(hub)) for hub in ("a", "b")}
    try:
        for event in answered.values():
            await asyncio.wait_for(event.wait(), ANSWER_WAIT)
        await replicas.hand_over("z")
        errors = {}
        for hub, task in tasks.items():
            with pytest.raises(ConnectError) as caught:
                await asyncio.wait_for(task, ANSWER_WAIT)
            errors[hub] = caught.value
    finally:
        release.set()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await echo_replicas.close()
        await replicas.stop()
    assert errors["a"].code is Code.UNAVAILABLE
    assert errors["a"].message == "this hub replica stopped leading; resume the Chat call"
    # b's call went through a's proxy: a ended it, and b passed that on.
    assert errors["b"].code is Code.UNAVAILABLE


# --------------------------------------------------------------------------------------------------
# Registration


async def test_a_service_without_a_route_stops_the_hub_at_start_up(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary
) -> None:
    config = write_config(
        tmp_path / "otterscale.yaml", issuer_url=issuer.url, specs=make_specs(), tunnel_port=free_port()
    )
    hub = HubProcess(
        config,
        tmp_path / "hub.log",
        chisel=chisel_binary.path,
        routed_services=("otterscale.cluster.v1.cluster_pb2:AgentService",),
    )
    try:
        assert await hub.exited(60) == 1
    finally:
        hub.stop()
    log = hub.log()
    assert (
        "cannot route /otterscale.cluster.v1.AgentService/GetAgentInfo: "
        "otterscale.cluster.v1.GetAgentInfoRequest has no `string cluster = 1`; declare where the "
        "cluster is with the method option (otterscale.routing.v1.route)"
    ) in log
    assert "Traceback" not in log
    assert not hub.children()  # no tunnel server left behind


async def test_a_registered_service_has_a_health_status(echo: EchoSystem) -> None:
    from otterscale.hub._health import HealthCheckRequest, HealthCheckResponse

    http = echo.http(HTTPVersion.HTTP2)
    url = echo.hubs["a"].url
    request = HealthCheckRequest(service="otterscale.testing.echo.v1.EchoService").SerializeToString()
    response = await http.post(
        f"{url}/grpc.health.v1.Health/Check", headers={"content-type": "application/proto"}, content=request
    )
    assert response.status == 200
    assert HealthCheckResponse.FromString(response.content).status == 1  # SERVING


async def iter_of(*messages: Any) -> AsyncIterator[Any]:
    for message in messages:
        yield message
