"""Followers forward to the leader; roles change under running hubs.

Every hub is an ``otterscale server --leader-elect`` process against the session's real
kube-apiserver (:class:`~.conftest.Replicas`): ``a`` wins the Lease of its own namespace; the
followers campaign, with read-only rights, for a staged Lease that the test points at ``a`` (or
at nobody, at a leader whose address is not known, at themselves, at each other), so each test
chooses what a follower believes through the API server, as a real hand-over would show it.
Hand-overs between candidates of one Lease are real elections (``Replicas.hand_over`` writes the
Lease as an administrator would). Real chisel, the fake agent of conftest.py. Three replicas with
the real agent and the default timings are tested in test_ha.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.cluster.v1.cluster_pb2 import ListClustersRequest
from otterscale.common import ChiselBinary, load_config
from otterscale.hub._replicas import ReplicaSigner, replica_key
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, staged_lease

from .conftest import (
    TRANSPORTS,
    FakeAgent,
    Issuer,
    Replicas,
    ReplicasEnv,
    eventually,
    replica_address,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.ha]

HOP = "x-otterscale-forwarded-by"
FORWARDED_FOR = "x-otterscale-forwarded-for"
#: "At once" on a loaded 2-core CI box: far above its round trips, far below the fake agent's 10 s
#: "slow" answer, a lease duration, or a call queued until a leader appears.
AT_ONCE = 5.0


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


def start_replicas(
    cp: ControlPlane, issuer: Issuer, binary: ChiselBinary, directory: Path, **options: Any
) -> Replicas:
    """``a`` leading, follower ``b`` following it, cluster alpha's fake agent connected to ``a``."""
    replicas = Replicas(cp, issuer, binary, directory, **options)
    return replicas.start_leader_and_follower(FakeAgent(replicas.specs["alpha"], binary))


@pytest.fixture(scope="module")
def shared_replicas(
    control_plane: ControlPlane,
    module_issuer: Issuer,
    chisel_binary: ChiselBinary,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replicas]:
    replicas = start_replicas(
        control_plane, module_issuer, chisel_binary, tmp_path_factory.mktemp("replicas")
    )
    try:
        yield replicas
    finally:
        replicas.stop_blocking()


@pytest_asyncio.fixture
async def replicas(shared_replicas: Replicas) -> AsyncIterator[ReplicasEnv]:
    """Hubs ``a`` (the leader) and ``b`` (a follower of ``a``); cluster alpha's agent connected to
    ``a``; shared by the module: ``b`` is pointed at ``a`` again for each test."""
    shared_replicas.follow("a")
    env = ReplicasEnv(shared_replicas)
    await shared_replicas.leader_sees("alpha")
    await env.forwarding("b")
    for agent in shared_replicas.agents.values():
        agent.forget()  # type: ignore[attr-defined]
    try:
        yield env
    finally:
        await env.close()


async def read_all(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


def fake(env: ReplicasEnv) -> FakeAgent:
    agent = env.agents["alpha"]
    assert isinstance(agent, FakeAgent)
    return agent


# --------------------------------------------------------------------------------------------------
# Forwarding


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("json", [False, True], ids=["binary", "json"])
async def test_follower_forwards_unary_calls_in_every_protocol(
    replicas: ReplicasEnv, transport: str, json: bool
) -> None:
    agent = fake(replicas)
    got = await replicas.client("b", transport, json=json).get(get("via-b"), headers=replicas.auth())
    assert got.object["metadata"]["name"] == "via-b"
    seen = agent.resources.records[-1]
    assert seen.subject == "alice"
    assert seen.headers["content-type"][0].endswith("json" if json else "proto")
    assert await replicas.forwarded("b", "Get", "ok") == 1
    assert await replicas.forwarded("a", "Get", "ok") == 0


@pytest.mark.parametrize("transport", ["connect-h1", "grpc-h2c", "grpcweb-h1"])
async def test_follower_forwards_watch_streams(replicas: ReplicasEnv, transport: str) -> None:
    client = replicas.client("b", transport)
    events = await read_all(client.watch(watch(3, end="ok"), headers=replicas.auth()))
    assert [e.resource_version for e in events] == ["100", "101", "102"]
    with pytest.raises(ConnectError) as ended:
        await read_all(client.watch(watch(2, end="end"), headers=replicas.auth()))
    # The agent's own status passes through the leader and the follower unchanged.
    assert ended.value.code is Code.UNAVAILABLE
    assert ended.value.message == "the upstream watch closed; resume from 199"


async def test_follower_passes_the_leaders_errors_unchanged(replicas: ReplicasEnv) -> None:
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
    replicas: ReplicasEnv, transport: str
) -> None:
    client = replicas.clusters("b", transport)
    response = await client.list_clusters(ListClustersRequest(), headers=replicas.auth())
    state = {cluster.name: cluster.connected for cluster in response.clusters}
    assert state == {"alpha": True, "beta": False}


