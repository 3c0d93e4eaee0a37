"""The hub's limits against hostile or broken clients (issue 8), end to end.

client -> hub process (limits from ``otterscale.yaml``) -> real chisel tunnel -> the real agent
process -> the session's real kube-apiserver (``otterscale.testing.start_system``). Every refusal
is checked for its exact Connect code and message and for the refusal counter (scraped from the
hub's ``/metrics``); every test fails if its limit is absent (the call would succeed, the hub's
memory would grow, or the stream would stay open). Memory is the hub process's RSS; open streams
are the hub's ``otterscale_hub_watch_streams_active`` gauge and, behind the agent, the Watch
requests kube-apiserver serves.

Hubs with the same limits are shared by the tests of this module (each test has its own
namespace, and reads the counters as differences from its start); a test that stops its hub
gets one of its own.

Raw clients are used where the library clients cannot misbehave: an HTTP/1.1 chunked body with
no Content-Length, HTTP/2 DATA frames with no Content-Length, and an HTTP/2 Watch client with a
tiny flow-control window that never reads (``h2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from connectrpc.code import Code
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from pyqwest import Client, Headers, HTTPTransport, HTTPVersion, Request, Response

from otterscale.common import ChiselBinary, ConfigError, parse_config
from otterscale.hub._errors import ResponseTooLargeError, WatchLimitError, to_connect_error
from otterscale.hub._limits import BoundedTransport, HubLimits, WatchSlots, size_text
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, HubProcess, KubeAPIError, System, holds_socket, start_system

from .conftest import (
    AUDIENCE,
    TRANSPORTS,
    HubEnv,
    HubWorld,
    Issuer,
    RawH2,
    end_of_connect_stream,
    eventually,
    wait_for,
)

pytestmark = pytest.mark.security

CLUSTER = "alpha"
SUBJECTS = ("alice", "bob")
RESOURCE_SERVICE = "/otterscale.resource.v1.ResourceService"
KIB = 1024
MIB = 1024 * 1024
WATCHES = "otterscale_hub_watch_streams_active"
REFUSALS = "otterscale_hub_limit_refusals_total"


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


class LimitedHub:
    """A hub process with ``limits`` and the real agent of cluster ``alpha`` connected to it, as
    one test sees it: its namespace, and counters read as differences from the test's start."""

    def __init__(
        self, system: System, issuer: Issuer, cp: ControlPlane, namespace: str, binary: ChiselBinary
    ) -> None:
        assert system.hub is not None
        self.system = system
        self.cp = cp
        self.namespace = namespace
        world = HubWorld(system.hub, issuer, {}, binary, system.config_path, system.tunnel_port)
        self.env = HubEnv(world)
        self._start = system.hub.metrics()

    @property
    def hub(self) -> HubProcess:
        return self.env.hub

    def refusals(self, reason: str) -> float:
        """Refusals for ``reason`` since the test started."""
        return self.hub.metrics().get(REFUSALS, reason=reason) - self._start.get(REFUSALS, reason=reason)

    def watches_open(self) -> float:
        """Streams the hub holds open to the agent right now (its gauge)."""
        return self.hub.metrics().get(WATCHES, cluster=CLUSTER)

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


@pytest.fixture(scope="module")
def limited_systems() -> Iterator[dict[str, System]]:
    """The module's running hubs (with their agents), by limits."""
    running: dict[str, System] = {}
    try:
        yield running
    finally:
        for system in running.values():
            system.stop()


