"""Fixtures of the hub's tests: a local OIDC issuer, the hub as a process, and fake agents.

The hub under test is always an ``otterscale server`` OS process
(:class:`~otterscale.testing.HubProcess`): tests reach it only at its port (the API, ``/readyz``,
``/metrics``), through its log and its children (chisel), never through its objects, so they
judge the hub and not the HTTP server it happens to run on.

- ``issuer`` / ``module_issuer``: a real OIDC issuer on loopback
  (:class:`~otterscale.testing.LocalIssuer`: discovery document and JWKS) with an RSA key
  generated per session; ``issuer.token(...)`` signs tokens locally. No Keycloak needed.
- ``hub_env``: a fresh hub process for the test, configured with two clusters (alpha, beta) in an
  ``otterscale.yaml`` of its own; clients, tokens and fake agents on demand
  (:class:`HubEnv`); everything is stopped after the test.
- ``shared_hub_env``: the same, but one hub (and its fake agents) per test module, for tests
  that leave it as they found it (no agent left disconnected, no chisel killed, no exact
  counter read: :meth:`HubEnv.metrics` differences instead). Each test gets its own clients and
  empty records of what the fake agents received.
- ``hub_env_factory``: ``await factory(limits=..., env=..., names=...)`` for a hub with another
  configuration (limits, environment, clusters).
- Fake agents (:class:`FakeAgent`): the hub's own logic is tested against a tiny test-only
  Connect server, an :class:`~otterscale.testing.AgentDouble` (the generated
  ``ResourceServiceASGIApplication`` with a fake implementation, behind a *real* ``chisel
  client`` that connects to the hub's real chisel server). It checks the hub's identity
  signature exactly as the real agent does and records what it got. The real agent is tested
  with the hub in ``test_limits.py``, ``test_ha.py`` and ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import pytest_asyncio
import yaml
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from connectrpc.request import RequestContext
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.cluster.v1 import cluster_pb2
from otterscale.cluster.v1.cluster_connect import AgentServiceASGIApplication, ClusterServiceClient
from otterscale.cluster.v1.cluster_pb2 import GetAgentInfoResponse
from otterscale.common import (
    ChiselBinary,
    IdentityHeaderError,
    check_chisel,
    derive_identity_key,
    verify_identity,
)
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceASGIApplication, ResourceServiceClient
from otterscale.testing import (
    AgentDouble,
    ControlPlane,
    FrameFeeder,
    HubProcess,
    KubeAPIError,
    LeaderRelay,
    LocalIssuer,
    Metrics,
    StagedLease,
    election_args,
    election_namespace,
    free_port,
    replica_env,
    replica_ip,
    set_pod,
    staged_lease,
    tool_path,
    write_lease,
)

AUDIENCE = "otterscale"
#: The tunnel key seed of the tests' configuration (the services refuse fewer than 32 characters).
KEY_SEED = "test-seed-0123456789abcdef-0123456789"

TRANSPORTS: dict[str, tuple[ProtocolType, Any]] = {
    "connect-h1": (ProtocolType.CONNECT, HTTPVersion.HTTP1),
    "connect-h2c": (ProtocolType.CONNECT, HTTPVersion.HTTP2),
    "grpc-h2c": (ProtocolType.GRPC, HTTPVersion.HTTP2),
    "grpcweb-h1": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP1),
}

#: The tests' hubs: calls in flight get this long to finish on shutdown (the default is 10 s).
DRAIN_TIMEOUT = 3.0


# --------------------------------------------------------------------------------------------------
# Owned tasks


@pytest_asyncio.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves a task running after every fixture was torn down."""
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    deadline = asyncio.get_running_loop().time() + 2.0
    while True:
        leaked = [t for t in asyncio.all_tasks() if t is not current and t not in before and not t.done()]
        if not leaked or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert not leaked, f"tasks left running: {sorted(t.get_name() for t in leaked)}"


# --------------------------------------------------------------------------------------------------
# OIDC issuer