async def test_forwarded_call_keeps_caller_identity_request_id_and_deadline(replicas: ReplicasEnv) -> None:
    agent = fake(replicas)
    client = replicas.client("b", timeout_ms=4000)
    await client.get(get("who"), headers=replicas.auth("bob", **{"x-request-id": "req-42"}))
    seen = agent.resources.records[-1]
    assert seen.subject == "bob"
    assert seen.headers["x-request-id"] == ["req-42"]
    # The deadline crossed both hops, shrinking a little on the way.
    remaining = int(seen.headers["connect-timeout-ms"][0])
    assert 2000 < remaining <= 4000

    def leader_lines() -> list[dict[str, Any]]:  # the leader's access log (its JSON log)
        return [
            r
            for r in replicas.hubs["a"].log_records()
            if r.get("logger") == "otterscale.hub.access" and r.get("request_id") == "req-42"
        ]

    await wait_for(lambda: bool(leader_lines()), 10, "the leader's access log line")
    (leader_line,) = leader_lines()
    assert leader_line["forwarded_by"] == "b"
    assert leader_line["subject"] == "bob"
    assert leader_line["method"] == "/otterscale.resource.v1.ResourceService/Get"
    # A deadline shorter than the agent's answer ends the call in time, as it would on the leader.
    started = time.perf_counter()
    with pytest.raises(ConnectError) as late:
        await replicas.client("b", timeout_ms=700).get(get("slow"), headers=replicas.auth())
    assert late.value.code is Code.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < AT_ONCE  # the deadline, not the agent's 10 s answer


def access_lines(env: ReplicasEnv, request_ids: set[str]) -> list[dict[str, Any]]:
    """The access log lines (of every replica) of the calls with these request ids."""
    return [
        record
        for hub in env.hubs.values()
        for record in hub.log_records()
        if record.get("logger") == "otterscale.hub.access" and record.get("request_id") in request_ids
    ]


