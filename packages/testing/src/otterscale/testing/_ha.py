"""Several hub replicas with Lease leader election, as separate OS processes, on one control plane.

Used by the hub's HA tests (``packages/hub/tests/test_ha.py``) and the soak test (``tests/soak``).
What :func:`start_hub_replicas` runs (everything real except the Service, which
:class:`LeaderRelay` emulates):

- in a fresh namespace of a real kube-apiserver: the Lease, one Pod ``hub-<i>`` per replica whose
  ``status.podIP`` is ``127.0.0.<11+i>`` (written as admin: there is no kubelet), and the chart's
  ServiceAccount, Role and RoleBinding; the hubs use that ServiceAccount's token, so the chart's
  RBAC is what they get;
- ``otterscale server --leader-elect`` per replica, with ``POD_NAME``/``POD_NAMESPACE``, each on
  its own loopback address (Linux routes all of 127.0.0.0/8 to lo) and the same port, so "<leader
  Pod IP>:<--address port>" is exactly how followers reach the leader. Their configurations
  differ only in ``tunnel.server.host`` (the replica's address);
- one ``otterscale agent`` per cluster (real chisel client, impersonating callers) whose
  ``--tunnel-server-url`` is the relay: it forwards each new TCP connection to the Pod that
  carries ``otterscale.io/leader=true`` (polled every 100 ms, as endpoints follow the label), and
  refuses connections while no Pod has it.

The tunnel fingerprint is asked of ``otterscale server --print-fingerprint``, as an operator
would. Processes are spawned from the calling thread, which must be the one that stops them (the
children's parent-death signal fires when the spawning *thread* ends). Waits have deadlines and
poll observable state (``/readyz``, ``/metrics``, the Lease), never fixed sleeps.

Never logs a token or an agent password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ._controlplane import ControlPlane, KubeAPIError
from ._process import ManagedProcess, free_port
from ._service import AgentProcess, HubProcess, eventually, otterscale_command
from .tools import tool_path

logger = logging.getLogger(__name__)

LEASE = "otterscale-server-leader"
LEADER_LABEL = "otterscale.io/leader"
#: What a caller may do with ConfigMaps in the agents' cluster (the agent impersonates them).
READ_CREATE = ("get", "list", "watch", "create")


def replica_ip(index: int) -> str:
    """The loopback address (the "Pod IP") of replica ``index``."""
    return f"127.0.0.{11 + index}"


def election_args(kubeconfig: Path) -> list[str]:
    """The flags of a hub replica that campaigns with ``kubeconfig``'s credentials."""
    return [f"--kubeconfig={kubeconfig}", "--leader-elect"]


def replica_env(pod: str, namespace: str, home: Path) -> dict[str, str]:
    """A replica's environment, as the chart's downward API gives it: its Pod and namespace."""
    return {
        "POD_NAME": pod,
        "POD_NAMESPACE": namespace,
        "HOME": str(home),
        "PATH": os.environ.get("PATH", ""),
    }


# --------------------------------------------------------------------------------------------------
# The tunnel Service, emulated


