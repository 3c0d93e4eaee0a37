"""Fixtures of the end-to-end tests: real users with real tokens calling the real system.

The system itself (Keycloak, control planes ``east`` and ``west``, the hub and one agent per
cluster, each its own OS process, real chisel tunnels) is the ``otterscale_system`` session
fixture of the ``otterscale.testing`` plugin; ``--provider=kind`` runs it in kind clusters
instead (the plugin's ``_kind``), ``--provider=node`` on the test node (``_nodesystem``); tests in
``LOCAL_ONLY`` below are then skipped. Here:

- ``rbac`` (session): each cluster's own RBAC, deliberately different. alice may edit in east
  only, bob in west only (bound by user, i.e. their Keycloak subject), and the group ``ops``
  (carol) may read configmaps in both clusters.
- ``hub`` (per test): Connect clients of the hub for every protocol, tokens from Keycloak, and
  the subjects behind them; everything is closed after the test. Every token handed out is
  remembered, so the session can check at the end that no process logged one.
- ``measurements`` (session): numbers the tests measure (connect and reconnect times, latency),
  written to ``<basetemp>/e2e-measurements.json`` and shown in pytest's terminal summary.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.protocol import ProtocolType
from google._upb import _message as upb  # type: ignore[import-not-found]
from pyqwest import Client, HTTPTransport, HTTPVersion

from otterscale.cluster.v1 import cluster_pb2
from otterscale.cluster.v1.cluster_connect import ClusterServiceClient
from otterscale.resource.v1.resource_connect import ResourceServiceClient
from otterscale.testing import (
    ClusterEntry,
    ControlPlane,
    Keycloak,
    KubeAPIError,
    LocalIssuer,
    System,
    create_namespace,
    object_path,
    service_account_kubeconfig,
    start_system,
    tool_path,
)

# Kubernetes objects can nest deeper than upb's default limit of 100 (the agent does the same).
upb.SetAllowOversizeProtos(True)

CLUSTERS = ("east", "west")

TRANSPORTS: dict[str, tuple[ProtocolType, Any]] = {
    "connect-h1": (ProtocolType.CONNECT, HTTPVersion.HTTP1),
    "connect-h2c": (ProtocolType.CONNECT, HTTPVersion.HTTP2),
    "grpc-h2c": (ProtocolType.GRPC, HTTPVersion.HTTP2),
    "grpcweb-h1": (ProtocolType.GRPC_WEB, HTTPVersion.HTTP1),
}

#: Every token any test used: none may show up in a log (checked at session end).
ISSUED_TOKENS: set[str] = set()

EDITOR_RULES = [
    {
        "apiGroups": [""],
        "resources": ["configmaps", "secrets"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
]
READER_RULES = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]


#: Tests that need what only the local provider has (OS processes and their pids, ports on this
#: host, a second local system): skipped under ``--provider=kind`` and ``--provider=node``, each
#: with its reason.
LOCAL_ONLY = {
    "test_demo.py::": "runs `nox -s demo`, the local stack itself",
    "test_browser.py::": "starts its own hub and agent (CORS configured) as local processes",
    "test_tunnels.py::": "runs chisel clients against the hub's tunnel and agent ports on this host",
    "test_auth.py::test_an_expired_token_is_unauthenticated": "starts a second local system",
    "test_faults.py::test_a_dead_agent_is": "compares the hub's OS process id",
    "test_faults.py::test_a_watch_lives_as_long_as_the_agent": "SIGKILLs the agent's OS process",
    "test_faults.py::test_a_restarted_hub_gets_its_agents_back": "compares the agents' OS process ids",
    "test_faults.py::test_a_killed_chisel_is_restarted": "SIGKILLs a chisel OS process",
    "test_faults_agent.py::test_an_agent_killed_mid_list": (
        "SIGKILLs the agent's OS process while it reads a List, by its I/O counters"
    ),
    "test_faults_network.py::": "black-holes the tunnel port on this host and compares OS process ids",
    "test_latency.py::": "calls the agent's API port and the hub's tunnel port on this host directly",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chosen = config.getoption("--provider")
    if chosen == "local":
        return
    for item in items:
        for test, reason in LOCAL_ONLY.items():
            if f"e2e/{test}" in item.nodeid:
                item.add_marker(
                    pytest.mark.skip(reason=f"local provider only (--provider={chosen}): {reason}")
                )


def subject_of(token: str) -> str:
    """The ``sub`` claim of a JWT (no verification: the token came straight from Keycloak)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sub"])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------------
