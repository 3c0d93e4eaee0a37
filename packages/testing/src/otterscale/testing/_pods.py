"""The system as Pods: the hub and agents installed by their charts, seen the way tests see it.

What the e2e tests use of the local :class:`~otterscale.testing.System` that a Kubernetes
installation can offer: URLs, the configured clusters and secrets, the hub's view of the tunnels
(its ``otterscale_hub_tunnel_up`` gauge), the hub or an agent stopped and started by scaling its
Deployment (:attr:`PodSystem.hub` and :attr:`PodSystem.agents` say what runs, as the local
``System``'s do), and every container's log. Shared by the kind provider (``_kind``) and the node provider
(``_nodesystem``), which differ only in where things run (:class:`Workload`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._controlplane import ControlPlane, KubeAPIError
from ._service import Metrics, http_ok
from ._system import ClusterEntry, Timings

logger = logging.getLogger(__name__)

#: Seconds for a Deployment to go away, and for an agent to be reported connected.
ROLLOUT_TIMEOUT = 300.0
CONNECT_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Workload:
    """Where one Deployment of ours runs: its cluster's admin client, namespace and name."""

    admin: ControlPlane
    namespace: str
    deployment: str
    #: A label of the log files (``<label>-<pod>-<container>.log``).
    label: str


def wait(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took (TimeoutError naming ``what`` otherwise)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(0.5)
    return time.monotonic() - started


def raw_get(cp: ControlPlane, path: str) -> str:
    """A plain-text GET as admin (pod logs are not JSON)."""
    req = urllib.request.Request(cp.server + path)  # noqa: S310
    try:
        with urllib.request.urlopen(req, context=cp.ssl_context, timeout=30) as resp:  # noqa: S310
            return str(resp.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        raise KubeAPIError(exc.code, exc.read().decode(errors="replace")) from None


class PodSystem:
    """The hub and its agents as Deployments (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        hub_url: str,
        tunnel_url: str,
        hub: Workload,
        agents: dict[str, Workload],
        clusters: dict[str, ClusterEntry],
        key_seed: str,
        fingerprint: str,
    ) -> None:
        self.directory = directory
        self.hub_url = hub_url
        self.tunnel_url = tunnel_url
        self.hub_workload = hub
        self.agent_workloads = agents
        self.clusters = clusters
        self.key_seed = key_seed
        self.fingerprint = fingerprint
        self.timings = Timings()
        #: The hub's Deployment while it runs (None after :meth:`stop_hub`).
        self.hub: Workload | None = hub
        #: The agents that run (an agent leaves it at :meth:`stop_agent`, is back at :meth:`start_agent`).
        self.agents: dict[str, Workload] = dict(agents)
        #: Replicas the hub runs with (its Deployment is scaled back to this).
        self.hub_replicas = 1

    # --- the hub's view ------------------------------------------------------------------------------

    def metrics_url(self) -> str:
        """Where the hub's view of the tunnels is read (the leader's, where there are replicas)."""
        return self.hub_url + "/metrics"

    def hub_metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url(), timeout=5) as resp:  # noqa: S310
            return str(resp.read().decode())

    def connected(self) -> dict[str, bool]:
        text = self.hub_metrics()
        return Metrics(text).tunnels()

    def wait_connected(self, name: str, connected: bool = True, timeout: float = CONNECT_TIMEOUT) -> float:
        what = f"the hub reporting cluster {name} {'connected' if connected else 'disconnected'}"

        def check() -> bool:
            try:
                return self.connected().get(name) is connected
            except (urllib.error.URLError, OSError):
                return False

        return wait(check, timeout, what)

    def secrets(self) -> list[str]:
        """Every secret of this installation (key seed, agent passwords): none may be logged."""
        return [self.key_seed, *(c.password for c in self.clusters.values())]

    # --- agents: the Deployment scaled to 0 and back --------------------------------------------------

    @staticmethod
    def _scale_workload(where: Workload, replicas: int) -> None:
        path = f"/apis/apps/v1/namespaces/{where.namespace}/deployments/{where.deployment}/scale"
        body = {"spec": {"replicas": replicas}}
        where.admin.request("PATCH", path, body, content_type="application/merge-patch+json")

    def _scale(self, name: str, replicas: int) -> None:
        self._scale_workload(self.agent_workloads[name], replicas)

    @staticmethod
    def pods_of(where: Workload) -> list[dict[str, Any]]:
        """The Deployment's Pods (those terminating included: they may still hold connections)."""
        found = where.admin.request("GET", f"/api/v1/namespaces/{where.namespace}/pods")
        return [p for p in found["items"] if p["metadata"]["name"].startswith(where.deployment + "-")]

    def agent_pods(self, name: str) -> list[dict[str, Any]]:
        return self.pods_of(self.agent_workloads[name])

    # --- the hub: its Deployment scaled to 0 and back -------------------------------------------------

    def stop_hub(self) -> None:
        """Scale the hub to 0 and wait until its Pods are gone (each drains on SIGTERM)."""
        self._scale_workload(self.hub_workload, 0)
        self.hub = None
        wait(lambda: not self.pods_of(self.hub_workload), ROLLOUT_TIMEOUT, "the hub's Pods gone")

    def start_hub(self, timeout: float = ROLLOUT_TIMEOUT) -> None:
        """Scale the hub back and wait until it answers ``/readyz`` through its Service."""
        started = time.monotonic()
        self._scale_workload(self.hub_workload, self.hub_replicas)
        self.hub = self.hub_workload
        wait(lambda: http_ok(self.hub_url + "/readyz"), timeout, "the hub answering /readyz")
        self.timings.hub_start.append(time.monotonic() - started)

    def stop_agent(self, name: str, *, grace_seconds: int | None = None) -> None:
        where = self.agent_workloads[name]
        self._scale(name, 0)
        self.agents.pop(name, None)
        if grace_seconds is not None:
            for pod in self.agent_pods(name):
                path = f"/api/v1/namespaces/{where.namespace}/pods/{pod['metadata']['name']}"
                try:
                    where.admin.request("DELETE", f"{path}?gracePeriodSeconds={grace_seconds}")
                except KubeAPIError as exc:
                    if exc.status != 404:
                        raise
        wait(lambda: not self.agent_pods(name), ROLLOUT_TIMEOUT, f"the agent of {name} gone")

    def kill_agent(self, name: str) -> None:
        self.stop_agent(name, grace_seconds=0)

    def start_agent(self, name: str, timeout: float = CONNECT_TIMEOUT) -> None:
        started = time.monotonic()
        self._scale(name, 1)
        self.agents[name] = self.agent_workloads[name]
        self.wait_connected(name, True, timeout)
        self.timings.agent_connect.setdefault(name, []).append(time.monotonic() - started)

    # --- logs -----------------------------------------------------------------------------------------

    def logs(self) -> dict[str, str]:
        """Every container's log of every workload's namespace (also written to files)."""
        found: dict[str, str] = {}
        places = {
            (w.label, w.namespace): w.admin for w in (self.hub_workload, *self.agent_workloads.values())
        }
        for (label, namespace), admin in places.items():
            pods = admin.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
            for pod in pods:
                spec = pod["spec"]
                for container in [*spec.get("initContainers", []), *spec["containers"]]:
                    pod_name, container_name = pod["metadata"]["name"], container["name"]
                    path = f"/api/v1/namespaces/{namespace}/pods/{pod_name}/log?container={container_name}"
                    try:
                        text = raw_get(admin, path)
                    except KubeAPIError as exc:
                        text = f"(no log: {exc})"
                    log_name = f"{label}-{pod_name}-{container_name}.log"
                    (self.directory / log_name).write_text(text)
                    found[log_name] = text
        return found

    def stop(self) -> None:
        """Keep the logs next to the run's other files (the provider removes the installation)."""
        try:
            self.logs()
        except (KubeAPIError, OSError):
            logger.exception("collecting the pods' logs failed")
