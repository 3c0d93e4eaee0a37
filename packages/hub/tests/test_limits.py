"""The hub's limits against hostile or broken clients (issue 8), end to end.

client -> hub (in-process, limits from ``otterscale.yaml``) -> real chisel tunnel -> the real
agent (in-process) -> the session's real kube-apiserver. Every refusal is checked for its exact
Connect code and message and for the refusal counter; every test fails if its limit is absent
(the call would succeed, the memory would grow, or the stream would stay open).

Raw clients are used where the library clients cannot misbehave: an HTTP/1.1 chunked body with
no Content-Length, HTTP/2 DATA frames with no Content-Length, and an HTTP/2 Watch client with a
tiny flow-control window that never reads (``h2``, hypercorn's dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import select
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import pytest_asyncio
import yaml
from connectrpc.code import Code
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from pyqwest import Client, Headers, HTTPTransport, Request, Response

from otterscale.agent import Agent, AgentSettings
from otterscale.common import ChiselBinary, ChiselClient, ConfigError, parse_config
from otterscale.common._h2 import CLOSE_TIMEOUT
from otterscale.hub import Hub
from otterscale.hub._errors import ResponseTooLargeError, WatchLimitError, to_connect_error
from otterscale.hub._limits import (
    DISCARD_BYTES,
    BoundedTransport,
    ClientLimits,
    HubLimits,
    WatchSlots,
    size_text,
)
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, KubeAPIError, free_port, holds_socket

from .conftest import TRANSPORTS, HubEnv, Issuer, hub_settings, make_specs, wait_for, write_config

pytestmark = pytest.mark.security

CLUSTER = "alpha"
SUBJECTS = ("alice", "bob")
RESOURCE_SERVICE = "/otterscale.resource.v1.ResourceService"
KIB = 1024
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------------
# A hub with limits in front of the real agent


@pytest.fixture(scope="module")
def cluster_admins(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The test subjects may do anything (the agent impersonates them) while this module runs.

    The control plane is shared by the whole session: the bindings are removed afterwards, or
    later tests that expect these users to be denied would find them allowed.
    """
    for subject in SUBJECTS:
        control_plane.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": f"otterscale-limits-{subject}"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "cluster-admin",
                },
                "subjects": [{"kind": "User", "name": subject, "apiGroup": "rbac.authorization.k8s.io"}],
            }
        )
    for subject in SUBJECTS:
        control_plane.wait_for(
            lambda subject=subject: control_plane.request(
                "GET", "/api/v1/namespaces", headers={"Impersonate-User": subject}
            ),
            what=f"{subject} bound to cluster-admin",
        )
    yield control_plane
    for subject in SUBJECTS:
        control_plane.request(
            "DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/otterscale-limits-{subject}"
        )


@pytest.fixture
def namespace(cluster_admins: ControlPlane) -> Iterator[str]:
    name = f"limits-{uuid.uuid4().hex[:8]}"
    cluster_admins.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    cluster_admins.wait_for(
        lambda: cluster_admins.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        what=f"namespace {name} ready",
    )
    yield name
    with contextlib.suppress(KubeAPIError):
        cluster_admins.request("DELETE", f"/api/v1/namespaces/{name}")


@dataclass
class LimitedHub:
    """A hub with ``limits`` and the real agent of cluster ``alpha`` connected to it."""

    env: HubEnv
    cp: ControlPlane
    namespace: str
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def hub(self) -> Hub:
        return self.env.hub

    def refusals(self, reason: str) -> float:
        assert self.hub.metrics is not None
        return float(self.hub.metrics.limit_refusals.labels(reason=reason)._value.get())

    def watches_open(self) -> float:
        assert self.hub.metrics is not None
        return float(self.hub.metrics.watch_active.labels(cluster=CLUSTER)._value.get())

    def slots(self) -> int:
        assert self.hub._proxy is not None
        return self.hub._proxy.watch_slots.total()

    def configmap(self, name: str, size: int = 0) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": self.namespace},
            "data": {"payload": "x" * size},
        }

    def create_configmaps(self, count: int, size: int, prefix: str = "cm") -> None:
        for i in range(count):
            self.cp.request(
                "POST",
                f"/api/v1/namespaces/{self.namespace}/configmaps",
                self.configmap(f"{prefix}-{i}", size),
            )


Start = Callable[..., Awaitable[LimitedHub]]


