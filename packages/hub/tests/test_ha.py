"""High availability end to end: three hub processes, one real agent, a real control plane.

The harness is :func:`otterscale.testing.start_hub_replicas` (see ``otterscale.testing._ha``): a
kube-apiserver holding the Lease and Pods ``hub-0..2`` (Pod IPs ``127.0.0.11..13``) with the
chart's RBAC; three ``otterscale server --leader-elect`` processes, each on its own loopback
address and the same port; one ``otterscale agent`` whose ``--tunnel-server-url`` is a relay that
stands in for the chart's tunnel Service (it follows the leader-labelled Pod). Tokens come from
the local OIDC issuer of conftest.py.

Fail-over timings are measured from the kill or the SIGTERM: a new Lease holder, the agent
connected to the new leader (its ``otterscale_hub_tunnel_up``), and a Get through every
surviving replica succeeding. They are printed (the targets: 20 s after kill -9, 5 s after
SIGTERM, with the default 15 s / 10 s / 2 s timings); the assertions bound them only as far as
a loaded 2-core CI box allows while still telling the behaviour apart: after kill -9 the
successor must wait for the 15 s lease, after SIGTERM it must not (the Lease was released).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import load_config
from otterscale.hub._replicas import ReplicaSigner, replica_key
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, HubReplicas, ManagedProcess, start_hub_replicas
from otterscale.testing import eventually as until

from .conftest import AUDIENCE, Issuer

pytestmark = [pytest.mark.integration, pytest.mark.ha]

REPLICAS = 3
HOP = "x-otterscale-forwarded-by"
GET = "/otterscale.resource.v1.ResourceService/Get"


@dataclass
class System:
    """The replicas plus what the tests call them with (clients, tokens, a probe Get)."""

    replicas: HubReplicas
    issuer: Issuer
    transports: list[HTTPTransport] = field(default_factory=list)

    @property
    def cp(self) -> ControlPlane:
        return self.replicas.cp

    @property
    def namespace(self) -> str:
        return self.replicas.namespace

    @property
    def hubs(self) -> dict[int, ManagedProcess]:
        return self.replicas.hubs

    def start_hub(self, index: int) -> None:
        self.replicas.start_hub(index)

    def client(self, index: int, *, timeout_ms: int = 3000) -> ResourceServiceClient:
        transport = HTTPTransport(http_version=HTTPVersion.HTTP2, connect_timeout=1.0)
        self.transports.append(transport)
        return ResourceServiceClient(
            self.replicas.url(index), http_client=Client(transport), timeout_ms=timeout_ms
        )

    def auth(self, subject: str = "alice") -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(subject)}"}

    def get(self, name: str = "probe") -> pb.GetRequest:
        return pb.GetRequest(
            cluster="alpha", version="v1", resource="configmaps", namespace=self.namespace, name=name
        )

    async def ready(self, index: int) -> bool:
        return await self.replicas.ready(index)

    async def metrics(self, index: int) -> dict[str, float]:
        return await self.replicas.metrics(index)

    async def holder(self) -> str | None:
        return await self.replicas.holder()

    async def labelled(self) -> list[str]:
        return await self.replicas.labelled()

    async def leader(self) -> int:
        return await self.replicas.leader()

    async def agent_connected_to(self, index: int) -> bool:
        return await self.replicas.agent_connected_to(index, "alpha")

    async def call_ok(self, index: int) -> bool:
        try:
            got = await self.client(index).get(self.get(), headers=self.auth())
        except ConnectError:
            return False
        return bool(got.object["metadata"]["name"] == "probe")

    async def close(self) -> None:
        await self.replicas.stop()
        for transport in self.transports:
            await transport.aclose()


@pytest_asyncio.fixture
async def system(control_plane: ControlPlane, issuer: Issuer, tmp_path: Path) -> AsyncIterator[System]:
    replicas = await start_hub_replicas(
        control_plane, tmp_path, realm_url=issuer.url, client_id=AUDIENCE, replicas=REPLICAS
    )
    found = System(replicas, issuer)
    try:
        control_plane.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "probe", "namespace": replicas.namespace},
                "data": {},
            }
        )
        yield found
    finally:
        await found.close()
        with contextlib.suppress(Exception):
            control_plane.request("DELETE", f"/api/v1/namespaces/{replicas.namespace}")


def report(what: str, numbers: dict[str, float], capsys: pytest.CaptureFixture[str]) -> None:
    line = json.dumps({"scenario": what, **{k: round(v, 2) for k, v in numbers.items()}})
    with capsys.disabled():
        print(f"\nHA timings: {line}")


async def measure(system: System, survivors: list[int], old_leader: int, within: float) -> dict[str, float]:
    """Seconds until: a new Lease holder, the agent connected to it, a Get through every survivor."""
    started = time.monotonic()
    found: dict[str, float] = {}
    new_leader: int | None = None
    while len(found) < 3:
        now = time.monotonic() - started
        if now > within:
            raise AssertionError(f"fail-over incomplete after {within}s: {found}")
        if "new_leader" not in found:
            with contextlib.suppress(Exception):
                holder = await system.holder()
                if holder is not None and holder != f"hub-{old_leader}":
                    new_leader = int(holder.removeprefix("hub-"))
                    found["new_leader"] = time.monotonic() - started
        if (
            new_leader is not None
            and "agent_connected" not in found
            and await system.agent_connected_to(new_leader)
        ):
            found["agent_connected"] = time.monotonic() - started
        if "calls_ok" not in found:
            results = await asyncio.gather(*(system.call_ok(index) for index in survivors))
            if all(results):
                found["calls_ok"] = time.monotonic() - started
        await asyncio.sleep(0.05)
    return found


def name_of(event: pb.WatchEvent) -> str:
    """The object's name in a Watch event ("" for a bookmark or an event without an object)."""
    if event.type not in (pb.WatchEvent.TYPE_ADDED, pb.WatchEvent.TYPE_MODIFIED):
        return ""
    metadata = json_format.MessageToDict(event.resource.object).get("metadata", {})
    return str(metadata.get("name", ""))


