"""The kind provider of the end-to-end suite (``pytest tests/e2e --provider=kind``).

Where the local provider (``_system``) runs the hub and the agents as OS processes next to
control planes of its own, this one runs the shipped artefacts the way a user installs them: a
hub cluster and two agent clusters (``east``, ``west``) created with kind from
``deploy/kind/*-cluster.yaml``, both images built from ``docker/*.Dockerfile`` and loaded with
``kind load docker-image``, and both charts installed with helm and the values in
``deploy/kind/``. What only exists at run time is passed with ``--set`` (:class:`KindPlan`).

Keycloak is *not* run in a cluster: the suite's Keycloak runs on the host as with the local
provider (same users, same token helpers), but its issuer is the kind network's gateway address
(``http://<gateway>:<port>/realms/otterscale``, :class:`GatewayKeycloak`), which the hub Pod
reaches through its node and the tests reach directly, so ``iss`` is the same on both sides.
Keycloak itself keeps listening on 127.0.0.1; a small TCP relay on ``<gateway>:<port>``
forwards to it (:class:`TcpRelay`).

The tests reach the hub at ``http://127.0.0.1:30299`` (the hub cluster maps its NodePort to the
host). Each cluster's admin access (RBAC setup, namespaces, the agent's Deployment) is a
:class:`~otterscale.testing.ControlPlane` built from ``kind get kubeconfig``, so the tests' RBAC
and namespace fixtures work unchanged. :class:`KindSystem` offers what the tests use of the
local ``System`` that a cluster can offer (URLs, clusters, secrets, logs, the hub's view of the
tunnels, stopping and starting an agent by scaling its Deployment); tests that need local OS
processes are skipped under kind with the reason (``tests/e2e/conftest.py``).

:func:`preflight` runs first: without a Docker engine or the ``kind`` binary the run stops
before anything starts, saying what is missing.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from ._controlplane import ControlPlane
from ._keycloak import (
    DEFAULT_USERS,
    REALM,
    Keycloak,
    KeycloakUser,
    _augmentation_cache,
    _prepare_home,
    _save_augmentation,
    find_java_home,
    realm_representation,
)
from ._pods import ROLLOUT_TIMEOUT, PodSystem, Workload, wait
from ._process import free_port
from ._service import http_ok
from ._system import ClusterEntry
from .tools import CHISEL_VERSION, keycloak_home

logger = logging.getLogger(__name__)

NAMESPACE = "otterscale"
HUB_CLUSTER = "otterscale-hub"
#: e2e cluster name -> kind cluster name (one agent cluster each).
AGENT_CLUSTERS = {"east": "otterscale-east", "west": "otterscale-west"}
#: Configured in the hub but with no cluster and no agent (as ``south`` of the local provider).
OFFLINE_CLUSTERS = ("south",)
HUB_URL = "http://127.0.0.1:30299"
TUNNEL_URL = "http://127.0.0.1:30300"
KIND_NETWORK = "kind"
#: Images, like the charts: <repository>:<appVersion> (chart values' image.tag is empty).
CHARTS = {"otterscale-hub": "docker/hub.Dockerfile", "otterscale-agent": "docker/agent.Dockerfile"}


class KindUnavailableError(RuntimeError):
    """Docker or kind is missing: the kind provider cannot run here."""


# --------------------------------------------------------------------------------------------------
# Preflight


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run_quietly(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)


def preflight(which: Callable[[str], str | None] = shutil.which, run: Runner = _run_quietly) -> list[str]:
    """What the kind provider misses here (empty: it can run): a Docker engine and ``kind``."""
    problems = []
    docker = which("docker")
    if docker is None:
        problems.append("`docker` is not installed (needs Docker or a compatible engine)")
    else:
        probe = run([docker, "info", "--format", "{{.ServerVersion}}"])
        if probe.returncode != 0:
            reason = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
            problems.append(f"no Docker engine answers (`docker info` failed: {reason})")
    if which("kind") is None:
        problems.append(
            "`kind` is not on PATH (https://kind.sigs.k8s.io: `go install sigs.k8s.io/kind@latest`)"
        )
    return problems


def unavailable_message(problems: Sequence[str]) -> str:
    return (
        "--provider=kind cannot run here: "
        + "; ".join(problems)
        + ". Run it where Docker and kind are installed (deploy/kind/README.md), or use the default "
        "--provider=local."
    )


# --------------------------------------------------------------------------------------------------
# The plan: every command the provider runs, built from deploy/kind/ (pure, so it can be tested)


def repo_root() -> Path:
    """The monorepo checkout (the provider needs deploy/kind/, charts/ and docker/)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "deploy" / "kind" / "hub-values.yaml").is_file():
            return parent
    raise KindUnavailableError("deploy/kind/ not found: the kind provider runs from a source checkout")


