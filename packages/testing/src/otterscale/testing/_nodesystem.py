"""The shipped images and charts on the test node: the node provider of the e2e suite
(``--provider=node``) and the chart tests of ``tests/node``.

Everything the operator's way: the images of ``nox -s images`` imported into the node, the hub
chart installed with helm into namespace ``otterscale`` and one agent release per cluster, with
the values in ``deploy/node/`` plus a generated values file (mode 0600) for what exists only at
run time (the issuer, the clusters, the tunnel key seed and passwords, the fingerprint the hub's
own ``--print-fingerprint`` derives from that seed).

Where things are:

- the hub's API is its Service's NodePort on the node (``http://10.250.<i>.1:30299``), so tests
  call the hub through the Service and kube-proxy, as a user would;
- agents dial the tunnel Service by its cluster DNS name (CoreDNS), which selects the leader only
  when there are several hub replicas;
- an agent *in* the node's cluster (:attr:`Installation.home`) uses its Pod's ServiceAccount and
  the chart's RBAC;
- the agents of other clusters (control planes of the ``control_plane_factory`` fixture, which
  listen on the host's loopback) run on the node too, in namespaces ``otterscale-<cluster>``, with
  a kubeconfig Secret (the agent chart's ``kubeconfig.secretName``): a relay on the host's end of
  the veth forwards to the API server (the certificate's ``localhost`` name is used as
  ``tls-server-name``), and the credentials are a token of a ServiceAccount bound, in *that*
  cluster, to the ClusterRole the agent chart renders;
- the OIDC issuer (Keycloak, or the local test issuer) is bound to the host's end of the veth, so
  the hub Pods and the tests see the same issuer URL.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import secrets
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import _node
from ._controlplane import ControlPlane
from ._kind import TcpRelay
from ._node import Node, NodeError
from ._pods import PodSystem, Workload, wait
from ._process import free_port
from ._service import http_ok, otterscale_command, service_env
from ._system import ClusterEntry
from .images import load_index
from .tools import tool_path

logger = logging.getLogger(__name__)

NAMESPACE = "otterscale"
HUB_RELEASE = "otterscale-hub"
#: The hub's management address on its Pod IP (/metrics, per-cluster health).
MANAGEMENT_PORT = 8298
AGENT_RELEASE = "otterscale-agent"
#: The hub Service's NodePort (deploy/node/hub-values.yaml).
HUB_NODE_PORT = 30299
TUNNEL_SERVICE = f"{HUB_RELEASE}-tunnel"
LEADER_LABEL = "otterscale.io/leader"
#: Seconds helm may take to bring a release's Pods Ready (images are local: this is start-up only).
HELM_TIMEOUT = 300
#: The images the charts reference (``nox -s images`` keys).
HUB_IMAGE, AGENT_IMAGE = "otterscale-hub", "otterscale-agent"


def preflight() -> list[str]:
    """What ``--provider=node`` misses here: what the node needs, and the images it runs."""
    problems = _node.preflight()
    index = load_index()
    missing = [
        key
        for key in (HUB_IMAGE, AGENT_IMAGE)
        if key not in index or not Path(index[key]["archive"]).is_file()
    ]
    if missing:
        problems.append(f"images not built: {', '.join(missing)} (nox -s images)")
    try:
        repo_root()
    except NodeError as exc:
        problems.append(str(exc))
    return problems


def unavailable_message(problems: Sequence[str]) -> str:
    return (
        "--provider=node cannot run here: "
        + "; ".join(problems)
        + ". The node needs root and Linux (deploy/node/README.md); or use the default --provider=local."
    )


def repo_root() -> Path:
    """The source checkout (charts/ and deploy/node/)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "deploy" / "node" / "hub-values.yaml").is_file():
            return parent
    raise NodeError("deploy/node/ not found: the node provider runs from a source checkout")


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@dataclasses.dataclass
class RemoteCluster:
    """A cluster outside the node whose agent runs on the node (see the module docstring)."""

    control_plane: ControlPlane
    relay: TcpRelay
    token: str

    def kubeconfig(self) -> str:
        host, port = self.relay.listen
        ca = base64.b64encode(self.control_plane.ca_file.read_bytes()).decode()
        name = self.control_plane.name
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": name,
                        "cluster": {
                            "server": f"https://{host}:{port}",
                            "certificate-authority-data": ca,
                            # The relay's address is not in the certificate; its loopback name is.
                            "tls-server-name": "localhost",
                        },
                    }
                ],
                "users": [{"name": "otterscale-agent", "user": {"token": self.token}}],
                "contexts": [{"name": name, "context": {"cluster": name, "user": "otterscale-agent"}}],
                "current-context": name,
            }
        )


