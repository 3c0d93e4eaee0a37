"""The serving layer's contract, at the ports of a hub and an agent running as processes.

Written against the ports alone, so that it holds whatever serves them.

Floods (issue 13, part 2): hundreds of requests whose body never ends (and HTTP/1.1 requests
whose headers never end), over raw HTTP/1.1 connections and raw h2c streams, without a token:

- every one is answered or closed within the request deadline (``limits.request_timeout_seconds``,
  3 s here) plus a margin for a loaded machine;
- the hub's memory (its whole process tree: launcher, Envoy with the hub inside, chisel) grows by
  less than :data:`RSS_BOUND` while they are open;
- an authenticated Get through the hub keeps answering meanwhile, within :data:`GET_BOUND`;
- the cluster is never marked down (its ``otterscale_hub_tunnel_up`` gauge stays 1 and its
  transitions counter does not move), so the prober is not starved.

With a token, a request whose body never ends is refused at the deadline (resource_exhausted in
the caller's protocol, counted as ``request_timeout``) and not logged one line per request. The
agent gets the same flood without the hub's signature on its own port.

Figures (open counts, time to close, RSS before/during/after, the Get's latency) are recorded in
the e2e measurements and printed.

Regressions of the server the services ran on before (issue 14, item 4): a request for an unknown
method over HTTP/2 whose body is still open is answered (not found / unimplemented) and leaves
the other streams of its connection alone, a Watch on it keeps streaming; gRPC over HTTP/1.1 (the
Python connectrpc client's default transport) works, with trailers, and logs nothing at error
level. And the drain: a Watch opened while the hub drains is refused with unavailable, telling the
caller to resume elsewhere; ``/metrics`` is only on the management address.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.protobuf import json_format
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import (
    ControlPlane,
    LocalIssuer,
    RawH1,
    RawH2,
    StreamState,
    System,
    caller_rbac,
    child_pids,
    create_namespace,
    start_system,
)

from .conftest import Measurements, percentile

pytestmark = [pytest.mark.e2e, pytest.mark.security]

CLUSTER = "alpha"
TUNNEL_UP = f'otterscale_hub_tunnel_up{{cluster="{CLUSTER}"}}'
TRANSITIONS = f'otterscale_hub_tunnel_transitions_total{{cluster="{CLUSTER}"}}'
REFUSED = 'otterscale_hub_limit_refusals_total{reason="request_timeout"}'
TARGET = pb.GetRequest(
    cluster=CLUSTER, version="v1", resource="configmaps", namespace="floods", name="target"
)
TARGET_JSON = json_format.MessageToJson(TARGET).encode()
AUDIENCE = "otterscale"
#: The request deadline of these tests' configuration (seconds).
REQUEST_TIMEOUT = 3.0
#: On a loaded 2-core CI box a closed connection can take seconds to be noticed (the hub, Envoy,
#: kube-apiserver and the flood itself share the cores): the deadline plus this margin.
CLOSE_MARGIN = 15.0
#: Growth of the hub's process tree allowed while the flood is open (measured: a few MiB; the
#: bound is what "memory stays bounded" means for a few hundred unauthenticated requests).
RSS_BOUND = 64 * 1024 * 1024
#: The Get answers in milliseconds on a quiet machine; the issue asks for 1 s. Loaded CI runs the
#: flood client, Envoy, the hub, chisel, the agent and kube-apiserver on the same two cores, so
#: the assertion allows 3 s and the measured maximum is recorded.
GET_BOUND = 3.0
H1_CONNECTIONS = 200
H1_SLOW_HEADERS = 50
H2_CONNECTIONS = 3
H2_STREAMS = 200
GET_PATH = "/otterscale.resource.v1.ResourceService/Get"
CONNECT_JSON = [("content-type", "application/json"), ("connect-protocol-version", "1")]
GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    found = LocalIssuer().start()
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def flood_system(
    control_plane: ControlPlane, issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    namespace = "floods"
    create_namespace(control_plane, namespace)
    for manifest in caller_rbac(namespace, users=("flood-user",), verbs=("get", "list", "watch", "create")):
        kind = manifest["kind"].lower() + "s"
        control_plane.request(
            "POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{kind}", manifest
        )
    control_plane.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "target"}, "data": {"a": "b"}},
    )
    system = start_system(
        tmp_path_factory.mktemp("floods"),
        {CLUSTER: control_plane},
        realm_url=issuer.url,
        client_id=AUDIENCE,
        log_level="info",
        extra_config={"limits": {"request_timeout_seconds": REQUEST_TIMEOUT}},
    )
    try:
        yield system
    finally:
        system.stop()


@pytest_asyncio.fixture
async def get_client(flood_system: System) -> AsyncIterator[ResourceServiceClient]:
    transport = HTTPTransport()
    client = ResourceServiceClient(flood_system.hub_url, http_client=Client(transport), timeout_ms=30_000)
    try:
        yield client
    finally:
        await client.close()
        await transport.aclose()


def _token(issuer: LocalIssuer) -> str:
    return issuer.token("flood-user", audience=AUDIENCE)


def _tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and every process below it, in bytes."""
    total = 0
    for member in [pid, *child_pids(pid)]:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _metric(system: System, name: str) -> float:
    text = system.hub_metrics()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