class Issuer(LocalIssuer):
    """The local OIDC issuer (:class:`~otterscale.testing.LocalIssuer`) with these tests' defaults."""

    def token(  # type: ignore[override]  # the same call with defaults for every argument
        self,
        subject: str = "alice",
        groups: tuple[str, ...] = ("developers",),
        *,
        audience: str = AUDIENCE,
        expires_in: int = 300,
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        return super().token(subject, groups, audience=audience, lifetime=expires_in, key=key, **claims)


@pytest.fixture(scope="session")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def issuer(signing_key: rsa.RSAPrivateKey) -> Iterator[Issuer]:
    found = Issuer(signing_key).start()
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def module_issuer(signing_key: rsa.RSAPrivateKey) -> Iterator[Issuer]:
    """An issuer for a module's shared hubs (a test that stops its issuer uses ``issuer``)."""
    found = Issuer(signing_key).start()
    try:
        yield found
    finally:
        found.stop()


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    user: str
    password: str
    tunnel_port: int
    api_port: int

    @property
    def key(self) -> bytes:
        return derive_identity_key(self.name, self.password)


def make_specs(names: tuple[str, ...] = ("alpha", "beta")) -> dict[str, ClusterSpec]:
    return {
        name: ClusterSpec(
            name=name,
            user=f"{name}-agent",
            password=f"{name}-password-0123456789abcdef-{name}",
            tunnel_port=free_port(),
            api_port=free_port(),
        )
        for name in names
    }


def write_config(
    path: Path,
    *,
    issuer_url: str,
    specs: dict[str, ClusterSpec],
    tunnel_port: int,
    key_seed: str = KEY_SEED,
    limits: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    tunnel_host: str = "127.0.0.1",
    extra: dict[str, Any] | None = None,
) -> Path:
    """An ``otterscale.yaml`` for ``specs``; ``extra`` adds top-level sections (``cors``...)."""
    document: dict[str, Any] = {
        "keycloak": {"realm_url": issuer_url, "client_id": AUDIENCE},
        "tunnel": {"server": {"host": tunnel_host, "port": tunnel_port, "key_seed": key_seed}},
        "clusters": {
            spec.name: {
                "agent": {
                    "auth": {"user": spec.user, "pass": spec.password},
                    "tunnel_port": spec.tunnel_port,
                    "api_port": spec.api_port,
                }
            }
            for spec in specs.values()
        },
        **(extra or {}),
    }
    if limits is not None:
        document["limits"] = limits
    if audit is not None:
        document["audit"] = audit
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="session")
def chisel_binary() -> ChiselBinary:
    return check_chisel(tool_path("chisel"))


# --------------------------------------------------------------------------------------------------
# Fake agent


@dataclass
class Recorded:
    method: str
    headers: dict[str, list[str]]
    request: Any
    subject: str