@pytest_asyncio.fixture
async def limited_hub(
    tmp_path_factory: pytest.TempPathFactory,
    module_issuer: Issuer,
    chisel_binary: ChiselBinary,
    cluster_admins: ControlPlane,
    namespace: str,
    limited_systems: dict[str, System],
) -> AsyncIterator[Start]:
    """``await start(limits, own=False)``: a hub with ``limits`` (the module's, or with ``own`` one
    for this test alone) and the real agent of alpha connected to it."""
    views: list[LimitedHub] = []
    owned: list[System] = []

    async def start(limits: dict[str, Any] | None = None, *, own: bool = False) -> LimitedHub:
        key = json.dumps(limits, sort_keys=True)
        system = None if own else limited_systems.get(key)
        if system is None or system.hub is None or not system.hub.alive():
            system = start_system(
                tmp_path_factory.mktemp("limited"),
                {CLUSTER: cluster_admins},
                realm_url=module_issuer.url,
                client_id=AUDIENCE,
                extra_config={"limits": limits} if limits is not None else None,
            )
            if own:
                owned.append(system)
            else:
                limited_systems[key] = system
        view = LimitedHub(system, module_issuer, cluster_admins, namespace, chisel_binary)
        views.append(view)
        return view

    try:
        yield start
    finally:
        for view in views:
            await view.env.close()
        for system in owned:
            system.stop()


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
    limited.env._transports.append(http)  # closed with the test's other clients
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
    limited = await limited_hub({"max_request_bytes": 16 * KIB, "max_watches_per_subject": 1})
    client = client_for(limited, transport, compressed=False)
    request = watch_request(limited.namespace, label_selector="a=" + "b" * (17 * KIB))
    with pytest.raises(ConnectError) as caught:
        await first_event(client.watch(request, headers=limited.env.auth()))
    assert caught.value.code is Code.RESOURCE_EXHAUSTED
    assert caught.value.message == request_refusal("16384 bytes (16 KiB)")
    assert limited.refusals("request_too_large") == 1
    # The refused Watch kept no slot: the caller's only one is free for the next Watch.
    for watch in await open_watches(limited, 1):
        await watch.cancel()
    await wait_for(lambda: limited.watches_open() == 0, 10, "the Watch closed")


@pytest.mark.integration
@pytest.mark.parametrize("version", ["http1", "h2c"])
async def test_a_message_announced_over_the_limit_is_refused_on_its_prefix(
    limited_hub: Start, version: str
) -> None:
    """A streamed request whose envelope announces a message over the limit is refused on those
    5 bytes, whatever follows (here: much less than announced, then the end of the body; read to
    its end, it would be a truncated message, not a too-large one)."""
    limited = await limited_hub({"max_request_bytes": 64 * KIB})
    http = limited.env.http(HTTPVersion.HTTP1 if version == "http1" else HTTPVersion.HTTP2)
    body = b"\x00" + (64 * KIB + 1).to_bytes(4, "big") + b"x" * KIB
    response = await http.post(
        f"{limited.hub.url}{RESOURCE_SERVICE}/Watch",
        headers={
            **limited.env.auth(),
            "content-type": "application/connect+proto",
            "connect-protocol-version": "1",
        },
        content=body,
    )
    assert response.status == 200
    error = end_of_connect_stream(bytes(response.content))["error"]
    assert error == {"code": "resource_exhausted", "message": request_refusal("65536 bytes (64 KiB)")}
    assert limited.refusals("request_too_large") == 1
    assert limited.watches_open() == 0