class Installation:
    """Both charts on the node (see the module docstring). Build, then :meth:`install_hub` and
    :meth:`install_agent`; :meth:`uninstall` removes every release; :meth:`close` the relays."""

    def __init__(
        self,
        node: Node,
        directory: Path,
        *,
        realm_url: str,
        clusters: Mapping[str, ControlPlane | None],
        offline: Sequence[str] = (),
        home: str | None = None,
        log_level: str = "debug",
    ) -> None:
        """``clusters``: name -> control plane of a remote cluster, or None for the node's own
        cluster (at most one, :attr:`home`); ``offline``: configured in the hub, never connected."""
        self.node = node
        self.root = repo_root()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.helm = str(tool_path("helm"))
        self.realm_url = realm_url
        self.log_level = log_level
        self.key_seed = secrets.token_urlsafe(24)
        self.home = home
        self.clusters: dict[str, ClusterEntry] = {}
        self.remote: dict[str, RemoteCluster] = {}
        for index, name in enumerate([*clusters, *offline]):
            cp = clusters.get(name)
            if name in clusters and cp is None:
                if home not in (None, name):
                    raise ValueError("only one cluster can be the node's own")
                self.home, cp = name, node.control_plane
            self.clusters[name] = ClusterEntry(
                name, cp, 51001 + index, 8299, f"{name}-agent", secrets.token_urlsafe(24)
            )
        self.offline = tuple(offline)
        self.fingerprint = self._fingerprint()
        self.replicas = 1
        #: Seconds: each helm install/upgrade (--wait: every Pod Ready through its probes).
        self.timings: dict[str, list[float]] = {}

    # --- values -----------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """The tunnel fingerprint of the key seed, as the operator gets it (``--print-fingerprint``)."""
        config = _write_private(
            self.directory / "fingerprint.yaml", yaml.safe_dump(self._config_for_fingerprint())
        )
        done = subprocess.run(
            [
                *otterscale_command(),
                "server",
                f"--config={config}",
                "--print-fingerprint",
                f"--chisel={tool_path('chisel')}",
            ],
            capture_output=True,
            text=True,
            env=service_env(),
            timeout=60,
            check=False,
        )
        config.unlink()
        if done.returncode != 0 or not done.stdout.strip():
            raise NodeError(
                f"otterscale server --print-fingerprint failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout.strip().splitlines()[-1]

    def _config_for_fingerprint(self) -> dict[str, Any]:
        entry = next(iter(self.clusters.values()))
        return {
            "keycloak": {"realm_url": self.realm_url, "client_id": "otterscale"},
            "tunnel": {"server": {"host": "127.0.0.1", "port": 8300, "key_seed": self.key_seed}},
            "clusters": {
                entry.name: {
                    "agent": {
                        "auth": {"user": entry.user, "pass": entry.password},
                        "tunnel_port": entry.tunnel_port,
                        "api_port": entry.api_port,
                    }
                }
            },
        }

    def hub_values(self, replicas: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The run-time part of the hub's values (the rest is deploy/node/hub-values.yaml)."""
        values: dict[str, Any] = {
            "replicaCount": replicas,
            "config": {
                "keycloak": {"realm_url": self.realm_url},
                "clusters": {
                    c.name: {
                        "agent": {
                            "auth": {"user": c.user},
                            "tunnel_port": c.tunnel_port,
                            "api_port": c.api_port,
                        }
                    }
                    for c in self.clusters.values()
                },
            },
            "secrets": {
                "tunnelKeySeed": self.key_seed,
                "agentPasswords": {c.name: c.password for c in self.clusters.values()},
            },
            "logLevel": self.log_level,
        }
        return _merge(values, dict(extra or {}))

    def agent_values(self, name: str) -> dict[str, Any]:
        entry = self.clusters[name]
        values: dict[str, Any] = {
            "cluster": name,
            "tunnelServerURL": f"http://{TUNNEL_SERVICE}.{NAMESPACE}.svc.cluster.local:8300",
            "config": {
                "agent": {
                    "auth": {"user": entry.user},
                    "fingerprint": self.fingerprint,
                    "tunnel_port": entry.tunnel_port,
                    "api_port": entry.api_port,
                }
            },
            "secrets": {"password": entry.password},
            "logLevel": self.log_level,
        }
        if name != self.home:
            values["kubeconfig"] = {"secretName": f"{name}-kubeconfig", "key": "kubeconfig"}
            values["rbac"] = {"create": False}
        return values

    def agent_namespace(self, name: str) -> str:
        return NAMESPACE if name == self.home else f"{NAMESPACE}-{name}"

    # --- helm -------------------------------------------------------------------------------------

    def helm_run(self, *args: str, timeout: float = HELM_TIMEOUT + 60) -> str:
        argv = [self.helm, *args, "--kubeconfig", str(self.node.kubeconfig)]
        logger.info("node provider: %s", " ".join(argv))
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if done.returncode != 0:
            raise NodeError(f"`helm {' '.join(args[:3])}` failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done.stdout

    def _upgrade(self, release: str, chart: str, namespace: str, base: str, values: dict[str, Any]) -> float:
        generated = _write_private(
            self.directory / f"{release}-{namespace}.values.yaml", yaml.safe_dump(values)
        )
        started = time.monotonic()
        self.helm_run(
            "upgrade", "--install", release, str(self.root / "charts" / chart), "--namespace", namespace,
            "--create-namespace", "--wait", "--timeout", f"{HELM_TIMEOUT}s",
            "--values", str(self.root / "deploy" / "node" / base), "--values", str(generated),
        )  # fmt: skip
        elapsed = time.monotonic() - started
        self.timings.setdefault(f"{release}/{namespace}", []).append(round(elapsed, 2))
        return elapsed

    def images(self) -> None:
        """Import the hub and agent images of ``nox -s images``; they must be what the charts use."""
        for key, chart in ((HUB_IMAGE, "otterscale-hub"), (AGENT_IMAGE, "otterscale-agent")):
            ref = self.node.image(key)
            meta = yaml.safe_load((self.root / "charts" / chart / "Chart.yaml").read_text())
            values = yaml.safe_load((self.root / "charts" / chart / "values.yaml").read_text())
            wanted = f"{values['image']['repository']}:{meta['appVersion']}"
            if ref != wanted:
                raise NodeError(f"the built image is {ref}, the chart runs {wanted}: run `nox -s images`")

    def install_hub(self, replicas: int = 1, extra: Mapping[str, Any] | None = None) -> float:
        """``helm upgrade --install --wait`` the hub; seconds until every Pod was Ready."""
        self.replicas = replicas
        return self._upgrade(
            HUB_RELEASE, "otterscale-hub", NAMESPACE, "hub-values.yaml", self.hub_values(replicas, extra)
        )

    def install_agent(self, name: str) -> float:
        """The agent of ``name`` (its cluster's access first, for a remote one); seconds to Ready."""
        namespace = self.agent_namespace(name)
        if name != self.home and name not in self.remote:
            self.remote[name] = self._expose(name, namespace)
        return self._upgrade(
            AGENT_RELEASE, "otterscale-agent", namespace, "agent-values.yaml", self.agent_values(name)
        )

    def _expose(self, name: str, namespace: str) -> RemoteCluster:
        """Reach cluster ``name`` from the node: relay, RBAC and a ServiceAccount token there, and
        the kubeconfig Secret in the agent's namespace on the node."""
        cp = self.clusters[name].control_plane
        assert cp is not None
        relay = TcpRelay((self.node.host_ip, free_port(self.node.host_ip)), ("127.0.0.1", cp.port))
        # The agent chart's own ClusterRole and binding, applied where the agent acts.
        generated = _write_private(
            self.directory / f"rbac-{name}.values.yaml", yaml.safe_dump(self.agent_values(name))
        )
        chart = str(self.root / "charts" / "otterscale-agent")
        rendered = self.helm_run(
            "template", AGENT_RELEASE, chart, "--namespace", namespace,
            "--values", str(self.root / "deploy" / "node" / "agent-values.yaml"), "--values", str(generated),
            "--set", "rbac.create=true", "--show-only", "templates/rbac.yaml",
        )  # fmt: skip
        cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        cp.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": AGENT_RELEASE, "namespace": namespace},
            }
        )
        for doc in yaml.safe_load_all(rendered):
            if doc:
                cp.apply(doc)
        answer = cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{AGENT_RELEASE}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 86400},
            },
        )
        remote = RemoteCluster(cp, relay, answer["status"]["token"])
        admin = self.node.control_plane
        admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        admin.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"{name}-kubeconfig", "namespace": namespace},
                "type": "Opaque",
                "stringData": {"kubeconfig": remote.kubeconfig()},
            }
        )
        return remote

    def uninstall(self) -> None:
        """``helm uninstall`` every release (agents first) and wait until their Pods are gone."""
        for name in self.clusters:
            if name in self.offline:
                continue
            namespace = self.agent_namespace(name)
            with contextlib.suppress(NodeError):  # not installed
                self.helm_run(
                    "uninstall", AGENT_RELEASE, "--namespace", namespace, "--wait", "--timeout", "120s"
                )
        with contextlib.suppress(NodeError):
            self.helm_run("uninstall", HUB_RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "120s")

    def close(self) -> None:
        for remote in self.remote.values():
            remote.relay.close()

    # --- what runs --------------------------------------------------------------------------------

    @property
    def hub_url(self) -> str:
        """The hub's Service, as a user outside the cluster calls it (NodePort)."""
        return f"http://{self.node.node_ip}:{HUB_NODE_PORT}"

    def hub_pods(self) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={HUB_RELEASE},app.kubernetes.io/component=hub"
        found = self.node.control_plane.request(
            "GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}"
        )
        return [p for p in found["items"] if not p["metadata"].get("deletionTimestamp")]

    def leader(self) -> dict[str, Any] | None:
        """The hub Pod that carries the leader label (None: none does right now)."""
        leaders = [p for p in self.hub_pods() if p["metadata"].get("labels", {}).get(LEADER_LABEL) == "true"]
        if len(leaders) > 1:
            raise NodeError(
                f"{len(leaders)} hub Pods carry the leader label: {[p['metadata']['name'] for p in leaders]}"
            )
        return leaders[0] if leaders else None

    def tunnel_endpoints(self) -> list[str]:
        """The Pod addresses the tunnel Service sends agents to (ready endpoints only)."""
        selector = f"kubernetes.io/service-name={TUNNEL_SERVICE}"
        found = self.node.control_plane.request(
            "GET", f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices?labelSelector={selector}"
        )
        return sorted(
            address
            for piece in found["items"]
            for endpoint in piece.get("endpoints") or []
            if endpoint.get("conditions", {}).get("ready")
            for address in endpoint["addresses"]
        )

    def metrics_url(self) -> str:
        """The hub's view of the tunnels: the leader's own /metrics (or the one replica's), on its
        management address (``management.expose`` in deploy/node/hub-values.yaml)."""
        if self.replicas > 1:
            hub = self.leader()
            if hub is None or not hub["status"].get("podIP"):
                raise OSError("no hub Pod is the leader right now")
        else:
            running = [p for p in self.hub_pods() if p["status"].get("podIP")]
            if len(running) != 1:
                raise OSError(f"{len(running)} hub Pods have an address right now, not 1")
            hub = running[0]
        return f"http://{hub['status']['podIP']}:{MANAGEMENT_PORT}/metrics"

    def system(self) -> NodeSystem:
        return NodeSystem(self)


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