class LeaderRelay:
    """Forwards TCP connections to ``<Pod IP of the leader-labelled Pod>:<target_port>``.

    Listens on a port the kernel chose (no race); ``url`` is what agents dial. ``connections``
    counts the relayed connections and ``open`` the ones still open (the soak checks neither
    leaks). The poller asks the API server every 100 ms, as endpoints follow the label.
    """

    def __init__(self, cp: ControlPlane, namespace: str, target_port: int) -> None:
        self.cp = cp
        self.namespace = namespace
        self.target_port = target_port
        self.port = 0
        self.target: str | None = None
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._poller = asyncio.create_task(self._poll(), name="relay-poll")

    async def _poll(self) -> None:
        selector = f"{LEADER_LABEL.replace('/', '%2F')}%3Dtrue"
        path = f"/api/v1/namespaces/{self.namespace}/pods?labelSelector={selector}"
        while True:
            # Any failure (the API server restarting, a timeout) keeps the last target, as
            # endpoints do while the control plane is away.
            with contextlib.suppress(Exception):
                pods = (await asyncio.to_thread(self.cp.request, "GET", path, timeout=5))["items"]
                ips = sorted(pod["status"].get("podIP") for pod in pods if pod["status"].get("podIP"))
                self.target = ips[0] if ips else None
            await asyncio.sleep(0.1)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            with contextlib.suppress(asyncio.CancelledError):  # stop() cancels: not an error of the relay
                await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target = self.target
            if target is None:
                return  # no endpoint: the connection is closed at once
            try:
                up_reader, up_writer = await asyncio.open_connection(target, self.target_port)
            except OSError:
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in [self._poller, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


# --------------------------------------------------------------------------------------------------
# The replicas


@dataclass
class AgentCluster:
    """One configured cluster: the kubeconfig its agent uses and the agent's ports."""

    name: str
    kubeconfig: Path
    tunnel_port: int
    api_port: int
    password: str


@dataclass
class HubReplicas:
    """Running hub replicas, their agents and the relay. Build with :func:`start_hub_replicas`.

    ``hubs[i]`` and ``agents[name]`` are the current processes; :meth:`start_hub` and
    :meth:`start_agent` (re)start one where it was (same address, configuration and Pod).
    """

    cp: ControlPlane
    namespace: str
    directory: Path
    replicas: int
    port: int
    management_port: int
    tunnel_port: int
    configs: list[Path]
    kubeconfig: Path
    chisel: str
    relay: LeaderRelay
    clusters: dict[str, AgentCluster]
    #: More ``otterscale server`` flags of every replica (e.g. shorter Lease timings).
    hub_args: Sequence[str] = ()
    hubs: dict[int, HubProcess] = field(default_factory=dict)
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    starts: int = 0

    def url(self, index: int) -> str:
        return f"http://{replica_ip(index)}:{self.port}"

    def management_url(self, index: int) -> str:
        """Replica ``index``'s management address (``/metrics``)."""
        return f"http://{replica_ip(index)}:{self.management_port}"

    def start_hub(self, index: int, *, log_level: str = "info") -> HubProcess:
        """Spawn replica ``index`` (does not wait; see :meth:`ready`)."""
        self.starts += 1
        process = HubProcess(
            self.configs[index],
            self.directory / f"hub-{index}.{self.starts}.log",
            name=f"hub-{index}",
            host=replica_ip(index),
            port=self.port,
            management_port=self.management_port,
            chisel=self.chisel,
            drain_timeout=3,
            log_level=log_level,
            args=[*election_args(self.kubeconfig), *self.hub_args],
            env=replica_env(f"hub-{index}", self.namespace, self.directory),
        )
        self.hubs[index] = process
        return process

    def start_agent(self, name: str, *, log_level: str = "info") -> AgentProcess:
        """Spawn the agent of cluster ``name``, dialling the relay (does not wait)."""
        cluster = self.clusters[name]
        self.starts += 1
        process = AgentProcess(
            name,
            self.configs[0],
            cluster.kubeconfig,
            self.directory / f"agent-{name}.{self.starts}.log",
            port=cluster.api_port,
            chisel=self.chisel,
            tunnel_server_url=self.relay.url,
            log_level=log_level,
            env={"HOME": str(self.directory), "PATH": os.environ.get("PATH", "")},
        )
        self.agents[name] = process
        return process

    # --- observations (async: the blocking HTTP runs in a worker thread) ---------------------------

    async def ready(self, index: int) -> bool:
        """Replica ``index`` answers ``/readyz`` with 200."""
        return await self.hubs[index].ready()

    async def metrics(self, index: int) -> dict[str, float]:
        """Replica ``index``'s ``/metrics`` samples (``name{labels}`` -> value, labels as printed)."""
        text = (await self.hubs[index].ametrics()).text
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                found[key] = float(value)
        return found

    async def holder(self) -> str | None:
        """The Lease's holder identity (``hub-<i>``), None while nobody holds it."""
        lease = await asyncio.to_thread(
            self.cp.request,
            "GET",
            f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{LEASE}",
            timeout=5,
        )
        holder: str | None = lease["spec"].get("holderIdentity")
        return holder

    async def labelled(self) -> list[str]:
        """The Pods that carry the leader label."""
        pods = await asyncio.to_thread(
            self.cp.request, "GET", f"/api/v1/namespaces/{self.namespace}/pods", timeout=5
        )
        return sorted(
            pod["metadata"]["name"]
            for pod in pods["items"]
            if pod["metadata"].get("labels", {}).get(LEADER_LABEL)
        )

    async def has_leader(self) -> bool:
        """The Lease has a holder and exactly its Pod carries the label."""
        try:
            holder = await self.holder()
            return holder is not None and await self.labelled() == [holder]
        except Exception:
            return False

    async def leader(self) -> int:
        """The index of the one leader: the Lease, the label and the replicas' gauges agree."""
        holder = await self.holder()
        assert holder is not None
        index = int(holder.removeprefix("hub-"))
        running = [i for i, process in self.hubs.items() if process.alive()]
        gauges = {i: (await self.metrics(i))["otterscale_hub_leader"] for i in running}
        assert gauges == {i: 1.0 if i == index else 0.0 for i in running}, gauges
        return index

    async def agent_connected_to(self, index: int, cluster: str) -> bool:
        """Replica ``index`` reports cluster ``cluster`` connected (``otterscale_hub_tunnel_up``)."""
        try:
            return (await self.metrics(index)).get(f'otterscale_hub_tunnel_up{{cluster="{cluster}"}}') == 1.0
        except Exception:
            return False

    async def all_connected(self) -> bool:
        """There is a leader and it reports every cluster's agent connected."""
        try:
            holder = await self.holder()
        except Exception:
            return False
        if holder is None:
            return False
        index = int(holder.removeprefix("hub-"))
        for name in self.clusters:
            if not await self.agent_connected_to(index, name):
                return False
        return True

    async def hand_over(self, index: int) -> None:
        """Hand the Lease to replica ``index`` as an administrator would (:func:`write_lease`): it
        renews it and leads; the former leader stops renewing and follows within its renew
        deadline (both may serve the tunnels for that long, as after any expiry)."""
        lease = await asyncio.to_thread(self.cp.request, "GET", self._lease_path())
        duration = int(lease["spec"].get("leaseDurationSeconds") or 15)
        await asyncio.to_thread(write_lease, self.cp, self.namespace, f"hub-{index}", duration=duration)

    def _lease_path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{LEASE}"

    async def stop(self) -> None:
        """Stop the agents, then every replica at once, then the relay. Safe to call twice."""
        for agent in self.agents.values():
            agent.stop()
        # All at once: one by one, each follower in turn would win the Lease and start chisel.
        for process in self.hubs.values():
            if process.alive():
                process.signal(signal.SIGTERM)
        for process in self.hubs.values():
            process.stop()
        await self.relay.stop()


# --------------------------------------------------------------------------------------------------
# Kubernetes objects


def _hub_account(namespace: str, role: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``otterscale-hub`` ServiceAccount of ``namespace``, bound to Role ``role`` of ``rules``."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "otterscale-hub", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": role, "namespace": namespace},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": role, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "otterscale-hub", "namespace": namespace}],
        },
    ]


