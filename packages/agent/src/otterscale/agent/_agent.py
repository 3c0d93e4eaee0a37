"""Assembling one agent: settings in, a served ASGI application out, a clean stop.

:class:`Agent` is the agent's service side as an async context manager: entering loads the
Kubernetes credentials, opens the client and builds :attr:`Agent.app` (ResourceService,
AgentService, RuntimeService, ``/ping``, ``/readyz``, ``/metrics``), which Envoy serves
(``otterscale agent`` runs the agent inside Envoy, :mod:`._hosted`, with its tunnel); leaving
ends open Watch streams, PodLog streams and exec and port-forward sessions (unavailable) and
closes the Kubernetes client. ``GET /readyz`` follows the readiness it is given (the
tunnel's) and says 503 once stopping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from otterscale.cluster.v1 import cluster_pb2
from otterscale.cluster.v1.cluster_connect import AgentServiceASGIApplication
from otterscale.common import ASGIApp, AuditConfig, AuditLog, RuntimeConfig
from otterscale.resource.v1 import resource_pb2
from otterscale.resource.v1.resource_connect import ResourceServiceASGIApplication
from otterscale.runtime.v1 import runtime_pb2
from otterscale.runtime.v1.runtime_connect import RuntimeServiceASGIApplication

from ._auth import EarlyIdentityInterceptor
from ._codecs import resource_codecs
from ._discovery import DEFAULT_TTL, DiscoveryCache
from ._info import AgentInfoService
from ._kube import KubeClient
from ._kubeconfig import KubeConnection, load_connection
from ._metrics import AgentMetrics
from ._runtime import RuntimeServiceImpl
from ._schema import SchemaCache
from ._server import Readiness, make_asgi_app, mount
from ._service import ErrorBoundary, ResourceServiceImpl
from ._tasks import start_task, stop_tasks
from ._tunnel import TunnelSettings

logger = logging.getLogger(__name__)

__all__ = ["Agent", "AgentSettings"]

#: The services the agent serves (a streamed request, such as Exec's, gets no body deadline; their
#: streaming methods get heartbeats and Envoy's stalled-reader reset when the agent sets a send
#: timeout): add a service's descriptor here when mounting its application in :meth:`Agent.start`.
SERVICES = (
    resource_pb2.DESCRIPTOR.services_by_name["ResourceService"],
    cluster_pb2.DESCRIPTOR.services_by_name["AgentService"],
    runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"],
)


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """Everything an agent needs, resolved from flags, environment and the config file."""

    cluster: str
    #: Listen host ("" = all interfaces) and port (0 = any free port).
    host: str
    port: int
    #: Key that verifies the hub's identity signatures (``derive_identity_key``).
    identity_key: bytes = dataclasses.field(repr=False)
    #: ``--kubeconfig``; None means KUBECONFIG, ~/.kube/config or in-cluster.
    kubeconfig: str | None = None
    #: The environment consulted for KUBECONFIG and the in-cluster service variables.
    environ: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    #: Freshness of discovery and the OpenAPI index (see ``_discovery``).
    discovery_ttl: float = DEFAULT_TTL
    #: Accepted clock skew (and age) of identity signatures, seconds.
    max_skew_seconds: float = 30.0
    #: The tunnel to the hub that :func:`run_agent` keeps open; None runs the agent alone
    #: (``--no-tunnel``: tests, local debugging).
    tunnel: TunnelSettings | None = None
    #: Seconds a request's whole body may take (``limits.request_timeout_seconds``; enforced by
    #: the serving layer inside Envoy).
    request_timeout: float = 10.0
    #: Limits and timeouts of exec and port-forward sessions (``runtime`` in otterscale.yaml).
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    #: Where the audit events of exec and port-forward sessions go (``audit`` in otterscale.yaml).
    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)


class Agent:
    """One running agent; use ``async with Agent(settings) as agent``.

    ``readiness`` decides ``GET /readyz`` (None when ready, else the reason); without one the
    agent is ready while it serves. Either way it is not ready once stopping. The agent runs
    inside Envoy (``otterscale agent``, :mod:`._hosted`), which serves :attr:`app`.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        connection: KubeConnection | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.settings = settings
        #: The agent's ASGI application (ResourceService, AgentService, /ping, /readyz).
        self.app: ASGIApp | None = None
        self._connection = connection
        self._readiness = readiness
        self._stopping = False
        self._client: KubeClient | None = None
        self._service: ResourceServiceImpl | None = None
        self._runtime: RuntimeServiceImpl | None = None
        self._audit: AuditLog | None = None
        self.metrics = AgentMetrics()
        self._background: list[asyncio.Task[Any]] = []
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the agent's HTTP server (loopback when it listens on all interfaces)."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def readiness(self) -> str | None:
        """None when the agent is ready for the hub's calls, else a short reason."""
        if self._stopping:
            return "shutting down"
        return self._readiness() if self._readiness is not None else None

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load credentials, open the client, bind and start serving."""
        settings = self.settings
        connection = self._connection or await load_connection(settings.kubeconfig, settings.environ)
        logger.info("kubernetes API %s via %s", connection.server, connection.source)
        self._client = await KubeClient.open(connection)
        try:
            if connection.refresher is not None:
                self._background.append(
                    start_task(connection.refresher(), name="kube-credentials-refresh", forever=False)
                )
            discovery = DiscoveryCache(self._client, ttl=settings.discovery_ttl)
            self._service = ResourceServiceImpl(
                cluster=settings.cluster,
                client=self._client,
                discovery=discovery,
                schemas=SchemaCache(self._client, ttl=settings.discovery_ttl),
            )
            self._audit = AuditLog.from_config(settings.audit)
            self._runtime = RuntimeServiceImpl(
                cluster=settings.cluster,
                client=self._client,
                discovery=discovery,
                config=settings.runtime,
                metrics=self.metrics,
                audit=self._audit,
            )
            self._background.append(start_task(self._runtime.sessions.sweep(), name="runtime-session-sweep"))
            identity = EarlyIdentityInterceptor
            interceptors = [
                # Outermost: an unsigned call never reaches a handler (inside Envoy, its body is
                # not even read).
                identity(
                    cluster=settings.cluster,
                    key=settings.identity_key,
                    max_skew_seconds=settings.max_skew_seconds,
                ),
                ErrorBoundary(),
            ]
            connect_app = mount(
                ResourceServiceASGIApplication(
                    self._service, interceptors=interceptors, codecs=resource_codecs()
                ),
                AgentServiceASGIApplication(
                    AgentInfoService(cluster=settings.cluster, client=self._client), interceptors=interceptors
                ),
                RuntimeServiceASGIApplication(self._runtime, interceptors=interceptors),
            )
            self.app = make_asgi_app(connect_app, readiness=self.readiness, metrics=self.metrics)
            self.host, self.port = settings.host, settings.port
        except BaseException:
            await self.stop()
            raise
        logger.info("agent for cluster %s started", settings.cluster)

    def drain(self) -> None:
        """A stop begins: not ready, and open Watch streams end with unavailable (no waiting)."""
        self._stopping = True
        if self._service is not None:
            self._service.shutdown()
        if self._runtime is not None:
            self._runtime.shutdown()

    async def stop(self) -> None:
        """End Watches, stop accepting, drain (bounded), close the Kubernetes client. Idempotent."""
        self.drain()
        await stop_tasks(self._background, grace=2.0)
        if self._audit is not None:
            self._audit.close()
        if self._client is not None:
            await self._client.close()
            self._client = None