class Watchdog:
    """While a flood is open: an authenticated Get every 200 ms (latency) and the cluster's state."""

    def __init__(self, system: System, client: ResourceServiceClient, token: str) -> None:
        self.system = system
        self.client = client
        self.token = token
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.tunnel_down = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Watchdog:
        self.transitions = _metric(self.system, TRANSITIONS)
        self._task = asyncio.create_task(self._run(), name="flood-watchdog")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        # Stopped, not cancelled: the client turns a cancellation into ConnectError(canceled), which
        # the loop would count and carry on after.
        self._stop.set()
        await self._task
        self.transitions_after = _metric(self.system, TRANSITIONS)

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self.client.get(TARGET, headers={"authorization": f"Bearer {self.token}"})
            except ConnectError as exc:
                self.errors.append(f"{exc.code.value}: {exc.message}")
            self.latencies.append(time.monotonic() - started)
            up = await asyncio.to_thread(_metric, self.system, TUNNEL_UP)
            if up != 1.0:
                self.tunnel_down += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)

    def check(self) -> dict[str, Any]:
        assert not self.errors, self.errors[:5]
        assert self.latencies, "no Get completed during the flood"
        assert max(self.latencies) < GET_BOUND, sorted(self.latencies)[-5:]
        assert self.tunnel_down == 0, "the hub reported the cluster down during the flood"
        assert self.transitions_after == self.transitions, "the cluster's tunnel state changed"
        return {
            "gets": len(self.latencies),
            "get_p50_ms": round(percentile(self.latencies, 50) * 1000, 1),
            "get_max_ms": round(max(self.latencies) * 1000, 1),
        }


