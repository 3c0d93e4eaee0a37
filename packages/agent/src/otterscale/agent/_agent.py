"""Assembling and running one agent: settings in, a serving HTTP endpoint out, a clean stop.

:class:`Agent` is the agent's HTTP side as an async context manager (used by the CLI and by
tests): entering loads the Kubernetes credentials, opens the client, binds the socket and starts
the HTTP server; leaving ends open Watch streams (unavailable), stops accepting, lets open
requests finish for a few seconds, and closes the Kubernetes client. Open exec and port-forward
sessions and PodLog streams end with unavailable, like Watches. :func:`run_agent` runs the
whole agent (with its tunnel, when ``settings.tunnel`` is set) until a stop is requested or a
root task ends.

Root tasks: the HTTP server, the tunnel (``_tunnel.Tunnel.run``: the supervised chisel client,
which dials the hub once the agent listens, since it needs the real port), and any passed in
``root_tasks``; the first root task to end stops the agent. On stop the other root tasks (the
tunnel first: no new calls arrive) are stopped, then the HTTP server drains. ``GET /readyz``
follows the tunnel (and says 503 once stopping).
Signal handling is not done here: the caller sets the ``stop`` event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any

from otterscale.cluster.v1.cluster_connect import AgentServiceASGIApplication
from otterscale.common import AuditConfig, AuditLog, RuntimeConfig, create_listener, serve
from otterscale.resource.v1.resource_connect import ResourceServiceASGIApplication
from otterscale.runtime.v1.runtime_connect import RuntimeServiceASGIApplication

from ._auth import IdentityInterceptor
from ._codecs import resource_codecs
from ._discovery import DEFAULT_TTL, DiscoveryCache
from ._info import AgentInfoService
from ._kube import KubeClient
from ._kubeconfig import KubeConnection, load_connection
from ._metrics import AgentMetrics
from ._runtime import RuntimeServiceImpl
from ._schema import SchemaCache
from ._server import GRACEFUL_TIMEOUT, Readiness, make_asgi_app, mount
from ._service import ErrorBoundary, ResourceServiceImpl
from ._tasks import start_task, stop_tasks
from ._tunnel import Tunnel, TunnelSettings

logger = logging.getLogger(__name__)

__all__ = ["Agent", "AgentSettings", "RootTask", "run_agent"]

#: A long-running part of the agent that ends the agent when it ends (e.g. tunnel supervision).
RootTask = Callable[["Agent"], Coroutine[Any, Any, None]]


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
    #: Limits and timeouts of exec and port-forward sessions (``runtime`` in otterscale.yaml).
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    #: Where the audit events of exec and port-forward sessions go (``audit`` in otterscale.yaml).
    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)


class Agent:
    """One running agent; use ``async with Agent(settings) as agent``.

    ``readiness`` decides ``GET /readyz`` (None when ready, else the reason); without one the
    agent is ready while it serves. Either way it is not ready once stopping.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        connection: KubeConnection | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.settings = settings
        self._connection = connection
        self._readiness = readiness
        self._stopping = False
        self._client: KubeClient | None = None
        self._service: ResourceServiceImpl | None = None
        self._runtime: RuntimeServiceImpl | None = None
        self._audit: AuditLog | None = None
        self.metrics = AgentMetrics()
        self._server_stop = asyncio.Event()
        self._server_task: asyncio.Task[None] | None = None
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

    @property
    def server_task(self) -> asyncio.Task[None]:
        if self._server_task is None:
            raise RuntimeError("agent is not running")
        return self._server_task

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
            interceptors = [
                # Outermost: an unsigned call never reaches a handler.
                IdentityInterceptor(
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
            sock = create_listener(settings.host, settings.port)
            bound = sock.getsockname()
            self.host, self.port = (settings.host, int(bound[1]))
            started = asyncio.Event()
            self._server_task = start_task(
                serve(
                    make_asgi_app(
                        connect_app, on_startup=started.set, readiness=self.readiness, metrics=self.metrics
                    ),
                    sock,
                    self._server_stop,
                    graceful_timeout=GRACEFUL_TIMEOUT,
                ),
                name="agent-http-server",
            )
            await _wait_started(started, self._server_task)
        except BaseException:
            await self.stop()
            raise
        logger.info("agent for cluster %s serving on %s", settings.cluster, self.url)

    async def stop(self) -> None:
        """End Watches, stop accepting, drain (bounded), close the Kubernetes client. Idempotent."""
        self._stopping = True
        if self._service is not None:
            self._service.shutdown()
        if self._runtime is not None:
            self._runtime.shutdown()
        self._server_stop.set()
        if self._server_task is not None and not self._server_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._server_task), GRACEFUL_TIMEOUT + 2.0)
            except TimeoutError:
                logger.warning("HTTP server did not stop in time; cancelling it")
                await stop_tasks([self._server_task], grace=2.0)
            except Exception:  # noqa: S110 - already logged by the task's done callback
                pass
        await stop_tasks(self._background, grace=2.0)
        if self._audit is not None:
            self._audit.close()
        if self._client is not None:
            await self._client.close()
            self._client = None


async def _wait_started(started: asyncio.Event, server: asyncio.Task[None], limit: float = 10.0) -> None:
    """Return once hypercorn has started the app (lifespan startup), or raise its failure.

    The socket already listens, so connections made from here on are queued and then served.
    """
    waiter = asyncio.ensure_future(started.wait())
    try:
        done, _ = await asyncio.wait({waiter, server}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if server in done:
        server.result()  # raises the server's failure
        raise RuntimeError("HTTP server ended during start-up")
    if not done:
        raise TimeoutError(f"HTTP server did not start within {limit:.0f}s")


async def run_agent(
    settings: AgentSettings,
    stop: asyncio.Event,
    *,
    root_tasks: Mapping[str, RootTask] | None = None,
    on_ready: Callable[[Agent], None] | None = None,
) -> int:
    """Run an agent until ``stop`` is set (exit status 0) or a root task ends (status 1).

    With ``settings.tunnel`` the tunnel is a root task (named ``tunnel``) and decides
    ``/readyz``. ``on_ready`` is called once the agent serves (before the tunnel is up).
    """
    tunnel = Tunnel(settings.tunnel) if settings.tunnel is not None else None
    tasks: dict[str, RootTask] = {"tunnel": tunnel.run} if tunnel is not None else {}
    tasks.update(root_tasks or {})
    async with Agent(settings, readiness=tunnel.readiness if tunnel is not None else None) as agent:
        if on_ready is not None:
            on_ready(agent)
        stopper = start_task(stop.wait(), name="agent-stop-request", forever=False)
        roots: list[asyncio.Task[Any]] = [agent.server_task, stopper]
        roots += [start_task(root(agent), name=name) for name, root in tasks.items()]
        done, _ = await asyncio.wait(roots, return_when=asyncio.FIRST_COMPLETED)
        requested = stopper in done
        if not requested:
            ended = ", ".join(task.get_name() for task in done)
            logger.error("agent stopping: %s ended unexpectedly", ended)
        else:
            logger.info("agent stopping (requested)")
        await stop_tasks([t for t in roots if t is not agent.server_task], grace=3.0)
    logger.info("agent stopped")
    return 0 if requested else 1