class FakeResources:
    """A test-only ResourceService: behaviour chosen by the request (see the names below).

    Get: name "forbidden" -> permission_denied, "missing" -> not_found, "slow" -> waits 10 s,
    anything else -> a ConfigMap named so, labelled with the cluster. List: ``limit`` items of
    about 1 KiB. Watch: ``resource_version`` (a number) ADDED events, then: field_selector "end"
    ends with unavailable, "ok" ends normally, else the stream stays open until cancelled.

    It runs in the fake agent's thread: ``watch_open``/``watch_closed`` are thread events, and
    ``open_watches`` counts the Watch streams open on this agent.
    """

    def __init__(self, cluster: str, key: bytes) -> None:
        self.cluster = cluster
        self.key = key
        self.records: list[Recorded] = []
        self.watch_closed = threading.Event()
        self.watch_open = threading.Event()
        self.open_watches = 0

    def _check(self, ctx: RequestContext[Any, Any], request: Any) -> str:
        method = f"/{ctx.method.service_name}/{ctx.method.name}"
        headers: dict[str, list[str]] = {}
        for name, value in ctx.request_headers.allitems():
            headers.setdefault(name.lower(), []).append(value)
        try:
            identity = verify_identity(
                {name: values[0] for name, values in headers.items()},
                cluster=self.cluster,
                method=method,
                key=self.key,
            )
        except IdentityHeaderError as exc:
            self.records.append(Recorded(method, headers, request, ""))
            raise ConnectError(Code.UNAUTHENTICATED, f"hub identity rejected: {exc}") from exc
        self.records.append(Recorded(method, headers, request, identity.subject))
        return identity.subject

    def _object(self, name: str, namespace: str = "default", size: int = 0) -> pb.Resource:
        obj = Struct()
        obj.update(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "labels": {"cluster": self.cluster}},
                "data": {"payload": "x" * size},
            }
        )
        return pb.Resource(object=obj)

    async def discovery(
        self, request: pb.DiscoveryRequest, ctx: RequestContext[Any, Any]
    ) -> pb.DiscoveryResponse:
        self._check(ctx, request)
        return pb.DiscoveryResponse(
            api_resources=[
                pb.APIResource(version="v1", resource="configmaps", kind="ConfigMap", namespaced=True)
            ]
        )

    async def schema(self, request: pb.SchemaRequest, ctx: RequestContext[Any, Any]) -> Struct:
        self._check(ctx, request)
        raise ConnectError(
            Code.NOT_FOUND, f'kind "{request.kind}" not found in {request.group}/{request.version}'
        )

    async def list(self, request: pb.ListRequest, ctx: RequestContext[Any, Any]) -> pb.ListResponse:
        self._check(ctx, request)
        items = [self._object(f"cm-{i}", size=900) for i in range(request.limit)]
        return pb.ListResponse(resource_version="42", items=items)

    async def get(self, request: pb.GetRequest, ctx: RequestContext[Any, Any]) -> pb.Resource:
        subject = self._check(ctx, request)
        if request.name == "forbidden":
            raise ConnectError(
                Code.PERMISSION_DENIED,
                f'configmaps "forbidden" is forbidden: User "{subject}" cannot get resource "configmaps"',
            )
        if request.name == "missing":
            raise ConnectError(Code.NOT_FOUND, 'configmaps "missing" not found')
        if request.name == "slow":
            await asyncio.sleep(10)
        return self._object(request.name, request.namespace or "default")

    async def describe(
        self, request: pb.DescribeRequest, ctx: RequestContext[Any, Any]
    ) -> pb.DescribeResponse:
        self._check(ctx, request)
        return pb.DescribeResponse(
            resource=self._object(request.name), events=[self._object("event")], events_error="partial"
        )

    async def create(self, request: pb.CreateRequest, ctx: RequestContext[Any, Any]) -> pb.Resource:
        self._check(ctx, request)
        return self._object("created")

    async def apply(self, request: pb.ApplyRequest, ctx: RequestContext[Any, Any]) -> pb.Resource:
        self._check(ctx, request)
        return self._object(request.name)

    async def delete(self, request: pb.DeleteRequest, ctx: RequestContext[Any, Any]) -> Any:
        from google.protobuf.empty_pb2 import Empty

        self._check(ctx, request)
        return Empty()

    async def watch(
        self, request: pb.WatchRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEvent]:
        self._check(ctx, request)
        count = int(request.resource_version or "0")
        self.open_watches += 1
        self.watch_closed.clear()
        self.watch_open.set()
        try:
            for i in range(count):
                yield pb.WatchEvent(
                    type=pb.WatchEvent.TYPE_ADDED,
                    resource=self._object(f"w-{i}"),
                    resource_version=str(100 + i),
                )
            if request.field_selector == "end":
                raise ConnectError(Code.UNAVAILABLE, "the upstream watch closed; resume from 199")
            if request.field_selector == "ok":
                return
            await asyncio.Event().wait()
        finally:
            self.open_watches -= 1
            if not self.open_watches:
                self.watch_open.clear()
            self.watch_closed.set()


class FakeAgentInfo:
    def __init__(self, cluster: str, key: bytes) -> None:
        self.cluster = cluster
        self.key = key

    async def get_agent_info(self, request: Any, ctx: RequestContext[Any, Any]) -> GetAgentInfoResponse:
        headers = {name: value for name, value in ctx.request_headers.allitems()}
        try:
            verify_identity(
                headers,
                cluster=self.cluster,
                method=f"/{ctx.method.service_name}/{ctx.method.name}",
                key=self.key,
            )
        except IdentityHeaderError as exc:
            raise ConnectError(Code.UNAUTHENTICATED, str(exc)) from exc
        return GetAgentInfoResponse(
            agent_version="9.9.9-fake", kubernetes_version="v1.36.3-fake", cluster=self.cluster
        )


class FakeAgent(AgentDouble):
    """A test-only agent: fake ResourceService + AgentService (+ ``/ping``), behind real chisel.

    ``peers`` are the distinct connections the hub opened to it (through the tunnel, each hub
    connection is one chisel-client connection to this server); ``stream_peers`` those that
    carried a Watch.
    """

    def __init__(self, spec: ClusterSpec, binary: ChiselBinary, *, max_streams: int = 1000) -> None:
        self.spec = spec
        self.binary = binary
        self.resources = FakeResources(spec.name, spec.key)
        self.info = FakeAgentInfo(spec.name, spec.key)
        resources = ResourceServiceASGIApplication(self.resources)
        info = AgentServiceASGIApplication(self.info)

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["path"].startswith("/otterscale.cluster.v1.AgentService/"):
                await info(scope, receive, send)
            else:
                await resources(scope, receive, send)

        super().__init__(
            spec.name, app, chisel=binary, max_streams=max_streams, name=f"fake-agent:{spec.name}"
        )

    @property
    def peers(self) -> set[tuple[Any, ...]]:
        return {call.peer for call in self.calls}

    @property
    def stream_peers(self) -> list[tuple[Any, ...]]:
        return [call.peer for call in self.calls if call.path.endswith("/Watch")]

    def forget(self) -> None:
        """Start a test with empty records (a shared agent)."""
        self.resources.records.clear()
        self.calls.clear()

    async def connect(  # type: ignore[override]  # the spec's credentials by default
        self,
        server_url: str,
        fingerprint: str,
        *,
        user: str | None = None,
        password: str | None = None,
        tunnel_port: int | None = None,
        wait: bool = True,
        within: float = 30.0,
    ) -> None:
        await super().connect(
            server_url,
            fingerprint,
            user=user or self.spec.user,
            password=password or self.spec.password,
            tunnel_port=tunnel_port or self.spec.tunnel_port,
            wait=wait,
            within=within,
        )


