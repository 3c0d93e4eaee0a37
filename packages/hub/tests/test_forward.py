"""Followers forward to the leader; roles change under a running hub (no Kubernetes here).

Two or three hubs run in the test's process, each with a test-controlled leadership
(:class:`~.conftest.StaticLeadership`) instead of the Lease: the test says who leads and where.
Real chisel, real HTTP servers, the fake agent of conftest.py. The Lease itself, and hubs as
separate processes with a real agent, are tested in test_election.py and test_ha.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.cluster.v1.cluster_connect import ClusterServiceClient
from otterscale.cluster.v1.cluster_pb2 import ListClustersRequest
from otterscale.common import ChiselBinary, load_config
from otterscale.hub import Hub
from otterscale.hub._leader import LeaderInfo
from otterscale.hub._replicas import ReplicaSigner, replica_key
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import free_port

from .conftest import (
    TRANSPORTS,
    ClusterSpec,
    FakeAgent,
    Issuer,
    StaticLeadership,
    hub_settings,
    make_specs,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.ha]

HOP = "x-otterscale-forwarded-by"
FORWARDED_FOR = "x-otterscale-forwarded-for"


def get(name: str = "demo", cluster: str = "alpha") -> pb.GetRequest:
    return pb.GetRequest(cluster=cluster, version="v1", resource="configmaps", namespace="default", name=name)


def watch(events: int = 1, end: str = "", cluster: str = "alpha") -> pb.WatchRequest:
    return pb.WatchRequest(
        cluster=cluster,
        version="v1",
        resource="configmaps",
        namespace="default",
        resource_version=str(events),
        field_selector=end,
    )


@dataclass
class Replicas:
    """Hubs sharing one configuration; ``controls[name]`` decides what each believes."""

    issuer: Issuer
    specs: dict[str, ClusterSpec]
    binary: ChiselBinary
    config_path: Path
    tunnel_port: int
    hubs: dict[str, Hub] = field(default_factory=dict)
    controls: dict[str, StaticLeadership] = field(default_factory=dict)
    agents: dict[str, FakeAgent] = field(default_factory=dict)
    transports: list[HTTPTransport] = field(default_factory=list)

    async def add(self, name: str) -> Hub:
        control = StaticLeadership(name)
        hub = Hub(hub_settings(self.config_path, self.binary, port=free_port()), leadership=control)
        await hub.start()
        self.hubs[name], self.controls[name] = hub, control
        return hub

    def info(self, name: str) -> LeaderInfo:
        return LeaderInfo(name, f"127.0.0.1:{self.hubs[name].port}")

    async def lead(self, name: str) -> None:
        """``name`` leads and every replica knows it."""
        for other, control in self.controls.items():
            control.set(leading=other == name, leader=self.info(name))
        await wait_for(lambda: self.hubs[name].leading, 15, f"{name} leads")
        for other, hub in self.hubs.items():
            if other != name:
                await wait_for(lambda hub=hub: not hub.leading, 15, f"{other} follows")  # type: ignore[misc]

    async def agent(self, cluster: str = "alpha") -> FakeAgent:
        agent = self.agents.get(cluster)
        if agent is None:
            agent = self.agents[cluster] = FakeAgent(self.specs[cluster], self.binary)
            await agent.serve()
            leader = next(hub for hub in self.hubs.values() if hub.leading)
            assert leader.fingerprint is not None
            await agent.connect(f"http://127.0.0.1:{self.tunnel_port}", leader.fingerprint)
        await wait_for(lambda: self.connected(cluster), 15, f"{cluster} connected to the leader")
        return agent

    def connected(self, cluster: str) -> bool:
        for hub in self.hubs.values():
            if hub.leading and hub.tunnels is not None:
                status = hub.tunnels.get(cluster)
                return status is not None and status.connected
        return False

    def _http(self, version: Any) -> Client:
        transport = HTTPTransport(http_version=version)
        self.transports.append(transport)
        return Client(transport)

    def client(
        self, name: str, transport: str = "connect-h1", *, json: bool = False, timeout_ms: int | None = None
    ) -> ResourceServiceClient:
        protocol, version = TRANSPORTS[transport]
        return ResourceServiceClient(
            self.hubs[name].url,
            protocol=protocol,
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            http_client=self._http(version),
            timeout_ms=timeout_ms,
        )

    def clusters(self, name: str, transport: str = "connect-h1") -> ClusterServiceClient:
        protocol, version = TRANSPORTS[transport]
        return ClusterServiceClient(self.hubs[name].url, protocol=protocol, http_client=self._http(version))

    def http(self) -> Client:
        return self._http(HTTPVersion.HTTP1)

    def auth(self, subject: str = "alice", **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(subject)}", **headers}

    def forwarded(self, name: str, method: str, code: str) -> float:
        metrics = self.hubs[name].metrics
        assert metrics is not None
        value = metrics.registry.get_sample_value(
            "otterscale_hub_forwarded_rpcs_total",
            {"service": "otterscale.resource.v1.ResourceService", "method": method, "code": code},
        )
        return value or 0.0

    async def close(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
        for hub in self.hubs.values():
            await hub.stop()
        for transport in self.transports:
            await transport.aclose()


#: Set-up attempts when the tunnel server's port was taken between choosing it and binding it.
SETUP_ATTEMPTS = 3


async def start_replicas(
    tmp_path: Path,
    issuer: Issuer,
    chisel_binary: ChiselBinary,
    *,
    limits: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
) -> Replicas:
    """Hubs ``a`` (leading, with the tunnel server) and ``b``, and cluster alpha's agent.

    ``free_port`` picks ports the kernel never hands out by itself, but another process may still
    bind one on purpose before we do. Then a hub cannot listen (address in use) or ``a`` steps
    down ("the tunnel server did not start"), and the set-up starts again with fresh ports; any
    other failure fails at once.
    """
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        specs = make_specs()
        tunnel_port = free_port()
        config_path = write_config(
            tmp_path / f"otterscale-{attempt}.yaml",
            issuer_url=issuer.url,
            specs=specs,
            tunnel_port=tunnel_port,
            limits=limits,
            audit=audit,
        )
        found = Replicas(issuer, specs, chisel_binary, config_path, tunnel_port)
        try:
            await found.add("a")
            await found.add("b")
            await found.lead("a")
            await found.agent("alpha")
            return found
        except BaseException as exc:
            await found.close()
            step_downs = found.controls["a"].step_downs if "a" in found.controls else []
            port_taken = (isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE) or (
                isinstance(exc, TimeoutError) and any("tunnel server did not start" in r for r in step_downs)
            )
            if not port_taken or attempt == SETUP_ATTEMPTS:
                raise
            logging.getLogger(__name__).warning("tunnel port %d was taken; set-up again", tunnel_port)
    raise AssertionError("unreachable")


@pytest_asyncio.fixture
async def replicas(tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary) -> AsyncIterator[Replicas]:
    """Hubs ``a`` (the leader) and ``b`` (a follower); cluster alpha's agent connected to ``a``."""
    found = await start_replicas(tmp_path, issuer, chisel_binary)
    try:
        yield found
    finally:
        await found.close()


