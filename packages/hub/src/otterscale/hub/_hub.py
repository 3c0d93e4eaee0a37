"""The hub: the public facade that assembles its parts and starts and stops them in order.

The parts, each in its own module:

- the tunnel side: the chisel server the agents dial (:mod:`._tunnel_server`), their state
  (:mod:`._tunnels`), the warm connections to them (:mod:`._upstream`) and the prober
  (:mod:`._prober`);
- the API side: every service, the proxy to the agents and the forwarder to the leader, behind
  one router (:mod:`._api`, :mod:`._services`);
- the role: standalone, or leader and follower with leader election (:mod:`._role`).

:meth:`Hub.start` checks chisel, starts the tunnel server (without leader election; the authfile
is written first), logs its fingerprint and bind address, starts serving and the prober, and
returns when the hub answers. Nothing contacts the identity provider at start-up: the hub starts
while Keycloak is down, and tokens fail with unavailable until it is back. With leader election
(``HubSettings.election``, ``--leader-elect``) the hub starts serving at once as a follower
(ready, no tunnel server) and campaigns for the Lease (see :mod:`._role`). A follower forwards
every API call to the leader; ``/metrics``, ``/readyz``, health and reflection are always
answered by the replica itself.

:meth:`Hub.stop` shuts down in order, each step bounded: stop reporting ready (health
NOT_SERVING), refuse new streams and end the open ones with unavailable, stop accepting
connections and let calls in flight finish within the drain deadline, stop the prober, stop the
tunnel server (a leader also unlabels its Pod), release the Lease (a successor takes over at
once instead of after the lease expires), close the agent connections, the verifier and the
audit trail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import ServiceDescriptor  # type: ignore[import-untyped]  # no stubs

from otterscale.common import (
    ChiselServer,
    OtterscaleConfig,
    check_chisel,
    derive_identity_key,
)

from ._api import Api, streaming_procedures
from ._auth import Authenticator
from ._cli import hub_version
from ._errors import HubError
from ._lease import ElectionSettings
from ._limits import HubLimits
from ._metrics import HubMetrics
from ._prober import Prober
from ._proxy import ClusterProxy
from ._role import Role
from ._services import HUB_SERVICES, ROUTED_SERVICES, HubService
from ._tunnel_server import TunnelServer
from ._tunnels import Tunnels
from ._upstream import AgentClients

if TYPE_CHECKING:
    # Types only: the Kubernetes client it uses is loaded only for --leader-elect (start-up time).
    from ._leader import Leadership

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HubSettings:
    """Everything the hub needs, built once by the command line (or a test) and passed down.

    ``host``/``port`` is the API listen address ("" = all interfaces; 0 = any free port).
    ``chisel`` is the chisel binary (None: ``chisel`` on PATH). ``drain_timeout`` bounds how long
    calls in flight may take after shutdown starts. The prober pings every agent every
    ``probe_interval`` seconds and waits ``probe_timeout`` for the answer. ``election`` turns
    leader election on (None: the hub runs alone and always leads); it needs a fixed ``port``,
    which followers use to reach the leader. The limits on clients (request and answer sizes,
    streams per subject, slow stream clients) come from ``config.limits`` (see ``_limits``).
    ``routed_services`` are the services forwarded to the agents by cluster and ``hub_services``
    those the hub answers itself (by default the registries of ``_services``; tests add test-only
    ones).
    """

    config: OtterscaleConfig
    host: str = ""
    port: int = 8299
    chisel: str | None = None
    drain_timeout: float = 10.0
    probe_interval: float = 5.0
    probe_timeout: float = 2.0
    chisel_keepalive: float = 10.0
    election: ElectionSettings | None = None
    routed_services: tuple[ServiceDescriptor, ...] = ROUTED_SERVICES
    hub_services: tuple[HubService, ...] = HUB_SERVICES


class Hub:
    """One running hub (see the module docstring). Use ``async with`` or start()/stop().

    ``leadership`` replaces the Kubernetes leader election of ``settings.election``. The hub
    runs inside Envoy (``otterscale server``, :mod:`._hosted`), which serves :attr:`api_app` and
    :attr:`management_app`.
    """

    def __init__(self, settings: HubSettings, *, leadership: Leadership | None = None) -> None:
        self.settings = settings
        if leadership is None and settings.election is not None:
            from ._leader import KubernetesLeadership  # Kubernetes' client only when it is used

            leadership = KubernetesLeadership(settings.election, port=settings.port)
        self.leadership = leadership
        self._elected = leadership is not None
        config = settings.config
        self._clusters: Mapping[str, Any] = config.clusters
        #: What the hub accepts from and holds for clients (``limits`` in otterscale.yaml).
        self.limits = HubLimits.from_config(config.limits)
        self._keys = {
            name: derive_identity_key(name, cluster.agent.auth.password.get_secret_value())
            for name, cluster in config.clusters.items()
        }
        self.metrics: HubMetrics | None = None
        self.tunnels: Tunnels | None = None
        self._tunnel_server: TunnelServer | None = None
        self._agents: AgentClients | None = None
        self._prober: Prober | None = None
        self._role: Role | None = None
        self._api: Api | None = None
        self._auth: Authenticator | None = None
        self._proxy: ClusterProxy | None = None
        self._serving = asyncio.Event()
        self._stopper: asyncio.Task[None] | None = None
        self._draining = False
        self.port: int | None = None
        self.started_in: float | None = None

    # ----------------------------------------------------------------------------------------------
    # Public state

    @property
    def url(self) -> str:
        """``http://<host>:<port>`` of the API (loopback when listening on all interfaces)."""
        host = self.settings.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def chisel(self) -> ChiselServer | None:
        """The running tunnel server (None while this replica does not serve the tunnels)."""
        return self._tunnel_server.chisel if self._tunnel_server is not None else None

    @property
    def fingerprint(self) -> str | None:
        """The tunnel server's SHA256 fingerprint (agents put it in their configuration).

        With leader election every replica knows it from start-up (it depends only on the key).
        """
        return self._tunnel_server.fingerprint if self._tunnel_server is not None else None

    @property
    def leading(self) -> bool:
        """Whether this replica serves the API itself (always, without leader election)."""
        return self._role.leading if self._role is not None else not self._elected

    @property
    def role(self) -> str:
        """``standalone`` (no leader election), ``leader`` or ``follower``."""
        if not self._elected:
            return "standalone"
        return "leader" if self.leading else "follower"

    @property
    def root_tasks(self) -> list[asyncio.Task[Any]]:
        """Tasks that must run as long as the hub (leadership); one ending is a failure."""
        tasks: list[asyncio.Task[Any]] = []
        if self._role is not None:
            tasks.extend(self._role.tasks())
        return tasks

    def refused(self, reason: str) -> None:
        """Count a call refused by a limit enforced outside the hub's own code (the serving layer)."""
        if self.metrics is not None:
            self.metrics.limit_refusals.labels(reason=reason).inc()

    def streaming(self) -> tuple[frozenset[str], frozenset[str]]:
        """The procedures whose answers stream, and those whose requests stream."""
        return streaming_procedures(self.settings.routed_services, self.settings.hub_services)

    async def api_app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The API (an ASGI application; serves once the hub has started)."""
        if self._api is None:
            raise RuntimeError("the hub was not started")
        await self._api.router(scope, receive, send)

    async def management_app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``/metrics``, readiness and the per-cluster health (an ASGI application)."""
        if self._api is None:
            raise RuntimeError("the hub was not started")
        await self._api.management(scope, receive, send)

    async def failed(self) -> str:
        """Return (a reason) once a root task has ended: the hub can no longer serve."""
        while True:
            tasks = self.root_tasks
            if tasks:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                ended = next((task.get_name() for task in tasks if task.done()), None)
                if ended is not None and not self._draining:
                    return f"{ended} stopped unexpectedly"
            await asyncio.sleep(1.0)

    def ready(self) -> bool:
        """Serving, not shutting down, and the tunnel server up unless a follower (``/readyz``)."""
        return self._serving.is_set() and not self._draining and self._serves_api()

    def _serves_api(self) -> bool:
        """A follower always can (it forwards); a leader (or a lone hub) needs its tunnel server."""
        if self._elected and not self.leading:
            return True
        return self.tunnels is not None and self.tunnels.server_up

    def probe_soon(self, cluster: str) -> None:
        """Probe ``cluster``'s agent now (and ask for its versions), unless a probe is running."""
        if self._prober is not None and not self._draining:
            self._prober.probe_soon(cluster)

    # ----------------------------------------------------------------------------------------------
    # Lifecycle

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start everything; raise (with nothing left running) if the hub cannot start."""
        started = time.perf_counter()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self.started_in = time.perf_counter() - started
        # The launcher says when Envoy serves it (the ready line).
        logger.debug("hub started in %.0f ms", self.started_in * 1000)

    async def _start(self) -> None:
        settings = self.settings
        config = settings.config
        if self._elected and settings.port == 0:
            raise HubError(
                "leader election needs a fixed --address port: followers forward calls to the leader's"
            )
        binary = await asyncio.to_thread(check_chisel, settings.chisel)
        names = sorted(config.clusters)
        self.metrics = metrics = HubMetrics(names, version=hub_version(), chisel_version=binary.version_text)
        self.tunnels = tunnels = Tunnels(
            {name: (c.agent.tunnel_port, c.agent.auth.user) for name, c in config.clusters.items()},
            metrics,
            on_tunnel_open=self.probe_soon,
        )
        self._agents = agents = AgentClients(
            {name: c.agent.tunnel_port for name, c in config.clusters.items()},
            self._keys,
            max_response_bytes=self.limits.max_response_bytes,
        )
        self._tunnel_server = tunnel_server = TunnelServer(
            config, binary, tunnels, metrics, keepalive=settings.chisel_keepalive
        )
        self._prober = Prober(
            tunnels, agents, interval=settings.probe_interval, timeout=settings.probe_timeout
        )
        self._role = role = Role(
            self.leadership,
            tunnel_server=tunnel_server,
            tunnels=tunnels,
            prober=self._prober,
            metrics=metrics,
            end_streams=self._end_streams,
        )
        self._api = api = Api(
            config,
            limits=self.limits,
            keys=self._keys,
            metrics=metrics,
            tunnels=tunnels,
            agents=agents,
            routed_services=settings.routed_services,
            hub_services=settings.hub_services,
            leadership=self.leadership,
            leading=lambda: role.leading,
            ready=self.ready,
            serves_tunnels=self._serves_api,
            on_started=self._serving.set,
            on_unreachable=self.probe_soon,
        )
        self._auth, self._proxy = api.authenticator, api.proxy

        if not self._elected:
            await role.start()
        else:
            # Only the leader runs the tunnel server, but every replica checks the key now (a
            # replica that cannot use it would otherwise win, fail and step down, again and
            # again) and logs the fingerprint, which operators copy into the agents' settings.
            fingerprint = await tunnel_server.probe()
            logger.info(
                "tunnel fingerprint %s (this replica runs the tunnel server on %s:%d while it leads)",
                fingerprint,
                config.tunnel.server.host,
                config.tunnel.server.port,
                extra={"fingerprint": fingerprint},
            )

        # Envoy serves the API once start-up is over; it listens only after that.
        self.port = settings.port
        self._serving.set()
        if not self._elected:
            role.serving()
            return
        await role.campaign(api.leader_changed)

    def _end_streams(self) -> None:
        """This replica stopped leading: end the streams it served to the agents."""
        if self._api is not None:
            self._api.end_streams()

    async def stop(self) -> None:
        """Shut down gracefully (see the module docstring); idempotent and bounded."""
        if self._stopper is None:
            self._stopper = asyncio.create_task(self._stop(), name="hub-stop")
        await asyncio.shield(self._stopper)

    def drain(self) -> None:
        """A stop begins: not ready (health NOT_SERVING), new streams refused, open ones ended
        with unavailable, no new probes or roles. Idempotent; :meth:`stop` does the rest."""
        if self._draining:
            return
        self._draining = True
        if self._serving.is_set():
            logger.info("hub shutting down: draining (at most %gs)", self.settings.drain_timeout)
        if self._tunnel_server is not None:
            self._tunnel_server.quiet()
        if self._prober is not None:
            self._prober.close()
        if self._role is not None:
            self._role.closing()
        if self._api is not None:
            self._api.drain()

    async def _stop(self) -> None:
        was_serving = self._serving.is_set()
        self.drain()
        if self._role is not None:
            await self._role.stop()
        if self._agents is not None:
            await self._agents.aclose()
        if self._api is not None:
            await self._api.aclose()
        if was_serving:
            logger.info("hub stopped")