def chart_rbac(
    namespace: str, *, users: Sequence[str] = ("alice",), verbs: Sequence[str] = READ_CREATE
) -> list[dict[str, Any]]:
    """What charts/otterscale-hub's rbac.yaml and serviceaccount.yaml create, plus what
    ``users`` may do with ConfigMaps in ``namespace`` (``verbs``)."""
    rules = [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [LEASE],
            "verbs": ["get", "list", "watch", "update", "patch"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    ]
    return [
        *_hub_account(namespace, "otterscale-hub-leader-election", rules),
        *caller_rbac(namespace, users=users, verbs=verbs),
    ]


def caller_rbac(
    namespace: str, *, users: Sequence[str] = ("alice",), verbs: Sequence[str] = READ_CREATE
) -> list[dict[str, Any]]:
    """A Role on ConfigMaps in ``namespace`` with ``verbs``, bound to ``users``."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "configmaps", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": list(verbs)}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "callers-configmaps", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmaps"},
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user} for user in users
            ],
        },
    ]


def create_namespace(cp: ControlPlane, name: str) -> None:
    """Create namespace ``name`` and wait for its default ServiceAccount (the controllers run)."""
    cp.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    cp.wait_for(
        lambda: cp.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        what=f"namespace {name}'s default ServiceAccount",
    )


def service_account_kubeconfig(
    cp: ControlPlane, namespace: str, path: Path, service_account: str = "otterscale-hub"
) -> Path:
    """A kubeconfig (mode 0600) with a token of ``service_account`` (default ``otterscale-hub``)."""
    token = cp.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600 * 24},
        },
    )["status"]["token"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_file)}}
        ],
        "users": [{"name": "hub", "user": {"token": token}}],
        "contexts": [{"name": "hub", "context": {"cluster": "test", "user": "hub", "namespace": namespace}}],
        "current-context": "hub",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f)
    return path


def follower_rbac(namespace: str) -> list[dict[str, Any]]:
    """The ``otterscale-hub`` ServiceAccount of ``namespace`` with read-only rights on its Leases
    and Pods: a hub campaigning with it sees the Lease but can never take it (see
    :class:`StagedLease`)."""
    rules = [
        {
            "apiGroups": ["coordination.k8s.io", ""],
            "resources": ["leases", "pods"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    return _hub_account(namespace, "otterscale-hub-follower", rules)


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_lease(
    cp: ControlPlane,
    namespace: str,
    holder: str | None,
    *,
    name: str = LEASE,
    duration: int = 3600,
) -> dict[str, Any]:
    """Write the Lease as an administrator would (created if missing): ``holder`` holds it from
    now for ``duration`` seconds (None: nobody holds it). A change of holder counts a transition.

    Hubs see it through their Lease watch at once: a candidate that is the new holder renews it
    (it leads), the former holder stops renewing within its renew deadline (it follows)."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    now = _micro_time(datetime.now(UTC))
    for _ in range(10):  # a replica's renewal may come in between: read again and retry
        try:
            lease = cp.request("GET", f"{path}/{name}")
        except KubeAPIError as exc:
            if exc.status != 404:
                raise
            lease = None
        spec: dict[str, Any] = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != holder:
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
            spec["acquireTime"] = now
        spec.pop("holderIdentity", None)
        if holder is not None:
            spec["holderIdentity"] = holder
        spec.update({"leaseDurationSeconds": duration, "renewTime": now})
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if lease is not None:
            metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}
        try:
            if lease is None:
                written: dict[str, Any] = cp.request("POST", path, body)
            else:
                written = cp.request("PUT", f"{path}/{name}", body)
        except KubeAPIError as exc:
            if exc.status == 409:
                continue
            raise
        return written
    raise RuntimeError(f"Lease {namespace}/{name}: conflicts on every attempt to write it")


