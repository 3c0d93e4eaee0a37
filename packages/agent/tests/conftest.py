"""Fixtures of the agent's tests: one real agent process per session, in front of the session's
real control plane, and real Connect clients that sign like the hub.

The agent under test is an ``otterscale agent --no-tunnel`` OS process
(:class:`~otterscale.testing.AgentProcess`) on a loopback port: tests reach it only at that port
(and through its log), never through its objects, so they judge the agent and not the HTTP server
it happens to run on. One agent is shared by every integration test (start-up costs a second or
two); :func:`start_agent` starts another (its own settings, another cluster). Clients are per
test (they belong to the test's loop) and are closed explicitly.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.protocol import ProtocolType
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.common import Identity, derive_identity_key, sign_identity
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import AgentProcess, ControlPlane, KubeAPIError

CLUSTER = "test"
AGENT_PASSWORD = "agent-password-for-tests-0123456789"
IDENTITY_KEY = derive_identity_key(CLUSTER, AGENT_PASSWORD)


@pytest.fixture(autouse=True)
def _no_garbage_of_earlier_tests(no_leftover_event_loops: None) -> None:
    """The manifest tests allocate enough to collect garbage: an event loop an earlier async test
    left unclosed must not be reported in them (the plugin's ``no_leftover_event_loops``)."""


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


def write_agent_config(
    path: Path, *, password: str = AGENT_PASSWORD, sections: Mapping[str, Any] | None = None
) -> Path:
    """An ``otterscale.yaml`` with cluster ``test`` (what an agent with ``--no-tunnel`` reads);
    ``sections``: more top-level sections (``runtime``, ``audit``...)."""
    document: dict[str, Any] = {
        "keycloak": {"realm_url": "https://keycloak.invalid/realms/unused", "client_id": "unused"},
        "tunnel": {"server": {"host": "127.0.0.1", "port": 8300}},
        "clusters": {
            CLUSTER: {
                "agent": {
                    "auth": {"user": f"{CLUSTER}-agent", "pass": password},
                    "tunnel_port": 51001,
                    "api_port": 8299,
                }
            }
        },
        **(sections or {}),
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def start_agent(
    cp: ControlPlane,
    directory: Path,
    *,
    discovery_ttl: float | None = None,
    sections: Mapping[str, Any] | None = None,
) -> Iterator[AgentProcess]:
    """``otterscale agent --cluster test --no-tunnel`` in front of ``cp`` (serving when this
    yields; stopped after). ``discovery_ttl``: its ``--discovery-ttl`` (default: the agent's);
    ``sections``: more sections of its config file (see :func:`write_agent_config`)."""
    directory.mkdir(parents=True, exist_ok=True)
    args = [f"--discovery-ttl={discovery_ttl:g}"] if discovery_ttl is not None else []
    agent = AgentProcess(
        CLUSTER,
        write_agent_config(directory / "otterscale.yaml", sections=sections),
        cp.kubeconfig,
        directory / f"agent-{uuid.uuid4().hex[:6]}.log",
        tunnel=False,
        args=args,
    )
    try:
        agent.wait_serving()
        yield agent
    finally:
        agent.stop()


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


@pytest.fixture(scope="session")
def agent_server(
    control_plane: ControlPlane, crds: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    """The session's agent (default discovery TTL) in front of the session's control plane.

    The test CRDs exist before it starts, so its first discovery already has them.
    """
    _ensure_admin_binding(control_plane)
    with start_agent(control_plane, tmp_path_factory.mktemp("agent")) as server:
        yield server


ClientFactory = Callable[..., Any]


@contextlib.asynccontextmanager
async def client_factory(default_url: str) -> AsyncIterator[ClientFactory]:
    """A factory of signed clients of ``default_url`` (see :func:`make_client`); closes them all."""
    opened: list[tuple[Any, HTTPTransport]] = []

    def factory(
        identity: Identity | None = ADMIN,
        *,
        transport: str = "connect-h1",
        signer: Any = None,
        json: bool = False,
        url: str | None = None,
        timeout_ms: int | None = None,
        service: type[Any] = ResourceServiceClient,
    ) -> Any:
        protocol, http_version = TRANSPORTS[transport]
        http_transport = HTTPTransport(http_version=http_version)
        interceptors = []
        if signer is not None:
            interceptors.append(signer)
        elif identity is not None:
            interceptors.append(HubSigner(identity))
        client = service(
            url or default_url,
            protocol=protocol,
            http_client=Client(http_transport),
            interceptors=interceptors,
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            timeout_ms=timeout_ms,
        )
        opened.append((client, http_transport))
        return client

    try:
        yield factory
    finally:
        for client, http_transport in opened:
            await client.close()
            await http_transport.aclose()


@pytest_asyncio.fixture
async def make_client(agent_server: AgentProcess) -> AsyncIterator[ClientFactory]:
    """``make_client(identity=ADMIN, transport="connect-h1", signer=None, json=False, url=None,
    service=ResourceServiceClient)``: a client of ``service`` (any generated Connect client)."""
    async with client_factory(agent_server.url) as factory:
        yield factory


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
