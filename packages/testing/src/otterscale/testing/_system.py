"""The whole system as separate OS processes: a hub and one agent per cluster, plus chisel.

Used by ``tests/e2e`` (the ``otterscale_system`` fixture) and ``nox -s demo``. Every service is
started from its installed console script (``otterscale server``, ``otterscale agent``), exactly
as a user runs it, with one shared ``otterscale.yaml`` written here (mode 0600: it holds the
agents' passwords and the tunnel key seed). The hub prints the tunnel fingerprint at start-up;
the harness reads it from the hub's JSON log and writes it into the agents' part of the
configuration before any agent starts, as an operator would.

Readiness is observed, never slept for: the hub's ``/readyz``, the agent's ``/ping``, and the
hub's own view of each cluster (the ``otterscale_hub_tunnel_up`` gauge of ``/metrics`` on its
management address), so "connected" means what a user of the hub sees. Every wait has a deadline and
fails with the tail of the process's log. Timings of every start are kept in
:attr:`System.timings` (the e2e tests report them).

Processes are :class:`~otterscale.testing.HubProcess` and :class:`~otterscale.testing.
AgentProcess` (``_service``), spawned only from the main thread: the children's parent-death
signal (see ``_process``) fires when the *thread* that spawned them exits, so a hub started from
``asyncio.to_thread`` would be killed when the executor's worker thread goes away.

Never logs a password, key seed or token; :meth:`System.secrets` lists the ones it generated so
tests can assert that no process logged them either.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ._controlplane import ControlPlane
from ._process import free_port
from ._service import AgentProcess, HubProcess, http_ok, otterscale_command
from .tools import tool_path

logger = logging.getLogger(__name__)

#: Seconds a started hub has to answer ``/readyz``; an agent to be reported connected.
HUB_START_TIMEOUT = 60.0
AGENT_START_TIMEOUT = 60.0


@dataclasses.dataclass
class ClusterEntry:
    """One configured cluster: its control plane (None: configured but never connected).

    ``kubeconfig`` is what its agent uses (None: the control plane's admin kubeconfig), e.g. a
    ServiceAccount's with exactly the agent chart's RBAC.
    """

    name: str
    control_plane: ControlPlane | None
    tunnel_port: int
    api_port: int
    user: str
    password: str
    kubeconfig: Path | None = None


@dataclasses.dataclass
class Timings:
    """Seconds each start took, in order (a restart appends)."""

    #: Hub process spawned -> ``/readyz`` answers 200.
    hub_start: list[float] = dataclasses.field(default_factory=list)
    #: Agent process spawned -> the hub reports the cluster connected, per cluster.
    agent_connect: dict[str, list[float]] = dataclasses.field(default_factory=dict)


class System:
    """A running hub with its agents. Build with :func:`start_system`; always call :meth:`stop`.

    Ports, passwords and the key seed are chosen once, so :meth:`stop_hub` then :meth:`start_hub`
    (or an agent's stop and start) brings a process back exactly where it was: same addresses,
    same fingerprint, and the other side reconnects on its own.
    """

    def __init__(
        self,
        directory: Path,
        realm_url: str,
        client_id: str,
        audience: str | None,
        *,
        keycloak_options: Mapping[str, Any] | None = None,
        log_level: str = "debug",
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = directory
        #: ``--log-level`` of the hub and the agents. Debug by default: the "no secret in any log"
        #: checks then cover every line they can write (chisel's own output is logged at debug).
        self.log_level = log_level
        self.config_path = directory / "otterscale.yaml"
        self.realm_url = realm_url
        self.client_id = client_id
        self.audience = audience
        self.keycloak_options = dict(keycloak_options or {})
        #: Merged into the generated ``otterscale.yaml``, key by key and recursively: more
        #: top-level sections (``{"cors": {...}}``, ``{"audit": ...}``), cluster labels, ``fanout``...
        self.extra_config = dict(extra_config or {})
        self.key_seed = secrets.token_urlsafe(32)  # 43 characters: the services refuse fewer than 32
        self.tunnel_port = free_port()
        self.hub_port = free_port()
        self.management_port = free_port()
        self.clusters: dict[str, ClusterEntry] = {}
        self.fingerprint: str | None = None
        self.hub: HubProcess | None = None
        self.agents: dict[str, AgentProcess] = {}
        self.chisel = str(tool_path("chisel"))
        self.timings = Timings()
        #: The ``otterscale`` command the hub and agents run (another tree's, to compare with).
        self.command = otterscale_command()
        #: Whether the hub serves ``/metrics`` on a management address of its own (hubs that predate
        #: it serve them on the API's address).
        self.separate_management = True

    @property
    def hub_url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    @property
    def management_url(self) -> str:
        """The hub's management address (``/metrics``, per-cluster health)."""
        if not self.separate_management:
            return self.hub_url
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def tunnel_url(self) -> str:
        """The hub's chisel server (what agents dial)."""
        return f"http://127.0.0.1:{self.tunnel_port}"

    @property
    def hub_log(self) -> Path:
        return self.directory / "hub.log"

    def agent_log(self, name: str) -> Path:
        return self.directory / f"agent-{name}.log"

    # --- configuration ------------------------------------------------------------------------

    def add_cluster(
        self, name: str, control_plane: ControlPlane | None, *, kubeconfig: Path | None = None
    ) -> ClusterEntry:
        entry = ClusterEntry(
            name=name,
            control_plane=control_plane,
            tunnel_port=free_port(),
            api_port=free_port(),
            user=f"{name}-agent",
            password=secrets.token_urlsafe(32),
            kubeconfig=kubeconfig,
        )
        self.clusters[name] = entry
        return entry

    def config(self) -> dict[str, Any]:
        """The ``otterscale.yaml`` document (hub and agents share it)."""
        keycloak: dict[str, Any] = {"realm_url": self.realm_url, "client_id": self.client_id}
        if self.audience:
            keycloak["audience"] = self.audience
        keycloak.update(self.keycloak_options)
        clusters: dict[str, Any] = {}
        for c in self.clusters.values():
            agent: dict[str, Any] = {
                "auth": {"user": c.user, "pass": c.password},
                "tunnel_port": c.tunnel_port,
                "api_port": c.api_port,
            }
            if self.fingerprint:
                agent["fingerprint"] = self.fingerprint
            clusters[c.name] = {"agent": agent}
        document = {
            "keycloak": keycloak,
            "tunnel": {"server": {"host": "127.0.0.1", "port": self.tunnel_port, "key_seed": self.key_seed}},
            "clusters": clusters,
        }
        return _merged(document, self.extra_config)

    def write_config(self) -> None:
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.config(), f, sort_keys=False)

    def secrets(self) -> list[str]:
        """Every secret this harness generated (key seed, agent passwords): none may be logged."""
        return [self.key_seed, *(c.password for c in self.clusters.values())]

    # --- the hub -------------------------------------------------------------------------------------

    def start_hub(self, timeout: float = HUB_START_TIMEOUT) -> HubProcess:
        """Start ``otterscale server``; wait for /readyz and read the tunnel fingerprint."""
        if self.hub is not None and self.hub.alive():
            raise RuntimeError("the hub is already running")
        self.write_config()
        started = time.monotonic()
        hub = HubProcess(
            self.config_path,
            self.hub_log,
            port=self.hub_port,
            chisel=self.chisel,
            log_level=self.log_level,
            management_port=self.management_port,
            separate_management=self.separate_management,
            command=self.command,
        )
        self.hub = hub
        hub.wait_ready(timeout)
        self.timings.hub_start.append(time.monotonic() - started)
        fingerprint = hub.fingerprint
        if self.fingerprint != fingerprint:
            if self.fingerprint is not None:
                raise RuntimeError(f"the hub's fingerprint changed ({self.fingerprint} -> {fingerprint})")
            self.fingerprint = fingerprint
            self.write_config()
        return hub

    def stop_hub(self) -> None:
        """Stop the hub gracefully (SIGTERM, bounded wait, then SIGKILL)."""
        if self.hub is not None:
            self.hub.stop()
            self.hub = None

    def hub_metrics(self) -> str:
        """The hub's ``/metrics`` text (its management address)."""
        if self.hub is None:
            raise RuntimeError("the hub is not running")
        return self.hub.metrics().text

    def connected(self) -> dict[str, bool]:
        """Each cluster's state as the hub reports it (its ``otterscale_hub_tunnel_up`` gauge)."""
        if self.hub is None:
            raise RuntimeError("the hub is not running")
        return self.hub.metrics().tunnels()

    def wait_connected(
        self, name: str, connected: bool = True, timeout: float = AGENT_START_TIMEOUT
    ) -> float:
        """Wait until the hub reports cluster ``name`` (dis)connected; returns the seconds waited."""
        hub = self.hub
        if hub is None:
            raise RuntimeError("the hub is not running")
        started = time.monotonic()
        what = f"reporting cluster {name} {'connected' if connected else 'disconnected'}"
        hub.wait_until(lambda: self.connected().get(name) is connected, timeout=timeout, what=what)
        return time.monotonic() - started

    # --- agents --------------------------------------------------------------------------------------

    def start_agent(
        self,
        name: str,
        timeout: float = AGENT_START_TIMEOUT,
        *,
        wait_connected: bool = True,
        tunnel_server_url: str | None = None,
    ) -> AgentProcess:
        """Start ``otterscale agent --cluster NAME``.

        Waits until it answers ``/ping`` and, with ``wait_connected`` (and a hub running), until
        the hub reports the cluster connected; that time is appended to
        ``timings.agent_connect[name]``. ``tunnel_server_url`` replaces what the agent dials
        (default :attr:`tunnel_url`), e.g. a :class:`~otterscale.testing.BlackHoleRelay` in front
        of the hub's tunnel server; the next start without it dials the hub directly again.
        """
        entry = self.clusters[name]
        if entry.control_plane is None:
            raise ValueError(f"cluster {name} has no control plane")
        running = self.agents.get(name)
        if running is not None and running.alive():
            raise RuntimeError(f"the agent of {name} is already running")
        started = time.monotonic()
        agent = AgentProcess(
            name,
            self.config_path,
            entry.kubeconfig or entry.control_plane.kubeconfig,
            self.agent_log(name),
            port=entry.api_port,
            chisel=self.chisel,
            tunnel_server_url=tunnel_server_url or self.tunnel_url,
            log_level=self.log_level,
            command=self.command,
        )
        self.agents[name] = agent
        agent.wait_serving(timeout)
        if wait_connected and self.hub is not None:
            remaining = max(1.0, timeout - (time.monotonic() - started))
            # The agent's own view first (its /readyz turns 200 when chisel reports connected),
            # so a tunnel that never comes up fails with the agent's log, not the hub's.
            agent.wait_until(
                lambda: http_ok(f"{agent.url}/readyz"),
                timeout=remaining,
                what="connected to the hub (/readyz)",
            )
            self.wait_connected(name, True, timeout=max(1.0, timeout - (time.monotonic() - started)))
            self.timings.agent_connect.setdefault(name, []).append(time.monotonic() - started)
        return agent

    def stop_agent(self, name: str) -> None:
        """Stop the agent gracefully (SIGTERM: open Watches end with unavailable)."""
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.stop()

    def kill_agent(self, name: str) -> None:
        """SIGKILL the agent's process group (the agent dies mid-flight; its chisel with it)."""
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.signal(signal.SIGKILL)
            agent.stop()

    # --- everything ----------------------------------------------------------------------------------

    def logs(self) -> dict[str, str]:
        """Every process's whole output (for assertions such as 'no secret was logged')."""
        files = sorted(self.directory.glob("*.log"))
        return {f.name: f.read_text(errors="replace") for f in files}

    def stop(self) -> None:
        """Stop every agent, then the hub. Safe to call twice."""
        for name in list(self.agents):
            try:
                self.stop_agent(name)
            except Exception:  # keep stopping the others; ManagedProcess's atexit is the backstop
                logger.exception("stopping the agent of %s failed", name)
        self.stop_hub()


def _merged(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def start_system(
    directory: Path,
    clusters: Mapping[str, ControlPlane | None],
    *,
    realm_url: str,
    client_id: str = "otterscale",
    audience: str | None = None,
    keycloak_options: Mapping[str, Any] | None = None,
    log_level: str = "debug",
    start_agents: bool = True,
    extra_config: Mapping[str, Any] | None = None,
    kubeconfigs: Mapping[str, Path] | None = None,
) -> System:
    """Write the config, start the hub, then one agent per cluster that has a control plane.

    ``keycloak_options`` adds keys to the configuration's ``keycloak`` section (for example
    ``{"leeway_seconds": 0}`` for token-expiry tests); ``log_level`` is the services'
    ``--log-level``; ``extra_config`` is merged into the configuration (see
    :attr:`System.extra_config`); ``kubeconfigs`` gives an agent another kubeconfig than the
    control plane's admin one. Returns once the hub reports every started agent connected.
    """
    directory.mkdir(parents=True, exist_ok=True)
    system = System(
        directory,
        realm_url,
        client_id,
        audience,
        keycloak_options=keycloak_options,
        log_level=log_level,
        extra_config=extra_config,
    )
    for name, cp in clusters.items():
        system.add_cluster(name, cp, kubeconfig=(kubeconfigs or {}).get(name))
    try:
        system.start_hub()
        if start_agents:
            for name, cp in clusters.items():
                if cp is not None:
                    system.start_agent(name)
    except BaseException:
        system.stop()
        raise
    return system