def _chunked_post(port: int, token: str, method: str, content_type: str = "application/proto") -> bytes:
    return (
        f"POST {RESOURCE_SERVICE}/{method} HTTP/1.1\r\nHost: hub\r\n"
        f"Content-Type: {content_type}\r\nConnect-Protocol-Version: 1\r\n"
        f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _exchange(
    port: int, head: bytes, chunk: bytes, *, chunks: int | None, terminate: bool = True
) -> tuple[int, bytes]:
    """Send ``head`` then ``chunk`` ``chunks`` times (None: until answered), reading meanwhile;
    then, with ``terminate``, the chunked body's last chunk.

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
                        pending = memoryview(b"0\r\n\r\n" if terminate else b"")
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
async def test_declared_length_over_the_limit_is_refused_and_never_buffered(limited_hub: Start) -> None:
    """A 16 MiB body that says so (``Content-Length``), over a 64 KiB limit: refused, and the hub
    process does not grow by what it was sent."""
    limited = await limited_hub({"max_request_bytes": 64 * KIB})
    token = limited.env.issuer.token()
    size = 16 * MIB
    head = (
        f"POST {RESOURCE_SERVICE}/Apply HTTP/1.1\r\nHost: hub\r\nContent-Type: application/proto\r\n"
        f"Connect-Protocol-Version: 1\r\nAuthorization: Bearer {token}\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    rss_before = limited.hub.rss()
    sent, received = await asyncio.to_thread(
        _exchange, limited.hub.port, head, b"\x0a" * (64 * KIB), chunks=size // (64 * KIB), terminate=False
    )
    grown = limited.hub.rss() - rss_before
    status, error = _parse(received)
    assert status.split()[:2] == ["HTTP/1.1", "429"]
    assert error == {"code": "resource_exhausted", "message": request_refusal("65536 bytes (64 KiB)")}
    assert grown < 8 * MIB, f"the hub grew by {grown / MIB:.1f} MiB for a refused {size / MIB:.0f} MiB body"
    assert limited.refusals("request_too_large") == 1
    print(f"declared 16 MiB: answered after {sent / MIB:.1f} MiB sent; hub RSS +{grown / MIB:.1f} MiB")


@pytest.mark.integration
async def test_chunked_http1_body_without_length_is_refused(limited_hub: Start) -> None:
    """A 2 MiB chunked body, no Content-Length: never buffered, refused, and the client, which
    sends its whole body, gets the answer (whether the hub answers before the body is in or
    reads and drops the rest first is the server's business)."""
    limited = await limited_hub({"max_request_bytes": 64 * KIB})
    head = _chunked_post(limited.hub.port, limited.env.issuer.token(), "Apply")
    rss_before = limited.hub.rss()
    sent, received = await asyncio.to_thread(
        _exchange, limited.hub.port, head, _chunk(b"\x0a" * (16 * KIB)), chunks=128
    )
    grown = limited.hub.rss() - rss_before
    status, error = _parse(received)
    assert status.split()[:2] == ["HTTP/1.1", "429"]
    assert error == {"code": "resource_exhausted", "message": request_refusal("65536 bytes (64 KiB)")}
    assert grown < 2 * MIB, f"the hub grew by {grown / MIB:.1f} MiB ({sent / MIB:.1f} MiB sent)"
    assert limited.refusals("request_too_large") == 1


@pytest.mark.integration
async def test_endless_http1_body_is_refused_within_bounds(limited_hub: Start) -> None:
    """A chunked body that never ends: answered once the hub has dropped a bounded amount."""
    limited = await limited_hub({"max_request_bytes": 64 * KIB})
    head = _chunked_post(limited.hub.port, limited.env.issuer.token(), "Apply")
    rss_before = limited.hub.rss()
    sent, received = await asyncio.to_thread(
        _exchange, limited.hub.port, head, _chunk(b"\x0a" * (16 * KIB)), chunks=None
    )
    grown = limited.hub.rss() - rss_before
    status, error = _parse(received)
    print(f"endless chunked body: answered after {sent / MIB:.1f} MiB sent; hub RSS +{grown / MIB:.1f} MiB")
    assert status.split()[:2] == ["HTTP/1.1", "429"]
    assert error == {"code": "resource_exhausted", "message": request_refusal("65536 bytes (64 KiB)")}
    # Answered after a bounded amount (today: at most 16 MiB read and dropped after the limit, plus
    # what sits in socket buffers; a server that answers at once reads less), and none of it kept.
    # Over loopback a client pushes hundreds of MiB in the seconds an unbounded read would take.
    assert sent < 32 * MIB
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
    assert limited.hub.connected(CLUSTER)
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
    """``count`` more Watches of ``subject``, open through the hub to the agent (its gauge grew by
    ``count`` and none of them ended)."""
    client = limited.env.client("connect-h2c")
    headers = limited.env.auth(limited.env.issuer.token(subject))
    before = await asyncio.to_thread(limited.watches_open)
    watches = [WatchStream(client, watch_request(limited.namespace), headers) for _ in range(count)]

    async def open_now() -> bool:
        ended = [watch.error for watch in watches if watch.ended.is_set()]
        assert not ended, f"a Watch ended: {ended}"
        return await asyncio.to_thread(limited.watches_open) == before + count

    await eventually(open_now, 15, f"{count} watches open")
    return watches


async def watches_closed(limited: LimitedHub, count: float = 0) -> None:
    """Wait until the hub holds ``count`` streams open to the agent."""

    async def closed() -> bool:
        return await asyncio.to_thread(limited.watches_open) == count

    await eventually(closed, 15, f"{count} watches open")


async def quota_free(limited: LimitedHub, subject: str, count: int) -> None:
    """``subject`` can open ``count`` Watches (every slot is free again); they are closed again."""
    for watch in await open_watches(limited, count, subject):
        await watch.cancel()
    await watches_closed(limited)


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
    await watches_closed(limited, 3)
    replacement = await open_watches(limited, 1)
    await asyncio.to_thread(limited.create_configmaps, 1, 10, prefix="after-cancel")
    await wait_for(
        lambda: any(e.type == pb.WatchEvent.TYPE_ADDED for e in replacement[0].events), 10, "event"
    )
    for watch in [*watches[1:], *others, *replacement]:
        await watch.cancel()
    await watches_closed(limited)
    for subject in SUBJECTS:
        await quota_free(limited, subject, 2)


PEER_LIMIT_3 = (
    "this address has 3 calls in progress on this hub already "
    "(limits.max_requests_per_peer in otterscale.yaml); end some first"
)


@pytest.mark.integration
@pytest.mark.security
async def test_calls_in_progress_per_address_are_limited_before_authentication(limited_hub: Start) -> None:
    """One address holds at most ``max_requests_per_peer`` calls, whoever the callers are: the next
    call, even without a token, is refused at once and never reaches authentication; a call that
    ends frees its place."""
    limited = await limited_hub({"max_requests_per_peer": 3})
    watches = [*await open_watches(limited, 2, "alice"), *await open_watches(limited, 1, "bob")]
    client = limited.env.client("connect-h2c")
    request = pb.GetRequest(cluster=CLUSTER, version="v1", resource="namespaces", name=limited.namespace)
    for headers in (limited.env.auth(), {}):  # with a token, and without one
        with pytest.raises(ConnectError) as caught:
            await client.get(request, headers=headers)
        assert caught.value.code is Code.RESOURCE_EXHAUSTED
        assert caught.value.message == PEER_LIMIT_3
    for protocol in ("grpc-h2c", "grpcweb-h1"):
        with pytest.raises(ConnectError) as caught:
            await limited.env.client(protocol).get(request, headers=limited.env.auth())
        assert caught.value.code is Code.RESOURCE_EXHAUSTED, protocol
    assert limited.refusals("peer_requests") == 4
    assert not [w.error for w in watches if w.ended.is_set()]  # the calls it holds go on
    await watches[0].cancel()
    await watches_closed(limited, 2)
    answer = await client.get(request, headers=limited.env.auth())
    assert answer.object
    for watch in watches[1:]:
        await watch.cancel()
    await watches_closed(limited)


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
    # None of them kept its slot: both are free.
    await quota_free(limited, "alice", 2)


@pytest.mark.integration
async def test_open_watches_end_with_unavailable_on_hub_drain(limited_hub: Start) -> None:
    """SIGTERM: every open Watch ends with unavailable, asking to resume from the last
    resourceVersion, and the hub exits cleanly (what it held for them goes with it)."""
    limited = await limited_hub({"max_watches_per_subject": 2}, own=True)
    watches = await open_watches(limited, 2)
    # Drain only once the agent's Kubernetes watches are up (each stream saw an event): cancelling
    # aiohttp in the middle of its TLS connect to kube-apiserver can leave a socket for the GC,
    # which this suite's warnings-as-errors then blames on whichever test runs next.
    await asyncio.to_thread(limited.create_configmaps, 1, 10, prefix="live")
    await wait_for(lambda: all(watch.events for watch in watches), 10, "both watches streaming")
    # Events keep coming while the hub drains, so the drain often finds a stream delivering one:
    # it must still end with the answer, not be cut mid-send (the client saw "Request was
    # cancelled" then).
    writing = threading.Event()
    writing.set()

    def write_while_draining() -> None:
        written = 0
        while writing.is_set():
            limited.create_configmaps(1, 32 * 1024, prefix=f"draining-{written}")
            written += 1

    writer = asyncio.create_task(asyncio.to_thread(write_while_draining))
    try:
        seen = len(watches[0].events)
        await wait_for(lambda: len(watches[0].events) >= seen + 3, 10, "events flowing")
        os.kill(limited.hub.pid, signal.SIGTERM)
        for watch in watches:
            await asyncio.wait_for(watch.ended.wait(), 30)
    finally:
        writing.clear()
        await writer
    for watch in watches:
        assert isinstance(watch.error, ConnectError)
        assert watch.error.code is Code.UNAVAILABLE
        assert (
            watch.error.message == "the hub is shutting down; resume the Watch from the last resourceVersion"
        )
    assert await limited.hub.exited() == 0


# --------------------------------------------------------------------------------------------------
# Slow readers


#: The slow-reader tests' send timeout: long enough that "the hub kept answering other calls
#: while the stalled stream waited for it" can be told apart from "the hub was stuck until the
#: stream was dropped" with a generous margin (other calls take milliseconds, even on a loaded box).
SEND_TIMEOUT = 6.0


async def upstream_watches(limited: LimitedHub, count: float) -> None:
    """Wait until kube-apiserver serves ``count`` namespaced ConfigMap watches (the agent's)."""

    async def serving() -> bool:
        return await asyncio.to_thread(limited.cp.open_watches, "configmaps") == count

    await eventually(serving, 30, f"kube-apiserver serving {count} namespaced ConfigMap watches")


@pytest.mark.integration
async def test_watch_client_that_stops_reading_is_dropped(limited_hub: Start) -> None:
    """A Watch client with a 1 KiB window that never grants more, while the cluster churns.

    The hub's memory stays bounded (HTTP/2 flow control holds the rest in the agent and
    kube-apiserver), the stream is reset once the send timeout has passed, its slot, gauge and
    agent stream (the agent's watch at kube-apiserver) are released, and the hub keeps answering
    other calls meanwhile.
    """
    timeout = SEND_TIMEOUT
    limited = await limited_hub({"watch_send_timeout_seconds": timeout, "max_watches_per_subject": 1})
    churn = Churn(limited)
    upstream = await asyncio.to_thread(limited.cp.settled_open_watches, "configmaps")
    async with RawH2(limited.hub.port, limited.env.issuer.token, window=KIB) as conn:
        watch = conn.request(f"{RESOURCE_SERVICE}/Watch", "application/connect+proto")
        message = watch_request(limited.namespace).SerializeToString()
        await conn.send_data(watch, b"\x00" + len(message).to_bytes(4, "big") + message, end=True)
        await conn.wait(lambda: conn.streams[watch].status is not None, 30)
        assert conn.streams[watch].status == 200
        assert limited.watches_open() == 1
        await upstream_watches(limited, upstream + 1)
        # The hub sends the headers with the first event (the ConfigMap as it is), whose body
        # no longer fits the window: from here on the client accepts nothing.
        started = conn.streams[watch].headers_at
        with churn:
            await churn.meanwhile(lambda: conn.streams[watch].reset, within=timeout + 30)
            dropped_after = conn.streams[watch].reset_at - started
        received = len(conn.streams[watch].body)
        code = conn.streams[watch].reset_code
    peak = churn.peak_growth
    print(
        f"slow reader (h2c): reset ({code}) {dropped_after:.2f}s after the client stopped accepting "
        f"(timeout {timeout:g}s); "
        f"{churn.written / MIB:.0f} MiB of events written meanwhile, {received} bytes reached the client; "
        f"hub RSS +{peak / MIB:.1f} MiB over {len(churn.rss_samples)} samples; "
        f"other Gets meanwhile: {len(churn.latencies)}, slowest {max(churn.latencies) * 1000:.0f} ms"
    )
    # Not before its timeout; after it, as soon as the loaded box lets the hub notice (what the
    # upper bound catches is a stream never dropped, which churn.meanwhile fails on anyway).
    assert timeout - 0.1 <= dropped_after < timeout + 30
    assert received <= KIB  # the client never granted more than its first window
    churn.assert_served_meanwhile(timeout)
    assert peak < 24 * MIB
    assert limited.refusals("slow_watch_client") == 1
    await watches_closed(limited)
    await upstream_watches(limited, upstream)
    await quota_free(limited, "alice", 1)  # its slot too


@pytest.mark.integration
async def test_http1_watch_client_that_stops_reading_is_dropped(limited_hub: Start) -> None:
    """The same over HTTP/1.1 (Connect streaming, chunked): a client with a 4 KiB receive buffer
    reads the response headers and then nothing. TCP fills up (the hub's send blocks), the call
    ends after the send timeout, and the hub closes its socket although unsent data is left in
    it, instead of waiting forever to flush it (a leaked connection per slow client)."""
    timeout = SEND_TIMEOUT
    limited = await limited_hub({"watch_send_timeout_seconds": timeout, "max_watches_per_subject": 1})
    port = limited.hub.port
    churn = Churn(limited)
    upstream = await asyncio.to_thread(limited.cp.settled_open_watches, "configmaps")
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
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.split()[1] == b"200", head
        assert limited.watches_open() == 1
        await upstream_watches(limited, upstream + 1)
        started = time.monotonic()
        with churn:
            await churn.meanwhile(lambda: limited.refusals("slow_watch_client") == 1, within=timeout + 40)
            dropped_after = time.monotonic() - started
        # The hub's end of the connection: its socket (found by the two ports among the hub
        # process's fds) must be closed with the client still reading nothing: within seconds,
        # not whenever the client would have read what is left (never).
        dropped = time.monotonic()
        await wait_for(
            lambda: not holds_socket(local_port=port, remote_port=client_port, pid=limited.hub.pid),
            30,
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
        f"hub RSS +{peak / MIB:.1f} MiB over {len(churn.rss_samples)} samples; "
        f"other Gets meanwhile: {len(churn.latencies)}, slowest {max(churn.latencies) * 1000:.0f} ms"
    )
    assert dropped_after >= timeout - 0.1
    churn.assert_served_meanwhile(timeout)
    assert peak < 24 * MIB
    await watches_closed(limited)
    await upstream_watches(limited, upstream)
    await quota_free(limited, "alice", 1)


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
        #: The hub's RSS before the test's client starts, and while the churn goes on.
        self.baseline = limited.hub.rss()
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

    def assert_served_meanwhile(self, timeout: float) -> None:
        """The hub kept answering other calls while the stalled stream waited: several Gets went
        through, none anywhere near as long as ``timeout`` (a hub stuck on the stalled client
        until it dropped it would have kept one waiting about that long)."""
        assert len(self.latencies) >= 5, self.latencies
        assert max(self.latencies) < timeout - 1, self.latencies

    async def meanwhile(self, done: Callable[[], bool], *, within: float) -> None:
        """Until ``done()``: sample the hub's RSS (:attr:`rss_samples`) and time a Get through
        the hub (:attr:`latencies`), 5 a second; fail after ``within`` seconds."""
        await asyncio.to_thread(self._started.wait, 10)
        limited = self.limited
        other = limited.env.client("connect-h2c")
        get = pb.GetRequest(
            cluster=CLUSTER, version="v1", resource="configmaps", namespace=limited.namespace, name="churn"
        )
        started = time.monotonic()
        while not done():
            self.rss_samples.append(limited.hub.rss())
            t0 = time.perf_counter()
            got = await other.get(get, headers=limited.env.auth())
            self.latencies.append(time.perf_counter() - t0)
            assert got.object["metadata"]["name"] == "churn"
            assert time.monotonic() - started < within, (
                "the stalled Watch was never dropped",
                f"refusals {limited.refusals('slow_watch_client')}, open {limited.watches_open()}",
                f"hub RSS +{(limited.hub.rss() - self.baseline) / MIB:.0f} MiB, "
                f"{self.written / MIB:.0f} MiB written",
            )
            await asyncio.sleep(0.2)


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
    assert slots.subjects() == 0  # nothing kept for subjects that came and went


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
        max_requests_per_peer=2000,
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
                "max_watches_per_subject, watch_send_timeout_seconds, request_timeout_seconds, "
                "max_connections, max_streams_per_connection, peer_requests_per_second, "
                "max_requests_per_peer"
            ],
        ),
        ({"max_requests_per_peer": -1}, ["limits.max_requests_per_peer: must be greater than or equal to 0"]),
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