@pytest_asyncio.fixture
async def limited_hub(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary, cluster_admins: ControlPlane, namespace: str
) -> AsyncIterator[Start]:
    started: list[LimitedHub] = []

    async def start(limits: dict[str, Any] | None = None) -> LimitedHub:
        specs = make_specs((CLUSTER,))
        spec = specs[CLUSTER]
        tunnel_port = free_port()
        path = write_config(
            tmp_path / "otterscale.yaml",
            issuer_url=issuer.url,
            specs=specs,
            tunnel_port=tunnel_port,
            limits=limits,
        )
        hub = Hub(hub_settings(path, chisel_binary))
        env = HubEnv(
            hub=hub,
            issuer=issuer,
            specs=specs,
            binary=chisel_binary,
            config_path=path,
            tunnel_port=tunnel_port,
        )
        limited = LimitedHub(env=env, cp=cluster_admins, namespace=namespace)
        started.append(limited)
        await hub.start()
        agent = Agent(
            AgentSettings(
                cluster=CLUSTER,
                host="127.0.0.1",
                port=spec.api_port,
                identity_key=spec.key,
                kubeconfig=str(cluster_admins.kubeconfig),
            )
        )
        await limited.stack.enter_async_context(agent)
        assert hub.fingerprint is not None
        tunnel = ChiselClient(
            chisel_binary,
            server_url=env.tunnel_url,
            fingerprint=hub.fingerprint,
            user=spec.user,
            password=spec.password,
            tunnel_port=spec.tunnel_port,
            api_port=spec.api_port,
            max_retry_interval=1.0,
        )
        await tunnel.start()
        limited.stack.push_async_callback(tunnel.stop)
        assert await tunnel.wait_connected(15), tunnel.state
        await wait_for(lambda: hub.tunnels is not None and hub.tunnels.get(CLUSTER).connected, 10, "agent up")  # type: ignore[union-attr]
        return limited

    try:
        yield start
    finally:
        for limited in started:
            await limited.env.hub.stop()
            await limited.stack.aclose()
            for transport in limited.env._transports:
                await transport.aclose()


def apply_request(namespace: str, name: str, size: int) -> pb.ApplyRequest:
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"payload": "x" * size},
    }
    return pb.ApplyRequest(
        cluster=CLUSTER,
        version="v1",
        resource="configmaps",
        namespace=namespace,
        name=name,
        manifest=json.dumps(manifest).encode(),
        field_manager="limits-test",
        force=True,
    )


def watch_request(namespace: str, **fields: Any) -> pb.WatchRequest:
    return pb.WatchRequest(
        cluster=CLUSTER, version="v1", resource="configmaps", namespace=namespace, **fields
    )


async def first_event(stream: AsyncIterator[pb.WatchEvent]) -> pb.WatchEvent:
    """The first event of a Watch (a test that expects a refusal fails if there is one)."""
    async for event in stream:
        return event
    raise AssertionError("the Watch ended without an event or an error")


def request_refusal(limit_text: str) -> str:
    return (
        f"the request is larger than the hub's limit of {limit_text} "
        "(limits.max_request_bytes in otterscale.yaml)"
    )


# --------------------------------------------------------------------------------------------------
# Request size


def client_for(limited: LimitedHub, transport: str, *, compressed: bool) -> ResourceServiceClient:
    """A client of the hub; connectrpc clients gzip requests unless told not to."""
    protocol, version = TRANSPORTS[transport]
    http = HTTPTransport(http_version=version)
    limited.env._transports.append(http)
    return ResourceServiceClient(
        limited.hub.url,
        protocol=protocol,
        http_client=Client(http),
        send_compression=GzipCompression() if compressed else None,
    )


@pytest.mark.integration
@pytest.mark.parametrize("compressed", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("transport", ["connect-h1", "connect-h2c", "grpc-h2c", "grpcweb-h1"])
async def test_request_over_the_limit_is_refused(
    limited_hub: Start, transport: str, compressed: bool
) -> None:
    limited = await limited_hub({"max_request_bytes": 64 * KIB})
    client = client_for(limited, transport, compressed=compressed)
    auth = limited.env.auth()
    # Just under the limit goes through to the cluster.
    applied = await client.apply(apply_request(limited.namespace, "fits", 60 * KIB), headers=auth)
    assert applied.object["metadata"]["name"] == "fits"
    with pytest.raises(ConnectError) as caught:
        await client.apply(apply_request(limited.namespace, "too-big", 65 * KIB), headers=auth)
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert caught.value.message == request_refusal("65536 bytes (64 KiB)")
    assert limited.refusals("request_too_large") == 1
    with pytest.raises(KubeAPIError) as missing:
        limited.cp.request("GET", f"/api/v1/namespaces/{limited.namespace}/configmaps/too-big")
    assert missing.value.status == 404
    # The connection is still good for the next call.
    got = await client.get(
        pb.GetRequest(
            cluster=CLUSTER, version="v1", resource="configmaps", namespace=limited.namespace, name="fits"
        ),
        headers=auth,
    )
    assert got.object["metadata"]["name"] == "fits"


@pytest.mark.integration
async def test_default_request_limit_is_4_mib(limited_hub: Start) -> None:
    limited = await limited_hub()
    client = limited.env.client("connect-h2c")
    with pytest.raises(ConnectError) as caught:
        await client.apply(apply_request(limited.namespace, "huge", 4 * MIB), headers=limited.env.auth())
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert caught.value.message == request_refusal("4194304 bytes (4 MiB)")
    assert limited.refusals("request_too_large") == 1


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["connect-h2c", "grpc-h2c"])
async def test_watch_request_over_the_limit_is_refused(limited_hub: Start, transport: str) -> None:
    limited = await limited_hub({"max_request_bytes": 16 * KIB})
    client = client_for(limited, transport, compressed=False)
    request = watch_request(limited.namespace, label_selector="a=" + "b" * (17 * KIB))
    with pytest.raises(ConnectError) as caught:
        await first_event(client.watch(request, headers=limited.env.auth()))
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert caught.value.message == request_refusal("16384 bytes (16 KiB)")
    assert limited.refusals("request_too_large") == 1
    assert limited.slots() == 0