@pytest.mark.security
async def test_forwarding_headers_count_only_when_a_replica_signed_them(replicas: ReplicasEnv) -> None:
    """A client's ``X-Otterscale-Forwarded-By`` (or a forged or stale signature) is dropped on
    entry: it neither makes a follower refuse the call as a second hop nor puts a replica name or
    an address into the leader's access log and audit trail. A fresh signature with the replicas'
    key (derived from the tunnel key they share) is kept."""
    procedure = "/otterscale.resource.v1.ResourceService/Get"
    key = replica_key(load_config(replicas.replicas.directory / "otterscale-a.yaml"))
    forged = [
        {HOP: "c"},
        {HOP: "c", FORWARDED_FOR: "203.0.113.9:1"},
        ReplicaSigner(b"not-the-replicas-key-0123456789ab").headers("c", "203.0.113.9:1", procedure),
        ReplicaSigner(key).headers("c", "203.0.113.9:1", procedure, now=time.time() - 120),  # stale
        ReplicaSigner(key).headers("c", "203.0.113.9:1", "/otterscale.resource.v1.ResourceService/List"),
    ]
    names: set[str] = set()
    for index, headers in enumerate(forged):
        for hub in ("b", "a"):  # the follower forwards it as any call; the leader serves it
            name = f"forged-{index}-{hub}"
            names.add(name)
            got = await replicas.client(hub).get(
                get(name), headers=replicas.auth(**headers, **{"x-request-id": name})
            )
            assert got.object["metadata"]["name"] == name
    # One line per replica a call passed: b's and a's for a call through b, a's for a direct one.
    await wait_for(lambda: len(access_lines(replicas, names)) == 3 * len(forged), 30, "every call logged")
    lines = access_lines(replicas, names)
    assert all(line.get("forwarded_by", "") in ("", "b") for line in lines), lines
    assert any(line.get("forwarded_by", "") == "b" for line in lines)  # b's own, signed, was kept
    # A replica's signature is kept: the leader logs the replica it names.
    signed = ReplicaSigner(key).headers("c", "203.0.113.9:1", procedure)
    await replicas.client("a").get(
        get("signed"), headers=replicas.auth(**signed, **{"x-request-id": "signed"})
    )
    await wait_for(lambda: bool(access_lines(replicas, {"signed"})), 30, "the call logged")
    assert [line.get("forwarded_by", "") for line in access_lines(replicas, {"signed"})] == ["c"]


async def refusal(client: ResourceServiceClient, env: ReplicasEnv) -> str:
    """The message of the unavailable answer to a Get ("" when it went through)."""
    try:
        await client.get(get(), headers=env.auth())
    except ConnectError as exc:
        if exc.code is not Code.UNAVAILABLE:
            raise
        return exc.message
    return ""


async def test_two_followers_that_name_each_other_never_loop(replicas: ReplicasEnv, tmp_path: Path) -> None:
    """b believes c leads, c believes b leads (their Leases disagree, as during a hand-over seen
    at different moments): a call goes b -> c and stops there."""
    cluster = replicas.replicas
    other_stage = await asyncio.to_thread(staged_lease, cluster.cp, tmp_path)
    try:
        c = await cluster.spawn_follower("c", other_stage).wait_ready_async()
        await asyncio.to_thread(cluster.follow, "b", None, other_stage)
        await asyncio.to_thread(cluster.follow, "c")
        client = replicas.client("b")

        async def looped_once() -> bool:
            return "c does not lead (the call was forwarded by b" in await refusal(client, replicas)

        await eventually(looped_once, 60, "b forwarding to c, which names b")
        await replicas.mark()
        started = time.perf_counter()
        message = await refusal(client, replicas)
        assert time.perf_counter() - started < AT_ONCE
        assert "c does not lead (the call was forwarded by b" in message
        # Exactly one hop: b forwarded once, c refused once and forwarded nothing.
        assert await replicas.forwarded("b", "Get", "unavailable") == 1
        assert await replicas.forwarded("c", "Get", "unavailable") == 1
        assert await replicas.forwarded("b", "Get", "ok") == 0
        assert await replicas.forwarded("c", "Get", "ok") == 0
        assert c.alive()
    finally:
        if "c" in cluster.hubs:
            await asyncio.to_thread(cluster.hubs.pop("c").stop)
        await asyncio.to_thread(cluster.cp.request, "DELETE", f"/api/v1/namespaces/{other_stage.namespace}")


async def test_unavailable_at_once_during_a_hand_over(replicas: ReplicasEnv) -> None:
    """What b says while its Lease shows no usable leader: at once, why, and nothing queued."""
    cluster = replicas.replicas
    client = replicas.client("b")
    closed = "127.0.0.99"  # a loopback address nothing listens on
    cases = [
        ((None, None), "no hub replica leads right now"),
        (("z-new", None), "the address of the leader z-new is not known yet"),
        (("b", replica_address("b")), "replica b is taking over"),
        (("z", closed), f"the leader z at {closed}:{cluster.port} cannot be reached"),
    ]
    for (holder, address), message in cases:
        await asyncio.to_thread(cluster.follow, holder, address)

        async def says(message: str = message) -> bool:
            return message in await refusal(client, replicas)

        await eventually(says, 60, f"b saying {message!r}")
        started = time.perf_counter()
        assert message in await refusal(client, replicas)
        assert time.perf_counter() - started < AT_ONCE, message
    await asyncio.to_thread(cluster.follow, "a")

    async def back() -> bool:
        return await refusal(client, replicas) == ""

    await eventually(back, 60, "b forwarding to a again")
    assert (await client.get(get("back"), headers=replicas.auth())).object["metadata"]["name"] == "back"


