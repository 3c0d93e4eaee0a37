"""Processes die and come back: agents, the hub, Keycloak. Nobody touches the other side.

Every test that stops something starts it again in ``finally``, so the session's system is whole
for the next test whatever the order. Times are measured and reported (``measurements``).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.testing import System

from .conftest import Hub, Measurements, unique

pytestmark = pytest.mark.e2e

#: A disconnected agent must show as unavailable within this many seconds.
UNAVAILABLE_WITHIN = 5.0
#: A call for a disconnected cluster must fail at once (no probe on the request path).
FAST_FAIL = 1.0
#: How long an idle Watch is kept open to prove it is not cut on a timer (> chisel's keepalive).
WATCH_IDLE = 12.0


def list_configmaps(cluster: str, namespace: str = "default") -> pb.ListRequest:
    return pb.ListRequest(cluster=cluster, version="v1", resource="configmaps", namespace=namespace)


async def until(check: Callable[[], Awaitable[Any]], within: float, what: str, every: float = 0.05) -> Any:
    """Await ``check()`` until it returns a truthy value (returned); AssertionError after ``within``."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:g}s")
        await asyncio.sleep(every)


async def call_code(coro: Awaitable[Any]) -> Code | None:
    """The Connect code a call ends with (None: it succeeded)."""
    try:
        await coro
    except ConnectError as exc:
        return exc.code
    return None


@pytest.mark.parametrize("how", ["kill", "stop"], ids=["sigkill", "sigterm"])
async def test_a_dead_agent_is_unavailable_within_seconds_and_comes_back_alone(
    hub: Hub, otterscale_system: System, measurements: Measurements, how: str
) -> None:
    system = otterscale_system
    client = hub.client("connect-h2c")
    auth = {"west": hub.auth("bob"), "east": hub.auth("alice")}
    assert await call_code(client.list(list_configmaps("west"), headers=auth["west"])) is None
    hub_pid = system.hub.pid if system.hub else None
    try:
        died = time.monotonic()
        if how == "kill":
            system.kill_agent("west")
        else:
            system.stop_agent("west")

        async def unavailable() -> bool:
            return (
                await call_code(client.list(list_configmaps("west"), headers=auth["west"]))
                is Code.UNAVAILABLE
            )

        await until(unavailable, UNAVAILABLE_WITHIN, "west unavailable after its agent died")
        detected = time.monotonic() - died
        # Once known, a disconnected cluster fails fast; the other cluster is untouched.
        started = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await client.list(list_configmaps("west"), headers=auth["west"])
        assert caught.value.code is Code.UNAVAILABLE
        assert "west" in caught.value.message
        assert time.monotonic() - started < FAST_FAIL
        assert await call_code(client.list(list_configmaps("east"), headers=auth["east"])) is None

        clusters = await hub.list_clusters()
        assert not clusters["west"].connected
        assert clusters["west"].last_error
        assert clusters["west"].since.ToSeconds() >= int(time.time() - 60)
        assert clusters["east"].connected
    finally:
        restarted = time.monotonic()
        system.start_agent("west")
    # The agent came back on its own: the hub was not touched, the first call works.
    assert await call_code(client.list(list_configmaps("west"), headers=auth["west"])) is None
    back = time.monotonic() - restarted
    assert system.hub is not None
    assert system.hub.pid == hub_pid

    async def reported() -> Any:
        clusters = await hub.list_clusters()
        return clusters["west"].connected and clusters["west"].agent_version

    await until(reported, 10, "ListClusters showing west connected, with its agent's version")
    measurements.record(
        f"agent_{how}",
        {
            "unavailable_after_s": round(detected, 3),
            "restart_to_first_call_s": round(back, 3),
            "agent_spawn_to_hub_connected_s": round(system.timings.agent_connect["west"][-1], 3),
        },
    )