def set_pod(
    cp: ControlPlane, namespace: str, name: str, ip: str | None, *, labels: Mapping[str, str] | None = None
) -> None:
    """Create Pod ``name`` if it is missing (no kubelet runs it; ``labels``, by default the hub
    chart's name label), and give it ``ip`` as its Pod IP."""
    try:
        cp.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    except KubeAPIError as exc:
        if exc.status != 404:
            raise
        cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "labels": dict(
                        labels if labels is not None else {"app.kubernetes.io/name": "otterscale-hub"}
                    ),
                },
                "spec": {"containers": [{"name": "hub", "image": "registry.example/otterscale-hub:test"}]},
            },
        )
    if ip is not None:
        cp.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
            content_type="application/merge-patch+json",
        )


@dataclass
class StagedLease:
    """A Lease the test writes, in a namespace of its own, that hubs can only follow.

    Hubs started with :meth:`args` and :meth:`env` campaign for it with the read-only rights of
    :func:`follower_rbac`, so they never take it: each follows exactly the holder the test
    stages (:meth:`stage`), at the Pod IP it gives, through the hub's real Lease watch and Pod
    lookup. That is how a test makes a hub process follow a given leader, nobody, a leader whose
    address is not known yet, or itself ("taking over"), and switch between them, while the
    leader it names runs elsewhere (for instance alone, with its own Lease). Build it with
    :func:`staged_lease`.
    """

    cp: ControlPlane
    namespace: str
    kubeconfig: Path
    directory: Path

    def stage(self, holder: str | None, ip: str | None = None) -> None:
        """``holder`` leads (its Pod has ``ip``; None: no Pod IP yet); None: nobody leads."""
        if holder is not None:
            set_pod(self.cp, self.namespace, holder, ip)
        write_lease(self.cp, self.namespace, holder)

    def args(self) -> list[str]:
        """The flags of a hub that follows this Lease."""
        return election_args(self.kubeconfig)

    def env(self, pod: str) -> dict[str, str]:
        """The environment of the hub whose Pod is ``pod`` (its identity in the Lease)."""
        return replica_env(pod, self.namespace, self.directory)


