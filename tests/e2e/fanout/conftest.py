"""The fan-out test fleet (fanout.md 4.1): real control planes whose RBAC differs for the same user.

One hub and six agents as OS processes with real chisel tunnels, four real control planes, and a
local OIDC issuer (real JWTs verified by the hub over HTTP; it lets the tests pick subjects,
groups and token lifetimes). Clusters:

=========== =============== ========================================================================
cluster     control plane   for ``alice`` (group ``team-a``) listing ConfigMaps in all namespaces
=========== =============== ========================================================================
a-full      fan-a           ClusterRole reader bound to alice and bob: OK
b-ns        fan-b           Role in namespace team-a only: FORBIDDEN (OK with namespace team-a)
c-none      fan-c           no binding: FORBIDDEN
d-down      none            configured, no agent: UNAVAILABLE at once, never dialled
e-slow      fan-a           its tunnel goes through a relay adding :data:`SLOW_LATENCY` each way
f-nocrd     fan-f           reader like a-full, but no Widget CRD: NOT_SERVED for widgets
g-hole      fan-a           its tunnel goes through a relay a test can freeze (black hole)
=========== =============== ========================================================================

Access (hub allow-lists): team-a may use every cluster, contractors (bob) only a-full, anyone else
(carol) none. Objects: :data:`PER_NAMESPACE` ConfigMaps in each of the :data:`NAMESPACES` per
control plane, the same names in every cluster, labelled ``idx=<i % 10>``; a few Widgets.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.protocol import ProtocolType
from google._upb import _message as upb  # type: ignore[import-not-found]
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.cluster.v1.cluster_connect import ClusterServiceClient
from otterscale.resource.v1.multicluster_connect import MultiClusterServiceClient
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import BlackHoleRelay, ControlPlane, LocalIssuer, System, start_system

upb.SetAllowOversizeProtos(True)

AUDIENCE = "otterscale"
CLUSTERS = ("a-full", "b-ns", "c-none", "d-down", "e-slow", "f-nocrd", "g-hole")
PLANES = {
    "a-full": "fan-a",
    "b-ns": "fan-b",
    "c-none": "fan-c",
    "e-slow": "fan-a",
    "f-nocrd": "fan-f",
    "g-hole": "fan-a",
}
NAMESPACES = ("team-a", "team-b", "team-c", "team-d", "team-e")
PER_NAMESPACE = 40
#: Seconds the slow cluster's relay holds every chunk back, each way (a List takes about 2x this).
#: Under the hub's probe timeout (2 s per round trip), so the cluster stays "connected".
SLOW_LATENCY = 0.4
USERS = {"alice": ("team-a",), "bob": ("contractors",), "carol": ("nobody",)}
LABELS = {
    "a-full": {"env": "prod", "tier": "gold"},
    "b-ns": {"env": "prod"},
    "c-none": {"env": "dev"},
    "d-down": {"env": "dev"},
    "e-slow": {"env": "prod"},
    "f-nocrd": {"env": "dev"},
    "g-hole": {"env": "dev"},
}
TOKEN_KEY = "fan-out test token key, 32 bytes or more: " + "k" * 8
#: The key before TOKEN_KEY, still accepted (``fanout.previous_token_keys``): a rotation under way.
PREVIOUS_TOKEN_KEY = "fan-out previous token key, 32 bytes or more: " + "p" * 8
#: A key the hub no longer knows (rotated out, or another hub's).
RETIRED_TOKEN_KEY = "fan-out retired token key, 32 bytes or more: " + "r" * 8
TRANSPORTS: dict[str, tuple[ProtocolType, Any]] = {
    "connect-h1": (ProtocolType.CONNECT, HTTPVersion.HTTP1),
    "connect-h2c": (ProtocolType.CONNECT, HTTPVersion.HTTP2),
    "grpc-h2c": (ProtocolType.GRPC, HTTPVersion.HTTP2),
    "grpcweb-h1": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP1),
}
READER = [
    {
        "apiGroups": ["", "example.com"],
        "resources": ["configmaps", "widgets"],
        "verbs": ["get", "list", "watch"],
    }
]
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def access_config() -> dict[str, Any]:
    return {
        "default": "none",
        "rules": [
            {"groups": ["team-a"], "clusters": ["*"]},
            {"groups": ["contractors"], "clusters": ["a-full"]},
        ],
    }


def fleet_overrides(**fanout: Any) -> dict[str, Any]:
    """The configuration added to the harness's: labels, access rules, fan-out settings."""
    return {
        "clusters": {name: {"labels": labels} for name, labels in LABELS.items()},
        "access": access_config(),
        "fanout": {
            "token_key": TOKEN_KEY,
            "previous_token_keys": [PREVIOUS_TOKEN_KEY],
            "max_inflight_per_cluster": 2,
            "max_clusters_per_call": 7,
            "max_legs_per_subject": 12,
            **fanout,
        },
    }


