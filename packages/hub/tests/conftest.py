"""Fixtures of the hub's tests: a local OIDC issuer, a hub in-process, and fake agents.

- ``issuer``: a real OIDC issuer on loopback (:class:`~otterscale.testing.LocalIssuer`: discovery
  document and JWKS) with an RSA key generated per session; ``issuer.token(...)`` signs tokens
  locally. No Keycloak needed.
- ``hub_env``: writes an ``otterscale.yaml`` with two clusters (alpha, beta), starts a
  :class:`~otterscale.hub.Hub` in the test's event loop (real chisel server, real HTTP server on
  a free port), and gives clients and agents; everything is stopped after the test.
- Fake agents (:class:`FakeAgent`): until the real agent is wired into end-to-end tests
  (``tests/e2e``), the hub's own logic is tested against a tiny test-only Connect server: the
  generated ``ResourceServiceASGIApplication`` with a fake implementation, served by hypercorn on
  loopback, behind a *real* ``chisel client`` that connects to the hub's real chisel server. It
  checks the hub's identity signature exactly as the real agent does and records what it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.cluster.v1.cluster_connect import AgentServiceASGIApplication, ClusterServiceClient
from otterscale.cluster.v1.cluster_pb2 import GetAgentInfoResponse
from otterscale.common import (
    ChiselBinary,
    ChiselClient,
    IdentityHeaderError,
    check_chisel,
    derive_identity_key,
    load_config,
    verify_identity,
)
from otterscale.hub import Hub, HubSettings
from otterscale.resource.v1 import resource_pb2 as pb
from otterscale.resource.v1.resource_connect import ResourceServiceASGIApplication, ResourceServiceClient
from otterscale.testing import LocalIssuer, free_port, tool_path

AUDIENCE = "otterscale"
#: The tunnel key seed of the tests' configuration (the services refuse fewer than 32 characters).
KEY_SEED = "test-seed-0123456789abcdef-0123456789"

TRANSPORTS: dict[str, tuple[ProtocolType, Any]] = {
    "connect-h1": (ProtocolType.CONNECT, HTTPVersion.HTTP1),
    "connect-h2c": (ProtocolType.CONNECT, HTTPVersion.HTTP2),
    "grpc-h2c": (ProtocolType.GRPC, HTTPVersion.HTTP2),
    "grpcweb-h1": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP1),
}


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
) -> Path:
    document: dict[str, Any] = {
        "keycloak": {"realm_url": issuer_url, "client_id": AUDIENCE},
        "tunnel": {"server": {"host": "127.0.0.1", "port": tunnel_port, "key_seed": key_seed}},
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
    """

    def __init__(self, cluster: str, key: bytes) -> None:
        self.cluster = cluster
        self.key = key
        self.records: list[Recorded] = []
        self.watch_closed = asyncio.Event()
        self.watch_open = asyncio.Event()

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