async def _flood(
    host: str, port: int, headers: list[tuple[str, str]]
) -> tuple[list[RawH1], list[RawH1], list[RawH2]]:
    """Open the flood: h1 requests with unfinished bodies, h1 requests with unfinished headers, and
    h2c connections full of streams with unfinished bodies. Returns them open."""
    bodies = [
        await RawH1.post(host, port, GET_PATH, [*CONNECT_JSON[:1], *headers], length=1000, body=b'{"clus')
        for _ in range(H1_CONNECTIONS)
    ]
    slow = []
    for _ in range(H1_SLOW_HEADERS):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST {GET_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Le".encode())
        slow.append(RawH1(reader, writer, time.monotonic()))
    connections = []
    for _ in range(H2_CONNECTIONS):
        connection = RawH2(host, port)
        await connection.connect()
        for _ in range(H2_STREAMS):
            connection.request(GET_PATH, [*GRPC, *headers], body=b"\x00\x00\x00\x03\xe8", end=False)
        connections.append(connection)
    return bodies, slow, connections


async def _closed(
    bodies: list[RawH1], slow: list[RawH1], connections: list[RawH2], within: float
) -> dict[str, Any]:
    """Wait until every request of the flood is answered or closed; the times it took."""
    started = time.monotonic()
    h1 = await asyncio.gather(*(request.wait_closed(within) for request in [*bodies, *slow]))
    streams: list[tuple[RawH2, StreamState]] = [(c, s) for c in connections for s in c.streams.values()]
    h2 = await asyncio.gather(*(c.wait(s, within) for c, s in streams))
    open_h1 = sum(1 for done in h1 if not done)
    open_h2 = sum(1 for done in h2 if not done)
    closed_times = [r.closed_at - r.opened for r in [*bodies, *slow] if r.closed_at is not None]
    closed_times += [(s.closed_at or c.closed_at or 0) - s.opened for c, s in streams if s.done or c.closed]
    return {
        "h1_requests": len(bodies),
        "h1_unfinished_headers": len(slow),
        "h2_streams": len(streams),
        "still_open_h1": open_h1,
        "still_open_h2": open_h2,
        "close_p50_s": round(percentile(closed_times, 50), 3) if closed_times else None,
        "close_max_s": round(max(closed_times), 3) if closed_times else None,
        "statuses_h1": sorted({r.status for r in bodies if r.status is not None}),
        "h2_status_or_reset": sorted(
            {str(s.header("grpc-status") or s.status or f"reset {s.reset}") for _, s in streams}
        ),
        "waited_s": round(time.monotonic() - started, 3),
    }


def _outcome(stream: StreamState) -> str:
    """A stream's gRPC status, else its HTTP status, else how it was reset."""
    return str(stream.header("grpc-status") or stream.status or f"reset {stream.reset}")


async def _close_all(bodies: list[RawH1], slow: list[RawH1], connections: list[RawH2]) -> None:
    for request in [*bodies, *slow]:
        await request.aclose()
    for connection in connections:
        await connection.aclose()


async def _measured_flood(
    system: System,
    pid: int,
    port: int,
    headers: list[tuple[str, str]],
    get_client: ResourceServiceClient,
    issuer: LocalIssuer,
    *,
    linger: float = 0.0,
) -> dict[str, Any]:
    """Flood ``port`` (the process tree of ``pid`` serves it) while authenticated Gets go through
    the hub, wait until every request is closed (plus ``linger`` seconds of Gets), close the
    client side: what :func:`_closed` and the watchdog saw, and the tree's RSS before and during."""
    rss_before = _tree_rss(pid)
    async with Watchdog(system, get_client, _token(issuer)) as watchdog:
        flood = await _flood("127.0.0.1", port, headers)
        rss_during = _tree_rss(pid)
        result = await _closed(*flood, within=REQUEST_TIMEOUT + CLOSE_MARGIN)
        await asyncio.sleep(linger)
    await _close_all(*flood)
    return {
        **result,
        **watchdog.check(),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_during_mib": round(rss_during / 2**20, 1),
    }


def _check_flood(result: dict[str, Any]) -> None:
    """What every flood must show: nothing left open, the process tree's growth within RSS_BOUND."""
    assert result["still_open_h1"] == 0
    assert result["still_open_h2"] == 0
    assert result["rss_during_mib"] - result["rss_before_mib"] < RSS_BOUND / 2**20


async def test_a_flood_without_a_token_is_closed_at_once_and_the_hub_keeps_serving(
    flood_system: System,
    issuer: LocalIssuer,
    get_client: ResourceServiceClient,
    measurements: Measurements,
) -> None:
    system = flood_system
    assert system.hub is not None
    # A few more Gets after the flood, then the RSS once it is over.
    result = await _measured_flood(
        system, system.hub.pid, system.hub_port, [], get_client, issuer, linger=1.0
    )
    rss_after = _tree_rss(system.hub.pid)
    result["rss_after_mib"] = round(rss_after / 2**20, 1)
    measurements.record("flood_hub_without_token", result)
    _check_flood(result)
    # Unfinished bodies without a token: unauthenticated, from the headers alone.
    assert result["statuses_h1"] == [401]
    assert result["h2_status_or_reset"] == ["16"]
    assert result["rss_after_mib"] - result["rss_before_mib"] < RSS_BOUND / 2**20


async def test_an_unfinished_body_with_a_token_is_refused_at_the_deadline(
    flood_system: System,
    issuer: LocalIssuer,
    get_client: ResourceServiceClient,
    measurements: Measurements,
) -> None:
    system = flood_system
    assert system.hub is not None
    token = _token(issuer)
    refused_before = _metric(system, REFUSED)
    log_lines_before = system.hub_log.read_text().count("did not arrive")
    headers = [("authorization", f"Bearer {token}")]
    result = await _measured_flood(system, system.hub.pid, system.hub_port, headers, get_client, issuer)
    refused = _metric(system, REFUSED) - refused_before
    result["refused_request_timeout"] = refused
    measurements.record("flood_hub_with_token", result)
    _check_flood(result)
    # Nothing closed before the deadline (the requests are valid so far), all soon after it.
    assert result["close_p50_s"] >= REQUEST_TIMEOUT * 0.9
    # Refused in the caller's protocol: Connect unary 429, gRPC resource_exhausted (8).
    assert 429 in result["statuses_h1"]
    assert "8" in result["h2_status_or_reset"]
    # Every unfinished body was counted; the headers that never ended were cut by Envoy.
    assert refused >= H1_CONNECTIONS + H2_CONNECTIONS * H2_STREAMS
    # A summary at most, never a line per request.
    assert system.hub_log.read_text().count("did not arrive") - log_lines_before <= 2


async def test_a_flood_without_a_signature_is_closed_at_once_by_the_agent(
    flood_system: System,
    issuer: LocalIssuer,
    get_client: ResourceServiceClient,
    measurements: Measurements,
) -> None:
    system = flood_system
    agent = system.agents[CLUSTER]
    port = system.clusters[CLUSTER].api_port
    result = await _measured_flood(system, agent.pid, port, [], get_client, issuer)
    measurements.record("flood_agent_without_signature", result)
    _check_flood(result)
    assert result["statuses_h1"] == [401]
    assert result["h2_status_or_reset"] == ["16"]


def test_management_routes_are_not_on_the_api_port(flood_system: System) -> None:
    """``/metrics`` (every cluster's name and state) only on the management address."""
    system = flood_system
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(system.hub_url + "/metrics", timeout=10)  # noqa: S310 - loopback
    caught.value.close()  # the error holds the connection
    assert caught.value.code == 404
    assert "otterscale_hub_tunnel_up" in system.hub_metrics()
    with urllib.request.urlopen(system.hub_url + "/readyz", timeout=10) as answer:  # noqa: S310
        assert answer.status == 200
    with urllib.request.urlopen(system.management_url + "/readyz", timeout=10) as answer:  # noqa: S310
        assert answer.status == 200


# --------------------------------------------------------------------------------------------------
# Regressions of the previous server (issue 14, item 4)

WATCH_PATH = "/otterscale.resource.v1.ResourceService/Watch"
CONNECT_STREAM_JSON = [("content-type", "application/connect+json"), ("connect-protocol-version", "1")]


def _envelope(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return b"\x00" + len(body).to_bytes(4, "big") + body


#: A Watch of the ConfigMaps in the tests' namespace, as a Connect streaming request body.
WATCH = _envelope({"cluster": CLUSTER, "version": "v1", "resource": "configmaps", "namespace": "floods"})


async def _wait_for(check: Any, within: float, what: str, *, fail: bool = True) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            assert not fail, f"not {what} within {within:g}s"
            return
        await asyncio.sleep(0.05)


def _create_configmap(control_plane: ControlPlane, name: str) -> None:
    control_plane.request(
        "POST",
        "/api/v1/namespaces/floods/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}},
    )


async def test_an_unknown_method_with_an_open_body_leaves_the_watch_beside_it_streaming(
    flood_system: System, issuer: LocalIssuer, control_plane: ControlPlane
) -> None:
    system = flood_system
    auth = [("authorization", f"Bearer {_token(issuer)}")]
    async with RawH2("127.0.0.1", system.hub_port) as connection:
        watch = connection.request(WATCH_PATH, [*CONNECT_STREAM_JSON, *auth], body=WATCH)
        # The Watch streams changes from now on: write until one arrives (it is established then).
        deadline = time.monotonic() + 60
        while not (watch.status == 200 and b"before-unknown-" in watch.data):
            assert time.monotonic() < deadline, f"the Watch delivered nothing: {watch}"
            _create_configmap(control_plane, f"before-unknown-{time.monotonic_ns()}")
            await _wait_for(lambda: b"before-unknown-" in watch.data or watch.done, 1.0, "", fail=False)
        unknown = connection.request(
            "/otterscale.resource.v1.ResourceService/NoSuchMethod",
            [*GRPC, *auth],
            body=b"\x00\x00\x00\x10\x00",
            end=False,  # the body is still open when the answer comes
        )
        assert await connection.wait(unknown, 30)
        assert _outcome(unknown) in ("404", "12"), _outcome(unknown)  # not found / unimplemented
        # The connection and the Watch on it are unharmed: a new object arrives as an event.
        name = f"after-unknown-{time.monotonic_ns()}"
        _create_configmap(control_plane, name)
        await _wait_for(lambda: name.encode() in watch.data, 30, "streaming the new ConfigMap")
        assert not connection.closed
        assert connection.goaway is None
        assert not watch.done
        connection.cancel(watch)


async def test_grpc_over_http1_works_and_logs_no_error(flood_system: System, issuer: LocalIssuer) -> None:
    """The Python connectrpc client's gRPC over HTTP/1.1: trailers carry the status (Envoy sends
    HTTP/1.1 trailers), so the call works; nothing is logged at error level."""
    system = flood_system
    errors_before = _error_lines(system)
    transport = HTTPTransport(http_version=HTTPVersion.HTTP1)
    client = ResourceServiceClient(
        system.hub_url, protocol=ProtocolType.GRPC, http_client=Client(transport), timeout_ms=30_000
    )
    try:
        got = await client.get(TARGET, headers={"authorization": f"Bearer {_token(issuer)}"})
        assert got.object["metadata"]["name"] == "target"
        with pytest.raises(ConnectError) as caught:
            await client.get(TARGET)  # no token: a gRPC status, not a transport error
        assert caught.value.code is Code.UNAUTHENTICATED
    finally:
        await client.close()
        await transport.aclose()
    assert _error_lines(system) == errors_before


def _error_lines(system: System) -> list[str]:
    found = []
    for name, text in system.logs().items():
        for line in text.splitlines():
            if '"level": "error"' in line or '"level":"error"' in line or "Traceback" in line:
                found.append(f"{name}: {line[:200]}")
    return found


def _watch_ends(system: System, code: str) -> float:
    return _metric(
        system,
        "otterscale_hub_rpc_handled_total"
        f'{{code="{code}",method="Watch",service="otterscale.resource.v1.ResourceService"}}',
    )


async def test_a_watch_whose_client_leaves_mid_stream_ends_as_canceled(
    flood_system: System, issuer: LocalIssuer, control_plane: ControlPlane
) -> None:
    """A client that resets its Watch while events are flowing: the service learns it at its next
    send, often before the disconnect poll does. Either way the call ends ``canceled`` (counted,
    logged and audited so), never ``unknown`` with an "rpc failed" warning."""
    system = flood_system
    auth = [("authorization", f"Bearer {_token(issuer)}")]
    canceled, unknown = _watch_ends(system, "canceled"), _watch_ends(system, "unknown")
    log_offset = len(system.hub_log.read_text())
    watches = 3
    writing = asyncio.Event()

    async def write_continuously() -> None:
        while writing.is_set():
            await asyncio.to_thread(_create_configmap, control_plane, f"leaving-{time.monotonic_ns()}")

    for _ in range(watches):
        async with RawH2("127.0.0.1", system.hub_port) as connection:
            watch = connection.request(WATCH_PATH, [*CONNECT_STREAM_JSON, *auth], body=WATCH)
            writing.set()
            writer = asyncio.create_task(write_continuously())
            try:
                await _wait_for(lambda w=watch: b"leaving-" in w.data, 30, "streaming events")
                connection.cancel(watch)  # events keep coming: the next send finds the client gone
                await asyncio.sleep(0.3)
            finally:
                writing.clear()
                await writer
    await _wait_for(
        lambda: _watch_ends(system, "canceled") >= canceled + watches, 30, f"{watches} Watches ended canceled"
    )
    assert _watch_ends(system, "unknown") == unknown
    failed = [line for line in system.hub_log.read_text()[log_offset:].splitlines() if "rpc failed" in line]
    assert not failed, failed[:3]


class _KeepAlive:
    """One HTTP/1.1 keep-alive connection to the hub, for unary Gets (blocking: use a thread)."""

    def __init__(self, port: int, token: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.token = token

    def get(self) -> str:
        """One Get; whether the answer keeps the connection (``keep-alive``) or not (``close``)."""
        headers = {"content-type": "application/json", "authorization": f"Bearer {self.token}"}
        self.connection.request("POST", GET_PATH, TARGET_JSON, headers)
        response = self.connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        return "close" if response.will_close else "keep-alive"

    def close(self) -> None:
        self.connection.close()


# --------------------------------------------------------------------------------------------------
# Drain (runs last in this module: it stops the hub, then starts it again)


async def test_a_watch_opened_while_the_hub_drains_is_refused_with_unavailable(
    flood_system: System, issuer: LocalIssuer
) -> None:
    system = flood_system
    assert system.hub is not None
    token = _token(issuer)
    holding: list[RawH1] = []
    stop_holding = asyncio.Event()

    async def hold_the_drain() -> None:
        """A request whose body never ends keeps the drain open until the request deadline; a new
        one every half second keeps it open however slowly the loaded machine gets to the Watch
        (the listener accepts connections while the hub drains)."""
        while not stop_holding.is_set():
            with contextlib.suppress(OSError):
                holding.append(
                    await RawH1.post(
                        "127.0.0.1",
                        system.hub_port,
                        GET_PATH,
                        [("content-type", "application/json"), ("authorization", f"Bearer {token}")],
                        length=100,
                        body=b"{",
                    )
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_holding.wait(), 0.5)

    holder = asyncio.create_task(hold_the_drain(), name="hold-the-drain")
    auth = [("authorization", f"Bearer {token}")]
    # Connections the clients already have when the drain starts: Envoy drains them (the next
    # answer on each says so: GOAWAY on HTTP/2, "connection: close" on HTTP/1.1), so clients take
    # their next calls elsewhere; the call itself is still answered.
    older_h2 = RawH2("127.0.0.1", system.hub_port)
    await older_h2.connect()
    keepalive = await asyncio.to_thread(_KeepAlive, system.hub_port, token)
    assert await asyncio.to_thread(keepalive.get) == "keep-alive"
    connection: RawH2 | None = None
    try:
        await _wait_for(lambda: bool(holding), 30, "holding the drain")
        system.hub.signal(signal.SIGTERM)
        await _wait_for(lambda: "draining" in system.hub_log.read_text(), 30, "draining")
        assert await asyncio.to_thread(keepalive.get) == "close"
        get = older_h2.request(GET_PATH, [*CONNECT_JSON, *auth], body=TARGET_JSON)
        assert await older_h2.wait(get, 30), f"the Get got no answer: {get}"
        assert get.status == 200, get
        assert older_h2.goaway == 0, "no graceful GOAWAY on a connection of a draining hub"
        # The listener still accepts while the hub drains (until --drain-time-s): a Watch opened
        # now is refused at once.
        connection = RawH2("127.0.0.1", system.hub_port)
        await connection.connect()
        watch = connection.request(WATCH_PATH, [*CONNECT_STREAM_JSON, *auth], body=WATCH)
        assert await connection.wait(watch, 30), f"the Watch got no answer: {watch}"
        assert watch.status == 200, watch
        # The Connect end-of-stream message: unavailable, telling the caller to resume elsewhere.
        assert b'"unavailable"' in watch.data, watch.data
        assert b"the Watch from the last resourceVersion" in watch.data, watch.data
        stop_holding.set()
        await holder
        assert await asyncio.to_thread(system.hub.popen.wait, 30) == 0
    finally:
        stop_holding.set()
        await holder
        for request in holding:
            await request.aclose()
        await older_h2.aclose()
        keepalive.close()
        if connection is not None:
            await connection.aclose()
        system.stop_hub()
        system.start_hub()
        system.wait_connected(CLUSTER)