def _rbac(cp: ControlPlane, plane: str) -> None:
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "fanout-reader"},
            "rules": READER,
        }
    )
    subjects = [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u} for u in ("alice", "bob")
    ]
    if plane in ("fan-a", "fan-f"):
        cp.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "fanout-reader"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "fanout-reader",
                },
                "subjects": subjects,
            }
        )
    elif plane == "fan-b":
        cp.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "fanout-reader", "namespace": "team-a"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "fanout-reader",
                },
                "subjects": subjects,
            }
        )


def _established(cp: ControlPlane) -> bool:
    crd = cp.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def _objects(cp: ControlPlane, plane: str) -> None:
    for namespace in NAMESPACES:
        cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    if plane != "fan-f":
        cp.apply(WIDGET_CRD)
        cp.wait_for(lambda: _established(cp), timeout=60, what="the Widget CRD established")
    for namespace in NAMESPACES:
        for i in range(PER_NAMESPACE):
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"cm-{i:03d}", "namespace": namespace, "labels": {"idx": str(i % 10)}},
                "data": {"plane": plane, "n": "0"},
            }
            cp.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", body)
    if plane != "fan-f":
        for i in range(3):
            cp.wait_for(
                lambda i=i: cp.apply(
                    {
                        "apiVersion": "example.com/v1",
                        "kind": "Widget",
                        "metadata": {"name": f"widget-{i}", "namespace": "team-a"},
                        "spec": {"size": i},
                    }
                ),
                timeout=60,
                what="a Widget created",
            )