def _chunked_post(port: int, token: str, method: str, content_type: str = "application/proto") -> bytes:
    return (
        f"POST {RESOURCE_SERVICE}/{method} HTTP/1.1\r\nHost: hub\r\n"
        f"Content-Type: {content_type}\r\nConnect-Protocol-Version: 1\r\n"
        f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _exchange(port: int, head: bytes, chunk: bytes, *, chunks: int | None) -> tuple[int, bytes]:
    """Send ``head`` then ``chunk`` ``chunks`` times (None: until answered), reading meanwhile.

    A blocking socket in a thread, so an answer that arrives while the body is still being
    sent is read even if the server then resets the connection. Returns (bytes sent, received).
    """
    sent = 0
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        pending = memoryview(b"")
        remaining = chunks
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sending = not received and (remaining != -1 or bool(pending))
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 1)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
                if _complete(received):
                    break
            if writable:
                if not pending:
                    if remaining == 0:
                        pending = memoryview(b"0\r\n\r\n")
                        remaining = -1
                    elif remaining == -1:
                        continue
                    else:
                        pending = memoryview(chunk)
                        remaining = None if remaining is None else remaining - 1
                try:
                    count = sock.send(pending)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    pending = memoryview(b"")
                    remaining = -1
                    continue
                sent += count
                pending = pending[count:]
    return sent, received


def _complete(response: bytes) -> bool:
    head, separator, body = response.partition(b"\r\n\r\n")
    if not separator:
        return False
    headers = _headers(head)
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"])
    return body.endswith(b"0\r\n\r\n")


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")[1:]
    return {k.lower(): v for k, v in (line.split(": ", 1) for line in lines if line)}