def staged_lease(cp: ControlPlane, directory: Path) -> StagedLease:
    """A fresh namespace ``lease-<random>`` with :func:`follower_rbac` (see :class:`StagedLease`);
    nobody holds its Lease until :meth:`StagedLease.stage`."""
    namespace = f"lease-{secrets.token_hex(3)}"
    create_namespace(cp, namespace)
    for obj in follower_rbac(namespace):
        cp.apply(obj)
    directory.mkdir(parents=True, exist_ok=True)
    kubeconfig = service_account_kubeconfig(cp, namespace, directory / f"{namespace}.kubeconfig")
    found = StagedLease(cp, namespace, kubeconfig, directory)
    found.stage(None)
    return found


def election_namespace(
    cp: ControlPlane,
    directory: Path,
    pods: Mapping[str, str],
    *,
    users: Sequence[str] = ("alice",),
    verbs: Sequence[str] = READ_CREATE,
) -> tuple[str, Path]:
    """A fresh namespace ``ha-<random>`` for a Lease, with the chart's RBAC (:func:`chart_rbac`)
    and one Pod per entry of ``pods`` (Pod name -> its IP); returns the namespace and a kubeconfig
    of its ``otterscale-hub`` ServiceAccount (what the replicas campaign with)."""
    namespace = f"ha-{secrets.token_hex(3)}"
    create_namespace(cp, namespace)
    for obj in chart_rbac(namespace, users=users, verbs=verbs):
        cp.apply(obj)
    for name, ip in pods.items():
        set_pod(cp, namespace, name, ip)
    directory.mkdir(parents=True, exist_ok=True)
    return namespace, service_account_kubeconfig(cp, namespace, directory / f"{namespace}.kubeconfig")