async def test_watch_through_a_follower_ends_cleanly_when_the_leader_changes(replicas: ReplicasEnv) -> None:
    agent = fake(replicas)
    stream = replicas.client("b", "grpc-h2c").watch(watch(1), headers=replicas.auth()).__aiter__()
    first = await asyncio.wait_for(stream.__anext__(), 30)
    assert first.resource_version == "100"
    await wait_for(lambda: agent.resources.open_watches == 1, 10, "the agent watches")
    await asyncio.to_thread(replicas.replicas.follow, None)
    with pytest.raises(ConnectError) as ended:
        await asyncio.wait_for(stream.__anext__(), 30)
    assert ended.value.code is Code.UNAVAILABLE
    assert "a no longer leads" in ended.value.message
    # The forwarded stream was reset all the way to the agent.
    await wait_for(lambda: agent.resources.open_watches == 0, 30, "the agent's watch closed")


async def test_follower_shutdown_ends_forwarded_watches(replicas: ReplicasEnv) -> None:
    cluster = replicas.replicas
    d = await cluster.spawn_follower("d").wait_ready_async()
    try:
        await replicas.forwarding("d")
        stream = replicas.client("d").watch(watch(1), headers=replicas.auth()).__aiter__()
        await asyncio.wait_for(stream.__anext__(), 30)
        os.kill(d.pid, signal.SIGTERM)
        with pytest.raises(ConnectError) as ended:
            await asyncio.wait_for(stream.__anext__(), 30)
        assert ended.value.code is Code.UNAVAILABLE
        assert "shutting down" in ended.value.message
        assert await d.exited() == 0
        assert any("hub stopped" in r.get("message", "") for r in d.log_records())
        # A follower leaves the Leases alone: the one it followed still names a, the leader's
        # still is a's, with a's Pod labelled.
        assert await asyncio.to_thread(cluster.holder) == "a"
        assert await asyncio.to_thread(cluster.labelled) == ["a"]
    finally:
        await asyncio.to_thread(cluster.hubs.pop("d").stop)


# --------------------------------------------------------------------------------------------------
# Roles


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


async def test_followers_are_ready_without_a_tunnel_server(replicas: ReplicasEnv) -> None:
    cluster = replicas.replicas
    http = replicas.http()
    for name in ("a", "b"):
        response = await http.get(replicas.hubs[name].url + "/readyz")
        assert response.status == 200, name
    assert replicas.hubs["b"].chisel_pid() is None
    assert port_is_free(replica_address("b"), cluster.tunnel_port)
    assert replicas.hubs["a"].chisel_pid() is not None
    assert (await replicas.hubs["a"].ametrics()).value("otterscale_hub_leader") == 1
    assert (await replicas.hubs["b"].ametrics()).value("otterscale_hub_leader") == 0
    assert await asyncio.to_thread(cluster.labelled) == ["a"]  # the leader labelled its Pod


@pytest_asyncio.fixture
async def candidates(
    control_plane: ControlPlane, issuer: Issuer, chisel_binary: ChiselBinary, tmp_path: Path
) -> AsyncIterator[ReplicasEnv]:
    """``a`` leads, ``b`` is a candidate for the same Lease (a real election); the fake agent of
    alpha dials a relay to the leader-labelled Pod, as through the chart's tunnel Service."""
    cluster = Replicas(control_plane, issuer, chisel_binary, tmp_path)
    env = ReplicasEnv(cluster)
    try:
        await cluster.start_relay()
        await cluster.astart_leader()
        await cluster.spawn_candidate("b").wait_ready_async()
        await cluster.aconnect(FakeAgent(cluster.specs["alpha"], chisel_binary))
        await cluster.leader_sees("alpha")
        await env.mark()
        yield env
    finally:
        await env.close()
        await cluster.stop()