# --------------------------------------------------------------------------------------------------
# The hub process


@dataclass
class HubWorld:
    """A hub process with its configuration and the fake agents connected to it."""

    hub: HubProcess
    issuer: Issuer
    specs: dict[str, ClusterSpec]
    binary: ChiselBinary
    config_path: Path
    tunnel_port: int
    agents: dict[str, FakeAgent] = field(default_factory=dict)

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.shutdown()
        self.agents.clear()
        self.hub.stop()


def start_world(
    directory: Path,
    issuer: Issuer,
    binary: ChiselBinary,
    *,
    names: tuple[str, ...] = ("alpha", "beta"),
    limits: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    routed_services: tuple[str, ...] = (),
    hub_services: tuple[str, ...] = (),
) -> HubWorld:
    """Write an ``otterscale.yaml`` for ``names`` and start ``otterscale server`` on it (blocks
    until ``/readyz`` answers 200). ``env`` is the hub's whole environment (default: the test's,
    cleaned), ``args`` more flags, ``routed_services`` test-only services it forwards
    (``"module:Service"``, see :class:`~otterscale.testing.HubProcess`)."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = make_specs(names)
    tunnel_port = free_port()
    config_path = write_config(
        directory / "otterscale.yaml",
        issuer_url=issuer.url,
        specs=specs,
        tunnel_port=tunnel_port,
        limits=limits,
        audit=audit,
        extra=extra,
    )
    hub = HubProcess(
        config_path,
        directory / "hub.log",
        chisel=binary.path,
        drain_timeout=DRAIN_TIMEOUT,
        args=args,
        routed_services=routed_services,
        hub_services=hub_services,
        env=env,
    )
    try:
        hub.wait_ready()
    except BaseException:
        hub.stop()
        raise
    return HubWorld(hub, issuer, specs, binary, config_path, tunnel_port)


class HubEnv:
    """What a test uses: a hub process (:attr:`hub`), its configuration, clients, tokens and the
    fake agents (:meth:`agent`). Clients made here are closed after the test."""

    def __init__(self, world: HubWorld) -> None:
        self.world = world
        self.hub = world.hub
        self.issuer = world.issuer
        self.specs = world.specs
        self.binary = world.binary
        self.config_path = world.config_path
        self.tunnel_port = world.tunnel_port
        self.agents = world.agents  # shared: agent() adds to the world's
        self._transports: list[HTTPTransport] = []

    @property
    def tunnel_url(self) -> str:
        return f"http://127.0.0.1:{self.tunnel_port}"

    def client(
        self, transport: str = "connect-h1", *, json: bool = False, timeout_ms: int | None = None
    ) -> ResourceServiceClient:
        protocol, version = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        self._transports.append(http)
        return ResourceServiceClient(
            self.hub.url,
            protocol=protocol,
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            http_client=Client(http),
            timeout_ms=timeout_ms,
        )

    def cluster_client(self, transport: str = "connect-h1") -> ClusterServiceClient:
        protocol, version = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        self._transports.append(http)
        return ClusterServiceClient(self.hub.url, protocol=protocol, http_client=Client(http))

    def http(self, version: Any = HTTPVersion.HTTP1) -> Client:
        transport = HTTPTransport(http_version=version)
        self._transports.append(transport)
        return Client(transport)

    def auth(self, token: str | None = None, **headers: str) -> dict[str, str]:
        values = {"authorization": f"Bearer {token or self.issuer.token()}"}
        values.update(headers)
        return values

    async def agent(self, name: str, *, connect: bool = True, max_streams: int = 1000) -> FakeAgent:
        """Cluster ``name``'s fake agent (started on first use); with ``connect``, connected and
        reported connected by the hub (its ``otterscale_hub_tunnel_up`` gauge)."""
        agent = self.agents.get(name)
        if agent is None:
            agent = self.agents[name] = FakeAgent(self.specs[name], self.binary, max_streams=max_streams)
            await agent.start()
        if connect:
            if agent.tunnel is None:
                await agent.connect(self.tunnel_url, self.hub.fingerprint)
            await self.hub.wait_connected(name, True, within=15)
        return agent

    async def disconnect(self, name: str) -> None:
        """Close cluster ``name``'s tunnel; returns once the hub reports it disconnected."""
        agent = self.agents.get(name)
        if agent is not None:
            await agent.disconnect()
        await self.hub.wait_connected(name, False, within=15)

    async def metrics(self) -> Metrics:
        """The hub's ``/metrics``."""
        return await self.hub.ametrics()

    async def clusters(self) -> dict[str, cluster_pb2.Cluster]:
        """ListClusters through the API: each cluster's state as the hub reports it."""
        response = await self.cluster_client().list_clusters(
            cluster_pb2.ListClustersRequest(), headers=self.auth()
        )
        return {cluster.name: cluster for cluster in response.clusters}

    async def close(self) -> None:
        """Close the clients made for this test (the hub and agents are the fixture's)."""
        for transport in self._transports:
            await transport.aclose()
        self._transports.clear()