# --------------------------------------------------------------------------------------------------
# Tests


async def test_one_leader_and_every_replica_serves(system: System) -> None:
    leader = await system.leader()
    assert await system.labelled() == [f"hub-{leader}"]
    for index in range(REPLICAS):
        assert await system.call_ok(index), index
    followers = [i for i in range(REPLICAS) if i != leader]
    # The caller's identity reaches the cluster through a follower and the leader: the agent acts
    # as mallory, whom the cluster's RBAC refuses.
    with pytest.raises(ConnectError) as refused:
        await system.client(followers[0]).get(system.get(), headers=system.auth("mallory"))
    assert refused.value.code is Code.PERMISSION_DENIED
    assert 'User "mallory"' in refused.value.message
    # A call that another replica already forwarded is never forwarded again.
    key = replica_key(load_config(system.replicas.configs[followers[0]]))
    signed = ReplicaSigner(key).headers(f"hub-{followers[1]}", "127.0.0.1:1", GET)
    with pytest.raises(ConnectError) as hop:
        await system.client(followers[0]).get(system.get(), headers={**system.auth(), **signed})
    assert hop.value.code is Code.UNAVAILABLE
    assert "does not lead" in hop.value.message
    # A client cannot pose as a replica: its unsigned hop header is dropped and the call served.
    got = await system.client(followers[0]).get(
        system.get(), headers={**system.auth(), HOP: f"hub-{followers[1]}"}
    )
    assert got.object["metadata"]["name"] == "probe"
    # Followers answer /readyz and /metrics themselves.
    for index in followers:
        assert await system.ready(index)
        metrics = await system.metrics(index)
        assert metrics["otterscale_hub_leader"] == 0
        assert (
            metrics[
                'otterscale_hub_forwarded_rpcs_total{code="ok",method="Get",service="otterscale.resource.v1.ResourceService"}'
            ]
            >= 1
        )


