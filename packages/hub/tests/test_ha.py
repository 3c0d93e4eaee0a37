"""High availability end to end: three hub processes, one real agent, a real control plane.

What runs (everything real except the Service, which a small relay emulates):

- a kube-apiserver holding the Lease and three Pods ``hub-0..2`` whose ``status.podIP`` is
  ``127.0.0.11..13`` (written as admin: there is no kubelet), plus the chart's ServiceAccount,
  Role and RoleBinding; the hubs use that ServiceAccount's token, so the chart's RBAC is what
  they get;
- three ``otterscale server --leader-elect`` processes with ``POD_NAME``/``POD_NAMESPACE``, each
  on its own loopback address (Linux routes all of 127.0.0.0/8 to lo) and the same fixed port,
  so "<leader Pod IP>:<--address port>" is exactly how followers reach the leader. Their
  configurations differ only in ``tunnel.server.host`` (the replica's address);
- one ``otterscale agent`` process (real chisel client, the same control plane as its cluster,
  impersonating callers) whose ``--tunnel-server-url`` is the relay;
- the relay stands in for the chart's tunnel Service: it forwards each new TCP connection to the
  Pod that carries ``otterscale.io/leader=true`` (polled every 100 ms, as endpoints would follow
  the label), and refuses connections while no Pod has it;
- tokens from the local OIDC issuer of conftest.py.

Fail-over timings are measured from the kill or the SIGTERM: a new Lease holder, the agent
connected to the new leader (its ``otterscale_hub_tunnel_up``), and a Get through every
surviving replica succeeding. They are printed and checked against the targets (20 s after
kill -9, 5 s after SIGTERM) with the default 15 s / 10 s / 2 s timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import ChiselBinary, load_config
from otterscale.hub._hub import tunnel_fingerprint
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, ManagedProcess, free_port

from .conftest import AUDIENCE, Issuer

pytestmark = [pytest.mark.integration, pytest.mark.ha]

BIN = Path(sys.executable).parent
OTTERSCALE = str(BIN / "otterscale")
LEASE = "otterscale-server-leader"
LABEL = "otterscale.io/leader"
REPLICAS = 3
HOP = "x-otterscale-forwarded-by"


def replica_ip(index: int) -> str:
    return f"127.0.0.{11 + index}"


# --------------------------------------------------------------------------------------------------
# The tunnel Service, emulated


class LeaderRelay:
    """Forwards TCP connections to ``<Pod IP of the leader-labelled Pod>:<port>`` (see the docstring)."""

    def __init__(self, cp: ControlPlane, namespace: str, target_port: int) -> None:
        self.cp = cp
        self.namespace = namespace
        self.target_port = target_port
        self.port = free_port()
        self.target: str | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._poller = asyncio.create_task(self._poll(), name="relay-poll")

    async def _poll(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods?labelSelector={LABEL.replace('/', '%2F')}%3Dtrue"
        while True:
            with contextlib.suppress(Exception):
                pods = (await asyncio.to_thread(self.cp.request, "GET", path, timeout=5))["items"]
                ips = sorted(pod["status"].get("podIP") for pod in pods if pod["status"].get("podIP"))
                self.target = ips[0] if ips else None
            await asyncio.sleep(0.1)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with contextlib.suppress(asyncio.CancelledError):  # stop() cancels: not an error of the relay
            await self._relay(reader, writer)
        self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target = self.target
            if target is None:
                return  # no endpoint: the connection is closed at once
            try:
                up_reader, up_writer = await asyncio.open_connection(target, self.target_port)
            except OSError:
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in [self._poller, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in [self._poller, *self._tasks] if t is not None), return_exceptions=True
        )
        if self._server is not None:
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


# --------------------------------------------------------------------------------------------------
# The system


@dataclass
class System:
    cp: ControlPlane
    namespace: str
    issuer: Issuer
    binary: ChiselBinary
    directory: Path
    port: int
    tunnel_port: int
    configs: list[Path]
    kubeconfig: Path
    relay: LeaderRelay
    hubs: dict[int, ManagedProcess] = field(default_factory=dict)
    agent: ManagedProcess | None = None
    transports: list[HTTPTransport] = field(default_factory=list)
    starts: int = 0

    def url(self, index: int) -> str:
        return f"http://{replica_ip(index)}:{self.port}"

    def start_hub(self, index: int) -> ManagedProcess:
        self.starts += 1
        process = ManagedProcess(
            f"hub-{index}",
            [
                OTTERSCALE,
                "server",
                f"--address={replica_ip(index)}:{self.port}",
                f"--config={self.configs[index]}",
                f"--chisel={self.binary.path}",
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect",
                "--log-format=json",
                "--log-level=info",
                "--drain-timeout=3",
            ],
            self.directory / f"hub-{index}.{self.starts}.log",
            env={
                "POD_NAME": f"hub-{index}",
                "POD_NAMESPACE": self.namespace,
                "HOME": str(self.directory),
                "PATH": os.environ.get("PATH", ""),
            },
        )
        self.hubs[index] = process
        return process

    def http(self) -> Client:
        transport = HTTPTransport(http_version=HTTPVersion.HTTP1, connect_timeout=1.0, timeout=3.0)
        self.transports.append(transport)
        return Client(transport)

    def client(self, index: int, *, timeout_ms: int = 3000) -> ResourceServiceClient:
        transport = HTTPTransport(http_version=HTTPVersion.HTTP2, connect_timeout=1.0)
        self.transports.append(transport)
        return ResourceServiceClient(self.url(index), http_client=Client(transport), timeout_ms=timeout_ms)

    def auth(self, subject: str = "alice") -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(subject)}"}

    def get(self, name: str = "probe") -> pb.GetRequest:
        return pb.GetRequest(
            cluster="alpha", version="v1", resource="configmaps", namespace=self.namespace, name=name
        )

    async def ready(self, index: int) -> bool:
        try:
            return (await self.http().get(self.url(index) + "/readyz")).status == 200
        except Exception:
            return False

    async def metrics(self, index: int) -> dict[str, float]:
        response = await self.http().get(self.url(index) + "/metrics")
        found: dict[str, float] = {}
        for line in bytes(response.content).decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                found[key] = float(value)
        return found

    async def holder(self) -> str | None:
        lease = await asyncio.to_thread(
            self.cp.request, "GET", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{LEASE}"
        )
        holder: str | None = lease["spec"].get("holderIdentity")
        return holder

    async def labelled(self) -> list[str]:
        pods = await asyncio.to_thread(self.cp.request, "GET", f"/api/v1/namespaces/{self.namespace}/pods")
        return sorted(
            pod["metadata"]["name"] for pod in pods["items"] if pod["metadata"].get("labels", {}).get(LABEL)
        )

    async def leader(self) -> int:
        """The index of the one leader: the Lease, the label and the replicas' gauges agree."""
        holder = await self.holder()
        assert holder is not None
        index = int(holder.removeprefix("hub-"))
        running = [i for i, process in self.hubs.items() if process.alive()]
        gauges = {i: (await self.metrics(i))["otterscale_hub_leader"] for i in running}
        assert gauges == {i: 1.0 if i == index else 0.0 for i in running}, gauges
        return index

    async def agent_connected_to(self, index: int) -> bool:
        try:
            return (await self.metrics(index)).get('otterscale_hub_tunnel_up{cluster="alpha"}') == 1.0
        except Exception:
            return False

    async def call_ok(self, index: int) -> bool:
        try:
            got = await self.client(index).get(self.get(), headers=self.auth())
        except ConnectError:
            return False
        return bool(got.object["metadata"]["name"] == "probe")

    async def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        # All at once: one by one, each follower in turn would win the Lease and start chisel.
        for process in self.hubs.values():
            if process.alive():
                process.signal(signal.SIGTERM)
        for process in self.hubs.values():
            process.stop()
        await self.relay.stop()
        for transport in self.transports:
            await transport.aclose()