async def wait_for(check: Callable[[], bool], within: float, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not met within {within}s")
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str = "condition") -> None:
    """:func:`wait_for` with an async check (a scrape of ``/metrics``, a call through the hub)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not met within {within}s")
        await asyncio.sleep(0.05)


HubFactory = Callable[..., Awaitable[HubEnv]]


@pytest_asyncio.fixture
async def hub_env_factory(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary
) -> AsyncIterator[HubFactory]:
    """``await factory(**options)``: a fresh hub process (options as for :func:`start_world`)."""
    started: list[tuple[HubWorld, HubEnv]] = []

    async def factory(**options: Any) -> HubEnv:
        world = start_world(tmp_path / f"hub-{len(started)}", issuer, chisel_binary, **options)
        env = HubEnv(world)
        started.append((world, env))
        return env

    try:
        yield factory
    finally:
        for world, env in started:
            await env.close()
            await asyncio.to_thread(world.stop)


@pytest_asyncio.fixture
async def hub_env(hub_env_factory: HubFactory) -> HubEnv:
    """A fresh hub process with clusters alpha and beta (no agent connected yet)."""
    return await hub_env_factory()


@pytest.fixture(scope="module")
def shared_hub_world(
    tmp_path_factory: pytest.TempPathFactory, module_issuer: Issuer, chisel_binary: ChiselBinary
) -> Iterator[HubWorld]:
    world = start_world(tmp_path_factory.mktemp("shared-hub"), module_issuer, chisel_binary)
    try:
        yield world
    finally:
        world.stop()


@pytest_asyncio.fixture
async def shared_hub_env(shared_hub_world: HubWorld) -> AsyncIterator[HubEnv]:
    """The module's hub (see the module docstring); its fake agents' records start empty."""
    for agent in shared_hub_world.agents.values():
        agent.forget()
    env = HubEnv(shared_hub_world)
    try:
        yield env
    finally:
        await env.close()


def struct_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


# --------------------------------------------------------------------------------------------------
# A raw HTTP/2 client


@dataclass
class RawStream:
    status: int | None = None
    headers_at: float = 0.0
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: bool = False
    reset_at: float = 0.0
    reset_code: int | None = None


class RawH2:
    """A minimal h2c client over a socket, for what library clients will not do: hold a request
    body back, or never grant flow-control window beyond ``window``. ``token`` makes the
    ``authorization`` header of each request (a callable: a fresh token per request)."""

    def __init__(
        self, port: int, token: Callable[[], str], *, host: str = "127.0.0.1", window: int = 65535
    ) -> None:
        self._host = host
        self._port = port
        self._token = token
        self._window = window
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, RawStream] = {}
        self.pings_acked = 0
        self._changed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawH2:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
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
        frames = FrameFeeder(self.conn)  # streams go on after a draining hub's GOAWAY
        while True:
            data = await self._reader.read(65536)
            if not data:
                return
            for event in frames.feed(data):
                if isinstance(event, h2.events.PingAckReceived):
                    self.pings_acked += 1
                    continue
                stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
                if stream is None:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    headers: dict[Any, Any] = dict(event.headers or [])  # str: header_encoding is set
                    stream.status = int(headers[":status"])
                    stream.headers_at = time.monotonic()
                elif isinstance(event, h2.events.TrailersReceived):
                    stream.trailers = dict(event.headers or [])  # type: ignore[arg-type]
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

    def request(self, path: str, content_type: str, **headers: str) -> int:
        """Send the headers of a POST (no END_STREAM: the body follows with :meth:`send_data`)."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "hub"),
                (":path", path),
                ("content-type", content_type),
                ("connect-protocol-version", "1"),
                ("authorization", f"Bearer {self._token()}"),
                *headers.items(),
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

    async def ping(self, within: float = 30.0) -> None:
        """A PING and its ACK: the server has processed every frame sent before it (HTTP/2
        frames of a connection are handled in order), e.g. a request's headers."""
        acked = self.pings_acked
        self.conn.ping(b"otterscl")
        await self._flush()
        await self.wait(lambda: self.pings_acked > acked, within)

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