# RBAC


@dataclass(frozen=True)
class Rbac:
    """Who may do what where (see the module docstring); subjects are Keycloak user ids."""

    subjects: dict[str, str]


def _cluster_role(cp: ControlPlane, name: str, rules: list[dict[str, Any]]) -> None:
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        }
    )


def _bind(cp: ControlPlane, name: str, role: str, kind: str, subject: str) -> None:
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}],
        }
    )


@pytest.fixture(scope="session")
def rbac(otterscale_system: System, keycloak: Keycloak) -> Rbac:
    subjects = {user: subject_of(keycloak.token(user)) for user in ("alice", "bob", "carol")}
    editor_of = {"east": "alice", "west": "bob"}
    for name in CLUSTERS:
        cp = otterscale_system.clusters[name].control_plane
        assert cp is not None
        _cluster_role(cp, "e2e-editor", EDITOR_RULES)
        _cluster_role(cp, "e2e-reader", READER_RULES)
        _bind(cp, "e2e-editor", "e2e-editor", "User", subjects[editor_of[name]])
        _bind(cp, "e2e-ops-reader", "e2e-reader", "Group", "ops")
    return Rbac(subjects=subjects)


@pytest.fixture
def namespace(otterscale_system: System) -> Iterator[str]:
    """A fresh namespace of the same name in both clusters (created as admin), deleted after."""
    name = unique("e2e")
    cps = [otterscale_system.clusters[c].control_plane for c in CLUSTERS]
    for cp in cps:
        assert cp is not None
        cp.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
    yield name
    for cp in cps:
        assert cp is not None
        cp.request("DELETE", f"/api/v1/namespaces/{name}")


# --------------------------------------------------------------------------------------------------
# Clients


@dataclass
class Hub:
    """Clients of the running hub for one test (closed after it) and tokens for its users."""

    system: System
    keycloak: Keycloak
    rbac: Rbac
    _transports: list[HTTPTransport] = field(default_factory=list)
    _clients: list[Any] = field(default_factory=list)
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.system.hub_url

    def client(
        self, transport: str = "connect-h1", *, json: bool = False, timeout_ms: int | None = 30_000
    ) -> ResourceServiceClient:
        protocol, version = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        self._transports.append(http)
        client = ResourceServiceClient(
            self.url,
            protocol=protocol,
            codec=google_protobuf_json_codec() if json else google_protobuf_binary_codec(),
            http_client=Client(http),
            timeout_ms=timeout_ms,
        )
        self._clients.append(client)
        return client

    def clusters_client(self, transport: str = "connect-h1") -> ClusterServiceClient:
        protocol, version = TRANSPORTS[transport]
        http = HTTPTransport(http_version=version)
        self._transports.append(http)
        client = ClusterServiceClient(
            self.url, protocol=protocol, http_client=Client(http), timeout_ms=10_000
        )
        self._clients.append(client)
        return client

    def token(self, user: str, *, fresh: bool = False, client_id: str | None = None) -> str:
        """A real access token of ``user`` (cached for the test unless ``fresh``)."""
        key = f"{user}/{client_id or ''}"
        if fresh or key not in self._tokens:
            self._tokens[key] = remember(self.keycloak.token(user, client_id=client_id))
        return self._tokens[key]

    def auth(self, user: str = "alice", **headers: str) -> dict[str, str]:
        """Request headers: ``Authorization: Bearer <token of user>`` plus ``headers``."""
        return {"authorization": f"Bearer {self.token(user)}", **headers}

    def subject(self, user: str) -> str:
        return self.rbac.subjects[user]

    async def list_clusters(self, user: str = "alice") -> dict[str, cluster_pb2.Cluster]:
        client = self.clusters_client()
        response = await client.list_clusters(cluster_pb2.ListClustersRequest(), headers=self.auth(user))
        return {c.name: c for c in response.clusters}

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()
        for transport in self._transports:
            await transport.aclose()


def remember(token: str) -> str:
    ISSUED_TOKENS.add(token)
    return token