async def until(check: Callable[[], Any], within: float, what: str, *, every: float = 0.1) -> float:
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what} not within {within}s")
        await asyncio.sleep(every)


def chart_rbac(namespace: str) -> list[dict[str, Any]]:
    """What charts/otterscale-hub/templates/rbac.yaml and serviceaccount.yaml create."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "otterscale-hub", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "otterscale-hub-leader-election", "namespace": namespace},
            "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "resourceNames": [LEASE],
                    "verbs": ["get", "list", "watch", "update", "patch"],
                },
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "otterscale-hub-leader-election", "namespace": namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "otterscale-hub-leader-election",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "otterscale-hub", "namespace": namespace}],
        },
        # What callers may do in the agent's cluster (the agent impersonates them).
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "configmaps", "namespace": namespace},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "alice-configmaps", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmaps"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
        },
    ]


def service_account_kubeconfig(cp: ControlPlane, namespace: str, path: Path) -> Path:
    token = cp.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/otterscale-hub/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )["status"]["token"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_file)}}
        ],
        "users": [{"name": "hub", "user": {"token": token}}],
        "contexts": [{"name": "hub", "context": {"cluster": "test", "user": "hub", "namespace": namespace}}],
        "current-context": "hub",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@pytest_asyncio.fixture
async def system(
    control_plane: ControlPlane, issuer: Issuer, chisel_binary: ChiselBinary, tmp_path: Path
) -> AsyncIterator[System]:
    cp = control_plane
    namespace = f"ha-{secrets.token_hex(3)}"
    cp.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
    )
    cp.wait_for(
        lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        what="the namespace's default ServiceAccount",
    )
    for obj in chart_rbac(namespace):
        cp.apply(obj)
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "probe", "namespace": namespace},
            "data": {},
        }
    )
    for index in range(REPLICAS):
        name = f"hub-{index}"
        cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "otterscale-hub"}},
                "spec": {
                    "serviceAccountName": "otterscale-hub",
                    "containers": [{"name": "hub", "image": "registry.example/otterscale-hub:test"}],
                },
            },
        )
        ip = replica_ip(index)
        cp.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
            content_type="application/merge-patch+json",
        )

    port, tunnel_port, tunnel_local, api_port = free_port(), free_port(), free_port(), free_port()
    document: dict[str, Any] = {
        "keycloak": {"realm_url": issuer.url, "client_id": AUDIENCE},
        "tunnel": {"server": {"host": "127.0.0.1", "port": tunnel_port, "key_seed": "ha-test-seed"}},
        "clusters": {
            "alpha": {
                "agent": {
                    "auth": {"user": "alpha-agent", "pass": "alpha-password-0123456789abcdef"},
                    "tunnel_port": tunnel_local,
                    "api_port": api_port,
                }
            }
        },
    }
    probe = tmp_path / "probe.yaml"
    probe.write_text(yaml.safe_dump(document))
    fingerprint = await tunnel_fingerprint(load_config(probe), chisel=str(chisel_binary.path))
    document["clusters"]["alpha"]["agent"]["fingerprint"] = fingerprint
    configs = []
    for index in range(REPLICAS):
        document["tunnel"]["server"]["host"] = replica_ip(index)
        path = tmp_path / f"hub-{index}.yaml"
        path.write_text(yaml.safe_dump(document))
        configs.append(path)

    relay = LeaderRelay(cp, namespace, tunnel_port)
    await relay.start()
    found = System(
        cp=cp,
        namespace=namespace,
        issuer=issuer,
        binary=chisel_binary,
        directory=tmp_path,
        port=port,
        tunnel_port=tunnel_port,
        configs=configs,
        kubeconfig=service_account_kubeconfig(cp, namespace, tmp_path / "hub.kubeconfig"),
        relay=relay,
    )
    try:
        for index in range(REPLICAS):
            found.start_hub(index)
        for index in range(REPLICAS):
            await until(lambda index=index: found.ready(index), 30, f"hub-{index} ready")  # type: ignore[misc]
        await until(lambda: _has_leader(found), 30, "a leader")
        found.agent = ManagedProcess(
            "agent-alpha",
            [
                OTTERSCALE,
                "agent",
                "--cluster=alpha",
                f"--config={configs[0]}",
                f"--kubeconfig={cp.kubeconfig}",
                f"--chisel={chisel_binary.path}",
                f"--tunnel-server-url={relay.url}",
                f"--address=127.0.0.1:{api_port}",
                "--log-format=json",
            ],
            tmp_path / "agent-alpha.log",
            env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")},
        )
        leader = await found.leader()
        await until(lambda: found.agent_connected_to(leader), 30, "the agent connected")
        yield found
    finally:
        await found.close()
        with contextlib.suppress(Exception):
            cp.request("DELETE", f"/api/v1/namespaces/{namespace}")


async def _has_leader(system: System) -> bool:
    try:
        holder = await system.holder()
    except Exception:
        return False
    return holder is not None and await system.labelled() == [holder]


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
    # A call that was already forwarded is never forwarded again.
    with pytest.raises(ConnectError) as hop:
        await system.client(followers[0]).get(
            system.get(), headers={**system.auth(), HOP: f"hub-{followers[1]}"}
        )
    assert hop.value.code is Code.UNAVAILABLE
    assert "does not lead" in hop.value.message
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
    assert numbers["calls_ok"] < 20, numbers
    # The Watch through a follower ended with unavailable as soon as the leader's connection
    # broke, not when the lease expired.
    assert code is Code.UNAVAILABLE
    assert watch_seconds < 3, watch_seconds
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
    assert numbers["new_leader"] < 2, numbers  # released, not expired
    assert numbers["calls_ok"] < 5, numbers
    assert system.hubs[leader].popen.wait(10) == 0
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
    assert time.monotonic() - started < 5
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
