"""Fixtures of the agent's tests: one real agent (in a thread, on a loopback port) per session,
in front of the session's real control plane, and real Connect clients that sign like the hub.

The agent runs on its own event loop in a background thread, so it outlives the per-test event
loops of pytest-asyncio and is shared by every integration test (start-up costs ~1 s). Clients
are per test (they belong to the test's loop) and are closed explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.agent import Agent, AgentSettings
from otterscale.common import Identity, derive_identity_key, sign_identity
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import ControlPlane, KubeAPIError

CLUSTER = "test"
AGENT_PASSWORD = "agent-password-for-tests-0123456789"
IDENTITY_KEY = derive_identity_key(CLUSTER, AGENT_PASSWORD)
#: The caller most tests use: bound to cluster-admin by the session fixture below.
ADMIN = Identity("otterscale-test-admin", ("otterscale-testers",))

TRANSPORTS: dict[str, tuple[ProtocolType, Any]] = {
    "connect-h1": (ProtocolType.CONNECT, HTTPVersion.HTTP1),
    "connect-h2c": (ProtocolType.CONNECT, HTTPVersion.HTTP2),
    "grpc-h2c": (ProtocolType.GRPC, HTTPVersion.HTTP2),
    "grpcweb-h1": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP1),
}


class HubSigner:
    """Client interceptor that signs each call the way the hub does (or deliberately not)."""

    def __init__(
        self,
        identity: Identity,
        *,
        key: bytes = IDENTITY_KEY,
        cluster: str = CLUSTER,
        clock: Callable[[], float] = time.time,
        method_override: str | None = None,
    ) -> None:
        self.identity = identity
        self.key = key
        self.cluster = cluster
        self.clock = clock
        self.method_override = method_override

    async def on_start(self, ctx: Any) -> None:
        method = self.method_override or f"/{ctx.method.service_name}/{ctx.method.name}"
        headers = sign_identity(
            self.identity, cluster=self.cluster, method=method, key=self.key, now=self.clock()
        )
        for name, value in headers.items():
            ctx.request_headers[name] = value

    async def on_end(self, token: Any, ctx: Any, error: Exception | None) -> None:
        return None


class AgentThread:
    """An :class:`Agent` running on its own loop in a daemon thread."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.url = ""
        self.agent: Agent | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="otterscale-agent-under-test", daemon=True)

    def __enter__(self) -> AgentThread:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("agent did not start within 60s")
        if self._error is not None:
            raise RuntimeError("agent failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("agent thread did not stop within 30s")

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the agent's loop (thread-safe)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with Agent(self.settings) as agent:
                self.agent = agent
                self.url = agent.url
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            if not isinstance(exc, Exception):
                raise


def _ensure_admin_binding(cp: ControlPlane) -> None:
    body = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "otterscale-test-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "User", "name": ADMIN.subject, "apiGroup": "rbac.authorization.k8s.io"}],
    }
    cp.apply(body)
    cp.wait_for(
        lambda: cp.request("GET", "/api/v1/namespaces", headers={"Impersonate-User": ADMIN.subject}),
        what="admin binding in effect",
    )


def agent_settings(cp: ControlPlane, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "cluster": CLUSTER,
        "host": "127.0.0.1",
        "port": 0,
        "identity_key": IDENTITY_KEY,
        "kubeconfig": str(cp.kubeconfig),
    }
    values.update(overrides)
    return AgentSettings(**values)


@pytest.fixture(scope="session")
def agent_server(control_plane: ControlPlane, crds: dict[str, str]) -> Iterator[AgentThread]:
    """The session's agent (default discovery TTL) in front of the session's control plane.

    The test CRDs exist before it starts, so its first discovery already has them.
    """
    _ensure_admin_binding(control_plane)
    with AgentThread(agent_settings(control_plane)) as server:
        yield server


ClientFactory = Callable[..., ResourceServiceClient]


@pytest_asyncio.fixture
async def make_client(agent_server: AgentThread) -> AsyncIterator[ClientFactory]:
    """``make_client(identity=ADMIN, transport="connect-h1", signer=None, json=False, url=None)``."""
    opened: list[tuple[ResourceServiceClient, HTTPTransport]] = []

    def factory(
        identity: Identity | None = ADMIN,
        *,
        transport: str = "connect-h1",
        signer: Any = None,
        json: bool = False,
        url: str | None = None,
        timeout_ms: int | None = None,
    ) -> ResourceServiceClient:
        protocol, http_version = TRANSPORTS[transport]
        http_transport = HTTPTransport(http_version=http_version)
        interceptors = []
        if signer is not None:
            interceptors.append(signer)
        elif identity is not None:
            interceptors.append(HubSigner(identity))
        client = ResourceServiceClient(
            url or agent_server.url,
            protocol=protocol,
            http_client=Client(http_transport),
            interceptors=interceptors,
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            timeout_ms=timeout_ms,
        )
        opened.append((client, http_transport))
        return client

    yield factory
    for client, http_transport in opened:
        await client.close()
        await http_transport.aclose()