async def test_hand_over_moves_the_tunnel_server_and_the_agents(candidates: ReplicasEnv) -> None:
    cluster = candidates.replicas
    a, b = cluster.hubs["a"], cluster.hubs["b"]
    agent = fake(candidates)
    local = candidates.client("a").watch(watch(1), headers=candidates.auth()).__aiter__()
    forwarded = candidates.client("b").watch(watch(1), headers=candidates.auth()).__aiter__()
    await asyncio.wait_for(local.__anext__(), 30)
    await asyncio.wait_for(forwarded.__anext__(), 30)

    # The Lease goes to b: a's Watches end, its tunnel server stops and frees the port, its Pod
    # loses the label; b's Watch (forwarded to a) ends too.
    await cluster.hand_over("b")
    for stream, text in ((local, "stopped leading"), (forwarded, "no longer leads")):
        with pytest.raises(ConnectError) as ended:
            await asyncio.wait_for(stream.__anext__(), 30)
        assert ended.value.code is Code.UNAVAILABLE
        assert text in ended.value.message

    async def a_follows() -> bool:
        return (await a.ametrics()).value("otterscale_hub_leader") == 0 and a.chisel_pid() is None

    await eventually(a_follows, 30, "a stepped down")
    assert port_is_free(replica_address("a"), cluster.tunnel_port)
    assert port_is_free(replica_address("a"), cluster.specs["alpha"].tunnel_port)
    assert (await candidates.http().get(a.url + "/readyz")).status == 200

    # b leads: its tunnel server, its Pod labelled, the agent back through the relay.
    started = time.perf_counter()
    await cluster.leader_sees("alpha")
    print(
        f"\nhand-over: the agent reconnected to b {time.perf_counter() - started:.2f}s after a stepped down"
    )
    assert (await b.ametrics()).value("otterscale_hub_leader") == 1
    assert b.chisel_pid() is not None
    assert await asyncio.to_thread(cluster.labelled) == ["b"]
    assert agent.connected
    for name in ("a", "b"):

        async def serves(name: str = name) -> bool:
            try:
                got = await candidates.client(name).get(get(f"after-{name}"), headers=candidates.auth())
            except ConnectError:
                return False
            return bool(got.object["metadata"]["name"] == f"after-{name}")

        await eventually(serves, 30, f"calls through {name}")
    assert await candidates.counter("a", "otterscale_hub_leader_transitions_total") == 1  # lost it


async def test_a_replica_that_cannot_start_the_tunnel_server_steps_down(candidates: ReplicasEnv) -> None:
    """c wins the Lease, but its tunnel address is taken: it steps down (releasing the Lease) rather
    than lead without a tunnel server, and a replica that can serve leads again."""
    cluster = candidates.replicas
    with socket.socket() as taken:
        taken.bind((replica_address("c"), cluster.tunnel_port))
        taken.listen()
        c = await cluster.spawn_candidate("c").wait_ready_async()
        await cluster.hand_over("c")

        def stepped_down() -> bool:
            return "stepping down as leader: the tunnel server did not start" in c.log()

        await wait_for(stepped_down, 60, "c stepped down")
        assert (await c.ametrics()).value("otterscale_hub_leader") == 0
        assert c.chisel_pid() is None

        async def served() -> bool:
            holder = await asyncio.to_thread(cluster.holder)
            return holder in ("a", "b") and await asyncio.to_thread(cluster.labelled) == [holder]

        await eventually(served, 60, "a replica that can serve leading again")
        await cluster.leader_sees("alpha")
        got = await candidates.client("a").get(get("still"), headers=candidates.auth())
        assert got.object["metadata"]["name"] == "still"
        assert c.alive()