async def test_a_watch_lives_as_long_as_the_agent_and_ends_unavailable_with_it(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    system = otterscale_system
    auth = hub.auth("bob")
    clients = {t: hub.client(t, timeout_ms=None) for t in ("connect-h1", "grpc-h2c", "grpcweb-h1")}
    events: dict[str, list[pb.WatchEvent]] = {t: [] for t in clients}
    ended: dict[str, float] = {}
    start = await clients["connect-h1"].list(list_configmaps("west", namespace), headers=auth)

    async def watch(transport: str) -> None:
        request = pb.WatchRequest(
            cluster="west",
            version="v1",
            resource="configmaps",
            namespace=namespace,
            resource_version=start.resource_version,
        )
        try:
            async for event in clients[transport].watch(request, headers=auth):
                events[transport].append(event)
        finally:
            ended[transport] = time.monotonic()

    watchers = {t: asyncio.create_task(watch(t), name=f"watch-{t}") for t in clients}
    try:
        # Idle for longer than chisel's keepalive and several hub probes: nothing cuts the streams.
        done, _ = await asyncio.wait(watchers.values(), timeout=WATCH_IDLE)
        assert not done, f"a watch ended while the agent was alive: {[t.exception() for t in done]}"
        cp = system.clusters["west"].control_plane
        assert cp is not None
        name = unique("cm")
        cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}},
        )

        async def everyone_saw_it() -> bool:
            return all(
                any(
                    e.type == pb.WatchEvent.TYPE_ADDED and e.resource.object["metadata"]["name"] == name
                    for e in got
                )
                for got in events.values()
            )

        await until(everyone_saw_it, 10, "the event on every watch")

        died = time.monotonic()
        system.kill_agent("west")
        for transport, task in watchers.items():
            with pytest.raises(ConnectError) as caught:
                await asyncio.wait_for(task, UNAVAILABLE_WITHIN + 5)
            assert caught.value.code is Code.UNAVAILABLE, transport
        after = {t: round(ended[t] - died, 3) for t in clients}
        assert max(after.values()) < UNAVAILABLE_WITHIN, after
    finally:
        for task in watchers.values():
            task.cancel()
        await asyncio.gather(*watchers.values(), return_exceptions=True)
        if "west" not in system.agents:
            system.start_agent("west")
    measurements.record("watch_ended_after_agent_kill_s", after)


async def test_a_restarted_hub_gets_its_agents_back_without_touching_them(
    hub: Hub, otterscale_system: System, namespace: str, measurements: Measurements
) -> None:
    system = otterscale_system
    agent_pids = {name: agent.pid for name, agent in system.agents.items()}
    client = hub.client("connect-h2c")
    auth = {"east": hub.auth("alice"), "west": hub.auth("bob")}
    for cluster in ("east", "west"):
        assert await call_code(client.list(list_configmaps(cluster), headers=auth[cluster])) is None

    # A Watch open while the hub shuts down ends with unavailable (the client resumes elsewhere).
    east = system.clusters["east"].control_plane
    assert east is not None
    east.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "before-restart"}},
    )
    watch_client = hub.client("grpc-h2c", timeout_ms=None)
    first = asyncio.Event()

    async def watch() -> None:
        request = pb.WatchRequest(cluster="east", version="v1", resource="configmaps", namespace=namespace)
        async for _ in watch_client.watch(request, headers=auth["east"]):
            first.set()  # the synthetic ADDED of "before-restart" (no resourceVersion: initial state)

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(first.wait(), 10)
    try:
        stopped = time.monotonic()
        system.stop_hub()
        stop_took = time.monotonic() - stopped
        with pytest.raises(ConnectError) as caught:
            await asyncio.wait_for(watcher, 5)
        assert caught.value.code is Code.UNAVAILABLE
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        spawned = time.monotonic()
        if system.hub is None:
            # Not in a worker thread: a child's parent-death signal follows the thread that
            # spawned it, and the loop's executor threads exit after the test.
            system.start_hub()
    hub_ready = time.monotonic() - spawned
    connected = {name: round(system.wait_connected(name) + hub_ready, 3) for name in ("east", "west")}
    for cluster in ("east", "west"):
        assert await call_code(client.list(list_configmaps(cluster), headers=auth[cluster])) is None
    assert {name: agent.pid for name, agent in system.agents.items()} == agent_pids
    assert all(agent.alive() for agent in system.agents.values())
    clusters = await hub.list_clusters()
    assert clusters["east"].connected
    assert clusters["west"].connected
    assert not clusters["south"].connected
    measurements.record(
        "hub_restart",
        {
            "hub_stop_s": round(stop_took, 3),
            "hub_spawn_to_ready_s": round(system.timings.hub_start[-1], 3),
            "hub_spawn_to_agent_connected_s": connected,
        },
    )