@pytest_asyncio.fixture
async def hub(
    otterscale_system: System,
    keycloak: Keycloak,
    rbac: Rbac,
    no_secret_logged: None,
    measurements: Measurements,
) -> AsyncIterator[Hub]:
    if "startup" not in measurements.values:
        timings = otterscale_system.timings
        measurements.record(
            "startup",
            {
                "hub_spawn_to_ready_s": round(timings.hub_start[0], 3),
                "agent_spawn_to_hub_connected_s": {
                    n: round(t[0], 3) for n, t in timings.agent_connect.items()
                },
            },
        )
    found = Hub(otterscale_system, keycloak, rbac)
    try:
        yield found
    finally:
        await found.aclose()


# --------------------------------------------------------------------------------------------------
# Secrets in logs, measurements


def secrets_in(logs: dict[str, str], secrets: dict[str, str]) -> list[str]:
    """``"<what> in <log file>"`` for every secret found in a log (a token also by its signature)."""
    found = []
    for what, secret in secrets.items():
        needles = [secret]
        if secret.count(".") == 2:  # a JWT: its signature alone is enough to count as leaked
            needles.append(secret.rsplit(".", 1)[1])
        for log_name, text in logs.items():
            if any(needle in text for needle in needles):
                found.append(f"{what} in {log_name}")
    return found


def all_secrets(system: System, keycloak: Keycloak) -> dict[str, str]:
    secrets = {f"token #{i}": t for i, t in enumerate(sorted(ISSUED_TOKENS))}
    secrets["tunnel key seed"] = system.key_seed
    for name, entry in system.clusters.items():
        secrets[f"agent password of {name}"] = entry.password
    for user in keycloak.users.values():
        secrets[f"password of {user.username}"] = user.password
    return secrets


@pytest.fixture(scope="session")
def no_secret_logged(otterscale_system: System, keycloak: Keycloak) -> Iterator[None]:
    """At the end of the session, after every call of every test: no process logged a secret.

    Every test that calls the hub depends on this (through ``hub``), so it is torn down after
    the last of them; a leak is reported as an error of the session's last test.
    """
    yield
    leaked = secrets_in(otterscale_system.logs(), all_secrets(otterscale_system, keycloak))
    assert not leaked, f"secrets found in the logs of {otterscale_system.directory}: {leaked}"


@dataclass
class Measurements:
    values: dict[str, Any] = field(default_factory=dict)

    def record(self, key: str, value: Any) -> None:
        self.values[key] = value
        print(f"\n[e2e] {key}: {json.dumps(value)}")


_MEASURED = Measurements()


