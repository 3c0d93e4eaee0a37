"""The services the hub serves: the one place where a service is registered.

Two kinds, each a list entry:

- **cluster-routed** (:data:`ROUTED_SERVICES`): served by the agents; the hub forwards every
  method of the service to the agent of the cluster each call names (:mod:`._proxy`), from the
  service's descriptor alone. The .proto says where a request names its cluster (field 1
  ``cluster`` by default, else the ``(otterscale.routing.v1.route)`` method option, see
  :mod:`._routes`). Adding a service to the agents means adding its descriptor here: no handler,
  no client, no code per RPC.
- **hub-served** (:data:`HUB_SERVICES`): answered by the hub itself (ClusterService from its own
  state; MultiClusterService by sending each cluster's part to that cluster's agent,
  :mod:`._fanout`). A :class:`HubService` pairs the descriptor with a factory of the ASGI
  application that serves it on the leader (or a hub alone); followers forward its calls to the
  leader, from the descriptor too (:mod:`._forward`). They are never forwarded to an agent. A
  service that keeps streams open registers a :class:`StreamOwner` in its context, so the hub
  ends those streams when it shuts down or stops leading.

Both kinds get the same front: authentication in the handlers, the client limits, the access log
and metrics, the audit trail, reflection and health.

The audit trail (:mod:`._audit`) covers every method of every service registered here, from its
descriptor: a method is audited always, unless it is a read (:data:`READ_METHODS`, or
``option idempotency_level = NO_SIDE_EFFECTS`` in its .proto), which is audited only at
``audit.reads: metadata``. So a new service or RPC is audited as a write until it is declared
a read here: no audit code per RPC.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from connectrpc.compression import Compression
from connectrpc.interceptor import Interceptor
from google.protobuf.descriptor import ServiceDescriptor  # type: ignore[import-untyped]  # no stubs

from otterscale.cluster.v1 import cluster_pb2
from otterscale.cluster.v1.cluster_connect import ClusterServiceASGIApplication
from otterscale.common import ASGIApp, OtterscaleConfig
from otterscale.resource.v1 import multicluster_pb2, resource_pb2
from otterscale.resource.v1.multicluster_connect import MultiClusterServiceASGIApplication
from otterscale.runtime.v1 import runtime_pb2

from ._access import AccessPolicy
from ._auth import Authenticator
from ._clusters import ClusterServiceImpl
from ._codec import CODEC_JSON, CODEC_PROTO, PassthroughCodec
from ._metrics import HubMetrics
from ._tunnels import Tunnels

if TYPE_CHECKING:  # both import the limits, which read this registry
    from ._limits import HubLimits, WatchSlots
    from ._upstream import AgentClients

logger = logging.getLogger(__name__)

#: Services served by the agents and forwarded by cluster (one entry per service).
ROUTED_SERVICES: tuple[ServiceDescriptor, ...] = (
    resource_pb2.DESCRIPTOR.services_by_name["ResourceService"],
    runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"],
)

#: Methods of the registered services that only read but whose .proto cannot say so
#: (``idempotency_level = NO_SIDE_EFFECTS`` would also turn on Connect GET, which the API does not
#: offer for them): audited only at ``audit.reads: metadata``. Every method not listed here and not
#: marked NO_SIDE_EFFECTS is audited always (see the module docstring).
#: The runtime's session traffic (WriteTTY, ResizeTTY, WritePortForward) is listed too, though
#: it writes: one event per keystroke would bury the trail, and the session is audited already,
#: by the hub at the end of its ExecuteTTY or PortForward call and by the agent at its start and end.
READ_METHODS: frozenset[str] = frozenset(
    [
        *(
            f"/otterscale.resource.v1.ResourceService/{method}"
            for method in ("Discovery", "Schema", "List", "Get", "Describe", "Watch")
        ),
        *(
            f"/otterscale.runtime.v1.RuntimeService/{method}"
            for method in ("PodLog", "GetScale", "WriteTTY", "ResizeTTY", "WritePortForward")
        ),
    ]
)


class StreamOwner(Protocol):
    """A hub-served service's streams, which the hub ends (after a last word) when it must."""

    def drain(self) -> None:
        """The hub shuts down: end the open streams, refuse new ones."""

    def end_streams(self) -> None:
        """This replica stopped leading: end the open streams."""


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """What the application of a hub-served service may use (built once at start-up)."""

    authenticator: Authenticator
    tunnels: Tunnels
    agents: AgentClients
    keys: Mapping[str, bytes]
    metrics: HubMetrics
    limits: HubLimits
    #: The hub's interceptors (request id, access log, metrics, audit trail): pass them to the
    #: application.
    interceptors: tuple[Interceptor, ...]
    #: The whole configuration (a service's own sections: ``fanout``, ``access``...).
    config: OtterscaleConfig
    #: Streams per subject (``limits.max_watches_per_subject``), shared with the proxy.
    watch_slots: WatchSlots
    #: Call when an agent could not be reached (the hub probes it at once).
    on_unreachable: Callable[[str], None]
    #: The hub's compressions (gzip bounded by the request limit).
    compressions: Sequence[Compression] = ()
    #: Which clusters each caller may use (``access``); None: everyone, every cluster.
    access: AccessPolicy | None = None
    #: Register here what keeps streams open (see :class:`StreamOwner`).
    stream_owners: list[StreamOwner] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HubService:
    """A service the hub answers itself: its descriptor and the factory of its ASGI application."""

    descriptor: ServiceDescriptor
    application: Callable[[ServiceContext], ASGIApp]