async def test_calls_go_on_while_the_identity_provider_is_down(hub: Hub) -> None:
    """The hub keeps the realm's keys: tokens it can verify keep working while Keycloak is away."""
    client = hub.client()
    token = hub.token("alice")
    assert await call_code(client.list(list_configmaps("east"), headers=hub.auth("alice"))) is None
    keycloak = hub.keycloak
    keycloak.stop()
    try:
        assert await call_code(client.list(list_configmaps("east"), headers=hub.auth("alice"))) is None
        clusters = await hub.list_clusters()
        assert clusters["east"].connected
        # Garbage is still refused, with the precise code (not unavailable, not internal).
        code = await call_code(
            client.list(list_configmaps("east"), headers={"authorization": "Bearer x.y.z"})
        )
        assert code is Code.UNAUTHENTICATED
    finally:
        keycloak.start()
    fresh = hub.token("alice", fresh=True)
    assert fresh != token
    assert await call_code(client.list(list_configmaps("east"), headers=hub.auth("alice"))) is None


def child_pids(parent: int, needle: str) -> list[int]:
    """Pids of ``parent``'s direct children whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent and needle in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("whose", ["hub", "agent"])
async def test_a_killed_chisel_is_restarted_and_the_tunnel_comes_back(
    hub: Hub, otterscale_system: System, measurements: Measurements, whose: str
) -> None:
    """SIGKILL the hub's chisel server or the east agent's chisel client: its supervisor restarts
    it, the tunnel comes back, and neither the hub nor any agent process is restarted."""
    system = otterscale_system
    assert system.hub is not None
    pids = {"hub": system.hub.pid, **{name: agent.pid for name, agent in system.agents.items()}}
    owner = pids["hub"] if whose == "hub" else pids["east"]
    needle = "chisel server" if whose == "hub" else "chisel client"
    (chisel,) = child_pids(owner, needle)
    client = hub.client("connect-h2c")
    auth = hub.auth("alice")
    assert await call_code(client.list(list_configmaps("east"), headers=auth)) is None

    killed = time.monotonic()
    os.kill(chisel, signal.SIGKILL)

    async def down() -> bool:
        return await call_code(client.list(list_configmaps("east"), headers=auth)) is Code.UNAVAILABLE

    await until(down, UNAVAILABLE_WITHIN, "east unavailable after its tunnel's chisel died")

    async def back() -> bool:
        return await call_code(client.list(list_configmaps("east"), headers=auth)) is None

    await until(back, 30, "east answering again", every=0.1)
    recovered = time.monotonic() - killed
    system.wait_connected("west", timeout=30)
    assert await call_code(client.list(list_configmaps("west"), headers=hub.auth("bob"))) is None
    (replacement,) = child_pids(owner, needle)
    assert replacement != chisel
    assert system.hub is not None
    assert {"hub": system.hub.pid, **{n: a.pid for n, a in system.agents.items()}} == pids
    if whose == "hub":
        restarts = re.search(r"^otterscale_hub_chisel_restarts_total (\S+)$", system.hub_metrics(), re.M)
        assert restarts is not None
        assert float(restarts.group(1)) >= 1
    measurements.record(f"{whose}_chisel_killed_to_first_call_s", round(recovered, 3))