@pytest.fixture(scope="session")
def measurements(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Measurements]:
    yield _MEASURED
    if _MEASURED.values:
        path = Path(tmp_path_factory.getbasetemp()) / "e2e-measurements.json"
        path.write_text(json.dumps(_MEASURED.values, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _MEASURED.values:
        terminalreporter.section("otterscale e2e measurements")
        for key, value in sorted(_MEASURED.values.items()):
            terminalreporter.write_line(f"{key}: {json.dumps(value)}")


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def monotonic_ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 1)


# --------------------------------------------------------------------------------------------------
# A system whose agent has exactly the agent chart's RBAC, with tokens from a local issuer


AGENT_CHART = Path(__file__).resolve().parents[2] / "charts" / "otterscale-agent"
#: The cluster name of ``chart_rbac_system`` in the hub's configuration.
CHART_RBAC_CLUSTER = "ident"
#: The group that may read configmaps (and alice may edit them) in ``ChartRbacSystem.namespace``.
TEAM = "oidc:team-a"


@dataclass
class ChartRbacSystem:
    """A hub and one agent (OS processes, real chisel) in front of a real kube-apiserver.

    The agent runs as a ServiceAccount with exactly the RBAC ``charts/otterscale-agent`` renders
    by default (impersonate any user and any group, read discovery and OpenAPI), so only the hub
    and the agent stand between a hostile token and ``system:masters``. Tokens come from a
    :class:`~otterscale.testing.LocalIssuer` (any claim a test wants). In ``namespace``, group
    ``oidc:team-a`` may read configmaps and user ``alice`` may also create and delete them;
    ``crown_jewels`` is a Secret in kube-system that only cluster-admins may read. The hub writes
    its audit trail to ``audit_log``.
    """

    system: System
    control_plane: ControlPlane
    issuer: LocalIssuer
    namespace: str
    service_account: str
    crown_jewels: str
    audit_log: Path

    @property
    def agent(self) -> ClusterEntry:
        return self.system.clusters[CHART_RBAC_CLUSTER]

    def token(self, subject: str, groups: tuple[str, ...] = (), **claims: Any) -> str:
        return remember(self.issuer.token(subject, groups, audience=self.system.client_id, **claims))

    def client(self) -> tuple[ResourceServiceClient, HTTPTransport]:
        http = HTTPTransport(http_version=HTTPVersion.HTTP1)
        client = ResourceServiceClient(self.system.hub_url, http_client=Client(http), timeout_ms=30_000)
        return client, http

    def audit_events(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]


def _agent_chart_rbac(namespace: str, release: str) -> list[dict[str, Any]]:
    """The ServiceAccount, ClusterRole and ClusterRoleBinding the agent chart renders by default."""
    result = subprocess.run(
        [
            str(tool_path("helm")),
            "template",
            release,
            str(AGENT_CHART),
            "--namespace",
            namespace,
            "--values",
            str(AGENT_CHART / "ci" / "default-values.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    wanted = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] in wanted]
    assert {doc["kind"] for doc in docs} == wanted
    return docs


@pytest.fixture(scope="session")
def chart_rbac_system(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChartRbacSystem]:
    cp = control_plane  # the session's shared cluster: everything made here has a unique name
    directory = tmp_path_factory.mktemp("chart-rbac")
    namespace = unique("ident")
    create_namespace(cp, namespace)
    rbac = _agent_chart_rbac(namespace, unique("agent"))
    for obj in rbac:
        cp.apply(obj)
    account = next(doc["metadata"]["name"] for doc in rbac if doc["kind"] == "ServiceAccount")
    kubeconfig = service_account_kubeconfig(cp, namespace, directory / "agent.kubeconfig", account)
    rbac_api = "rbac.authorization.k8s.io"
    cp.apply(
        {
            "apiVersion": f"{rbac_api}/v1",
            "kind": "Role",
            "metadata": {"name": "cm-reader", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
        }
    )
    cp.apply(
        {
            "apiVersion": f"{rbac_api}/v1",
            "kind": "Role",
            "metadata": {"name": "cm-editor", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "delete"]}],
        }
    )
    for role, kind, name in (("cm-reader", "Group", TEAM), ("cm-editor", "User", "alice")):
        cp.apply(
            {
                "apiVersion": f"{rbac_api}/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{role}-{kind.lower()}", "namespace": namespace},
                "roleRef": {"apiGroup": rbac_api, "kind": "Role", "name": role},
                "subjects": [{"apiGroup": rbac_api, "kind": kind, "name": name}],
            }
        )
    cp.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "visible"}, "data": {"a": "b"}},
    )
    crown_jewels = unique("crown-jewels")
    cp.request(
        "POST",
        "/api/v1/namespaces/kube-system/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": crown_jewels}, "data": {}},
    )
    # RBAC works from informer caches: wait until the team's binding is in effect.
    cp.wait_for(
        lambda: cp.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/configmaps",
            headers={"Impersonate-User": "probe", "Impersonate-Group": TEAM},
        ),
        what="the team's role binding in effect",
    )
    issuer = LocalIssuer().start()
    audit_log = directory / "audit.log"
    try:
        system = start_system(
            directory / "system",
            {CHART_RBAC_CLUSTER: cp},
            realm_url=issuer.url,
            client_id="otterscale",
            extra_config={"audit": {"sink": "file", "file": str(audit_log)}},
            kubeconfigs={CHART_RBAC_CLUSTER: kubeconfig},
        )
    except BaseException:
        issuer.stop()
        raise
    try:
        yield ChartRbacSystem(system, cp, issuer, namespace, account, crown_jewels, audit_log)
    finally:
        system.stop()
        issuer.stop()
        leaked = secrets_in(system.logs(), {**_token_secrets(), "tunnel key seed": system.key_seed})
        for obj in rbac:
            if obj["kind"].startswith("Cluster"):
                with contextlib.suppress(KubeAPIError):
                    cp.request("DELETE", object_path(obj))
        cp.request("DELETE", f"/api/v1/namespaces/kube-system/secrets/{crown_jewels}")
        cp.request("DELETE", f"/api/v1/namespaces/{namespace}")
        assert not leaked, f"secrets found in the logs of {system.directory}: {leaked}"


@pytest.fixture
def stack(chart_rbac_system: ChartRbacSystem) -> ChartRbacSystem:
    """``chart_rbac_system`` under a short name."""
    return chart_rbac_system


def _token_secrets() -> dict[str, str]:
    return {f"token #{i}": t for i, t in enumerate(sorted(ISSUED_TOKENS))}