class NodeSystem(PodSystem):
    """What the e2e tests use of :class:`~otterscale.testing.System`, backed by the node."""

    def __init__(self, installation: Installation) -> None:
        admin = installation.node.control_plane
        super().__init__(
            installation.directory,
            hub_url=installation.hub_url,
            tunnel_url=f"http://{TUNNEL_SERVICE}.{NAMESPACE}.svc.cluster.local:8300",
            hub=Workload(admin, NAMESPACE, HUB_RELEASE, "hub"),
            agents={
                name: Workload(admin, installation.agent_namespace(name), AGENT_RELEASE, name)
                for name in installation.clusters
                if name not in installation.offline
            },
            clusters=installation.clusters,
            key_seed=installation.key_seed,
            fingerprint=installation.fingerprint,
        )
        self.installation = installation
        self.node = installation.node
        self.hub_replicas = installation.replicas

    def metrics_url(self) -> str:
        return self.installation.metrics_url()


def start_node_system(
    node: Node,
    directory: Path,
    *,
    realm_url: str,
    clusters: Mapping[str, ControlPlane | None],
    offline: Sequence[str] = (),
    replicas: int = 1,
) -> tuple[Installation, NodeSystem]:
    """Install the hub and one agent per connected cluster; wait until the hub reports each."""
    installation = Installation(node, directory, realm_url=realm_url, clusters=clusters, offline=offline)
    try:
        installation.images()
        system = installation.system()
        started = time.monotonic()
        installation.install_hub(replicas)
        system.hub_replicas = replicas
        wait(
            lambda: http_ok(installation.hub_url + "/readyz"),
            60,
            "the hub answering /readyz through its Service",
        )
        system.timings.hub_start.append(time.monotonic() - started)
        for name in clusters:
            started = time.monotonic()
            installation.install_agent(name)
            system.wait_connected(name, True)
            system.timings.agent_connect.setdefault(name, []).append(time.monotonic() - started)
    except BaseException:
        installation.close()
        raise
    return installation, system
