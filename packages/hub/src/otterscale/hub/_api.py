"""The API side of the hub: every service it serves, assembled into its one ASGI application.

:class:`Api` builds, once at start-up:

- one pass-through application per cluster-routed service (:data:`._services.ROUTED_SERVICES`,
  or the hub's settings), built from the service's descriptor and served by the proxy to the
  agents (:mod:`._proxy`);
- the application of each hub-served service (:data:`._services.HUB_SERVICES`);
- with leader election, a pass-through application per service served by the forwarder to the
  leader (:mod:`._forward`), and a :class:`~._server.Switch` per service that picks, per request,
  serving (leader) or forwarding (follower);
- in front of each API service, the client limits (:class:`~._limits.ClientLimits`: request
  size, slow stream clients); on every service, the observing interceptor (request id, access
  log, metrics);
- gRPC health and reflection (describing every service above), ``/metrics``, ``/healthz`` and
  ``/readyz``, all answered by this replica itself (:class:`~._server.Router`).
- in front of everything, the CORS layer for browser pages of other origins (:mod:`._cors`).

Authentication happens in the handlers (the proxy, the forwarder's leader, the hub-served
services), after routing by path but before anything is passed on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from connectrpc.interceptor import Interceptor
from google.protobuf.descriptor import ServiceDescriptor  # type: ignore[import-untyped]  # no stubs

from otterscale.common import ASGIApp, OIDCVerifier, OtterscaleConfig

from ._access import AccessPolicy
from ._auth import Authenticator
from ._cors import with_cors
from ._forward import LeaderForwarder
from ._health import HealthASGIApplication, HealthService, health_file
from ._leader import Leadership
from ._limits import BoundedGzipCompression, ClientLimits, HubLimits
from ._metrics import HubMetrics
from ._observe import ObservingInterceptor
from ._passthrough import PassThroughApplication, Relay
from ._proxy import ClusterProxy
from ._reflection import reflection_apps
from ._routes import Route, RouteError, cluster_routes, hub_routes, routes_by_procedure
from ._server import Router, Switch
from ._services import HubService, ServiceContext
from ._tunnels import Tunnels
from ._upstream import AgentClients

logger = logging.getLogger(__name__)


class Api:
    """Every service of one hub and the router in front of them (see the module docstring)."""

    def __init__(
        self,
        config: OtterscaleConfig,
        *,
        limits: HubLimits,
        keys: Mapping[str, bytes],
        metrics: HubMetrics,
        tunnels: Tunnels,
        agents: AgentClients,
        routed_services: Iterable[ServiceDescriptor],
        hub_services: Iterable[HubService],
        leadership: Leadership | None,
        leading: Callable[[], bool],
        ready: Callable[[], bool],
        serves_tunnels: Callable[[], bool],
        on_started: Callable[[], None],
        on_unreachable: Callable[[str], None],
    ) -> None:
        self._limits = limits
        self._metrics = metrics
        self._leading = leading
        routed = list(routed_services)
        served = list(hub_services)
        self.authenticator = Authenticator(OIDCVerifier.from_config(config.keycloak))
        #: Which clusters each caller may use, for every service (``access`` in otterscale.yaml).
        self.access = AccessPolicy(config.access, {name: c.labels for name, c in config.clusters.items()})
        self.proxy = ClusterProxy(
            authenticator=self.authenticator,
            tunnels=tunnels,
            agents=agents,
            keys=keys,
            metrics=metrics,
            limits=limits,
            on_unreachable=on_unreachable,
            access=self.access,
        )
        self.health = HealthService(
            tunnels,
            serving=ready,
            resources_serving=serves_tunnels,
            routed=[service.full_name for service in routed],
            served=[service.descriptor.full_name for service in served],
        )
        self.forwarder = LeaderForwarder(leadership, metrics) if leadership is not None else None
        self._interceptors: tuple[Interceptor, ...] = (ObservingInterceptor(metrics),)
        # gzip only when the caller asks for it, at the fastest level: responses can be large
        # (a List of thousands of objects) and the hub should stay close to a plain relay. A
        # compressed request is inflated up to the request limit only.
        self._gzip = BoundedGzipCompression(level=1, on_refused=self._refused)
        context = ServiceContext(
            authenticator=self.authenticator,
            tunnels=tunnels,
            agents=agents,
            keys=keys,
            metrics=metrics,
            limits=limits,
            interceptors=self._interceptors,
            config=config,
            watch_slots=self.proxy.watch_slots,
            on_unreachable=on_unreachable,
            compressions=(self._gzip,),
            access=self.access,
        )
        self._stream_owners = context.stream_owners
        services: dict[str, ASGIApp] = {}
        for descriptor in routed:
            routes = cluster_routes(descriptor)
            self._add(services, descriptor, self._pass_through(descriptor, routes, self.proxy), routes)
        for service in served:
            self._add(
                services, service.descriptor, service.application(context), hub_routes(service.descriptor)
            )
        health_app = HealthASGIApplication(self.health, interceptors=self._interceptors)
        services[_service_name(health_app.path)] = health_app  # type: ignore[assignment]
        described = [
            *routed,
            *(service.descriptor for service in served),
            health_file().services_by_name["Health"],
        ]
        for app in reflection_apps(described, interceptors=self._interceptors):
            services[_service_name(app.path)] = app  # type: ignore[assignment]
        router = Router(services, metrics=metrics.render, ready=ready, on_startup=on_started)
        #: The hub's ASGI application; CORS outermost: before auth, on followers too.
        self.router: ASGIApp = with_cors(router, config.cors)

    def drain(self) -> None:
        """Shutdown begins: health says NOT_SERVING; new streams are refused, open ones end."""
        self.health.close()
        self.proxy.drain()
        for owner in self._stream_owners:
            owner.drain()
        if self.forwarder is not None:
            self.forwarder.drain()

    def end_streams(self) -> None:
        """This replica stopped leading: end the streams it served (the agents go with the tunnels)."""
        self.proxy.end_streams()
        for owner in self._stream_owners:
            owner.end_streams()

    def leader_changed(self) -> None:
        """The known leader changed: end the calls forwarded to a former one."""
        if self.forwarder is not None:
            self.forwarder.leader_changed()

    async def aclose(self) -> None:
        """Close the connections to the leader and the token verifier (after serving stopped)."""
        if self.forwarder is not None:
            await self.forwarder.aclose()
        await self.authenticator.aclose()

    # ----------------------------------------------------------------------------------------------

    def _refused(self, reason: str) -> None:
        self._metrics.limit_refusals.labels(reason=reason).inc()

    def _pass_through(self, descriptor: ServiceDescriptor, routes: list[Route], relay: Relay) -> ASGIApp:
        return PassThroughApplication(  # type: ignore[return-value]
            descriptor,
            routes,
            relay,
            interceptors=self._interceptors,
            compressions=[self._gzip],
            # Bounds a compressed request once inflated (ClientLimits bounds the wire bytes).
            read_max_bytes=self._limits.max_request_bytes,
        )

    def _add(
        self, services: dict[str, ASGIApp], descriptor: ServiceDescriptor, local: ASGIApp, routes: list[Route]
    ) -> None:
        """Serve ``descriptor``'s service: ``local`` while leading, else forwarded; limits in front."""
        name = descriptor.full_name
        if name in services:
            raise RouteError(f"service {name} is registered twice")
        app = local
        if self.forwarder is not None:
            # Followers forward every service to the leader (pass-through codecs, nothing decoded).
            forward = self._pass_through(descriptor, routes, self.forwarder)
            app = Switch(local, forward, self._leading)
        # Request size and slow stream clients are bounded for leader and follower alike.
        services[name] = ClientLimits(
            app, self._limits, on_refused=self._refused, routes=routes_by_procedure(routes)
        )


def _service_name(path: str) -> str:
    return path.strip("/")