async def read_all(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


# --------------------------------------------------------------------------------------------------
# Forwarding


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("json", [False, True], ids=["binary", "json"])
async def test_follower_forwards_unary_calls_in_every_protocol(
    replicas: Replicas, transport: str, json: bool
) -> None:
    agent = replicas.agents["alpha"]
    got = await replicas.client("b", transport, json=json).get(get("via-b"), headers=replicas.auth())
    assert got.object["metadata"]["name"] == "via-b"
    seen = agent.resources.records[-1]
    assert seen.subject == "alice"
    assert seen.headers["content-type"][0].endswith("json" if json else "proto")
    assert replicas.forwarded("b", "Get", "ok") == 1
    assert replicas.forwarded("a", "Get", "ok") == 0


@pytest.mark.parametrize("transport", ["connect-h1", "grpc-h2c", "grpcweb-h1"])
async def test_follower_forwards_watch_streams(replicas: Replicas, transport: str) -> None:
    client = replicas.client("b", transport)
    events = await read_all(client.watch(watch(3, end="ok"), headers=replicas.auth()))
    assert [e.resource_version for e in events] == ["100", "101", "102"]
    with pytest.raises(ConnectError) as ended:
        await read_all(client.watch(watch(2, end="end"), headers=replicas.auth()))
    # The agent's own status passes through the leader and the follower unchanged.
    assert ended.value.code is Code.UNAVAILABLE
    assert ended.value.message == "the upstream watch closed; resume from 199"


async def test_follower_passes_the_leaders_errors_unchanged(replicas: Replicas) -> None:
    client = replicas.client("b")
    direct = replicas.client("a")
    for request, code in (
        (get("forbidden"), Code.PERMISSION_DENIED),
        (get("missing"), Code.NOT_FOUND),
        (get(cluster="gamma"), Code.NOT_FOUND),
        (get(cluster="beta"), Code.UNAVAILABLE),
    ):
        with pytest.raises(ConnectError) as via_follower:
            await client.get(request, headers=replicas.auth())
        with pytest.raises(ConnectError) as via_leader:
            await direct.get(request, headers=replicas.auth())
        assert via_follower.value.code is code
        assert via_follower.value.message.split(" (since")[0] == via_leader.value.message.split(" (since")[0]
    with pytest.raises(ConnectError) as anonymous:
        await client.get(get())
    assert anonymous.value.code is Code.UNAUTHENTICATED
    assert "missing credentials" in anonymous.value.message


@pytest.mark.parametrize("transport", ["connect-h1", "grpc-h2c"])
async def test_list_clusters_through_a_follower_is_the_leaders_view(
    replicas: Replicas, transport: str
) -> None:
    client = replicas.clusters("b", transport)
    response = await client.list_clusters(ListClustersRequest(), headers=replicas.auth())
    state = {cluster.name: cluster.connected for cluster in response.clusters}
    assert state == {"alpha": True, "beta": False}


async def test_forwarded_call_keeps_caller_identity_request_id_and_deadline(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="otterscale.hub.access")
    agent = replicas.agents["alpha"]
    client = replicas.client("b", timeout_ms=4000)
    await client.get(get("who"), headers=replicas.auth("bob", **{"x-request-id": "req-42"}))
    seen = agent.resources.records[-1]
    assert seen.subject == "bob"
    assert seen.headers["x-request-id"] == ["req-42"]
    # The deadline crossed both hops, shrinking a little on the way.
    remaining = int(seen.headers["connect-timeout-ms"][0])
    assert 2000 < remaining <= 4000
    records = [r for r in caplog.records if r.name == "otterscale.hub.access" and r.method.endswith("/Get")]
    leader_line = next(r for r in records if getattr(r, "forwarded_by", "") == "b")
    assert leader_line.subject == "bob"
    assert leader_line.request_id == "req-42"
    # A deadline shorter than the agent's answer ends the call in time, as it would on the leader.
    started = time.perf_counter()
    with pytest.raises(ConnectError) as late:
        await replicas.client("b", timeout_ms=700).get(get("slow"), headers=replicas.auth())
    assert late.value.code is Code.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 3


@pytest.mark.security
async def test_forwarding_headers_count_only_when_a_replica_signed_them(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's ``X-Otterscale-Forwarded-By`` (or a forged or stale signature) is dropped on
    entry: it neither makes a follower refuse the call as a second hop nor puts a replica name or
    an address into the leader's access log and audit trail. A fresh signature with the replicas'
    key (derived from the tunnel key they share) is kept."""
    caplog.set_level(logging.INFO, logger="otterscale.hub.access")
    procedure = "/otterscale.resource.v1.ResourceService/Get"
    key = replica_key(load_config(replicas.config_path))
    forged = [
        {HOP: "c"},
        {HOP: "c", FORWARDED_FOR: "203.0.113.9:1"},
        ReplicaSigner(b"not-the-replicas-key-0123456789ab").headers("c", "203.0.113.9:1", procedure),
        ReplicaSigner(key).headers("c", "203.0.113.9:1", procedure, now=time.time() - 120),  # stale
        ReplicaSigner(key).headers("c", "203.0.113.9:1", "/otterscale.resource.v1.ResourceService/List"),
    ]
    for index, headers in enumerate(forged):
        for hub in ("b", "a"):  # the follower forwards it as any call; the leader serves it
            name = f"forged-{index}-{hub}"
            got = await replicas.client(hub).get(get(name), headers=replicas.auth(**headers))
            assert got.object["metadata"]["name"] == name
    lines = [r for r in caplog.records if r.name == "otterscale.hub.access" and r.method.endswith("/Get")]
    assert lines
    assert all(getattr(r, "forwarded_by", "") in ("", "b") for r in lines)
    assert any(getattr(r, "forwarded_by", "") == "b" for r in lines)  # b's own, signed, was kept
    # A replica's signature is kept: the leader logs the replica it names.
    caplog.clear()
    signed = ReplicaSigner(key).headers("c", "203.0.113.9:1", procedure)
    await replicas.client("a").get(get("signed"), headers=replicas.auth(**signed))
    lines = [r for r in caplog.records if r.name == "otterscale.hub.access" and r.method.endswith("/Get")]
    assert [getattr(r, "forwarded_by", "") for r in lines] == ["c"]


async def test_two_followers_that_name_each_other_never_loop(replicas: Replicas) -> None:
    await replicas.add("c")
    replicas.controls["b"].set(leader=replicas.info("c"))
    replicas.controls["c"].set(leader=replicas.info("b"))
    started = time.perf_counter()
    with pytest.raises(ConnectError) as refused:
        await replicas.client("b").get(get(), headers=replicas.auth())
    assert time.perf_counter() - started < 2
    assert refused.value.code is Code.UNAVAILABLE
    assert "c does not lead (the call was forwarded by b" in refused.value.message
    # Exactly one hop: b forwarded once, c refused once and forwarded nothing.
    assert replicas.forwarded("b", "Get", "unavailable") == 1
    assert replicas.forwarded("c", "Get", "unavailable") == 1


async def test_unavailable_at_once_during_a_hand_over(replicas: Replicas) -> None:
    client = replicas.client("b")
    closed = free_port()
    cases = [
        (None, "no hub replica leads right now"),
        (LeaderInfo("a", None), "the address of the leader a is not known yet"),
        (LeaderInfo("b", f"127.0.0.1:{replicas.hubs['b'].port}"), "b is taking over"),
        (LeaderInfo("z", f"127.0.0.1:{closed}"), "the leader z at 127.0.0.1:"),
    ]
    for leader, message in cases:
        replicas.controls["b"].set(leader=leader)
        started = time.perf_counter()
        with pytest.raises(ConnectError) as refused:
            await client.get(get(), headers=replicas.auth())
        assert time.perf_counter() - started < 2.5, message
        assert refused.value.code is Code.UNAVAILABLE
        assert message in refused.value.message
    replicas.controls["b"].set(leader=replicas.info("a"))
    assert (await client.get(get("back"), headers=replicas.auth())).object["metadata"]["name"] == "back"


async def test_watch_through_a_follower_ends_cleanly_when_the_leader_changes(replicas: Replicas) -> None:
    agent = replicas.agents["alpha"]
    stream = replicas.client("b", "grpc-h2c").watch(watch(1), headers=replicas.auth()).__aiter__()
    first = await asyncio.wait_for(stream.__anext__(), 10)
    assert first.resource_version == "100"
    await wait_for(lambda: agent.resources.watch_open.is_set(), 5, "the agent watches")
    replicas.controls["b"].set(leader=None)
    with pytest.raises(ConnectError) as ended:
        await asyncio.wait_for(stream.__anext__(), 5)
    assert ended.value.code is Code.UNAVAILABLE
    assert "a no longer leads" in ended.value.message
    # The forwarded stream was reset all the way to the agent.
    await asyncio.wait_for(agent.resources.watch_closed.wait(), 5)


async def test_follower_shutdown_ends_forwarded_watches(replicas: Replicas) -> None:
    stream = replicas.client("b").watch(watch(1), headers=replicas.auth()).__aiter__()
    await asyncio.wait_for(stream.__anext__(), 10)
    stopping = asyncio.create_task(replicas.hubs["b"].stop())
    with pytest.raises(ConnectError) as ended:
        await asyncio.wait_for(stream.__anext__(), 5)
    assert ended.value.code is Code.UNAVAILABLE
    assert "shutting down" in ended.value.message
    await stopping
    assert replicas.controls["b"].closed
    assert replicas.controls["b"].unmarks == 0  # it never led


# --------------------------------------------------------------------------------------------------
# Roles


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def metric(replicas: Replicas, name: str, metric_name: str) -> float:
    response = await replicas.http().get(replicas.hubs[name].url + "/metrics")
    for line in bytes(response.content).decode().splitlines():
        if line.startswith(metric_name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{metric_name} not in /metrics")


async def test_followers_are_ready_without_a_tunnel_server(replicas: Replicas) -> None:
    http = replicas.http()
    for name in ("a", "b"):
        response = await http.get(replicas.hubs[name].url + "/readyz")
        assert response.status == 200, name
    assert replicas.hubs["b"].chisel is None
    assert replicas.hubs["b"].role == "follower"
    assert replicas.hubs["a"].role == "leader"
    assert await metric(replicas, "a", "otterscale_hub_leader") == 1
    assert await metric(replicas, "b", "otterscale_hub_leader") == 0
    assert replicas.controls["a"].marks == 1


async def test_hand_over_moves_the_tunnel_server_and_the_agents(replicas: Replicas) -> None:
    a, b = replicas.hubs["a"], replicas.hubs["b"]
    agent = replicas.agents["alpha"]
    local = replicas.client("a").watch(watch(1), headers=replicas.auth()).__aiter__()
    forwarded = replicas.client("b").watch(watch(1), headers=replicas.auth()).__aiter__()
    await asyncio.wait_for(local.__anext__(), 10)
    await asyncio.wait_for(forwarded.__anext__(), 10)

    # a loses the Lease: its Watches end, its tunnel server stops and frees the port.
    replicas.controls["a"].set(leading=False, leader=None)
    replicas.controls["b"].set(leader=None)
    for stream, text in ((local, "stopped leading"), (forwarded, "no longer leads")):
        with pytest.raises(ConnectError) as ended:
            await asyncio.wait_for(stream.__anext__(), 5)
        assert ended.value.code is Code.UNAVAILABLE
        assert text in ended.value.message
    await wait_for(lambda: not a.leading and a.chisel is None, 10, "a stepped down")
    assert port_is_free(replicas.tunnel_port)
    assert port_is_free(replicas.specs["alpha"].tunnel_port)
    assert replicas.controls["a"].unmarks == 1
    assert agent.tunnel is not None
    await wait_for(lambda: not agent.tunnel.connected, 10, "the agent saw its tunnel go")  # type: ignore[union-attr]
    assert (await replicas.http().get(a.url + "/readyz")).status == 200

    # b wins: it starts the tunnel server on the same port; the agent comes back to it.
    started = time.perf_counter()
    await replicas.lead("b")
    await wait_for(lambda: replicas.connected("alpha"), 15, "the agent reconnected to b")
    reconnected = time.perf_counter() - started
    assert reconnected < 10
    for name in ("a", "b"):
        got = await replicas.client(name).get(get(f"after-{name}"), headers=replicas.auth())
        assert got.object["metadata"]["name"] == f"after-{name}"
    assert b.role == "leader"
    assert await metric(replicas, "a", "otterscale_hub_leader_transitions_total") == 2


async def test_a_replica_that_cannot_start_the_tunnel_server_steps_down(replicas: Replicas) -> None:
    c = await replicas.add("c")
    # c believes it won, but a's tunnel server still holds the port: c's chisel cannot listen.
    replicas.controls["c"].set(leading=True)
    await wait_for(lambda: bool(replicas.controls["c"].step_downs), 20, "c stepped down")
    assert "the tunnel server did not start" in replicas.controls["c"].step_downs[0]
    assert not c.leading
    assert c.chisel is None
    # The leader was not disturbed.
    got = await replicas.client("a").get(get("still"), headers=replicas.auth())
    assert got.object["metadata"]["name"] == "still"


# --------------------------------------------------------------------------------------------------
# Limits on the forwarding path


async def test_followers_enforce_the_same_limits(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary
) -> None:
    """A follower refuses a request over ``max_request_bytes`` itself (nothing reaches the leader
    or the agent); an answer over ``max_response_bytes`` is refused by the leader and that refusal
    reaches the follower's caller unchanged; Watches through a follower hold their subject's
    slots on the leader, so ``max_watches_per_subject`` counts them with direct ones."""
    kib = 1024
    replicas = await start_replicas(
        tmp_path,
        issuer,
        chisel_binary,
        limits={
            "max_request_bytes": 64 * kib,
            "max_response_bytes": 1024 * kib,
            "max_watches_per_subject": 2,
        },
    )
    watches: list[asyncio.Task[Any]] = []
    try:
        follower, leader = replicas.client("b"), replicas.client("a")
        agent = replicas.agents["alpha"]
        seen_by_agent = len(agent.resources.records)

        big = pb.ApplyRequest(
            cluster="alpha",
            version="v1",
            resource="configmaps",
            namespace="default",
            name="big",
            manifest=b"{" + b" " * (100 * kib) + b"}",
        )
        with pytest.raises(ConnectError) as too_big:
            await follower.apply(big, headers=replicas.auth())
        assert too_big.value.code is Code.RESOURCE_EXHAUSTED
        assert "limits.max_request_bytes" in too_big.value.message
        assert refusals(replicas.hubs["b"], "request_too_large") == 1
        assert refusals(replicas.hubs["a"], "request_too_large") == 0
        assert (
            replicas.forwarded("b", "Apply", "ok") + replicas.forwarded("b", "Apply", "resource_exhausted")
            == 0
        )
        assert len(agent.resources.records) == seen_by_agent

        # ~1.8 MB of ConfigMaps (the fake agent makes 900-byte items): over the 1 MiB answer limit.
        listing = pb.ListRequest(
            cluster="alpha", version="v1", resource="configmaps", namespace="default", limit=2000
        )
        with pytest.raises(ConnectError) as via_follower:
            await follower.list(listing, headers=replicas.auth())
        with pytest.raises(ConnectError) as direct:
            await leader.list(listing, headers=replicas.auth())
        assert via_follower.value.code is direct.value.code is Code.RESOURCE_EXHAUSTED
        assert via_follower.value.message == direct.value.message
        assert "limits.max_response_bytes" in direct.value.message
        assert refusals(replicas.hubs["a"], "response_too_large") == 2
        listing.limit = 10  # a small page still goes through
        assert len((await follower.list(listing, headers=replicas.auth())).items) == 10

        async def hold(client: ResourceServiceClient) -> None:
            async for _ in client.watch(watch(1), headers=replicas.auth()):
                pass  # the fake agent sends one event and then holds the stream open

        watches = [asyncio.create_task(hold(replicas.client("b", "grpc-h2c"))) for _ in range(2)]
        assert replicas.hubs["a"]._proxy is not None
        slots = replicas.hubs["a"]._proxy.watch_slots
        await wait_for(lambda: slots.total() == 2, 10, "two forwarded Watches holding slots on the leader")
        for client in (follower, leader):
            with pytest.raises(ConnectError) as third:
                await read_all(client.watch(watch(1), headers=replicas.auth()))
            assert third.value.code is Code.RESOURCE_EXHAUSTED
            assert "limits.max_watches_per_subject" in third.value.message
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await wait_for(lambda: slots.total() == 0, 10, "slots freed when the forwarded Watches end")
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await replicas.close()


def refusals(hub: Hub, reason: str) -> float:
    assert hub.metrics is not None
    return float(hub.metrics.limit_refusals.labels(reason=reason)._value.get())


@pytest.mark.security
async def test_a_forwarded_call_is_audited_once_by_the_leader(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary
) -> None:
    """The follower that forwards a call writes no audit event; the leader that serves it writes
    the one event, naming the follower and the caller's own address (signed by the follower)."""
    log = tmp_path / "audit.log"
    found = await start_replicas(
        tmp_path, issuer, chisel_binary, audit={"sink": "file", "file": str(log), "reads": "metadata"}
    )
    create = pb.CreateRequest(cluster="alpha", version="v1", resource="configmaps", namespace="default")
    try:
        await found.client("b").create(create, headers=found.auth(**{"x-request-id": "fwd-create"}))
        await found.client("b").get(get("g"), headers=found.auth(**{"x-request-id": "fwd-get"}))
        await found.client("a").get(get("g"), headers=found.auth(**{"x-request-id": "direct-get"}))
    finally:
        await found.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    for request_id, verb, via in (
        ("fwd-create", "Create", "b"),
        ("fwd-get", "Get", "b"),
        ("direct-get", "Get", ""),
    ):
        [event] = [e for e in events if e["request_id"] == request_id]
        assert (event["verb"], event["replica"], event["forwarded_by"]) == (verb, "a", via)
        assert (event["subject"], event["code"], event["cluster"]) == ("alice", "ok", "alpha")
        assert event["source"].startswith("127.0.0.1:")