async def test_kill_9_of_the_leader(system: System, capsys: pytest.CaptureFixture[str]) -> None:
    leader = await system.leader()
    survivors = [i for i in range(REPLICAS) if i != leader]
    watch = pb.WatchRequest(cluster="alpha", version="v1", resource="configmaps", namespace=system.namespace)
    stream = system.client(survivors[0], timeout_ms=120_000).watch(watch, headers=system.auth()).__aiter__()
    while name_of(await asyncio.wait_for(stream.__anext__(), 15)) != "probe":
        pass

    async def watch_ends() -> tuple[float, Code | None]:
        started = time.monotonic()
        try:
            while True:
                await stream.__anext__()
        except ConnectError as exc:
            return time.monotonic() - started, exc.code
        except StopAsyncIteration:
            return time.monotonic() - started, None

    ended = asyncio.create_task(watch_ends())
    await asyncio.sleep(0)
    system.hubs[leader].signal(signal.SIGKILL)
    numbers = await measure(system, survivors, leader, within=40)
    watch_seconds, code = await asyncio.wait_for(ended, 10)
    numbers["watch_via_follower_ended"] = watch_seconds
    report("kill -9 (lease 15s, renew 10s, retry 2s)", numbers, capsys)
    # The successor waited for the lease (15 s) to expire, and took over well before another one
    # passed (the target, 20 s, is a number to watch in the printed report, not on a loaded box).
    assert 10 < numbers["new_leader"] < 30, numbers
    # The Watch through a follower ended with unavailable as soon as the leader's connection
    # broke (kill -9 closes its sockets at once), not when the lease expired 15 s later.
    assert code is Code.UNAVAILABLE
    assert watch_seconds < 10, watch_seconds
    system.hubs[leader].stop()
    # The killed replica comes back (same Pod, as Kubernetes restarts the container) as a follower.
    system.start_hub(leader)
    await until(lambda: system.ready(leader), 30, "the restarted replica ready")
    await until(lambda: system.call_ok(leader), 10, "calls through the restarted replica")
    new = await system.leader()
    assert new != leader
    assert await system.labelled() == [f"hub-{new}"]


async def test_sigterm_of_the_leader_hands_over(system: System, capsys: pytest.CaptureFixture[str]) -> None:
    leader = await system.leader()
    survivors = [i for i in range(REPLICAS) if i != leader]
    system.hubs[leader].signal(signal.SIGTERM)
    numbers = await measure(system, survivors, leader, within=30)
    report("SIGTERM (lease 15s, renew 10s, retry 2s)", numbers, capsys)
    # Released, not expired: the leader says so, and its successor took over long before the
    # 15 s lease could have run out (the target, 5 s for the calls, is in the printed report).
    assert system.hubs[leader].popen.wait(30) == 0
    assert "released Lease" in system.hubs[leader].log()
    assert numbers["new_leader"] < 10, numbers
    assert numbers["calls_ok"] < 12, numbers
    new = await system.leader()
    assert new != leader
    assert await system.labelled() == [f"hub-{new}"]


async def test_watch_through_a_follower(system: System) -> None:
    leader = await system.leader()
    follower, other = (i for i in range(REPLICAS) if i != leader)
    watch = pb.WatchRequest(cluster="alpha", version="v1", resource="configmaps", namespace=system.namespace)
    stream = system.client(follower, timeout_ms=120_000).watch(watch, headers=system.auth()).__aiter__()

    async def next_named(name: str) -> pb.WatchEvent:
        while True:
            event = await asyncio.wait_for(stream.__anext__(), 15)
            if name_of(event) == name:
                return event

    await next_named("probe")  # the initial ADDED
    # Another follower restarting does not disturb it.
    system.hubs[other].signal(signal.SIGTERM)
    assert system.hubs[other].popen.wait(15) == 0
    system.start_hub(other)
    await until(lambda: system.ready(other), 30, "the other follower back")
    system.cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "during", "namespace": system.namespace},
        }
    )
    event = await next_named("during")
    last_version = event.resource_version
    # The leader going away ends it cleanly, with unavailable.
    system.hubs[leader].signal(signal.SIGTERM)
    started = time.monotonic()

    async def drain() -> None:
        while True:
            await asyncio.wait_for(stream.__anext__(), 15)

    with pytest.raises(ConnectError) as ended:
        await drain()
    assert ended.value.code is Code.UNAVAILABLE
    # At the leader's drain (3 s here), not after its 15 s lease; generous for a loaded box.
    assert time.monotonic() - started < 12
    # The client resumes from its last resourceVersion through the same follower.
    system.cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "after", "namespace": system.namespace},
        }
    )
    resumed_request = pb.WatchRequest(
        cluster="alpha",
        version="v1",
        resource="configmaps",
        namespace=system.namespace,
        resource_version=last_version,
    )

    async def resumed() -> bool:
        resumed_stream = system.client(follower).watch(resumed_request, headers=system.auth()).__aiter__()
        try:
            event = await asyncio.wait_for(resumed_stream.__anext__(), 5)
        except (ConnectError, TimeoutError):
            return False
        finally:
            aclose = getattr(resumed_stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return name_of(event) == "after"

    await until(resumed, 30, "the Watch resumed after the hand-over", every=0.5)
