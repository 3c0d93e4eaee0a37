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
- on the applications that serve a call here (the proxy's and the hub-served ones, not the
  forwarder's: the leader that serves a forwarded call audits it), the audit trail's interceptors
  (:mod:`._audit`), which audit every method of every registered service from its descriptor;
- gRPC health and reflection (describing every service above), ``/metrics``, ``/healthz`` and
  ``/readyz``, all answered by this replica itself (:class:`~._server.Router`).
- in front of everything, the CORS layer for browser pages of other origins (:mod:`._cors`),
  then the guard that keeps the forwarding headers only when another replica signed them
  (:mod:`._replicas`), before anything reads a header, then the bound on calls in progress per
  caller address (:class:`~._limits.PeerLimit`).

Authentication: :class:`~._auth.AuthInterceptor` verifies the caller of every API service from
the headers before the request body is read, on followers too (after the audit trail's metadata
interceptor, so a refused call is still audited); the handlers take that identity.

The management router (``/metrics``, per-cluster health) is its own application, served on the
management address only.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from connectrpc.interceptor import Interceptor, MetadataInterceptor
from google.protobuf.descriptor import ServiceDescriptor  # type: ignore[import-untyped]  # no stubs

from otterscale.common import ASGIApp, AuditLog, OIDCVerifier, OtterscaleConfig, streaming_methods

from ._access import AccessPolicy
from ._audit import AuditTrail, audited_methods
from ._auth import Authenticator, AuthInterceptor
from ._cors import with_cors
from ._errors import HubError
from ._forward import LeaderForwarder
from ._health import HEALTH_SERVICE, HealthASGIApplication, HealthService, health_file
from ._limits import BoundedGzipCompression, ClientLimits, HubLimits, PeerLimit
from ._metrics import HubMetrics
from ._observe import ObservingInterceptor
from ._passthrough import PassThroughApplication, Relay
from ._proxy import ClusterProxy
from ._reflection import reflection_apps
from ._replicas import ReplicaHeaderGuard, ReplicaSigner, replica_key
from ._routes import Route, RouteError, cluster_routes, hub_routes, routes_by_procedure
from ._server import Router, Switch
from ._services import READ_METHODS, HubService, ServiceContext
from ._tunnels import Tunnels
from ._upstream import AgentClients

if TYPE_CHECKING:
    # Types only: the Kubernetes client it uses is loaded only for --leader-elect (start-up time).
    from ._leader import Leadership

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
        # Everything that can refuse a registration first, before any file is opened.
        routed = [(descriptor, cluster_routes(descriptor)) for descriptor in routed_services]
        served = [(service, hub_routes(service.descriptor)) for service in hub_services]
        names = [descriptor.full_name for descriptor, _ in routed]
        names += [service.descriptor.full_name for service, _ in served]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise RouteError(f"service {', '.join(twice)} is registered twice")
        try:
            #: Signs the forwarding headers of a follower, checks those a leader receives.
            self.replicas = ReplicaSigner(replica_key(config))
            audit_log = AuditLog.from_config(config.audit)
        except OSError as exc:
            raise HubError(f"cannot open {exc.filename or 'a file'}: {exc.strerror or exc}") from exc
        #: Every method of every registered service, audited by the replica that serves the call.
        self.audit = AuditTrail(
            audit_log,
            audited_methods(
                [*routed, *((service.descriptor, routes) for service, routes in served)], reads=READ_METHODS
            ),
            replica=leadership.identity if leadership is not None else socket.gethostname(),
        )
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

        def health(clusters: bool) -> HealthService:
            return HealthService(
                tunnels,
                serving=ready,
                resources_serving=serves_tunnels,
                routed=names[: len(routed)],
                served=names[len(routed) :],
                clusters=clusters,
            )

        #: The API's health: the hub and its services, not the clusters.
        self.health = health(clusters=False)
        #: The management address's health, per cluster too.
        self.management_health = health(clusters=True)
        self.forwarder = (
            LeaderForwarder(leadership, metrics, self.replicas) if leadership is not None else None
        )
        observing = ObservingInterceptor(metrics)
        #: Health's and reflection's interceptors (anyone may call them).
        self._interceptors: tuple[Interceptor, ...] = (observing,)
        # The caller is authenticated before the body is read: a metadata interceptor among the
        # leading ones, which connectrpc runs before reading the body.
        auth: tuple[Interceptor, ...] = (AuthInterceptor(self.authenticator),)
        #: The forwarder's (a follower authenticates too, the leader audits what it forwards; the
        #: follower audits what it refuses itself).
        self._forwarding: tuple[Interceptor, ...] = (observing, self.audit.refusals(), *auth)
        audit = self.audit.interceptors()
        first = tuple(i for i in audit if isinstance(i, MetadataInterceptor))
        then = tuple(i for i in audit if not isinstance(i, MetadataInterceptor))
        #: Those of the applications that serve a call on this replica: the audit trail's too.
        self._serving: tuple[Interceptor, ...] = (observing, *first, *auth, *then)
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
            interceptors=self._serving,
            config=config,
            watch_slots=self.proxy.watch_slots,
            on_unreachable=on_unreachable,
            compressions=(self._gzip,),
            access=self.access,
        )
        self._stream_owners = context.stream_owners
        services: dict[str, ASGIApp] = {}
        for descriptor, routes in routed:
            local = self._pass_through(descriptor, routes, self.proxy, self._serving)
            self._add(services, descriptor, local, routes)
        for service, routes in served:
            self._add(services, service.descriptor, service.application(context), routes)
        health_app = HealthASGIApplication(self.health, interceptors=self._interceptors)
        services[_service_name(health_app.path)] = health_app  # type: ignore[assignment]
        management_services: dict[str, ASGIApp] = {
            HEALTH_SERVICE: HealthASGIApplication(  # type: ignore[dict-item]
                self.management_health, interceptors=self._interceptors
            )
        }
        described = [
            *(descriptor for descriptor, _ in routed),
            *(service.descriptor for service, _ in served),
            health_file().services_by_name["Health"],
        ]
        for app in reflection_apps(described, interceptors=self._interceptors):
            services[_service_name(app.path)] = app  # type: ignore[assignment]
        router = Router(
            services,
            metrics=None,
            ready=ready,
            on_startup=on_started,
            read_body=False,
        )
        #: The hub's ASGI application. CORS outermost: preflights before auth, on followers too;
        #: then the forwarding headers are trusted only when another replica signed them, before
        #: anything reads them.
        #: Then the per-address bound (after the guard: it counts a forwarded call for its caller).
        self.router: ASGIApp = with_cors(
            ReplicaHeaderGuard(
                PeerLimit(router, self._limits.max_requests_per_peer, on_refused=self._refused),
                self.replicas,
            ),
            config.cors,
        )
        #: ``/metrics``, readiness and the per-cluster health (the management address).
        self.management: ASGIApp = Router(
            management_services, metrics=metrics.render, ready=ready, read_body=False
        )

    def drain(self) -> None:
        """Shutdown begins: health says NOT_SERVING; new streams are refused, open ones end."""
        self.health.close()
        self.management_health.close()
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
        """Close the connections to the leader, the token verifier and the audit trail (after
        serving stopped)."""
        if self.forwarder is not None:
            await self.forwarder.aclose()
        await self.authenticator.aclose()
        self.audit.close()

    # ----------------------------------------------------------------------------------------------

    def _refused(self, reason: str) -> None:
        self._metrics.limit_refusals.labels(reason=reason).inc()

    def _pass_through(
        self,
        descriptor: ServiceDescriptor,
        routes: list[Route],
        relay: Relay,
        interceptors: tuple[Interceptor, ...],
    ) -> ASGIApp:
        return PassThroughApplication(  # type: ignore[return-value]
            descriptor,
            routes,
            relay,
            interceptors=interceptors,
            compressions=[self._gzip],
            # Bounds a compressed request once inflated (ClientLimits bounds the wire bytes).
            read_max_bytes=self._limits.max_request_bytes,
        )

    def _add(
        self, services: dict[str, ASGIApp], descriptor: ServiceDescriptor, local: ASGIApp, routes: list[Route]
    ) -> None:
        """Serve ``descriptor``'s service: ``local`` while leading, else forwarded; limits in front."""
        app = local
        if self.forwarder is not None:
            # Followers forward every service to the leader (pass-through codecs, nothing decoded);
            # the leader audits the call, the follower does not.
            forward = self._pass_through(descriptor, routes, self.forwarder, self._forwarding)
            app = Switch(local, forward, self._leading)
        # Request size and slow stream clients are bounded for leader and follower alike.
        services[descriptor.full_name] = ClientLimits(
            app,
            self._limits,
            on_refused=self._refused,
            routes=routes_by_procedure(routes),
        )


def _service_name(path: str) -> str:
    return path.strip("/")


#: The streaming methods of the services every hub serves besides the registered ones.
_OWN_STREAMING = (
    f"/{HEALTH_SERVICE}/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
_OWN_REQUEST_STREAMING = _OWN_STREAMING[1:]


def streaming_procedures(
    routed: Iterable[ServiceDescriptor], hub_services: Iterable[HubService]
) -> tuple[frozenset[str], frozenset[str]]:
    """The procedures whose answers stream and those whose requests stream, of every service a hub
    with ``routed`` and ``hub_services`` serves (from their descriptors)."""
    answers, requests = streaming_methods([*routed, *(service.descriptor for service in hub_services)])
    return answers | set(_OWN_STREAMING), requests | set(_OWN_REQUEST_STREAMING)