def offline_password(name: str) -> str:
    """The agent password of a configured cluster that has no agent (32+ characters, test only)."""
    return f"{name}-password-kind-e2e-test-only-0000"


@dataclasses.dataclass(frozen=True)
class Release:
    """One ``helm upgrade --install`` into one kind cluster."""

    kind_cluster: str
    name: str
    chart: Path
    values: Path
    sets: tuple[str, ...]

    @property
    def context(self) -> str:
        return f"kind-{self.kind_cluster}"

    def values_args(self) -> list[str]:
        args = ["--namespace", NAMESPACE, "--values", str(self.values)]
        for item in self.sets:
            args += ["--set", item]
        return args

    def install_argv(self, helm: str) -> list[str]:
        return [
            helm, "upgrade", "--install", self.name, str(self.chart), "--kube-context", self.context,
            "--create-namespace", "--wait", "--timeout", f"{int(ROLLOUT_TIMEOUT)}s", *self.values_args(),
        ]  # fmt: skip

    def template_argv(self, helm: str) -> list[str]:
        return [helm, "template", self.name, str(self.chart), *self.values_args()]


@dataclasses.dataclass(frozen=True)
class KindPlan:
    """The clusters, images and releases of one kind run (``realm_url``: the Keycloak issuer)."""

    root: Path
    realm_url: str

    def _yaml(self, name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load((self.root / "deploy" / "kind" / name).read_text())
        return loaded

    @property
    def hub_values(self) -> dict[str, Any]:
        return self._yaml("hub-values.yaml")

    @property
    def agent_values(self) -> dict[str, Any]:
        return self._yaml("agent-values.yaml")

    def image(self, chart: str) -> str:
        values = self._yaml_of_chart(chart, "values.yaml")
        app_version = self._yaml_of_chart(chart, "Chart.yaml")["appVersion"]
        return f"{values['image']['repository']}:{app_version}"

    def _yaml_of_chart(self, chart: str, name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load((self.root / "charts" / chart / name).read_text())
        return loaded

    def create_commands(self) -> list[list[str]]:
        kind_dir = self.root / "deploy" / "kind"
        commands = [
            [
                "kind",
                "create",
                "cluster",
                "--config",
                str(kind_dir / "hub-cluster.yaml"),
                "--name",
                HUB_CLUSTER,
            ]
        ]
        for kind_name in AGENT_CLUSTERS.values():
            commands.append(
                [
                    "kind",
                    "create",
                    "cluster",
                    "--config",
                    str(kind_dir / "agent-cluster.yaml"),
                    "--name",
                    kind_name,
                ]
            )
        return commands

    def build_commands(self) -> list[list[str]]:
        """The same builds as ``nox -s images`` (tags: the charts' image repository and appVersion)."""
        return [
            ["docker", "build", "--file", str(self.root / dockerfile), "--tag", self.image(chart),
             "--build-arg", f"CHISEL_VERSION={CHISEL_VERSION}", str(self.root)]
            for chart, dockerfile in CHARTS.items()
        ]  # fmt: skip

    def load_commands(self) -> list[list[str]]:
        commands = [["kind", "load", "docker-image", self.image("otterscale-hub"), "--name", HUB_CLUSTER]]
        for kind_name in AGENT_CLUSTERS.values():
            commands.append(
                ["kind", "load", "docker-image", self.image("otterscale-agent"), "--name", kind_name]
            )
        return commands

    def delete_commands(self) -> list[list[str]]:
        return [
            ["kind", "delete", "cluster", "--name", name] for name in (HUB_CLUSTER, *AGENT_CLUSTERS.values())
        ]

    def offline_agent(self, name: str, index: int) -> dict[str, Any]:
        return {"auth": {"user": f"{name}-agent"}, "tunnel_port": 51100 + index, "api_port": 8299}

    def hub_release(self) -> Release:
        sets = [f"config.keycloak.realm_url={self.realm_url}"]
        for index, name in enumerate(OFFLINE_CLUSTERS):
            agent = self.offline_agent(name, index)
            sets += [
                f"config.clusters.{name}.agent.auth.user={agent['auth']['user']}",
                f"config.clusters.{name}.agent.tunnel_port={agent['tunnel_port']}",
                f"config.clusters.{name}.agent.api_port={agent['api_port']}",
                f"secrets.agentPasswords.{name}={offline_password(name)}",
            ]
        kind_dir = self.root / "deploy" / "kind"
        chart = self.root / "charts" / "otterscale-hub"
        return Release(HUB_CLUSTER, "otterscale-hub", chart, kind_dir / "hub-values.yaml", tuple(sets))

    def agent_release(self, name: str) -> Release:
        """The agent of cluster ``name``: user, port and password as the hub's values have them."""
        hub = self.hub_values
        agent = hub["config"]["clusters"][name]["agent"]
        sets = (
            f"cluster={name}",
            f"config.agent.auth.user={agent['auth']['user']}",
            f"config.agent.tunnel_port={agent['tunnel_port']}",
            f"config.agent.api_port={agent['api_port']}",
            f"secrets.password={hub['secrets']['agentPasswords'][name]}",
        )
        kind_dir = self.root / "deploy" / "kind"
        chart = self.root / "charts" / "otterscale-agent"
        return Release(AGENT_CLUSTERS[name], "otterscale-agent", chart, kind_dir / "agent-values.yaml", sets)

    def releases(self) -> list[Release]:
        return [self.hub_release(), *(self.agent_release(name) for name in AGENT_CLUSTERS)]

    def cluster_entries(self) -> dict[str, ClusterEntry]:
        """Every configured cluster as the tests see it (control planes filled in later)."""
        hub = self.hub_values
        entries = {}
        for name in AGENT_CLUSTERS:
            agent = hub["config"]["clusters"][name]["agent"]
            entries[name] = ClusterEntry(
                name, None, agent["tunnel_port"], agent["api_port"], agent["auth"]["user"],
                hub["secrets"]["agentPasswords"][name],
            )  # fmt: skip
        for index, name in enumerate(OFFLINE_CLUSTERS):
            agent = self.offline_agent(name, index)
            entries[name] = ClusterEntry(
                name,
                None,
                agent["tunnel_port"],
                agent["api_port"],
                agent["auth"]["user"],
                offline_password(name),
            )
        return entries


# --------------------------------------------------------------------------------------------------
# Admin access to a kind cluster


def admin_access(name: str, kubeconfig: str, directory: Path) -> ControlPlane:
    """A :class:`ControlPlane` (admin client only, nothing to stop) from a kubeconfig with
    embedded credentials, as ``kind get kubeconfig`` prints it."""
    config = yaml.safe_load(kubeconfig)
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    directory.mkdir(parents=True, exist_ok=True)
    cp = ControlPlane(name, directory)
    cp.server = cluster["server"]
    cp.ca_file.parent.mkdir(parents=True, exist_ok=True)
    for path, data in (
        (cp.ca_file, cluster["certificate-authority-data"]),
        (cp.admin_cert, user["client-certificate-data"]),
        (cp.admin_key, user["client-key-data"]),
    ):
        path.write_bytes(base64.b64decode(data))
        path.chmod(0o600)
    cp.kubeconfig.write_text(kubeconfig)
    cp.kubeconfig.chmod(0o600)
    return cp


# --------------------------------------------------------------------------------------------------
# Keycloak on the host, issuer on the kind network's gateway


class TcpRelay:
    """Forward every connection to ``listen`` on to ``target`` (one thread per direction)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self._server = socket.create_server(listen)
        self._closed = False
        threading.Thread(target=self._accept, name=f"relay-{listen[1]}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()


class GatewayKeycloak(Keycloak):
    """The test Keycloak with its issuer on ``gateway`` (see the module docstring)."""

    gateway = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.gateway}:{self.port}"


def start_gateway_keycloak(
    directory: Path, gateway: str, *, users: Sequence[KeycloakUser] = DEFAULT_USERS
) -> tuple[GatewayKeycloak, TcpRelay]:
    """Start Keycloak as ``start_keycloak`` does, issuer ``http://<gateway>:<port>``, plus its relay."""
    java = find_java_home()
    directory.mkdir(parents=True, exist_ok=True)
    kc = GatewayKeycloak(directory, users=list(users), java_home=java, heap="512m", access_token_lifespan=900)
    kc.gateway = gateway
    kc.port, kc.management_port = free_port(), free_port()
    augmented = _augmentation_cache(java)
    _prepare_home(keycloak_home(), kc.home, augmented if augmented.is_dir() else None, java)
    realm = realm_representation(list(users))
    (kc.home / "data" / "import" / f"{REALM}-realm.json").write_text(json.dumps(realm, indent=2))
    relay = TcpRelay((gateway, kc.port), ("127.0.0.1", kc.port))
    try:
        kc.start()
    except BaseException:
        kc.stop()
        relay.close()
        raise
    if not augmented.is_dir():
        _save_augmentation(kc.home / "lib" / "quarkus", augmented)
    return kc, relay


# --------------------------------------------------------------------------------------------------
# The running system


class KindSystem(PodSystem):
    """What the e2e tests use of :class:`~otterscale.testing.System`, backed by kind clusters."""

    def __init__(
        self, plan: KindPlan, directory: Path, hub: ControlPlane, agents: dict[str, ControlPlane]
    ) -> None:
        clusters = plan.cluster_entries()
        for name, admin in agents.items():
            clusters[name].control_plane = admin
        super().__init__(
            directory,
            hub_url=HUB_URL,
            tunnel_url=TUNNEL_URL,
            hub=Workload(hub, NAMESPACE, "otterscale-hub", "hub"),
            agents={
                name: Workload(admin, NAMESPACE, "otterscale-agent", name) for name, admin in agents.items()
            },
            clusters=clusters,
            key_seed=plan.hub_values["secrets"]["tunnelKeySeed"],
            fingerprint=plan.agent_values["config"]["agent"]["fingerprint"],
        )
        self.plan = plan
        self.hub_cluster = hub


# --------------------------------------------------------------------------------------------------
# The provider: clusters and images, then Keycloak, then the releases


def _run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 1800) -> str:
    logger.info("kind provider: %s", " ".join(argv))
    done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def kind_gateway() -> str:
    """The IPv4 gateway of kind's Docker network (the host, as seen from every kind node)."""
    out = _run(["docker", "network", "inspect", KIND_NETWORK, "--format", "{{json .IPAM.Config}}"])
    for entry in json.loads(out) or []:
        gateway = str(entry.get("Gateway", ""))
        if gateway and ":" not in gateway:
            return gateway
    raise RuntimeError(f"the docker network {KIND_NETWORK!r} has no IPv4 gateway: {out.strip()}")


@contextlib.contextmanager
def kind_clusters(root: Path, *, keep: bool = False) -> Iterator[None]:
    """Create the three clusters and load freshly built images; delete the clusters at the end."""
    problems = preflight()
    if problems:
        raise KindUnavailableError(unavailable_message(problems))
    plan = KindPlan(root, realm_url="")
    try:
        for argv in plan.delete_commands():  # leftovers of an interrupted run
            _run(argv)
        for argv in [*plan.create_commands(), *plan.build_commands(), *plan.load_commands()]:
            _run(argv, cwd=root)
        yield
    finally:
        if keep:
            logger.warning("kind clusters kept: %s", ", ".join(c[-1] for c in plan.delete_commands()))
        else:
            for argv in plan.delete_commands():
                try:
                    _run(argv)
                except RuntimeError:
                    logger.exception("deleting a kind cluster failed")


def start_kind_system(root: Path, directory: Path, helm: str, realm_url: str) -> KindSystem:
    """Install both charts (the clusters exist: :func:`kind_clusters`) and wait for the tunnels."""
    plan = KindPlan(root, realm_url=realm_url)
    directory.mkdir(parents=True, exist_ok=True)
    hub_admin = admin_access(
        HUB_CLUSTER, _run(["kind", "get", "kubeconfig", "--name", HUB_CLUSTER]), directory / "hub"
    )
    agents = {
        name: admin_access(
            kind_name, _run(["kind", "get", "kubeconfig", "--name", kind_name]), directory / name
        )
        for name, kind_name in AGENT_CLUSTERS.items()
    }
    system = KindSystem(plan, directory, hub_admin, agents)
    started = time.monotonic()
    _run(plan.hub_release().install_argv(helm), cwd=root)
    wait(lambda: http_ok(HUB_URL + "/readyz"), ROLLOUT_TIMEOUT, "kind: the hub answering /readyz on the host")
    system.timings.hub_start.append(time.monotonic() - started)
    for name in AGENT_CLUSTERS:
        started = time.monotonic()
        _run(plan.agent_release(name).install_argv(helm), cwd=root)
        system.wait_connected(name, True)
        system.timings.agent_connect.setdefault(name, []).append(time.monotonic() - started)
    return system