# --------------------------------------------------------------------------------------------------
# Limits on the forwarding path


async def test_followers_enforce_the_same_limits(
    control_plane: ControlPlane, issuer: Issuer, chisel_binary: ChiselBinary, tmp_path: Path
) -> None:
    """A follower refuses a request over ``max_request_bytes`` itself (nothing reaches the leader
    or the agent); an answer over ``max_response_bytes`` is refused by the leader and that refusal
    reaches the follower's caller unchanged; Watches through a follower hold their subject's
    slots on the leader, so ``max_watches_per_subject`` counts them with direct ones."""
    kib = 1024
    cluster = start_replicas(
        control_plane,
        issuer,
        chisel_binary,
        tmp_path,
        limits={
            "max_request_bytes": 64 * kib,
            "max_response_bytes": 1024 * kib,
            "max_watches_per_subject": 2,
        },
    )
    replicas = ReplicasEnv(cluster)
    watches: list[asyncio.Task[Any]] = []
    try:
        await replicas.forwarding("b")
        follower, leader = replicas.client("b"), replicas.client("a")
        agent = fake(replicas)
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
        assert await replicas.refusals("b", "request_too_large") == 1
        assert await replicas.refusals("a", "request_too_large") == 0
        assert (
            await replicas.forwarded("b", "Apply", "ok")
            + await replicas.forwarded("b", "Apply", "resource_exhausted")
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
        assert await replicas.refusals("a", "response_too_large") == 2
        listing.limit = 10  # a small page still goes through
        assert len((await follower.list(listing, headers=replicas.auth())).items) == 10

        async def hold(client: ResourceServiceClient) -> None:
            async for _ in client.watch(watch(1), headers=replicas.auth()):
                pass  # the fake agent sends one event and then holds the stream open

        async def open_on_leader(count: float) -> bool:
            metrics = await replicas.hubs["a"].ametrics()
            return metrics.get("otterscale_hub_watch_streams_active", cluster="alpha") == count

        watches = [asyncio.create_task(hold(replicas.client("b", "grpc-h2c"))) for _ in range(2)]
        await eventually(lambda: open_on_leader(2), 30, "two forwarded Watches open on the leader")
        for client in (follower, leader):
            with pytest.raises(ConnectError) as third:
                await read_all(client.watch(watch(1), headers=replicas.auth()))
            assert third.value.code is Code.RESOURCE_EXHAUSTED
            assert "limits.max_watches_per_subject" in third.value.message
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await eventually(lambda: open_on_leader(0), 30, "the forwarded Watches closed on the leader")
        # Their slots were freed: two Watches of the same caller are accepted again.
        watches = [asyncio.create_task(hold(replicas.client(name, "grpc-h2c"))) for name in ("a", "b")]
        await eventually(lambda: open_on_leader(2), 30, "two Watches accepted again")
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await replicas.close()
        await cluster.stop()


@pytest.mark.security
async def test_a_forwarded_call_is_audited_once_by_the_leader(
    control_plane: ControlPlane, issuer: Issuer, chisel_binary: ChiselBinary, tmp_path: Path
) -> None:
    """The follower that forwards a call writes no audit event; the leader that serves it writes
    the one event, naming the follower and the caller's own address (signed by the follower)."""
    log = tmp_path / "audit.log"
    cluster = start_replicas(
        control_plane,
        issuer,
        chisel_binary,
        tmp_path,
        audit={"sink": "file", "file": str(log), "reads": "metadata"},
    )
    found = ReplicasEnv(cluster)
    create = pb.CreateRequest(cluster="alpha", version="v1", resource="configmaps", namespace="default")
    try:
        await found.forwarding("b")
        await found.client("b").create(create, headers=found.auth(**{"x-request-id": "fwd-create"}))
        await found.client("b").get(get("g"), headers=found.auth(**{"x-request-id": "fwd-get"}))
        await found.client("a").get(get("g"), headers=found.auth(**{"x-request-id": "direct-get"}))
    finally:
        await found.close()
        await cluster.stop()
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