def envelope(message: bytes, flags: int = 0) -> bytes:
    """One message of a gRPC or Connect streaming body: flags, 4-byte length, the message."""
    return bytes([flags]) + len(message).to_bytes(4, "big") + message


def end_of_connect_stream(body: bytes) -> dict[str, Any]:
    """The end-of-stream message (flags 0x02) of a Connect streaming answer, decoded."""
    import json

    while len(body) >= 5:
        flags, size = body[0], int.from_bytes(body[1:5], "big")
        message, body = body[5 : 5 + size], body[5 + size :]
        if flags & 0x02:
            found: dict[str, Any] = json.loads(message)
            return found
    raise AssertionError("no end-of-stream message in the answer")


# --------------------------------------------------------------------------------------------------
# Replicas: a leader and followers, each an `otterscale server --leader-elect` process

#: Lease timings of the tests' replicas: a leader that loses its Lease follows within 5 s.
ELECTION_TIMINGS = (
    "--leader-elect-lease-duration=8",
    "--leader-elect-renew-deadline=5",
    "--leader-elect-retry-period=1",
)
#: The replicas' names, in the order of their loopback addresses (``replica_ip``).
REPLICA_NAMES = "abcdefgh"


def replica_address(name: str) -> str:
    """The loopback address (the "Pod IP") of replica ``name``."""
    return replica_ip(REPLICA_NAMES.index(name))