class FakeAgent:
    """A test-only agent: fake ResourceService + AgentService + /ping on hypercorn, behind chisel."""

    def __init__(self, spec: ClusterSpec, binary: ChiselBinary, *, max_streams: int = 1000) -> None:
        self.spec = spec
        self.max_streams = max_streams
        self.binary = binary
        self.resources = FakeResources(spec.name, spec.key)
        self.info = FakeAgentInfo(spec.name, spec.key)
        self._resource_app = ResourceServiceASGIApplication(self.resources)
        self._info_app = AgentServiceASGIApplication(self.info)
        self._shutdown = asyncio.Event()
        self._server: asyncio.Task[None] | None = None
        self.tunnel: ChiselClient | None = None
        self.stream_peers: list[tuple[Any, ...]] = []
        self.pings = 0
        self.peers: set[tuple[Any, ...]] = set()

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.peers.add(tuple(scope.get("client") or ()))
        if scope["path"] == "/ping":
            self.pings += 1
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"].endswith("/Watch"):
            self.stream_peers.append(tuple(scope.get("client") or ()))
        if scope["path"].startswith("/otterscale.cluster.v1.AgentService/"):
            await self._info_app(scope, receive, send)
            return
        await self._resource_app(scope, receive, send)

    async def serve(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind(("127.0.0.1", self.spec.api_port))
        sock.listen(128)
        sock.setblocking(False)
        config = Config()
        config.keep_alive_max_requests = 2**31 - 1
        config.h2_max_concurrent_streams = self.max_streams
        config.graceful_timeout = 1.0
        config.accesslog = None
        self._shutdown.clear()
        self._server = asyncio.create_task(
            worker_serve(
                wrap_app(self.app, config.wsgi_max_body_size, "asgi"),
                config,
                sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
                shutdown_trigger=self._shutdown.wait,
            ),
            name=f"fake-agent:{self.spec.name}",
        )

    async def connect(
        self,
        tunnel_url: str,
        fingerprint: str,
        *,
        user: str | None = None,
        password: str | None = None,
        tunnel_port: int | None = None,
        wait: bool = True,
    ) -> ChiselClient:
        self.tunnel = ChiselClient(
            self.binary,
            server_url=tunnel_url,
            fingerprint=fingerprint,
            user=user or self.spec.user,
            password=password or self.spec.password,
            tunnel_port=tunnel_port or self.spec.tunnel_port,
            api_port=self.spec.api_port,
            max_retry_interval=1.0,
        )
        await self.tunnel.start()
        if wait:
            assert await self.tunnel.wait_connected(15), self.tunnel.state
        return self.tunnel

    async def disconnect(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.stop()
            self.tunnel = None

    async def stop(self) -> None:
        await self.disconnect()
        if self._server is not None:
            self._shutdown.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server, 5)
            self._server = None


# --------------------------------------------------------------------------------------------------
# Hub environment


@dataclass
class HubEnv:
    hub: Hub
    issuer: Issuer
    specs: dict[str, ClusterSpec]
    binary: ChiselBinary
    config_path: Path
    tunnel_port: int
    agents: dict[str, FakeAgent] = field(default_factory=dict)
    _transports: list[HTTPTransport] = field(default_factory=list)

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
        agent = self.agents.get(name)
        if agent is None:
            agent = self.agents[name] = FakeAgent(self.specs[name], self.binary, max_streams=max_streams)
            await agent.serve()
        if connect and agent.tunnel is None:
            assert self.hub.fingerprint is not None
            await agent.connect(self.tunnel_url, self.hub.fingerprint)
            await wait_for(lambda: self.hub.tunnels is not None and self.hub.tunnels.get(name).connected, 10)  # type: ignore[union-attr]
        return agent

    async def close(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
        await self.hub.stop()
        for transport in self._transports:
            await transport.aclose()


async def wait_for(check: Callable[[], bool], within: float, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not met within {within}s")
        await asyncio.sleep(0.02)


def hub_settings(config_path: Path, binary: ChiselBinary, **overrides: Any) -> HubSettings:
    values: dict[str, Any] = {
        "config": load_config(config_path),
        "host": "127.0.0.1",
        "port": 0,
        "chisel": str(binary.path),
        "drain_timeout": 3.0,
        "probe_interval": 1.0,
        "probe_timeout": 1.0,
    }
    values.update(overrides)
    return HubSettings(**values)


@pytest_asyncio.fixture
async def hub_env(tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary) -> AsyncIterator[HubEnv]:
    env = await start_hub_env(tmp_path, issuer, chisel_binary)
    try:
        yield env
    finally:
        await env.close()


async def start_hub_env(
    tmp_path: Path, issuer: Issuer, chisel_binary: ChiselBinary, **sections: Any
) -> HubEnv:
    """A started hub of clusters alpha and beta; ``sections`` as for :func:`write_config`
    (``limits=``, ``audit=``). The caller closes it."""
    specs = make_specs()
    tunnel_port = free_port()
    config_path = write_config(
        tmp_path / "otterscale.yaml", issuer_url=issuer.url, specs=specs, tunnel_port=tunnel_port, **sections
    )
    hub = Hub(hub_settings(config_path, chisel_binary))
    await hub.start()
    return HubEnv(
        hub=hub,
        issuer=issuer,
        specs=specs,
        binary=chisel_binary,
        config_path=config_path,
        tunnel_port=tunnel_port,
    )


def struct_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


# --------------------------------------------------------------------------------------------------
# Leadership without Kubernetes


class StaticLeadership:
    """A test-only :class:`~otterscale.hub._leader.Leadership`: the test says who leads.

    ``set(leading=..., leader=...)`` changes the state and tells the hub, as the Lease watch and
    the elector do; ``marks``, ``unmarks`` and ``step_downs`` record what the hub asked for.
    """

    def __init__(self, identity: str) -> None:
        self._identity = identity
        self.is_leading = False
        self.current: Any = None
        self.marks = 0
        self.unmarks = 0
        self.step_downs: list[str] = []
        self.closed = False
        self._on_change: Callable[[], None] | None = None

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def leading(self) -> bool:
        return self.is_leading

    def leader(self) -> Any:
        return self.current

    def set(self, *, leading: bool | None = None, leader: Any = ...) -> None:
        if leading is not None:
            self.is_leading = leading
        if leader is not ...:
            self.current = leader
        if self._on_change is not None:
            self._on_change()

    async def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change

    async def step_down(self, reason: str) -> None:
        self.step_downs.append(reason)
        self.set(leading=False)

    async def mark_leader(self) -> None:
        self.marks += 1

    async def unmark(self) -> None:
        self.unmarks += 1

    async def close(self) -> None:
        self.closed = True

    def tasks(self) -> list[asyncio.Task[Any]]:
        return []