def _fingerprint(config: Path, chisel: str) -> str:
    done = subprocess.run(
        [*otterscale_command(), "server", "--print-fingerprint", f"--config={config}", f"--chisel={chisel}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"otterscale server --print-fingerprint failed: {done.stderr.strip()}")
    return lines[-1].strip()


async def start_hub_replicas(
    cp: ControlPlane,
    directory: Path,
    *,
    realm_url: str,
    client_id: str = "otterscale",
    replicas: int = 3,
    clusters: Mapping[str, Path] | None = None,
    users: Sequence[str] = ("alice",),
    verbs: Sequence[str] = READ_CREATE,
    log_level: str = "info",
    within: float = 60.0,
    hub_args: Sequence[str] = (),
) -> HubReplicas:
    """Start ``replicas`` hubs with leader election, and one agent per cluster of ``clusters``
    (name -> the kubeconfig its agent uses; default ``{"alpha": cp.kubeconfig}``).

    Creates a namespace ``ha-<random>`` for the Lease and the Pods (``users`` get ``verbs`` on its
    ConfigMaps); returns once every replica is ready, one leads and every agent is connected to
    it (each wait at most ``within`` seconds). On failure everything started is stopped again.
    ``hub_args`` are more flags for every replica (``--leader-elect-lease-duration=8``...).
    """
    namespace, hub_kubeconfig = election_namespace(
        cp,
        directory,
        {f"hub-{index}": replica_ip(index) for index in range(replicas)},
        users=users,
        verbs=verbs,
    )
    chisel = str(tool_path("chisel"))
    port, management_port, tunnel_port = free_port(), free_port(), free_port()
    kubeconfigs = dict(clusters) if clusters is not None else {"alpha": cp.kubeconfig}
    agents = {
        name: AgentCluster(
            name=name,
            kubeconfig=kubeconfig,
            tunnel_port=free_port(),
            api_port=free_port(),
            password=secrets.token_urlsafe(32),
        )
        for name, kubeconfig in kubeconfigs.items()
    }
    document: dict[str, Any] = {
        "keycloak": {"realm_url": realm_url, "client_id": client_id},
        "tunnel": {
            "server": {"host": "127.0.0.1", "port": tunnel_port, "key_seed": secrets.token_urlsafe(32)}
        },
        "clusters": {
            c.name: {
                "agent": {
                    "auth": {"user": f"{c.name}-agent", "pass": c.password},
                    "tunnel_port": c.tunnel_port,
                    "api_port": c.api_port,
                }
            }
            for c in agents.values()
        },
    }
    directory.mkdir(parents=True, exist_ok=True)

    def write(path: Path) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(document, f)
        return path

    fingerprint = await asyncio.to_thread(_fingerprint, write(directory / "probe.yaml"), chisel)
    for c in agents.values():
        document["clusters"][c.name]["agent"]["fingerprint"] = fingerprint
    configs = []
    for index in range(replicas):
        document["tunnel"]["server"]["host"] = replica_ip(index)
        configs.append(write(directory / f"hub-{index}.yaml"))

    relay = LeaderRelay(cp, namespace, tunnel_port)
    await relay.start()
    found = HubReplicas(
        cp=cp,
        namespace=namespace,
        directory=directory,
        replicas=replicas,
        port=port,
        management_port=management_port,
        tunnel_port=tunnel_port,
        configs=configs,
        kubeconfig=hub_kubeconfig,
        chisel=chisel,
        relay=relay,
        clusters=agents,
        hub_args=tuple(hub_args),
    )
    try:
        for index in range(replicas):
            found.start_hub(index, log_level=log_level)
        for index in range(replicas):
            await _wait_alive(found.hubs[index], lambda index=index: found.ready(index), within, "ready")  # type: ignore[misc]
        await eventually(found.has_leader, within, "a leader")
        for name in agents:
            found.start_agent(name, log_level=log_level)
        await eventually(found.all_connected, within, "every agent connected to the leader")
    except BaseException:
        await found.stop()
        raise
    return found


async def _wait_alive(
    process: ManagedProcess, check: Callable[[], Awaitable[bool]], within: float, what: str
) -> None:
    """Like :func:`eventually`, failing at once (with the log tail) if the process exits."""

    async def alive_and() -> bool:
        if not process.alive():
            raise RuntimeError(
                f"{process.name} exited with {process.popen.returncode} before {what}; "
                f"log {process.log_file}:\n{process.log_tail()}"
            )
        return await check()

    try:
        await eventually(alive_and, within, f"{process.name} {what}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; log {process.log_file}:\n{process.log_tail()}") from None