class Replicas:
    """Hub ``a`` leads; followers follow it; all real ``otterscale server --leader-elect`` processes.

    - ``a`` campaigns alone for the Lease of a namespace of its own (the chart's RBAC, a Pod ``a``
      with its IP) and wins it; more candidates there (:meth:`add_candidate`) make a real
      election, and :meth:`hand_over` gives the Lease to one of them as an administrator would.
    - Followers (:meth:`add_follower`) campaign with read-only rights for a
      :class:`~otterscale.testing.StagedLease` (:attr:`stage`) that names ``a`` at its address:
      they forward to whoever the test stages there (:meth:`follow`).

    Every replica listens on its own loopback address and the same port, as Pods do behind one
    Service port; the leader's tunnel server listens on its own address too. Agents dial ``a``'s
    tunnel server, or with ``relay`` a :class:`~otterscale.testing.LeaderRelay` that follows the
    leader label, as the chart's tunnel Service does.
    """

    def __init__(
        self,
        cp: ControlPlane,
        issuer: Issuer,
        binary: ChiselBinary,
        directory: Path,
        *,
        names: tuple[str, ...] = ("alpha", "beta"),
        limits: dict[str, Any] | None = None,
        audit: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        routed_services: tuple[str, ...] = (),
    ) -> None:
        self.cp = cp
        self.issuer = issuer
        self.binary = binary
        self.directory = directory
        self.specs = make_specs(names)
        self.port = free_port()
        self.tunnel_port = free_port()
        self.key_seed = KEY_SEED
        self._limits = limits
        self._audit = audit
        self._extra = extra
        self._routed_services = routed_services
        self.hubs: dict[str, HubProcess] = {}
        self.agents: dict[str, AgentDouble] = {}
        self.relay: LeaderRelay | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.namespace, self._kubeconfig = election_namespace(cp, directory, {"a": replica_address("a")})
        self.stage = staged_lease(cp, directory)

    # --- processes --------------------------------------------------------------------------------

    def _config(self, name: str) -> Path:
        return write_config(
            self.directory / f"otterscale-{name}.yaml",
            issuer_url=self.issuer.url,
            specs=self.specs,
            tunnel_port=self.tunnel_port,
            key_seed=self.key_seed,
            limits=self._limits,
            audit=self._audit,
            tunnel_host=replica_address(name),
            extra=self._extra,
        )

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> HubProcess:
        if name in self.hubs and self.hubs[name].alive():
            raise RuntimeError(f"replica {name} is already running")
        hub = HubProcess(
            self._config(name),
            self.directory / f"hub-{name}.log",
            name=f"hub-{name}",
            host=replica_address(name),
            port=self.port,
            chisel=self.binary.path,
            drain_timeout=DRAIN_TIMEOUT,
            args=[*args, *ELECTION_TIMINGS],
            routed_services=self._routed_services,
            env=env,
        )
        self.hubs[name] = hub
        return hub

    def start_leader_and_follower(self, *doubles: AgentDouble) -> Replicas:
        """``a`` leading, follower ``b`` following it, ``doubles`` connected to ``a`` (blocking);
        everything is stopped again if that fails."""
        try:
            self.start_leader()
            self.follow("a")
            self.add_follower("b")
            for double in doubles:
                self.connect(double)
        except BaseException:
            self.stop_blocking()
            raise
        return self

    def start_leader(self) -> HubProcess:
        """Start ``a`` and wait until it leads (its ``otterscale_hub_leader`` gauge)."""
        hub = self.add_candidate("a")
        hub.wait_until(lambda: hub.metrics().value("otterscale_hub_leader") == 1.0, 60, "leading")
        return hub

    async def astart_leader(self) -> HubProcess:
        """:meth:`start_leader` without blocking the event loop."""
        hub = self.spawn_candidate("a")

        async def leading() -> bool:
            try:
                return (await hub.ametrics()).value("otterscale_hub_leader") == 1.0
            except OSError:  # not listening yet
                return False

        await hub.until(leading, 60, "leading")
        return hub

    def spawn_candidate(self, name: str) -> HubProcess:
        """Spawn replica ``name`` campaigning for ``a``'s Lease (its Pod is created); not waited for."""
        if name != "a":
            set_pod(self.cp, self.namespace, name, replica_address(name))
        return self._spawn(
            name, election_args(self._kubeconfig), replica_env(name, self.namespace, self.directory)
        )

    def add_candidate(self, name: str) -> HubProcess:
        """:meth:`spawn_candidate`, then wait until it is ready (blocking)."""
        return self.spawn_candidate(name).wait_ready()

    def spawn_follower(self, name: str, stage: StagedLease | None = None) -> HubProcess:
        """Spawn replica ``name`` following ``stage`` (default :attr:`stage`); not waited for."""
        stage = stage or self.stage
        return self._spawn(name, stage.args(), stage.env(name))

    def add_follower(self, name: str, stage: StagedLease | None = None) -> HubProcess:
        """:meth:`spawn_follower`, then wait until it is ready (blocking)."""
        return self.spawn_follower(name, stage).wait_ready()

    def follow(
        self, holder: str | None, address: str | None = None, stage: StagedLease | None = None
    ) -> None:
        """Followers of ``stage`` (default :attr:`stage`) now follow ``holder`` at ``address``
        (default: that replica's address; None with a holder that is not a replica: unknown)."""
        if address is None and holder is not None and holder in REPLICA_NAMES:
            address = replica_address(holder)
        (stage or self.stage).stage(holder, address)

    async def hand_over(self, name: str) -> None:
        """Give ``a``'s Lease to ``name`` (see :func:`~otterscale.testing.write_lease`)."""
        await asyncio.to_thread(write_lease, self.cp, self.namespace, name, duration=8)

    def holder(self) -> str | None:
        """Who holds ``a``'s Lease (None: nobody)."""
        lease = self.cp.request(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/otterscale-server-leader"
        )
        holder: str | None = lease["spec"].get("holderIdentity")
        return holder

    def labelled(self) -> list[str]:
        """The Pods of ``a``'s namespace that carry the leader label."""
        pods = self.cp.request("GET", f"/api/v1/namespaces/{self.namespace}/pods")
        return sorted(
            pod["metadata"]["name"]
            for pod in pods["items"]
            if pod["metadata"].get("labels", {}).get("otterscale.io/leader") == "true"
        )

    # --- agents -----------------------------------------------------------------------------------

    @property
    def tunnel_url(self) -> str:
        """What agents dial: the relay, or ``a``'s tunnel server."""
        if self.relay is not None:
            return self.relay.url
        return f"http://{replica_address('a')}:{self.tunnel_port}"

    async def start_relay(self) -> None:
        """From now on agents dial a relay to the leader-labelled Pod (call before connecting)."""
        self.relay = LeaderRelay(self.cp, self.namespace, self.tunnel_port)
        await self.relay.start()

    def connect(self, agent: AgentDouble) -> AgentDouble:
        """Serve ``agent`` and connect it to the tunnel server (blocking: not through the relay)."""
        spec = self.specs[agent.cluster]
        self.agents[agent.cluster] = agent
        agent.serve()
        agent.dial(
            self.tunnel_url,
            self.hubs["a"].fingerprint,
            user=spec.user,
            password=spec.password,
            tunnel_port=spec.tunnel_port,
        )
        return agent

    async def aconnect(self, agent: AgentDouble) -> AgentDouble:
        """:meth:`connect` without blocking the event loop (the relay runs on it)."""
        spec = self.specs[agent.cluster]
        self.agents[agent.cluster] = agent
        await agent.start()
        await agent.connect(
            self.tunnel_url,
            self.hubs["a"].fingerprint,
            user=spec.user,
            password=spec.password,
            tunnel_port=spec.tunnel_port,
        )
        return agent

    async def leader_sees(self, cluster: str, connected: bool = True) -> None:
        """Wait until the replica that leads reports ``cluster`` (dis)connected."""

        async def check() -> bool:
            for hub in self.hubs.values():
                if hub.alive():
                    metrics = await hub.ametrics()
                    if metrics.value("otterscale_hub_leader") == 1.0:
                        return metrics.value("otterscale_hub_tunnel_up", cluster=cluster) == float(connected)
            return False

        await eventually(check, 60, f"the leader reporting {cluster} {'up' if connected else 'down'}")

    # --- the end ----------------------------------------------------------------------------------

    async def stop(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
        for hub in self.hubs.values():  # all at once: one by one, each would take over in turn
            if hub.alive():
                hub.signal(signal.SIGTERM)
        for hub in self.hubs.values():
            await asyncio.to_thread(hub.stop)
        if self.relay is not None:
            await self.relay.stop()
        for namespace in (self.namespace, self.stage.namespace):
            with contextlib.suppress(KubeAPIError):
                await asyncio.to_thread(self.cp.request, "DELETE", f"/api/v1/namespaces/{namespace}")

    def stop_blocking(self) -> None:
        """:meth:`stop` for synchronous fixtures (no relay)."""
        assert self.relay is None
        for agent in self.agents.values():
            agent.shutdown()
        for hub in self.hubs.values():
            if hub.alive():
                hub.signal(signal.SIGTERM)
        for hub in self.hubs.values():
            hub.stop()
        for namespace in (self.namespace, self.stage.namespace):
            with contextlib.suppress(KubeAPIError):
                self.cp.request("DELETE", f"/api/v1/namespaces/{namespace}")


class ReplicasEnv:
    """What a test uses of :class:`Replicas`: clients and tokens, and the replicas' counters as
    differences from the test's start (they may be shared by a module)."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self._transports: list[HTTPTransport] = []
        self._start: dict[str, Metrics] = {}

    async def mark(self) -> None:
        """Counters from now on."""
        self._start = {name: await hub.ametrics() for name, hub in self.replicas.hubs.items() if hub.alive()}

    @property
    def hubs(self) -> dict[str, HubProcess]:
        return self.replicas.hubs

    @property
    def issuer(self) -> Issuer:
        return self.replicas.issuer

    @property
    def agents(self) -> dict[str, Any]:
        return self.replicas.agents

    def _http(self, version: Any) -> Client:
        transport = HTTPTransport(http_version=version)
        self._transports.append(transport)
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

    def http(self, version: Any = HTTPVersion.HTTP1) -> Client:
        return self._http(version)

    def auth(self, subject: str = "alice", **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(subject)}", **headers}

    async def counter(self, name: str, metric: str, **labels: str) -> float:
        """``metric`` of replica ``name`` since :meth:`mark`."""
        now = (await self.hubs[name].ametrics()).get(metric, **labels)
        start = self._start.get(name)
        return now - (start.get(metric, **labels) if start is not None else 0.0)

    async def forwarded(
        self, name: str, method: str, code: str, service: str = "otterscale.resource.v1.ResourceService"
    ) -> float:
        """Calls of ``method`` replica ``name`` forwarded (ending with ``code``) since :meth:`mark`."""
        return await self.counter(
            name, "otterscale_hub_forwarded_rpcs_total", service=service, method=method, code=code
        )

    async def refusals(self, name: str, reason: str) -> float:
        return await self.counter(name, "otterscale_hub_limit_refusals_total", reason=reason)

    async def forwarding(self, name: str, via_leader: str = "a") -> None:
        """Wait until follower ``name`` forwards to a replica that serves (a ListClusters goes
        through); then the counters start from here."""

        async def through() -> bool:
            try:
                await self.clusters(name).list_clusters(
                    cluster_pb2.ListClustersRequest(), headers=self.auth()
                )
            except ConnectError:
                return False
            return True

        await eventually(through, 60, f"{name} forwarding to {via_leader}")
        await self.mark()

    async def close(self) -> None:
        for transport in self._transports:
            await transport.aclose()
        self._transports.clear()