@dataclass
class Fleet:
    """The running fleet and helpers to call it."""

    system: System
    issuer: LocalIssuer
    planes: dict[str, ControlPlane]
    relays: dict[str, BlackHoleRelay]
    audit_log: Path
    tokens: set[str] = field(default_factory=set)

    def plane(self, cluster: str) -> ControlPlane:
        return self.planes[PLANES[cluster]]

    def token(self, user: str, *, lifetime: float = 3600.0) -> str:
        token = self.issuer.token(user, USERS.get(user, ()), audience=AUDIENCE, lifetime=lifetime)
        self.tokens.add(token)
        return token

    def auth(self, user: str, **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(user)}", **headers}

    def truth(
        self,
        cluster: str,
        user: str = "alice",
        namespace: str = "",
        selector: str = "",
        resource: str = "configmaps",
    ) -> set[tuple[str, str]]:
        """(namespace, name) of what ``user`` sees in ``cluster``, straight from its kube-apiserver."""
        cp = self.plane(cluster)
        base = "/api/v1" if resource == "configmaps" else "/apis/example.com/v1"
        path = f"{base}/namespaces/{namespace}/{resource}" if namespace else f"{base}/{resource}"
        if selector:
            path += "?labelSelector=" + urllib.parse.quote(selector)
        headers = {"Impersonate-User": user}
        listed = cp.request("GET", path, headers=headers)
        return {(i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in listed["items"]}

    async def audit_event(self, request_id: str, *, within: float = 60.0) -> dict[str, Any]:
        """The hub's one audit event of the call with ``request_id``. A MultiWatch's is written
        when the hub has wound the stream down, after the client left: polled for, ``within`` is
        generous for a loaded machine."""
        deadline = time.monotonic() + within
        while True:
            text = self.audit_log.read_text() if self.audit_log.exists() else ""
            events = [e for e in map(json.loads, text.splitlines()) if e["request_id"] == request_id]
            if events:
                assert len(events) == 1, events
                return events[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no audit event for {request_id} within {within:g}s")
            await asyncio.sleep(0.2)

    def hub_metric(self, name: str, **labels: str) -> float:
        """The hub's value of metric ``name`` with exactly ``labels`` (0 when absent)."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.system.hub_metrics().splitlines():
            key, _, value = line.rpartition(" ")
            metric, _, found = key.partition("{")
            if metric != name:
                continue
            got = ",".join(sorted(found.rstrip("}").split(","))) if found.rstrip("}") else ""
            if got == wanted:
                return float(value)
        return 0.0


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, control_plane_factory: Any) -> Iterator[Fleet]:
    started = time.monotonic()
    planes = {name: control_plane_factory(name) for name in sorted(set(PLANES.values()))}
    for plane, cp in planes.items():
        _objects(cp, plane)
        _rbac(cp, plane)
    issuer = LocalIssuer().start()
    directory = tmp_path_factory.mktemp("fanout")
    audit_log = directory / "audit.log"
    system = start_system(
        directory,
        {name: (planes[PLANES[name]] if name in PLANES else None) for name in CLUSTERS},
        realm_url=issuer.url,
        client_id=AUDIENCE,
        start_agents=False,
        extra_config={**fleet_overrides(), "audit": {"sink": "file", "file": str(audit_log)}},
    )
    relays = {
        "e-slow": BlackHoleRelay(("127.0.0.1", system.tunnel_port), latency=SLOW_LATENCY).start(),
        "g-hole": BlackHoleRelay(("127.0.0.1", system.tunnel_port)).start(),
    }
    found = Fleet(system, issuer, planes, relays, audit_log)
    try:
        for name in CLUSTERS:
            if name in PLANES:
                relay = relays.get(name)
                system.start_agent(name, tunnel_server_url=relay.url if relay else None)
        print(f"\n[fanout] fleet up in {time.monotonic() - started:.1f}s: hub {system.hub_url}")
        yield found
        logs = {**system.logs(), "audit trail": audit_log.read_text() if audit_log.exists() else ""}
        secrets = {
            *found.tokens,
            system.key_seed,
            TOKEN_KEY,
            PREVIOUS_TOKEN_KEY,
            *(c.password for c in system.clusters.values()),
        }
        leaked = [
            name
            for name, text in logs.items()
            for secret in secrets
            if secret in text or secret.rsplit(".", 1)[-1] in text
        ]
        assert not leaked, f"a token or secret was logged in {sorted(set(leaked))}"
    finally:
        system.stop()
        for relay in relays.values():
            relay.close()
        issuer.stop()


@dataclass
class Clients:
    """Connect clients of the hub for one test (closed after it)."""

    fleet: Fleet
    _transports: list[HTTPTransport] = field(default_factory=list)
    _clients: list[Any] = field(default_factory=list)

    def multi(
        self, transport: str = "connect-h2c", *, json: bool = False, timeout_ms: int | None = 60_000
    ) -> MultiClusterServiceClient:
        protocol, version = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        self._transports.append(http)
        client = MultiClusterServiceClient(
            self.fleet.system.hub_url,
            protocol=protocol,
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            http_client=Client(http),
            timeout_ms=timeout_ms,
        )
        self._clients.append(client)
        return client

    def clusters(self) -> ClusterServiceClient:
        http = HTTPTransport(http_version=HTTPVersion.HTTP2)
        self._transports.append(http)
        client = ClusterServiceClient(self.fleet.system.hub_url, http_client=Client(http), timeout_ms=30_000)
        self._clients.append(client)
        return client

    def resources(self) -> ResourceServiceClient:
        http = HTTPTransport(http_version=HTTPVersion.HTTP2)
        self._transports.append(http)
        client = ResourceServiceClient(self.fleet.system.hub_url, http_client=Client(http), timeout_ms=30_000)
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()
        for transport in self._transports:
            await transport.aclose()


@pytest_asyncio.fixture
async def clients(fleet: Fleet) -> AsyncIterator[Clients]:
    found = Clients(fleet)
    try:
        yield found
    finally:
        await found.aclose()


async def wait_connected(fleet: Fleet, cluster: str, *, within: float = 60.0) -> None:
    """Until the hub reports ``cluster`` connected (its /metrics), polling without blocking the loop."""
    deadline = time.monotonic() + within
    while not (await asyncio.to_thread(fleet.system.connected)).get(cluster):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{cluster} not connected within {within:g}s")
        await asyncio.sleep(0.2)