def _cluster_service(context: ServiceContext) -> ASGIApp:
    service = ClusterServiceImpl(
        authenticator=context.authenticator, tunnels=context.tunnels, access=context.access
    )
    app: ASGIApp = ClusterServiceASGIApplication(service, interceptors=context.interceptors)
    return app


def _multicluster_service(context: ServiceContext) -> ASGIApp:
    from ._fanout import Fanout  # imports the limits, which import this registry

    fanout = Fanout(
        context.config,
        authenticator=context.authenticator,
        tunnels=context.tunnels,
        agents=context.agents,
        keys=context.keys,
        metrics=context.metrics,
        limits=context.limits,
        watch_slots=context.watch_slots,
        on_unreachable=context.on_unreachable,
        access=context.access,
    )
    context.stream_owners.append(fanout)
    # Pass-through codecs: requests are decoded by the service, answers are spliced from the
    # agents' bytes in the caller's codec (see _fanout.wire).
    app: ASGIApp = MultiClusterServiceASGIApplication(  # type: ignore[assignment]
        fanout.service,  # type: ignore[arg-type]
        interceptors=context.interceptors,
        codecs=[PassthroughCodec(CODEC_PROTO), PassthroughCodec(CODEC_JSON)],
        compressions=list(context.compressions),
        read_max_bytes=context.limits.max_request_bytes,
    )
    return app


#: Services the hub answers itself (one entry per service).
HUB_SERVICES: tuple[HubService, ...] = (
    HubService(cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"], _cluster_service),
    HubService(multicluster_pb2.DESCRIPTOR.services_by_name["MultiClusterService"], _multicluster_service),
)


def routed_service(spec: str) -> ServiceDescriptor:
    """The descriptor ``MODULE:SERVICE`` names (a generated ``_pb2`` module and a service in it):
    a cluster-routed service added by name (tests; see :func:`otterscale.hub.main`)."""
    module_name, _, service = spec.partition(":")
    if not module_name or not service:
        raise ValueError(f"{spec!r}: expected MODULE:SERVICE")
    module = importlib.import_module(module_name)
    try:
        return module.DESCRIPTOR.services_by_name[service]
    except KeyError:
        raise ValueError(f"{spec!r}: {module_name} has no service {service}") from None


def hub_service(spec: str) -> HubService:
    """The hub-served service ``MODULE:SERVICE=MODULE:FACTORY`` names (see :func:`routed_service`)."""
    service, _, factory = spec.partition("=")
    module_name, _, name = factory.partition(":")
    if not module_name or not name:
        raise ValueError(f"{spec!r}: expected MODULE:SERVICE=MODULE:FACTORY")
    application = getattr(importlib.import_module(module_name), name, None)
    if not callable(application):
        raise ValueError(f"{spec!r}: {module_name} has no factory {name}")
    return HubService(routed_service(service), application)