def _parse(response: bytes) -> tuple[str, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.decode().split("\r\n")[0]
    if _headers(head).get("transfer-encoding") == "chunked":
        data = b""
        while True:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            data, body = data + rest[:size], rest[size + 2 :]
        body = data
    return status, json.loads(body)


@pytest.mark.integration
async def test_chunked_http1_body_without_length_is_refused(limited_hub: Start) -> None:
    """A 2 MiB chunked body, no Content-Length: read and dropped, never buffered, then refused."""
    limited = await limited_hub({"max_request_bytes": 64 * KIB})
    assert limited.hub.port is not None
    head = _chunked_post(limited.hub.port, limited.env.issuer.token(), "Apply")
    sent, received = await asyncio.to_thread(
        _exchange, limited.hub.port, head, _chunk(b"\x0a" * (16 * KIB)), chunks=128
    )
    status, error = _parse(received)
    assert status.split()[:2] == ["HTTP/1.1", "429"]
    assert error == {"code": "resource_exhausted", "message": request_refusal("65536 bytes (64 KiB)")}
    assert sent >= 2 * MIB  # the whole body went in (read and dropped) before the answer
    assert limited.refusals("request_too_large") == 1


@pytest.mark.integration
async def test_endless_http1_body_is_refused_within_bounds(limited_hub: Start) -> None:
    """A chunked body that never ends: answered once the hub has dropped a bounded amount."""
    limited = await limited_hub({"max_request_bytes": 64 * KIB})
    assert limited.hub.port is not None
    head = _chunked_post(limited.hub.port, limited.env.issuer.token(), "Apply")
    rss_before = _rss()
    sent, received = await asyncio.to_thread(
        _exchange, limited.hub.port, head, _chunk(b"\x0a" * (16 * KIB)), chunks=None
    )
    grown = _rss() - rss_before
    status, error = _parse(received)
    print(
        f"endless chunked body: answered after {sent / MIB:.1f} MiB sent; process RSS +{grown / MIB:.1f} MiB"
    )
    assert status.split()[:2] == ["HTTP/1.1", "429"]
    assert error == {"code": "resource_exhausted", "message": request_refusal("65536 bytes (64 KiB)")}
    # Dropped at most DISCARD_BYTES after the limit (plus what sat in socket buffers), kept none.
    assert sent < DISCARD_BYTES + 8 * MIB
    assert grown < 8 * MIB
    assert limited.refusals("request_too_large") == 1


# --------------------------------------------------------------------------------------------------
# Response size


@pytest.mark.integration
async def test_response_over_the_limit_asks_to_page(limited_hub: Start) -> None:
    limited = await limited_hub({"max_response_bytes": 2 * MIB})
    # 24 ConfigMaps of 256 KiB: a 6 MiB List.
    await asyncio.to_thread(limited.create_configmaps, 24, 256 * KIB)
    client = limited.env.client("connect-h2c")
    auth = limited.env.auth()
    request = pb.ListRequest(
        cluster=CLUSTER, version="v1", resource="configmaps", namespace=limited.namespace
    )
    with pytest.raises(ConnectError) as caught:
        await client.list(request, headers=auth)
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert caught.value.message == (
        "the answer of cluster 'alpha' is larger than the hub's limit of 2097152 bytes (2 MiB) "
        "(limits.max_response_bytes in otterscale.yaml); page with limit/continue"
    )
    assert limited.refusals("response_too_large") == 1
    # Not a tunnel failure: the cluster stays connected, and paging works.
    status = limited.hub.tunnels.get(CLUSTER)  # type: ignore[union-attr]
    assert status is not None
    assert status.connected
    names: list[str] = []
    page = pb.ListRequest(
        cluster=CLUSTER, version="v1", resource="configmaps", namespace=limited.namespace, limit=5
    )
    while True:
        listed = await client.list(page, headers=auth)
        names += [item.object["metadata"]["name"] for item in listed.items]
        if not getattr(listed, "continue"):
            break
        setattr(page, "continue", getattr(listed, "continue"))
    assert len(names) == 24


# --------------------------------------------------------------------------------------------------
# Watches per subject


class WatchStream:
    """One Watch consumed in a task: ``events`` fills as they come, ``error`` when it ends."""

    def __init__(self, client: Any, request: pb.WatchRequest, headers: dict[str, str]) -> None:
        self.events: list[pb.WatchEvent] = []
        self.error: BaseException | None = None
        self.ended = asyncio.Event()
        self.task = asyncio.create_task(self._run(client, request, headers))

    async def _run(self, client: Any, request: pb.WatchRequest, headers: dict[str, str]) -> None:
        try:
            async for event in client.watch(request, headers=headers):
                self.events.append(event)
        except ConnectError as exc:
            self.error = exc
        finally:
            self.ended.set()

    async def cancel(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


WATCH_LIMIT_2 = (
    "too many concurrent Watch streams for this caller: the hub's limit is 2 per subject "
    "(limits.max_watches_per_subject in otterscale.yaml); close one first"
)


async def open_watches(limited: LimitedHub, count: int, subject: str = "alice") -> list[WatchStream]:
    client = limited.env.client("connect-h2c")
    headers = limited.env.auth(limited.env.issuer.token(subject))
    watches = [WatchStream(client, watch_request(limited.namespace), headers) for _ in range(count)]
    await wait_for(lambda: limited.hub._proxy.watch_slots.held(subject) == count, 10, f"{count} watches open")  # type: ignore[union-attr]
    return watches


async def refused_watch(limited: LimitedHub, subject: str = "alice") -> ConnectError:
    client = limited.env.client("connect-h2c")
    headers = limited.env.auth(limited.env.issuer.token(subject))
    with pytest.raises(ConnectError) as caught:
        await first_event(client.watch(watch_request(limited.namespace), headers=headers))
    return caught.value


@pytest.mark.integration
async def test_watches_per_subject_are_limited_and_freed_on_cancel(limited_hub: Start) -> None:
    limited = await limited_hub({"max_watches_per_subject": 2})
    watches = await open_watches(limited, 2)
    error = await refused_watch(limited)
    assert error.code is Code.RESOURCE_EXHAUSTED
    assert error.message == WATCH_LIMIT_2
    assert limited.refusals("watch_limit") == 1
    # Another subject has its own slots.
    others = await open_watches(limited, 2, subject="bob")
    # A client that cancels frees its slot: the next Watch is accepted and streams events.
    await watches[0].cancel()
    await wait_for(lambda: limited.hub._proxy.watch_slots.held("alice") == 1, 10, "slot freed")  # type: ignore[union-attr]
    replacement = await open_watches(limited, 1)
    await asyncio.to_thread(limited.create_configmaps, 1, 10, prefix="after-cancel")
    await wait_for(
        lambda: any(e.type == pb.WatchEvent.TYPE_ADDED for e in replacement[0].events), 10, "event"
    )
    for watch in [*watches[1:], *others, *replacement]:
        await watch.cancel()
    await wait_for(lambda: limited.slots() == 0 and limited.watches_open() == 0, 10, "every slot freed")


@pytest.mark.integration
async def test_watch_slots_are_freed_when_the_agent_ends_the_stream(limited_hub: Start) -> None:
    limited = await limited_hub({"max_watches_per_subject": 2})
    client = limited.env.client("connect-h2c")
    auth = limited.env.auth()
    # Five Watches the cluster refuses (no such resource) after the hub took their slots.
    for _ in range(5):
        request = pb.WatchRequest(cluster=CLUSTER, version="v1", resource="nosuchthings", namespace="default")
        with pytest.raises(ConnectError) as caught:
            async for _ in client.watch(request, headers=auth):
                pass
        assert caught.value.code is Code.NOT_FOUND
    assert limited.slots() == 0
    watches = await open_watches(limited, 2)
    for watch in watches:
        await watch.cancel()


@pytest.mark.integration
async def test_watch_slots_are_freed_on_hub_drain(limited_hub: Start) -> None:
    limited = await limited_hub({"max_watches_per_subject": 2})
    watches = await open_watches(limited, 2)
    # Drain only once the agent's Kubernetes watches are up (each stream saw an event): cancelling
    # aiohttp in the middle of its TLS connect to kube-apiserver can leave a socket for the GC,
    # which this suite's warnings-as-errors then blames on whichever test runs next.
    await asyncio.to_thread(limited.create_configmaps, 1, 10, prefix="live")
    await wait_for(lambda: all(watch.events for watch in watches), 10, "both watches streaming")
    await limited.hub.stop()
    for watch in watches:
        await asyncio.wait_for(watch.ended.wait(), 10)
        assert isinstance(watch.error, ConnectError)
        assert watch.error.code is Code.UNAVAILABLE
        assert (
            watch.error.message == "the hub is shutting down; resume the Watch from the last resourceVersion"
        )
    assert limited.slots() == 0
    assert limited.watches_open() == 0


# --------------------------------------------------------------------------------------------------
# Slow readers


@pytest.mark.integration
async def test_watch_client_that_stops_reading_is_dropped(limited_hub: Start) -> None:
    """A Watch client with a 1 KiB window that never grants more, while the cluster churns.

    The hub's memory stays bounded (HTTP/2 flow control holds the rest in the agent and
    kube-apiserver), the stream is reset within the send timeout plus slack, its slot, gauge and
    agent stream are released, and the hub keeps answering other calls meanwhile.
    """
    timeout = 3.0
    limited = await limited_hub({"watch_send_timeout_seconds": timeout})
    churn = Churn(limited)
    async with RawH2(limited, window=KIB) as conn:
        watch = conn.request("Watch", "application/connect+proto")
        message = watch_request(limited.namespace).SerializeToString()
        await conn.send_data(watch, b"\x00" + len(message).to_bytes(4, "big") + message, end=True)
        await conn.wait(lambda: conn.streams[watch].status is not None, 10)
        assert conn.streams[watch].status == 200
        assert limited.watches_open() == 1
        # The hub sends the headers with the first event (the ConfigMap as it is), whose body
        # no longer fits the window: from here on the client accepts nothing.
        started = conn.streams[watch].headers_at
        with churn:
            await churn.meanwhile(lambda: conn.streams[watch].reset, within=timeout + 10)
            dropped_after = conn.streams[watch].reset_at - started
        assert conn.streams[watch].reset_code == h2.errors.ErrorCodes.CANCEL
        received = len(conn.streams[watch].body)
    peak = churn.peak_growth
    print(
        f"slow reader (h2c): dropped {dropped_after:.2f}s after the client stopped accepting "
        f"(timeout {timeout:g}s); "
        f"{churn.written / MIB:.0f} MiB of events written meanwhile, {received} bytes reached the client; "
        f"process RSS +{peak / MIB:.1f} MiB over {len(churn.rss_samples)} samples; "
        f"other Gets meanwhile: {len(churn.latencies)}, slowest {max(churn.latencies) * 1000:.0f} ms"
    )
    assert timeout - 0.1 <= dropped_after < timeout + 3.0
    assert received <= KIB  # the client never granted more than its first window
    assert max(churn.latencies) < 1.0
    assert peak < 24 * MIB
    assert limited.refusals("slow_watch_client") == 1
    await wait_for(lambda: limited.watches_open() == 0 and limited.slots() == 0, 5, "watch released")
    assert limited.hub._agents is not None
    assert sum(limited.hub._agents._open_streams[CLUSTER]) == 0


@pytest.mark.integration
async def test_http1_watch_client_that_stops_reading_is_dropped(limited_hub: Start) -> None:
    """The same over HTTP/1.1 (Connect streaming, chunked): a client with a 4 KiB receive buffer
    reads the response headers and then nothing. TCP fills up (the hub's send blocks), the call
    ends after the send timeout, and the hub closes its socket although unsent data is left in
    it, instead of waiting forever to flush it (a leaked connection per slow client)."""
    timeout = 3.0
    limited = await limited_hub({"watch_send_timeout_seconds": timeout})
    port = limited.hub.port
    assert port is not None
    churn = Churn(limited)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KIB)  # before connect: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    client_port = sock.getsockname()[1]
    message = watch_request(limited.namespace).SerializeToString()
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    writer.write(
        (
            f"POST {RESOURCE_SERVICE}/Watch HTTP/1.1\r\nHost: hub\r\n"
            "Content-Type: application/connect+proto\r\nConnect-Protocol-Version: 1\r\n"
            f"Authorization: Bearer {limited.env.issuer.token()}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.split()[1] == b"200", head
        assert limited.watches_open() == 1
        started = time.monotonic()
        with churn:
            await churn.meanwhile(lambda: limited.refusals("slow_watch_client") == 1, within=timeout + 20)
            dropped_after = time.monotonic() - started
        # The hub's end of the connection: its socket (found by the two ports) must be closed,
        # with the client still reading nothing (after hypercorn's bounded close, CLOSE_TIMEOUT).
        dropped = time.monotonic()
        await wait_for(
            lambda: not holds_socket(local_port=port, remote_port=client_port),
            CLOSE_TIMEOUT + 5,
            "the hub closing the stalled connection's socket",
        )
        closed_after = time.monotonic() - dropped
    finally:
        writer.transport.abort()
    peak = churn.peak_growth
    print(
        f"slow reader (HTTP/1.1): dropped {dropped_after:.2f}s after the headers (timeout {timeout:g}s, "
        f"plus the time to fill TCP's buffers); {churn.written / MIB:.0f} MiB of events written "
        f"meanwhile; socket closed {closed_after:.2f}s later; "
        f"process RSS +{peak / MIB:.1f} MiB over {len(churn.rss_samples)} samples; "
        f"other Gets meanwhile: {len(churn.latencies)}, slowest {max(churn.latencies) * 1000:.0f} ms"
    )
    assert max(churn.latencies) < 1.0
    assert peak < 24 * MIB
    await wait_for(lambda: limited.watches_open() == 0 and limited.slots() == 0, 5, "watch released")


class Churn:
    """One 256 KiB ConfigMap rewritten without pause from a thread while a test waits (``with``):
    each write is a ~256 KiB MODIFIED event for the Watch under test."""

    SIZE = 256 * KIB

    def __init__(self, limited: LimitedHub) -> None:
        self.limited = limited
        self.written = 0
        self._started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        limited.cp.request(
            "POST",
            f"/api/v1/namespaces/{limited.namespace}/configmaps",
            limited.configmap("churn", self.SIZE),
        )
        #: This process's RSS before the test's client starts, and while the churn goes on.
        self.baseline = _rss()
        self.rss_samples: list[int] = []
        #: Seconds each Get through the hub took meanwhile.
        self.latencies: list[float] = []

    @property
    def peak_growth(self) -> int:
        """Bytes the RSS grew at most over :attr:`baseline`."""
        return max(self.rss_samples) - self.baseline

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        path = f"/api/v1/namespaces/{self.limited.namespace}/configmaps/churn"
        while not self._stop.is_set():
            body = self.limited.configmap("churn", self.SIZE)
            body["data"]["payload"] = uuid.uuid4().hex * (self.SIZE // 32)
            self.limited.cp.request("PUT", path, body)
            self.written += self.SIZE
            self._started.set()

    async def meanwhile(self, done: Callable[[], bool], *, within: float) -> None:
        """Until ``done()``: sample this process's RSS (:attr:`rss_samples`) and time a Get
        through the hub (:attr:`latencies`), 5 a second; fail after ``within`` seconds."""
        await asyncio.to_thread(self._started.wait, 10)
        limited = self.limited
        other = limited.env.client("connect-h2c")
        get = pb.GetRequest(
            cluster=CLUSTER, version="v1", resource="configmaps", namespace=limited.namespace, name="churn"
        )
        started = time.monotonic()
        while not done():
            self.rss_samples.append(_rss())
            t0 = time.perf_counter()
            got = await other.get(get, headers=limited.env.auth())
            self.latencies.append(time.perf_counter() - t0)
            assert got.object["metadata"]["name"] == "churn"
            assert time.monotonic() - started < within, (
                "the stalled Watch was never dropped",
                f"refusals {limited.refusals('slow_watch_client')}, open {limited.watches_open()}",
                f"RSS +{(_rss() - self.baseline) / MIB:.0f} MiB, {self.written / MIB:.0f} MiB written",
            )
            await asyncio.sleep(0.2)


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------------
# A raw HTTP/2 client


@dataclass
class RawStream:
    status: int | None = None
    headers_at: float = 0.0
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: bool = False
    reset_at: float = 0.0
    reset_code: int | None = None


class RawH2:
    """A minimal h2c client over a socket: it never grants flow-control window beyond ``window``."""

    def __init__(self, limited: LimitedHub, *, window: int = 65535) -> None:
        self._limited = limited
        self._window = window
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, RawStream] = {}
        self._changed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawH2:
        port = self._limited.hub.port
        assert port is not None
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        sock = self._writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._window}
        )
        self.conn.initiate_connection()
        await self._flush()
        self._task = asyncio.create_task(self._read(), name="raw-h2-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._writer is not None
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _flush(self) -> None:
        assert self._writer is not None
        data = self.conn.data_to_send()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _read(self) -> None:
        assert self._reader is not None
        while True:
            data = await self._reader.read(65536)
            if not data:
                return
            for event in self.conn.receive_data(data):
                stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
                if stream is None:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    headers: dict[Any, Any] = dict(event.headers or [])  # str: header_encoding is set
                    stream.status = int(headers[":status"])
                    stream.headers_at = time.monotonic()
                elif isinstance(event, h2.events.DataReceived):
                    stream.body += event.data
                    if self._window >= 65535:  # a well-behaved reader gives the window back
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    stream.ended = True
                elif isinstance(event, h2.events.StreamReset):
                    stream.reset, stream.ended = True, True
                    stream.reset_at = time.monotonic()
                    stream.reset_code = event.error_code
            await self._flush()
            self._changed.set()

    def request(self, method: str, content_type: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "hub"),
                (":path", f"{RESOURCE_SERVICE}/{method}"),
                ("content-type", content_type),
                ("connect-protocol-version", "1"),
                ("authorization", f"Bearer {self._limited.env.issuer.token()}"),
            ],
        )
        self.streams[stream_id] = RawStream()
        return stream_id

    async def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Send ``data`` as the window allows; stop early if the stream ends meanwhile."""
        view = memoryview(data)
        while view or end:
            if self.streams[stream_id].ended:
                return
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0 and view:
                await self.wait(
                    lambda: self.conn.local_flow_control_window(stream_id) > 0
                    or self.streams[stream_id].ended,
                    10,
                )
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=end and not view)
            await self._flush()
            if end and not view:
                return

    async def wait(self, check: Callable[[], bool], within: float, *, quiet: bool = False) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while not check():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                if quiet:
                    return
                raise TimeoutError("raw HTTP/2 condition not met")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


# --------------------------------------------------------------------------------------------------
# Unit tests: pure logic, no network


def test_watch_slots_count_per_subject() -> None:
    slots = WatchSlots(2)
    slots.acquire("alice")
    slots.acquire("alice")
    slots.acquire("bob")
    with pytest.raises(WatchLimitError) as caught:
        slots.acquire("alice")
    assert str(caught.value) == WATCH_LIMIT_2
    assert to_connect_error(caught.value).code is Code.RESOURCE_EXHAUSTED
    assert (slots.held("alice"), slots.held("bob"), slots.total()) == (2, 1, 3)
    slots.release("alice")
    slots.acquire("alice")
    for subject in ("alice", "alice", "bob"):
        slots.release(subject)
    assert slots.total() == 0
    assert slots._held == {}  # no empty entries left behind for subjects that came and went


def test_size_text_is_exact_and_readable() -> None:
    assert size_text(4 * MIB) == "4194304 bytes (4 MiB)"
    assert size_text(64 * KIB) == "65536 bytes (64 KiB)"
    assert size_text(1500) == "1500 bytes"


class _Chunks:
    """A pyqwest transport whose response body never ends; counts what was pulled from it."""

    def __init__(self, *, content_length: int | None = None) -> None:
        self.pulled = 0
        self.content_length = content_length

    async def execute(self, request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            while True:
                self.pulled += 16 * KIB
                yield b"\0" * (16 * KIB)

        headers = Headers()
        if self.content_length is not None:
            headers["content-length"] = str(self.content_length)
        return Response(status=200, headers=headers, content=body())


async def test_bounded_transport_stops_reading_at_the_limit() -> None:
    """An endless answer: the hub pulls at most the limit plus one chunk, then gives up."""
    inner = _Chunks()
    client = Client(BoundedTransport(inner, 1 * MIB))
    with pytest.raises(ResponseTooLargeError) as caught:
        await client.post("http://agent/otterscale.resource.v1.ResourceService/List", content=b"")
    assert str(caught.value) == "the answer is larger than 1048576 bytes (1 MiB)"
    assert inner.pulled <= 1 * MIB + 16 * KIB


async def test_bounded_transport_refuses_a_declared_length_without_reading() -> None:
    inner = _Chunks(content_length=2 * MIB)
    client = Client(BoundedTransport(inner, 1 * MIB))
    with pytest.raises(ResponseTooLargeError):
        await client.post("http://agent/otterscale.resource.v1.ResourceService/List", content=b"")
    assert inner.pulled == 0


async def test_body_limit_refuses_a_declared_length_before_reading() -> None:
    received: list[dict[str, Any]] = []
    refused: list[str] = []

    async def receive() -> dict[str, Any]:
        message = {"type": "http.request", "body": b"x" * KIB, "more_body": True}
        received.append(message)
        return message

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent by the middleware itself")

    limits = ClientLimits(app, HubLimits(max_request_bytes=64 * KIB), on_refused=refused.append)
    scope = {
        "type": "http",
        "path": f"{RESOURCE_SERVICE}/Apply",
        "headers": [(b"content-type", b"application/proto"), (b"content-length", b"%d" % (64 * KIB + 1))],
    }
    with pytest.raises(ConnectError) as caught:
        await limits(scope, receive, send)
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert caught.value.message == request_refusal("65536 bytes (64 KiB)")
    assert refused == ["request_too_large"]
    assert received == []  # refused on the header alone


async def test_body_limit_reads_an_envelope_prefix_before_the_message() -> None:
    """A gRPC message that announces more than the limit is refused on its 5-byte prefix."""
    refused: list[str] = []
    chunks = [b"\x00" + (64 * KIB + 1).to_bytes(4, "big"), b"x" * KIB]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if not message.get("more_body"):
                raise AssertionError("the whole body was read")

    limits = ClientLimits(app, HubLimits(max_request_bytes=64 * KIB), on_refused=refused.append)
    scope = {
        "type": "http",
        "path": f"{RESOURCE_SERVICE}/Watch",
        "headers": [(b"content-type", b"application/grpc")],
    }
    with pytest.raises(ConnectError) as caught:
        await limits(scope, receive, None)  # type: ignore[arg-type]
    assert caught.value.message == request_refusal("65536 bytes (64 KiB)")
    assert refused == ["request_too_large"]


async def test_watch_send_timeout_ends_the_call_and_later_sends_fail_at_once() -> None:
    refused: list[str] = []
    blocked = asyncio.Event()
    attempts: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        attempts.append(message["type"])
        if message["type"] == "http.response.body":
            blocked.set()
            await asyncio.Event().wait()  # a client that never accepts anything

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with pytest.raises(ConnectError) as caught:
            await send({"type": "http.response.body", "body": b"event", "more_body": True})
        assert caught.value.code is Code.RESOURCE_EXHAUSTED
        assert caught.value.message == (
            "the client accepted no Watch event for 0.2s (limits.watch_send_timeout_seconds in "
            "otterscale.yaml); resume from the last resourceVersion"
        )
        with pytest.raises(ConnectError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        raise caught.value

    limits = ClientLimits(app, HubLimits(watch_send_timeout=0.2), on_refused=refused.append)
    scope = {"type": "http", "path": f"{RESOURCE_SERVICE}/Watch", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    started = time.monotonic()
    await limits(scope, receive, send)  # the stall is swallowed: the server resets the stream
    assert 0.2 <= time.monotonic() - started < 2.0
    assert refused == ["slow_watch_client"]
    assert attempts == ["http.response.start", "http.response.body"]  # the end was never attempted


def test_limits_come_from_the_config_with_defaults(tmp_path: Path) -> None:
    document = {
        "keycloak": {"realm_url": "https://keycloak.example.com/realms/x", "client_id": "otterscale"},
        "tunnel": {"server": {"host": "127.0.0.1", "port": 8300, "key_seed": "seed-" * 8}},
        "clusters": {
            "dev": {
                "agent": {"auth": {"user": "dev", "pass": "pw-" * 11}, "tunnel_port": 8301, "api_port": 1}
            }
        },
    }
    assert HubLimits.from_config(parse_config(yaml.safe_dump(document), "x").limits) == HubLimits(
        max_request_bytes=4 * MIB,
        max_response_bytes=64 * MIB,
        max_watches_per_subject=1000,
        watch_send_timeout=30.0,
    )
    document["limits"] = {"max_watches_per_subject": 5, "watch_send_timeout_seconds": 2.5}
    limits = HubLimits.from_config(parse_config(yaml.safe_dump(document), "x").limits)
    assert (limits.max_watches_per_subject, limits.watch_send_timeout, limits.max_request_bytes) == (
        5,
        2.5,
        4 * MIB,
    )


@pytest.mark.parametrize(
    ("limits", "problems"),
    [
        ({"max_request_bytes": 100}, ["limits.max_request_bytes: must be greater than or equal to 1024"]),
        ({"max_request_bytes": "4MiB"}, ["limits.max_request_bytes: must be an integer"]),
        ({"max_response_bytes": True}, ["limits.max_response_bytes: must be an integer"]),
        (
            {"max_watches_per_subject": 0},
            ["limits.max_watches_per_subject: must be greater than or equal to 1"],
        ),
        ({"watch_send_timeout_seconds": 0}, ["limits.watch_send_timeout_seconds: must be greater than 0"]),
        (
            {"max_watch": 3},
            [
                "limits.max_watch: unknown key; allowed keys: max_request_bytes, max_response_bytes, "
                "max_watches_per_subject, watch_send_timeout_seconds"
            ],
        ),
        ([1], ["limits: must be a mapping"]),
    ],
)
def test_bad_limits_name_the_key_and_why(limits: Any, problems: list[str]) -> None:
    document = {
        "keycloak": {"realm_url": "https://keycloak.example.com/realms/x", "client_id": "otterscale"},
        "tunnel": {"server": {"host": "127.0.0.1", "port": 8300, "key_seed": "seed-" * 8}},
        "clusters": {
            "dev": {
                "agent": {"auth": {"user": "dev", "pass": "pw-" * 11}, "tunnel_port": 8301, "api_port": 1}
            }
        },
        "limits": limits,
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(document), "otterscale.yaml")
    assert list(caught.value.problems) == [tuple(problem.split(": ", 1)) for problem in problems]