@pytest.fixture(params=list(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    """Every protocol/HTTP version pair: Connect and gRPC-Web over HTTP/1.1, Connect and gRPC over h2c."""
    return str(request.param)


@pytest_asyncio.fixture
async def rpc(make_client: ClientFactory) -> ResourceServiceClient:
    """A client calling as ADMIN (Connect, HTTP/1.1)."""
    return make_client()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    name = unique("ns")
    control_plane.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    yield name
    with contextlib.suppress(KubeAPIError):
        control_plane.request("DELETE", f"/api/v1/namespaces/{name}")


CRD_GROUP = "otterscale.test"


def _crd(
    plural: str,
    kind: str,
    scope: str,
    short_names: list[str],
    *,
    group: str = CRD_GROUP,
    extra_fields: tuple[str, ...] = (),
    subresources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    version: dict[str, Any] = {
        "name": "v1",
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": {
                            "size": {"type": "integer", "minimum": 1},
                            "color": {"type": "string", "enum": ["red", "green", "blue"]},
                            "labels": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            **{field: {"type": "string"} for field in extra_fields},
                        },
                    },
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            }
        },
    }
    if subresources is not None:
        version["subresources"] = subresources
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": scope,
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "shortNames": short_names},
            "versions": [version],
        },
    }


def install_crd(
    cp: ControlPlane,
    plural: str,
    kind: str,
    scope: str,
    short_names: list[str] | None = None,
    *,
    wait_for_openapi: bool = True,
    group: str = CRD_GROUP,
    extra_fields: tuple[str, ...] = (),
    subresources: dict[str, Any] | None = None,
) -> None:
    """Create (or update) a CRD and wait until it is established and served (and, by default,
    until kube-apiserver publishes its OpenAPI v3 schema with every spec field).

    ``extra_fields`` are added to the spec as strings; ``subresources`` is the version's
    ``subresources`` (for example ``{"status": {}}``). Short names must be unique within the
    group, or the CRD is never established.
    """
    body = _crd(
        plural,
        kind,
        scope,
        short_names or [],
        group=group,
        extra_fields=extra_fields,
        subresources=subresources,
    )
    cp.apply(body)

    def established() -> bool:
        crd = cp.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{group}")
        conditions = (crd.get("status") or {}).get("conditions") or []
        ready = any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
        return ready and cp.request("GET", f"/apis/{group}/v1/{plural}?limit=1") is not None

    cp.wait_for(established, timeout=60, what=f"CRD {plural}.{group} established")
    if wait_for_openapi:
        wanted = {"size", "color", "labels", *extra_fields}
        cp.wait_for(
            lambda: wanted <= published_spec_fields(cp, group, kind),
            timeout=60,
            what=f"OpenAPI v3 of {kind} with {sorted(wanted)}",
        )


def published_spec_fields(cp: ControlPlane, group: str, kind: str) -> set[str]:
    """The spec fields of ``kind`` in kube-apiserver's published OpenAPI v3 (as admin).

    kube-apiserver publishes a CRD's OpenAPI v3 a little after serving it, and a change a little
    after making it.
    """
    entry = cp.request("GET", "/openapi/v3")["paths"].get(f"apis/{group}/v1")
    if not entry:
        return set()
    schemas = cp.request("GET", entry["serverRelativeURL"])["components"]["schemas"]
    for schema in schemas.values():
        if any(gvk.get("kind") == kind for gvk in schema.get("x-kubernetes-group-version-kind", ())):
            return set(((schema.get("properties") or {}).get("spec") or {}).get("properties") or {})
    return set()


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> dict[str, str]:
    """A namespaced (widgets/Widget) and a cluster-scoped (gadgets/Gadget) CRD."""
    install_crd(control_plane, "widgets", "Widget", "Namespaced", ["wdg"])
    install_crd(control_plane, "gadgets", "Gadget", "Cluster", ["gdg"])
    return {"namespaced": "widgets", "cluster": "gadgets"}
